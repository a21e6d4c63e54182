"""sdop: a Kubernetes operator that runs Stable Diffusion as a production service."""

__version__ = "0.1.0"
