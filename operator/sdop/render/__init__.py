"""Desired state as a pure function: ``render(cr) -> list of Kubernetes objects``.

No network, no clock, no randomness: the operator applies exactly this list and
``sdop render`` prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..api import (
    CUSTOM_METRICS_API,
    GATEWAY_API,
    KEDA_API,
    KEDA_HTTP_API,
    MONITORING_API,
    StableDiffusionService,
    kind_of,
    load,
)
from . import config, dashboard, monitoring, network, redis, rollout, scaling, storage, workload
from .context import ClusterFacts, Ctx, digest

# Order matters only for humans reading `sdop render`: dependencies first.
_BUILDERS: tuple[Callable[[Ctx], dict[str, Any] | None], ...] = (
    workload.service_account,
    config.configmap,
    storage.cache_pvc,
    storage.prefetch_job,
    redis.redis_deployment,
    redis.redis_service,
    redis.redis_network_policy,
    workload.deployment,
    workload.service,
    workload.track_service,
    workload.pod_disruption_budget,
    scaling.hpa,
    scaling.scaled_object,
    scaling.http_scaled_object,
    scaling.wake_service,
    network.network_policy,
    network.ingress,
    network.http_route,
    monitoring.service_monitor,
    monitoring.prometheus_rule,
    dashboard.dashboard_configmap,
)

#: What a canary adds: its own settings, prefetch Job, Deployment and (behind a Gateway) Service.
_CANARY_BUILDERS: tuple[Callable[[Ctx], dict[str, Any] | None], ...] = (
    config.configmap,
    storage.prefetch_job,
    workload.deployment,
    workload.track_service,
)


def render(obj: dict[str, Any] | StableDiffusionService, facts: ClusterFacts | None = None) -> list[dict[str, Any]]:
    cr = load(obj)
    facts = facts or ClusterFacts()
    plan = rollout.plan(cr)
    ctx = Ctx(rollout.with_model(cr, plan.stable), facts, rollout_plan=plan)
    out = [o for o in (build(ctx) for build in _BUILDERS) if o is not None]
    if plan.canary is not None:
        canary = Ctx(rollout.with_model(cr, plan.canary), facts, track="canary", rollout_plan=plan)
        names = {(o["kind"], o["metadata"]["name"]) for o in out}
        for o in (build(canary) for build in _CANARY_BUILDERS):
            # The same prefetch Job for both tracks (the same model in the same cache) is one Job.
            if o is not None and (o["kind"], o["metadata"]["name"]) not in names:
                out.append(o)
    for o in out:
        row = kind_of(o["kind"])  # a builder of a kind missing from sdop.api.kinds fails here, in every test
        if not row.managed or row.api_version != o["apiVersion"]:
            raise ValueError(f"{o['kind']} {o['apiVersion']} does not match its row in sdop.api.kinds")
    return out


def required_apis(cr: StableDiffusionService) -> list[str]:
    """The optional APIs this spec needs; without them the objects that need them are not rendered."""
    s = cr.spec
    need = []
    if s.monitoring.service_monitor or s.monitoring.prometheus_rule:
        need.append(MONITORING_API)
    if s.autoscaling.enabled:
        need.append(KEDA_API if s.autoscaling.provider == "keda" else CUSTOM_METRICS_API)
        if s.autoscaling.provider == "keda" and s.autoscaling.scale_to_zero:
            need.append(KEDA_HTTP_API)
    if s.gateway is not None:
        need.append(GATEWAY_API)
    return need


__all__ = ["ClusterFacts", "Ctx", "digest", "render", "required_apis"]
