"""The layer between render() and the API server: apply, prune, status."""
