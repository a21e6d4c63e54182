"""The whole ``spec`` of a StableDiffusionService, and its cross-field rules."""

from __future__ import annotations

from pydantic import Field, model_validator

from ..base import ApiModel, cel
from .access import AuthSpec, RateLimitSpec, WebhooksSpec
from .model import ModelSpec
from .monitoring import MonitoringSpec
from .network import GatewaySpec, IngressSpec, ServiceSpec
from .serving import BatchingSpec, LimitsSpec, RequestDefaultsSpec, SafetySpec, ServerSpec
from .storage import CacheSpec, OutputsSpec
from .workload import (
    AutoscalingSpec,
    CanarySpec,
    GpuSpec,
    ImageSpec,
    ReplicasSpec,
    ResourcesSpec,
    RolloutSpec,
    SchedulingSpec,
)


class StableDiffusionServiceSpec(ApiModel):
    """Desired state of a Stable Diffusion service."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            (
                "self.replicas.min >= 1 || (self.autoscaling.enabled && self.autoscaling.provider == 'keda' && "
                "self.autoscaling.scaleToZero)",
                "replicas.min 0 needs autoscaling.provider keda with autoscaling.scaleToZero",
                ".replicas.min",
            ),
            (
                "!self.autoscaling.scaleToZero || self.autoscaling.provider == 'keda'",
                "autoscaling.scaleToZero needs autoscaling.provider keda",
                ".autoscaling.scaleToZero",
            ),
            (
                "!has(self.canary) || !self.autoscaling.scaleToZero",
                "spec.canary cannot be combined with autoscaling.scaleToZero (the KEDA HTTP interceptor routes to one "
                "Service)",
                ".canary",
            ),
            (
                "!has(self.gateway) || !self.autoscaling.scaleToZero",
                "spec.gateway cannot be combined with autoscaling.scaleToZero (requests must pass the KEDA HTTP "
                "interceptor)",
                ".gateway",
            ),
            (
                "!has(self.batching.maxBatchSize) || self.batching.maxBatchSize <= self.limits.queueSize",
                "batching.maxBatchSize must be <= limits.queueSize",
                ".batching.maxBatchSize",
            ),
            (
                "!has(self.server.compileMode) || self.server.compile",
                "server.compileMode needs server.compile: true",
                ".server.compileMode",
            ),
            (
                "!has(self.server.warmupSizes) || self.server.warmupSizes.all(s, s.width >= self.limits.minSide && "
                "s.width <= self.limits.maxWidth && s.height >= self.limits.minSide && "
                "s.height <= self.limits.maxHeight)",
                "server.warmupSizes must be within limits.minSide, limits.maxWidth and limits.maxHeight",
                ".server.warmupSizes",
            ),
            (
                "!has(self.defaults.size) || (self.defaults.size.width >= self.limits.minSide && "
                "self.defaults.size.width <= self.limits.maxWidth && self.defaults.size.height >= self.limits.minSide "
                "&& self.defaults.size.height <= self.limits.maxHeight)",
                "defaults.size must be within limits.minSide, limits.maxWidth and limits.maxHeight",
                ".defaults.size",
            ),
            (
                "!has(self.defaults.steps) || self.defaults.steps <= self.limits.maxSteps",
                "defaults.steps must be <= limits.maxSteps",
                ".defaults.steps",
            ),
            (
                "!has(self.defaults.negativePrompt) || "
                "size(self.defaults.negativePrompt) <= self.limits.maxPromptLength",
                "defaults.negativePrompt must be at most limits.maxPromptLength characters",
                ".defaults.negativePrompt",
            ),
        )
    }

    model: ModelSpec = Field(description="Model weights to serve.")
    image: ImageSpec = Field(default_factory=ImageSpec, description="Inference server image.")
    gpu: GpuSpec = Field(default_factory=GpuSpec, description="GPUs per replica and the hardware preset.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="CPU and memory per replica.")
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec, description="Node selection.")
    replicas: ReplicasSpec = Field(default_factory=ReplicasSpec, description="Replica bounds.")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Autoscaling on queue depth.")
    batching: BatchingSpec = Field(default_factory=BatchingSpec, description="Dynamic batching.")
    limits: LimitsSpec = Field(default_factory=LimitsSpec, description="Request limits.")
    defaults: RequestDefaultsSpec = Field(
        default_factory=RequestDefaultsSpec, description="What a request gets for what it does not name."
    )
    cache: CacheSpec = Field(default_factory=CacheSpec, description="Result cache.")
    auth: AuthSpec = Field(default_factory=AuthSpec, description="Authentication.")
    rate_limit: RateLimitSpec = Field(default_factory=RateLimitSpec, description="Per-key rate limit.")
    safety: SafetySpec = Field(default_factory=SafetySpec, description="Content safety.")
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec, description="Metrics, alerts and dashboard.")
    service: ServiceSpec = Field(default_factory=ServiceSpec, description="Service.")
    ingress: IngressSpec = Field(default_factory=IngressSpec, description="Ingress.")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="Rollout, automatic rollback and drain.")
    canary: CanarySpec | None = Field(None, description="A candidate model on a share of the traffic.")
    gateway: GatewaySpec | None = Field(None, description="Publish through a Gateway API HTTPRoute.")
    server: ServerSpec = Field(default_factory=ServerSpec, description="Server tuning.")
    webhooks: WebhooksSpec = Field(default_factory=WebhooksSpec, description="Async job webhooks.")
    outputs: OutputsSpec = Field(default_factory=OutputsSpec, description="Object storage for URL outputs.")

    @model_validator(mode="after")
    def _cross(self) -> StableDiffusionServiceSpec:
        a = self.autoscaling
        if self.replicas.min == 0 and not (a.enabled and a.provider == "keda" and a.scale_to_zero):
            raise ValueError("replicas.min 0 needs autoscaling.provider keda with autoscaling.scaleToZero")
        if a.scale_to_zero and a.provider != "keda":
            raise ValueError("autoscaling.scaleToZero needs autoscaling.provider keda")
        if self.canary is not None and a.scale_to_zero:
            raise ValueError(
                "spec.canary cannot be combined with autoscaling.scaleToZero (the KEDA HTTP interceptor routes to "
                "one Service)"
            )
        if self.gateway is not None and a.scale_to_zero:
            raise ValueError(
                "spec.gateway cannot be combined with autoscaling.scaleToZero (requests must pass the KEDA HTTP "
                "interceptor)"
            )
        if self.batching.max_batch_size is not None and self.batching.max_batch_size > self.limits.queue_size:
            raise ValueError("batching.maxBatchSize must be <= limits.queueSize")
        if self.server.compile_mode is not None and not self.server.compile:
            raise ValueError("server.compileMode needs server.compile: true")
        lim = self.limits
        d = self.defaults
        sizes = [("server.warmupSizes", z) for z in self.server.warmup_sizes]
        sizes += [("defaults.size", d.size)] if d.size else []
        for field, size in sizes:
            if not (lim.min_side <= size.width <= lim.max_width and lim.min_side <= size.height <= lim.max_height):
                raise ValueError(
                    f"{field} {size.width}x{size.height} must be within limits.minSide, "
                    "limits.maxWidth and limits.maxHeight"
                )
        if d.steps is not None and d.steps > lim.max_steps:
            raise ValueError(f"defaults.steps {d.steps} must be <= limits.maxSteps ({lim.max_steps})")
        if d.negative_prompt is not None and len(d.negative_prompt) > lim.max_prompt_length:
            raise ValueError(
                f"defaults.negativePrompt must be at most limits.maxPromptLength ({lim.max_prompt_length})"
            )
        return self
