"""Autoscaling on queue depth per replica: an HPA (autoscaling/v2) or a KEDA ScaledObject."""

from __future__ import annotations

from typing import Any

from ..api import KEDA_API
from .context import Ctx
from .workload import COMPONENT

QUEUE_METRIC = "sdserve_queue_depth"
INFLIGHT_METRIC = "sdserve_inflight_requests"


def _behavior(ctx: Ctx) -> dict[str, Any]:
    a = ctx.spec.autoscaling
    return {
        "scaleUp": {
            "stabilizationWindowSeconds": a.scale_up_stabilization_seconds,
            "policies": [{"type": "Pods", "value": 4, "periodSeconds": 60}],
            "selectPolicy": "Max",
        },
        "scaleDown": {
            "stabilizationWindowSeconds": a.scale_down_stabilization_seconds,
            # A replica takes minutes to come back: remove them one at a time.
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
            "selectPolicy": "Min",
        },
    }


def hpa(ctx: Ctx) -> dict[str, Any] | None:
    a = ctx.spec.autoscaling
    if not ctx.autoscaled or a.provider != "hpa":
        return None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": ctx.meta(ctx.name, COMPONENT),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": ctx.name},
            "minReplicas": max(1, ctx.spec.replicas.min),
            "maxReplicas": ctx.spec.replicas.max,
            # Served by prometheus-adapter from the pods' own gauge (see docs/autoscaling.md).
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": QUEUE_METRIC},
                        "target": {"type": "AverageValue", "averageValue": str(a.target_queue_depth)},
                    },
                }
            ],
            "behavior": _behavior(ctx),
        },
    }


def keda_query(ctx: Ctx) -> str:
    sel = f'namespace="{ctx.namespace}",service="{ctx.name}"'
    # Waiting plus running work: a busy replica with an empty queue is not idle.
    return f"sum({QUEUE_METRIC}{{{sel}}}) + sum({INFLIGHT_METRIC}{{{sel}}})"


def scaled_object(ctx: Ctx) -> dict[str, Any] | None:
    a = ctx.spec.autoscaling
    if not ctx.autoscaled or a.provider != "keda":
        return None
    return {
        "apiVersion": KEDA_API,
        "kind": "ScaledObject",
        "metadata": ctx.meta(ctx.name, COMPONENT),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": ctx.name},
            "minReplicaCount": 0 if a.scale_to_zero else ctx.spec.replicas.min,
            "maxReplicaCount": ctx.spec.replicas.max,
            "pollingInterval": 15,
            "cooldownPeriod": a.idle_seconds,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior(ctx)}},
            "triggers": [
                {
                    "type": "prometheus",
                    "metadata": {
                        "serverAddress": a.prometheus_address,
                        "query": keda_query(ctx),
                        "threshold": str(a.target_queue_depth),
                        "activationThreshold": "0",
                    },
                }
            ],
        },
    }
