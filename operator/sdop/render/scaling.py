"""Autoscaling on queue depth per replica: an HPA (autoscaling/v2) or a KEDA ScaledObject."""

from __future__ import annotations

from typing import Any

from ..api import KEDA_API, KEDA_HTTP_API
from .context import Ctx
from .network import PUBLIC_PATHS
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
    # Waiting plus running work: a busy replica with an empty queue is not idle. The queue depth
    # holds each replica's share of the async jobs handed off and not taken up yet, so the sum
    # counts those once (as the HPA's average over the pods does).
    return f"sum({QUEUE_METRIC}{{{sel}}}) + sum({INFLIGHT_METRIC}{{{sel}}})"


def scaled_object(ctx: Ctx) -> dict[str, Any] | None:
    """KEDA on queue depth, at least one replica. With scale to zero the HTTP add-on's own
    ScaledObject takes over (KEDA allows one ScaledObject per workload)."""
    a = ctx.spec.autoscaling
    if not ctx.autoscaled or a.provider != "keda" or ctx.scales_to_zero:
        return None
    return {
        "apiVersion": KEDA_API,
        "kind": "ScaledObject",
        "metadata": ctx.meta(ctx.name, COMPONENT),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": ctx.name},
            # Without the HTTP add-on nothing could wake a service at zero: at least one replica.
            "minReplicaCount": max(1, ctx.spec.replicas.min),
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


def http_scaled_object(ctx: Ctx) -> dict[str, Any] | None:
    """Scale from zero that wakes: the KEDA HTTP add-on counts the requests its interceptor
    holds or forwards (for sdserve, every queued or running request is one open request) and
    scales the Deployment from 0 to replicas.max; a request that arrives at zero waits in the
    interceptor (at most wakeTimeoutSeconds) until a replica is ready."""
    if not ctx.scales_to_zero:
        return None
    a, s = ctx.spec.autoscaling, ctx.spec
    hosts = [f"{ctx.wake_service}.{ctx.namespace}.svc", f"{ctx.wake_service}.{ctx.namespace}.svc.cluster.local"]
    if s.ingress.enabled and s.ingress.host:
        hosts.insert(0, s.ingress.host)
    return {
        "apiVersion": KEDA_HTTP_API,
        "kind": "HTTPScaledObject",
        "metadata": ctx.meta(ctx.name, COMPONENT),
        "spec": {
            "hosts": hosts,
            "pathPrefixes": [p for p, _ in PUBLIC_PATHS],
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": ctx.name,
                "service": ctx.name,
                "port": s.service.port,
            },
            "replicas": {"min": 0, "max": s.replicas.max},
            "scaledownPeriod": a.idle_seconds,
            # Queue depth plus the batch being computed, per replica.
            "scalingMetric": {"concurrency": {"targetValue": a.target_queue_depth + ctx.max_batch_size}},
            "timeouts": {
                "conditionWait": f"{a.wake_timeout_seconds}s",
                "responseHeader": f"{s.limits.timeout_seconds + 30}s",
            },
        },
    }


def wake_service(ctx: Ctx) -> dict[str, Any] | None:
    """The client-facing Service at scale to zero: a name for the add-on's interceptor in this
    namespace (Ingress backends cannot name a Service of another namespace)."""
    if not ctx.scales_to_zero:
        return None
    a = ctx.spec.autoscaling
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ctx.meta(ctx.wake_service, COMPONENT),
        "spec": {
            "type": "ExternalName",
            "externalName": a.interceptor_service,
            "ports": [{"name": "http", "port": a.interceptor_port, "protocol": "TCP"}],
        },
    }
