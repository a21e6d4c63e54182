"""Network exposure: NetworkPolicy for the API pods and an optional Ingress."""

from __future__ import annotations

from typing import Any

from ..api import GATEWAY_API
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


def http_route(ctx: Ctx) -> dict[str, Any] | None:
    """spec.gateway: an HTTPRoute for the public paths. With a live canary it splits requests
    between the two track Services by weight; else it sends them all to the main Service."""
    gw = ctx.spec.gateway
    if gw is None or not ctx.gateway_routing:
        return None
    port = ctx.spec.service.port
    p = ctx.plan
    if p.canary is not None:
        backends = [
            {"name": ctx.child("stable"), "port": port, "weight": 100 - p.route_weight},
            {"name": ctx.child("canary"), "port": port, "weight": p.route_weight},
        ]
    else:
        backends = [{"name": ctx.name, "port": port}]
    kinds = {"Prefix": "PathPrefix", "Exact": "Exact"}
    parents = []
    for ref in gw.parent_refs:
        parent: dict[str, Any] = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": ref.name}
        if ref.namespace:
            parent["namespace"] = ref.namespace
        if ref.section_name:
            parent["sectionName"] = ref.section_name
        parents.append(parent)
    spec: dict[str, Any] = {
        "parentRefs": parents,
        "rules": [
            {
                "matches": [{"path": {"type": kinds[kind], "value": path}} for path, kind in PUBLIC_PATHS],
                "backendRefs": backends,
            }
        ],
    }
    if gw.hostnames:
        spec["hostnames"] = list(gw.hostnames)
    return {"apiVersion": GATEWAY_API, "kind": "HTTPRoute", "metadata": ctx.meta(ctx.name, COMPONENT), "spec": spec}
