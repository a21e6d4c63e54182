"""Model rollouts: which model proved good, which one failed and is rolled back (pure).

The verdict goes into ``status.model`` and ``status.canary``; ``sdop.render.rollout.plan``
reads it back, so the next render serves the last good model and keeps the failed one out.
A model fails when its replicas report that the model cannot load (sdserve's termination
message) or when its Deployment passes the progress deadline (startupTimeoutSeconds + 300 s);
a serving canary also fails when its share of 5xx responses passes rollout.maxErrorRatio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..api import StableDiffusionService
from ..api.status import FailedModel, ModelStatus
from ..render.rollout import Plan, fingerprint, model_ref
from ..render.workload import MODEL_FINGERPRINT
from .conditions import deadline_exceeded, deployment_counts, rolled_out, workload_problems

#: How many rolled-back models status keeps (only those the spec still names are kept at all).
MAX_FAILED = 5


@dataclass(frozen=True)
class Track:
    """What the API server says about one track's Deployment and its pods."""

    deployment: dict[str, Any] | None
    #: The track's pods (listed only while its Deployment is not rolled out).
    pods: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fingerprint(self) -> str | None:
        meta = (self.deployment or {}).get("metadata") or {}
        return (meta.get("annotations") or {}).get(MODEL_FINGERPRINT)

    @property
    def ready(self) -> int:
        return deployment_counts(self.deployment)[1]

    def failure(self) -> tuple[str, str] | None:
        """Why this track's current model cannot serve, when it cannot: from the pods that were
        loading this model (not the leftovers of an earlier one) and the rollout deadline."""
        fp = self.fingerprint
        pods = [p for p in self.pods if (p["metadata"].get("labels") or {}).get(MODEL_FINGERPRINT) == fp]
        loads = [m for reason, m in workload_problems(pods, []) if reason == "ModelLoadFailed"]
        if loads:
            return "ModelLoadFailed", "; ".join(loads[:3])
        late = deadline_exceeded(self.deployment)
        if late:
            return "ProgressDeadlineExceeded", late
        return None


@dataclass(frozen=True)
class Verdict:
    model: dict[str, Any]
    canary: dict[str, Any] | None
    #: Models that failed in this look (each is rolled back by the next render).
    new_failures: list[FailedModel]


def error_verdict(cr: StableDiffusionService, errors: tuple[float, float] | None) -> tuple[str, str] | None:
    """A serving canary answering too many 5xx (rollout.maxErrorRatio), from (5xx, total) requests."""
    r = cr.spec.rollout
    if r.max_error_ratio is None or errors is None:
        return None
    bad, total = errors
    if total < r.error_ratio_min_requests or total <= 0 or bad / total <= r.max_error_ratio:
        return None
    return (
        "ErrorRatio",
        f"{bad / total:.1%} of {total:.0f} requests answered 5xx over {r.error_ratio_window} "
        f"(rollout.maxErrorRatio {r.max_error_ratio:.1%})",
    )


def judge(
    cr: StableDiffusionService,
    plan: Plan,
    stable: Track,
    canary: Track,
    *,
    gateway: bool,
    now: str,
    canary_errors: tuple[float, float] | None = None,
) -> Verdict:
    s = cr.spec
    prev = (cr.status.model if cr.status else None) or ModelStatus()
    spec_fp = fingerprint(s.model)
    named = {spec_fp} | ({fingerprint(s.canary.model)} if s.canary else set())
    failed = [f for f in prev.failed if f.fingerprint in named]  # forgotten once the spec moves on
    last_good, last_good_fp = prev.last_good, prev.last_good_fingerprint
    new: list[FailedModel] = []

    if plan.rolled_back is None and stable.fingerprint == spec_fp:
        if rolled_out(stable.deployment) and stable.ready >= 1:
            last_good, last_good_fp = s.model, spec_fp
        elif s.rollout.auto_rollback and last_good is not None and last_good_fp != spec_fp:
            # Only a model with something to return to is rolled back; a first model that
            # cannot load is reported (Degraded) and left for the user to fix.
            why = stable.failure()
            if why is not None:
                new.append(
                    FailedModel(
                        fingerprint=spec_fp,
                        model=model_ref(s.model),
                        track="stable",
                        reason=why[0],
                        message=why[1],
                        time=now,
                    )
                )

    canary_status = None
    if s.canary is not None:
        cfp = fingerprint(s.canary.model)
        phase = "RolledBack" if plan.canary is None else "Progressing"
        weight = 0
        if plan.canary is not None and canary.fingerprint == cfp:
            why = canary.failure() or (error_verdict(cr, canary_errors) if canary.ready >= 1 else None)
            if why is not None and s.rollout.auto_rollback:
                new.append(
                    FailedModel(
                        fingerprint=cfp,
                        model=model_ref(s.canary.model),
                        track="canary",
                        reason=why[0],
                        message=why[1],
                        time=now,
                    )
                )
                phase = "RolledBack"
            elif canary.ready >= 1:
                phase = "Serving"
                if gateway:
                    weight = plan.route_weight
                else:  # the Service spreads requests over every ready replica
                    weight = round(100 * canary.ready / (canary.ready + max(stable.ready, 0)))
        canary_status = {
            "model": model_ref(s.canary.model),
            "fingerprint": cfp,
            "phase": phase,
            "traffic": "gateway" if gateway else "replicas",
            "weight": weight,
            "readyReplicas": canary.ready if phase != "RolledBack" else 0,
        }

    failed = [*failed, *new][-MAX_FAILED:]
    model: dict[str, Any] = {
        "serving": model_ref(plan.stable),
        "lastGoodFingerprint": last_good_fp,
        "failed": [f.wire() for f in failed],
    }
    if last_good is not None:
        model["lastGood"] = last_good.wire()
    return Verdict(model, canary_status, new)


def rolled_back_message(plan: Plan) -> str | None:
    """The Degraded message while a failed model is kept out, None when none is."""
    parts = []
    if plan.rolled_back is not None:
        f = plan.rolled_back
        parts.append(
            f"model {f.model} failed ({f.reason}: {f.message}); serving the last good model {model_ref(plan.stable)}"
        )
    if plan.canary_rolled_back is not None:
        f = plan.canary_rolled_back
        parts.append(f"canary model {f.model} failed ({f.reason}: {f.message}); all traffic stays on the stable model")
    return "; ".join(parts) or None
