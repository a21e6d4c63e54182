"""Desired state as a pure function: ``render(cr) -> list of Kubernetes objects``.

No network, no clock, no randomness: the operator applies exactly this list and
``sdop render`` prints it.
"""

from __future__ import annotations

from typing import Any

from ..api import SpecError, StableDiffusionService, parse
from ..api.semantics import problems
from . import config, dashboard, monitoring, network, redis, scaling, storage, workload
from .context import ClusterFacts, Ctx

# Order matters only for humans reading `sdop render`: dependencies first.
_BUILDERS = (
    workload.service_account,
    config.configmap,
    storage.cache_pvc,
    storage.prefetch_job,
    redis.redis_deployment,
    redis.redis_service,
    redis.redis_network_policy,
    workload.deployment,
    workload.service,
    workload.pod_disruption_budget,
    scaling.hpa,
    scaling.scaled_object,
    network.network_policy,
    network.ingress,
    monitoring.service_monitor,
    monitoring.prometheus_rule,
    dashboard.dashboard_configmap,
)


def load(obj: dict[str, Any] | StableDiffusionService) -> StableDiffusionService:
    """Parse a CR and apply the rules the CRD schema cannot express; SpecError names the fields."""
    cr = obj if isinstance(obj, StableDiffusionService) else parse(obj)
    found = problems(cr.spec)
    if found:
        raise SpecError(found)
    return cr


def render(obj: dict[str, Any] | StableDiffusionService, facts: ClusterFacts | None = None) -> list[dict[str, Any]]:
    ctx = Ctx(load(obj), facts or ClusterFacts())
    return [o for o in (build(ctx) for build in _BUILDERS) if o is not None]


__all__ = ["ClusterFacts", "Ctx", "load", "render"]
