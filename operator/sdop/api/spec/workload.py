"""The replicas: image, GPUs, resources, scheduling, replica bounds, autoscaling, rollout and canary."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ..base import ApiModel, cel
from ..k8s import EXTENDED_RESOURCE, IMAGE_REPOSITORY, IMAGE_TAG, QUALIFIED_NAME, DnsSubdomain, Labels, key_rule
from ..presets import GpuMatch, GpuType
from .common import DURATION, QUANTITY
from .model import ModelSpec

#: The inference image when ``spec.image`` leaves it unset (the operator's SDOP_DEFAULT_IMAGE_* override it).
DEFAULT_IMAGE_REPOSITORY = "ghcr.io/sdop/sdserve"


DEFAULT_IMAGE_TAG = "0.1.0"


class ImageSpec(ApiModel):
    """The inference server image."""

    repository: str | None = Field(
        None,
        description="Image repository (lower case, an optional registry host); the operator's default when unset.",
        max_length=512,
        pattern=IMAGE_REPOSITORY,
    )
    tag: str | None = Field(
        None, description="Image tag; the operator's default when unset.", max_length=128, pattern=IMAGE_TAG
    )
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Image pull policy.")
    pull_secrets: list[DnsSubdomain] = Field(
        default_factory=list, description="Names of Secrets used to pull the image.", max_length=16
    )


class GpuSpec(ApiModel):
    """GPUs per replica and the hardware preset that sizes batching and memory."""

    count: int = Field(
        1,
        description=(
            "GPUs per replica: 1, or 0 for CPU replicas (gpu.type custom). The server runs one pipeline on one "
            "GPU; to use more GPUs, run more replicas."
        ),
        ge=0,
        le=1,
    )
    type: GpuType = Field(
        "a100-40gb",
        description=(
            "GPU preset: t4-16gb, rtx3080-10gb, rtx4090-24gb, a10g-24gb, l4-24gb, l40s-48gb, a100-40gb, a100-80gb, "
            "h100-80gb, h200-141gb or custom. It sets the default batch size, CPU/memory requests, largest image side "
            "and the node label values that select the GPU."
        ),
    )
    match: GpuMatch = Field(
        "product",
        description=(
            "How replicas find nodes with this GPU: product (NVIDIA GPU feature discovery's nvidia.com/gpu.product, "
            "any of the preset's form factors), gke (cloud.google.com/gke-accelerator), karpenter "
            "(karpenter.k8s.aws/instance-gpu-name), eks-auto (EKS Auto Mode's eks.amazonaws.com/instance-gpu-name), "
            "or none (only the GPU resource request)."
        ),
    )
    node_label_values: list[str] = Field(
        default_factory=list,
        description="Overrides the preset's values for the match label (any of them matches).",
        max_length=16,
    )
    resource_name: str = Field(
        "nvidia.com/gpu",
        description="Extended resource name of the GPU device plugin (a domain, '/', a name).",
        max_length=128,
        pattern=EXTENDED_RESOURCE,
    )


class ResourcesSpec(ApiModel):
    """Explicit CPU and memory per replica; the GPU preset's values when unset."""

    cpu: str | None = Field(None, description="CPU request and limit per replica.", pattern=QUANTITY)
    memory: str | None = Field(None, description="Memory request and limit per replica.", pattern=QUANTITY)
    shm_size: str = Field("2Gi", description="Size of the in-memory /dev/shm volume.", pattern=QUANTITY)


class Toleration(ApiModel):
    """A Kubernetes toleration."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            (
                "self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "a toleration with operator Exists has no value",
                ".value",
            ),
            (
                "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                "tolerationSeconds needs effect NoExecute",
                ".tolerationSeconds",
            ),
            (
                "(has(self.key) && self.key != '') || self.operator == 'Exists'",
                "a toleration without a key needs operator Exists",
                ".operator",
            ),
        )
    }

    key: str | None = Field(None, description="Taint key.", max_length=317, pattern=QUALIFIED_NAME)
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal or Exists.")
    value: str | None = Field(None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect; all effects when unset."
    )
    toleration_seconds: int | None = Field(
        None, description="For NoExecute: how long the pod stays bound after the taint appears.", ge=0
    )

    @model_validator(mode="after")
    def _as_the_api_server(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists has no value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without a key needs operator Exists")
        return self


class SchedulingSpec(ApiModel):
    """Where replicas may run."""

    node_selector: Labels = Field(
        default_factory=dict,
        description="Extra node labels a replica's node must have.",
        json_schema_extra=key_rule("scheduling.nodeSelector"),
    )
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        description="Tolerations; by default the usual nvidia.com/gpu NoSchedule taint is tolerated.",
        max_length=32,
    )
    affinity: dict[str, Any] | None = Field(
        None,
        description="A Kubernetes Affinity object, passed through unchanged.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: DnsSubdomain | None = Field(None, description="PriorityClass of the replicas.")
    topology_spread: bool = Field(True, description="Spread replicas across nodes (soft topology spread constraint).")


class ReplicasSpec(ApiModel):
    """Replica bounds; equal min and max mean a fixed size."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(("self.min <= self.max", "replicas.min must be <= replicas.max", ".min"))
    }

    min: int = Field(
        1,
        description="Fewest replicas. 0 is allowed only with autoscaling.provider keda and autoscaling.scaleToZero.",
        ge=0,
        le=1000,
    )
    max: int = Field(1, description="Most replicas.", ge=1, le=1000)

    @model_validator(mode="after")
    def _bounds(self) -> ReplicasSpec:
        if self.min > self.max:
            raise ValueError(f"replicas.min ({self.min}) must be <= replicas.max ({self.max})")
        return self


class AutoscalingSpec(ApiModel):
    """Scaling on queue depth per replica, the signal that matches GPU saturation (CPU does not)."""

    enabled: bool = Field(True, description="Scale between replicas.min and replicas.max. Off: replicas.min replicas.")
    provider: Literal["hpa", "keda"] = Field(
        "hpa",
        description=(
            "hpa: autoscaling/v2 on the pods metric sdserve_queue_depth (needs prometheus-adapter). keda: a KEDA "
            "ScaledObject with a Prometheus trigger; needed for scale to zero."
        ),
    )
    target_queue_depth: int = Field(4, description="Queued requests per replica to aim for.", ge=1, le=10000)
    scale_up_stabilization_seconds: int = Field(0, description="Stabilisation window before scaling up.", ge=0, le=3600)
    scale_down_stabilization_seconds: int = Field(
        300,
        description="Stabilisation window before scaling down; long, since a replica is slow to start.",
        ge=0,
        le=3600,
    )
    scale_to_zero: bool = Field(
        False,
        description=(
            "Allow zero replicas when idle (keda only). Needs the KEDA HTTP add-on: its interceptor holds a "
            "request while the service wakes up."
        ),
    )
    wake_timeout_seconds: int = Field(
        900,
        description=(
            "With scaleToZero: how long a request that wakes the service waits for a replica to be ready (the "
            "interceptor's conditionWait); cover the model load."
        ),
        ge=30,
        le=3600,
    )
    interceptor_service: DnsSubdomain = Field(
        "keda-add-ons-http-interceptor-proxy.keda.svc.cluster.local",
        description="With scaleToZero: the KEDA HTTP add-on's interceptor proxy Service (host name).",
    )
    interceptor_port: int = Field(8080, description="With scaleToZero: the interceptor proxy's port.", ge=1, le=65535)
    idle_seconds: int = Field(
        600, description="With scaleToZero: idle time before going to zero (KEDA cooldownPeriod).", ge=30, le=86400
    )
    prometheus_address: str = Field(
        "http://prometheus-operated.monitoring.svc:9090",
        description="Prometheus the KEDA trigger and the canary error-ratio rollback (rollout.maxErrorRatio) query.",
        pattern=r"^https?://",
    )


class RolloutSpec(ApiModel):
    """How new versions roll out and old replicas drain."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            (
                "self.maxSurge > 0 || self.maxUnavailable > 0",
                "rollout.maxSurge and rollout.maxUnavailable cannot both be 0 (the rollout could never start)",
                ".maxUnavailable",
            )
        )
    }

    max_surge: int = Field(1, description="Extra replicas during a rollout.", ge=0, le=100)
    max_unavailable: int = Field(0, description="Replicas that may be missing during a rollout.", ge=0, le=100)
    termination_grace_period_seconds: int = Field(
        180, description="Time a stopping replica has to finish queued work.", ge=10, le=3600
    )
    startup_timeout_seconds: int = Field(
        1800, description="Longest a replica may take to load the model before it is restarted.", ge=60, le=21600
    )
    auto_rollback: bool = Field(
        True,
        description=(
            "When a new model (spec.model or spec.canary.model) fails to load, or its rollout passes its deadline "
            "(startupTimeoutSeconds + 300 s), return traffic to the last good model and keep the failed one out "
            "(status.model.failed). To try the failed model again, change it (or remove the canary and add it back)."
        ),
    )
    max_error_ratio: float | None = Field(
        None,
        description=(
            "Roll back a serving canary whose share of 5xx responses over errorRatioWindow is above this (read "
            "from Prometheus at autoscaling.prometheusAddress). Unset: no rollback on errors."
        ),
        gt=0,
        le=1,
    )
    error_ratio_window: str = Field(
        "5m", description="The window maxErrorRatio is measured over (a Prometheus duration).", pattern=DURATION
    )
    error_ratio_min_requests: int = Field(
        20, description="Fewest canary requests in the window before maxErrorRatio is judged.", ge=1, le=1000000
    )

    @model_validator(mode="after")
    def _can_roll(self) -> RolloutSpec:
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError(
                "rollout.maxSurge and rollout.maxUnavailable cannot both be 0 (the rollout could never start)"
            )
        return self


class CanarySpec(ApiModel):
    """A second model served beside spec.model on a share of the traffic. Promote it by copying
    canary.model to spec.model and removing spec.canary; abandon it by removing spec.canary."""

    model: ModelSpec = Field(
        description="The candidate model. It shares spec.model.cache (its own cache settings are not used)."
    )
    weight: int = Field(
        10,
        description=(
            "Percent of requests for the canary. Through spec.gateway (Gateway API) this is exact; without it "
            "the Service spreads requests over all replicas, so the share is canary replicas / all replicas "
            "(status.canary.weight says what it is) and weight 0 stops the canary's replicas."
        ),
        ge=0,
        le=100,
    )
    replicas: int = Field(1, description="Replicas of the canary (not autoscaled).", ge=1, le=100)
