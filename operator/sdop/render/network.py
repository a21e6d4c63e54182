"""Network exposure: NetworkPolicy for the API pods and an optional Ingress."""

from __future__ import annotations

from typing import Any

from .context import HTTP_PORT, Ctx
from .workload import COMPONENT


def network_policy(ctx: Ctx) -> dict[str, Any]:
    """Only the HTTP port is reachable, from the sources service.allowedNamespaces names (any
    when unset); with service.restrictEgress the replicas reach only DNS, HTTPS and Redis."""
    svc = ctx.spec.service
    rule: dict[str, Any] = {"ports": [{"port": HTTP_PORT, "protocol": "TCP"}]}
    if svc.allowed_namespaces is not None:
        names = sorted({ctx.namespace, *svc.allowed_namespaces})
        rule["from"] = [
            {
                "namespaceSelector": {
                    "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": names}]
                }
            }
        ]
    spec: dict[str, Any] = {
        "podSelector": {"matchLabels": ctx.selector(COMPONENT)},
        "policyTypes": ["Ingress"],
        "ingress": [rule],
    }
    if svc.restrict_egress:
        spec["policyTypes"] = ["Ingress", "Egress"]
        spec["egress"] = [
            {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
            {"ports": [{"port": 443, "protocol": "TCP"}]},
            {"ports": [{"port": 6379, "protocol": "TCP"}]},
        ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": ctx.meta(ctx.name, COMPONENT),
        "spec": spec,
    }


#: What the Ingress publishes: the OpenAI-style image API (/v1/...) and the seed's /generate.
PUBLIC_PATHS = (("/v1", "Prefix"), ("/generate", "Exact"))


def ingress(ctx: Ctx) -> dict[str, Any] | None:
    ing = ctx.spec.ingress
    if not ing.enabled:
        return None
    backend: dict[str, Any] = {"service": {"name": ctx.name, "port": {"name": "http"}}}
    if ctx.scales_to_zero:
        # Through the KEDA HTTP add-on's interceptor, which holds requests while the service wakes.
        backend = {"service": {"name": ctx.wake_service, "port": {"number": ctx.spec.autoscaling.interceptor_port}}}
    base = ing.path.rstrip("/")
    # Only the image API goes out: /metrics, /docs, /openapi.json, the probes and
    # /admin/drain stay inside the cluster.
    paths = [{"path": f"{base}{path}", "pathType": kind, "backend": backend} for path, kind in PUBLIC_PATHS]
    spec: dict[str, Any] = {"rules": [{"host": ing.host, "http": {"paths": paths}}]}
    if ing.class_name:
        spec["ingressClassName"] = ing.class_name
    if ing.tls:
        spec["tls"] = [{"hosts": [ing.host], "secretName": ing.tls.secret_name}]
    meta = ctx.meta(ctx.name, COMPONENT)
    if ing.annotations:
        meta["annotations"] = dict(sorted(ing.annotations.items()))
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta, "spec": spec}
