"""Network exposure: NetworkPolicy for the API pods and an optional Ingress."""

from __future__ import annotations

from typing import Any

from .context import HTTP_PORT, Ctx
from .workload import COMPONENT


def network_policy(ctx: Ctx) -> dict[str, Any]:
    """Only the HTTP port is reachable; egress stays open (model downloads, Redis, JWKS)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": ctx.meta(ctx.name, COMPONENT),
        "spec": {
            "podSelector": {"matchLabels": ctx.selector(COMPONENT)},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"port": HTTP_PORT, "protocol": "TCP"}]}],
        },
    }


def ingress(ctx: Ctx) -> dict[str, Any] | None:
    ing = ctx.spec.ingress
    if not ing.enabled:
        return None
    spec: dict[str, Any] = {
        "rules": [
            {
                "host": ing.host,
                "http": {
                    "paths": [
                        {
                            "path": ing.path,
                            "pathType": "Prefix",
                            "backend": {"service": {"name": ctx.name, "port": {"name": "http"}}},
                        }
                    ]
                },
            }
        ],
    }
    if ing.class_name:
        spec["ingressClassName"] = ing.class_name
    if ing.tls:
        spec["tls"] = [{"hosts": [ing.host], "secretName": ing.tls.secret_name}]
    meta = ctx.meta(ctx.name, COMPONENT)
    if ing.annotations:
        meta["annotations"] = dict(sorted(ing.annotations.items()))
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta, "spec": spec}
