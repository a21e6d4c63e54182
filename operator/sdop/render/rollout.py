"""Which model each track serves: spec.model, or the last good model after a rollback, and the canary.

A pure function of the CR, status included: the rollback decision lives in
``status.model`` (written by ``sdop.reconcile.rollout``), so it survives an operator
restart and ``sdop render`` of a live object shows what the operator applies.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..api import StableDiffusionService
from ..api.spec.model import ModelSpec
from ..api.status import FailedModel
from .context import digest


def fingerprint(model: ModelSpec) -> str:
    """Identity of a model block: any change to it (id, revision, dtype, ...) is a new model."""
    return digest(model.model_dump(by_alias=True, mode="json"), 16)


def model_ref(model: ModelSpec) -> str:
    """How status and events name a model: id@revision, the path, or pvc:claim/subPath."""
    if model.id is not None:
        return f"{model.id}@{model.revision}"
    if model.path is not None:
        return model.path
    assert model.pvc is not None, "ModelSpec allows exactly one of id, path and pvc"
    return f"pvc:{model.pvc.claim_name}/{model.pvc.sub_path.strip('/')}".rstrip("/")


@dataclass(frozen=True)
class Plan:
    #: The model the stable Deployment runs.
    stable: ModelSpec
    #: spec.model failed and the stable Deployment runs status.model.lastGood instead.
    rolled_back: FailedModel | None
    #: The canary model (its cache replaced by the stable's), None when there is no live canary.
    canary: ModelSpec | None
    #: spec.canary.model failed: it is kept out.
    canary_rolled_back: FailedModel | None
    #: The canary's requested share of traffic, percent (0 without a live canary).
    canary_weight: int
    canary_replicas: int
    #: The canary has a ready replica (status.canary): only then does the HTTPRoute send it traffic.
    canary_serving: bool = False

    @property
    def route_weight(self) -> int:
        """The canary's weight in the HTTPRoute: none before it can answer."""
        return self.canary_weight if self.canary is not None and self.canary_serving else 0


def failed_record(cr: StableDiffusionService, model: ModelSpec) -> FailedModel | None:
    status = cr.status.model if cr.status else None
    if status is None:
        return None
    fp = fingerprint(model)
    return next((f for f in status.failed if f.fingerprint == fp), None)


def plan(cr: StableDiffusionService) -> Plan:
    s = cr.spec
    status = cr.status.model if cr.status else None
    stable, rolled_back = s.model, None
    failed = failed_record(cr, s.model)
    if failed is not None and status is not None and status.last_good is not None:
        if status.last_good_fingerprint != failed.fingerprint:
            stable, rolled_back = status.last_good, failed
    canary = canary_failed = None
    weight = replicas = 0
    serving = False
    if s.canary is not None:
        canary_failed = failed_record(cr, s.canary.model)
        if canary_failed is None:
            # One cache volume per service: the canary downloads into the stable's.
            canary = s.canary.model.model_copy(update={"cache": stable.cache})
            weight, replicas = s.canary.weight, s.canary.replicas
            seen = cr.status.canary if cr.status else None
            serving = seen is not None and seen.phase == "Serving" and seen.fingerprint == fingerprint(s.canary.model)
    return Plan(stable, rolled_back, canary, canary_failed, weight, replicas, serving)


def with_model(cr: StableDiffusionService, model: ModelSpec) -> StableDiffusionService:
    """The CR as the builders see it for one track: spec.model replaced."""
    if model is cr.spec.model:
        return cr
    return cr.model_copy(update={"spec": cr.spec.model_copy(update={"model": model})})
