"""The StableDiffusionService status, following the Kubernetes API conventions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ApiModel
from .spec.model import ModelSpec

ConditionType = Literal["Ready", "Progressing", "Degraded", "ModelReady"]
CONDITION_TYPES: tuple[str, ...] = ("Ready", "Progressing", "Degraded", "ModelReady")


class Condition(ApiModel):
    """One aspect of the service's state (metav1.Condition)."""

    type: str = Field(description="Ready (summary), Progressing, Degraded or ModelReady.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        description="CamelCase reason of the last transition.", pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    )
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int = Field(0, description="metadata.generation this condition was computed for.", ge=0)


class FailedModel(ApiModel):
    """A model that failed to become ready and is kept out until the spec moves on from it."""

    fingerprint: str = Field(description="Hash of the model block (sdop.render.rollout.fingerprint).")
    model: str = Field(description="The model, as id@revision (or path, or pvc:claim).")
    track: Literal["stable", "canary"] = Field(description="Where it was tried: spec.model or spec.canary.model.")
    reason: str = Field(description="Why: ModelLoadFailed or ProgressDeadlineExceeded.")
    message: str = Field("", description="What the replicas said.")
    time: str = Field(description="When it was rolled back (RFC 3339).")


class ModelStatus(ApiModel):
    """Which model serves, which one last served well, and which ones were rolled back."""

    serving: str = Field("", description="The model the stable replicas run, as id@revision.")
    last_good: ModelSpec | None = Field(
        None, description="The last model block that became ready; a failed new model rolls back to it."
    )
    last_good_fingerprint: str = Field("", description="Hash of lastGood.")
    failed: list[FailedModel] = Field(default_factory=list, description="Models rolled back and kept out.")


class CanaryStatus(ApiModel):
    """The canary's state."""

    model: str = Field(description="The canary model, as id@revision.")
    fingerprint: str = Field(description="Hash of spec.canary.model.")
    phase: Literal["Progressing", "Serving", "RolledBack"] = Field(description="Progressing, Serving or RolledBack.")
    traffic: Literal["gateway", "replicas"] = Field(
        description="How traffic is split: HTTPRoute weights (gateway) or by replica count (replicas)."
    )
    weight: int = Field(0, description="Percent of requests the canary gets now.", ge=0, le=100)
    ready_replicas: int = Field(0, description="Canary replicas that are ready.", ge=0)


class StableDiffusionServiceStatus(ApiModel):
    """Observed state of a Stable Diffusion service."""

    observed_generation: int = Field(0, description="Last metadata.generation the operator acted on.", ge=0)
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready, Progressing, Degraded and ModelReady."
    )
    replicas: int = Field(0, description="Replicas of the Deployment.", ge=0)
    ready_replicas: int = Field(0, description="Replicas that are ready (model loaded).", ge=0)
    endpoint: str = Field("", description="In-cluster URL of the API (or the Ingress URL when one is set).")
    model_revision: str = Field("", description="Model revision the replicas were asked to load.")
    optional_apis: list[str] = Field(
        default_factory=list, description="Optional APIs found in the cluster (monitoring.coreos.com, keda.sh)."
    )
    model: ModelStatus | None = Field(None, description="Model rollout state: serving, last good, rolled back.")
    canary: CanaryStatus | None = Field(None, description="The canary, while spec.canary is set.")
