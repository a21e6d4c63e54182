"""Prometheus Operator objects: ServiceMonitor and PrometheusRule (when the API exists)."""

from __future__ import annotations

import re
from typing import Any

from ..api import MONITORING_API
from .alerts import rule_groups
from .context import Ctx
from .workload import COMPONENT, REVISION_LABEL, TRACK_LABEL


def _pod_label_meta(label: str) -> str:
    """Prometheus' name for a pod label in its Kubernetes service discovery metadata."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^A-Za-z0-9_]", "_", label)


REVISION_META = _pod_label_meta(REVISION_LABEL)
TRACK_META = _pod_label_meta(TRACK_LABEL)


def _meta(ctx: Ctx) -> dict[str, Any]:
    meta = ctx.meta(ctx.name, COMPONENT)
    meta["labels"].update(ctx.spec.monitoring.labels)
    return meta


def service_monitor(ctx: Ctx) -> dict[str, Any] | None:
    if not ctx.spec.monitoring.service_monitor or not ctx.has_api(MONITORING_API):
        return None
    return {
        "apiVersion": MONITORING_API,
        "kind": "ServiceMonitor",
        "metadata": _meta(ctx),
        "spec": {
            "selector": {"matchLabels": ctx.selector(COMPONENT)},
            "namespaceSelector": {"matchNames": [ctx.namespace]},
            "endpoints": [
                {
                    "port": "http",
                    "path": "/metrics",
                    "interval": ctx.spec.monitoring.interval,
                    # Every sdserve_* series carries the model revision of the pod that made it,
                    # and its track (stable or canary: the canary's error ratio is read by it).
                    "relabelings": [
                        {"sourceLabels": [REVISION_META], "targetLabel": "revision", "action": "replace"},
                        {"sourceLabels": [TRACK_META], "targetLabel": "track", "action": "replace"},
                    ],
                }
            ],
        },
    }


def prometheus_rule(ctx: Ctx) -> dict[str, Any] | None:
    if not ctx.spec.monitoring.prometheus_rule or not ctx.has_api(MONITORING_API):
        return None
    return {
        "apiVersion": MONITORING_API,
        "kind": "PrometheusRule",
        "metadata": _meta(ctx),
        "spec": {"groups": rule_groups(ctx)},
    }
