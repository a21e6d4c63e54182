"""The StableDiffusionService status, following the Kubernetes API conventions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ApiModel

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
