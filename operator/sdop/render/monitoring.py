"""Prometheus Operator objects: ServiceMonitor and PrometheusRule (when the API exists)."""

from __future__ import annotations

from typing import Any

from ..api import MONITORING_API
from .alerts import rule_groups
from .context import Ctx
from .workload import COMPONENT


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
            "endpoints": [{"port": "http", "path": "/metrics", "interval": ctx.spec.monitoring.interval}],
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
