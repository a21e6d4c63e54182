"""A test Kubernetes API server that refuses what kube-apiserver refuses, where the operator depends on it.

Built on kmock's public scaffold (discovery, Status errors) with our own storage. One module
per concern: ``server`` (the request pipeline, storage, watch, finalizers, garbage
collection), ``fields`` (server-side apply field ownership), ``rules`` (defaults,
validation and immutable fields of built-in kinds), ``names`` (names, labels, annotations),
``quantity`` (canonical quantities), ``crdschema`` (custom resources: schema, defaults,
CEL), ``cluster`` (a thread running it, with kubectl-like helpers). Aimed at the behaviour
documented for kube-apiserver 1.28-1.33; see ``server`` for what is not modelled.
"""

from .cluster import Cluster
from .server import ApiServer, Fault

__all__ = ["ApiServer", "Cluster", "Fault"]
