"""The StableDiffusionService spec, defined once.

The CRD (``sdop crd``), the defaults, the CLI's validation and the operator's parsing all
come from these models. Cross-field rules are written twice on purpose: as a pydantic
validator (what the CLI and the operator run) and as a CEL rule in the CRD (what the API
server runs); ``tests/unit/test_crd.py`` evaluates both on the same CRs so they cannot drift.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from .base import ApiModel, cel
from .k8s import (
    DNS_SUBDOMAIN,
    EXTENDED_RESOURCE,
    IMAGE_REPOSITORY,
    IMAGE_TAG,
    QUALIFIED_NAME,
    Annotations,
    DnsLabel,
    DnsSubdomain,
    Hostname,
    Labels,
    key_rule,
)
from .presets import GpuMatch, GpuType

JwtAlgorithm = Literal["HS256", "RS256", "ES256"]


def _default_jwt_algorithms() -> list[JwtAlgorithm]:
    return ["RS256"]


#: Noise schedulers the inference server offers; "default" keeps the model's own.
#: sdserve has the same list (``sdserve.schedulers``); tests/unit/test_config_contract.py ties the two.
Scheduler = Literal["default", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "lcm"]

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"
DURATION = r"^[0-9]+(ms|s|m|h)$"
#: An IPv4 or IPv6 address or network (CIDR); the exact check is ipaddress's, in the model.
IP_OR_CIDR = r"^[0-9a-fA-F.:]+(/[0-9]{1,3})?$"


class SecretKeyRef(ApiModel):
    """A key of a Secret in the same namespace."""

    name: str = Field(
        description="Name of the Secret.",
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
    )
    key: str = Field(description="Key inside the Secret.", min_length=1, max_length=253)


class ConfigMapKeyRef(ApiModel):
    """A key of a ConfigMap in the same namespace."""

    name: str = Field(
        description="Name of the ConfigMap.",
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
    )
    key: str = Field(description="Key inside the ConfigMap.", min_length=1, max_length=253)


class PvcSource(ApiModel):
    """Model files already present on a PersistentVolumeClaim."""

    claim_name: DnsSubdomain = Field(description="Name of an existing PersistentVolumeClaim holding the model.")
    sub_path: str = Field(
        "",
        description=(
            "Folder inside the volume that holds the diffusers model (model_index.json) or the .safetensors file."
        ),
        max_length=1024,
    )


class ModelCache(ApiModel):
    """A PersistentVolumeClaim that keeps downloaded weights across restarts, filled once by a prefetch Job."""

    enabled: bool = Field(False, description="Create a PVC for the Hugging Face cache and mount it in every replica.")
    size: str = Field("30Gi", description="Requested size of the cache volume.", pattern=QUANTITY)
    storage_class_name: DnsSubdomain | None = Field(
        None, description="StorageClass of the cache volume; the cluster default when unset."
    )
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce"] | None = Field(
        None,
        description=(
            "Access mode of the cache volume. Unset: ReadWriteOnce with replicas.max 1 (what every default "
            "StorageClass offers), else ReadWriteMany (replicas on several nodes share it; needs a StorageClass "
            "that offers it, e.g. NFS, EFS, Filestore, Azure Files)."
        ),
    )
    prefetch: bool = Field(
        True, description="Run a Job that downloads the weights into the cache before the replicas start."
    )


class LoraSpec(ApiModel):
    """A LoRA adapter loaded at start; requests name it (lora, loras) to use it."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            ("has(self.id) != has(self.path)", "exactly one of id and path must be set", None),
        )
    }

    name: str = Field(description="Name requests use.", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    id: str | None = Field(
        None,
        description="Hugging Face repo of the adapter.",
        max_length=256,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$",
    )
    path: str | None = Field(
        None,
        description="Absolute path in the image or the model volume: a folder or a .safetensors file.",
        pattern=r"^/.*",
        max_length=1024,
    )
    weight_name: str | None = Field(None, description="The file inside the repo or folder.", max_length=256)
    weight: float = Field(1.0, description="Weight when a request names the adapter without one.", ge=-4, le=4)

    @model_validator(mode="after")
    def _one_source(self) -> LoraSpec:
        if (self.id is None) == (self.path is None):
            raise ValueError("exactly one of id and path must be set")
        return self


class ModelSpec(ApiModel):
    """Which weights to serve, from where, in which precision."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            (
                "(has(self.id) ? 1 : 0) + (has(self.path) ? 1 : 0) + (has(self.pvc) ? 1 : 0) == 1",
                "exactly one of model.id, model.path and model.pvc must be set",
                None,
            ),
            (
                "!has(self.tokenSecretRef) || has(self.id)",
                "model.tokenSecretRef is only used with model.id",
                ".tokenSecretRef",
            ),
            (
                "!self.cache.enabled || has(self.id)",
                "model.cache needs model.id: only Hugging Face downloads are cached",
                ".cache",
            ),
            (
                "self.loras.all(a, self.loras.exists_one(b, b.name == a.name))",
                "model.loras names must be unique",
                ".loras",
            ),
        )
    }

    id: str | None = Field(
        None,
        description=(
            "Hugging Face model id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5. An inpainting model "
            "(stable-diffusion-v1-5/stable-diffusion-inpainting) serves only edits with a mask. The built-in test "
            "model is 'tiny' (an SD 1.5 or, with pipeline sdxl, an SDXL architecture, scaled down; runs on a CPU)."
        ),
        min_length=1,
        max_length=256,
        pattern=r"^(tiny|[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)$",
    )
    revision: str = Field(
        "main", description="Hugging Face branch, tag or commit of model.id.", min_length=1, max_length=128
    )
    path: str | None = Field(
        None,
        description=(
            "Absolute path inside the inference image to a diffusers folder or a single .safetensors checkpoint."
        ),
        pattern=r"^/.*",
        max_length=1024,
    )
    pvc: PvcSource | None = Field(
        None, description="Load the model from an existing PersistentVolumeClaim (mounted read-only)."
    )
    pipeline: Literal["sd", "sdxl"] = Field("sd", description="Pipeline family: 'sd' (SD 1.x/2.x) or 'sdxl'.")
    variant: str | None = Field(None, description="Weights variant to download, e.g. fp16.", max_length=32)
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Precision of the weights: auto is float16 on a GPU and float32 on a CPU."
    )
    token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding a Hugging Face token for gated or private models."
    )
    cache: ModelCache = Field(default_factory=ModelCache, description="Persistent download cache and prefetch Job.")
    loras: list[LoraSpec] = Field(
        default_factory=list, max_length=16, description="LoRA adapters loaded at start, chosen per request."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        sources = [n for n in ("id", "path", "pvc") if getattr(self, n) is not None]
        if len(sources) != 1:
            raise ValueError("exactly one of model.id, model.path and model.pvc must be set")
        if self.token_secret_ref is not None and self.id is None:
            raise ValueError("model.tokenSecretRef is only used with model.id")
        if self.cache.enabled and self.id is None:
            raise ValueError("model.cache needs model.id: only Hugging Face downloads are cached")
        names = [a.name for a in self.loras]
        if len(names) != len(set(names)):
            raise ValueError("model.loras names must be unique")
        return self


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
            "GPU preset: rtx3080-10gb, rtx4090-24gb, a100-40gb, h100-80gb or custom. It sets the default batch size, "
            "CPU/memory requests, largest image side and the nvidia.com/gpu.product node selector."
        ),
    )
    match: GpuMatch = Field(
        "product",
        description=(
            "How replicas find nodes with this GPU: product (NVIDIA GPU feature discovery's nvidia.com/gpu.product, "
            "any of the preset's form factors), gke (cloud.google.com/gke-accelerator), karpenter "
            "(karpenter.k8s.aws/instance-gpu-name), or none (only the GPU resource request)."
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


class BatchingSpec(ApiModel):
    """Dynamic batching of compatible requests."""

    max_batch_size: int | None = Field(
        None, description="Largest batch of images run together; the GPU preset's value when unset.", ge=1, le=64
    )
    max_wait_ms: int = Field(25, description="How long the batcher waits to fill a batch.", ge=0, le=10000)
    mode: Literal["request", "step"] = Field(
        "request",
        description=(
            "request: a batch runs all its steps together and holds only requests with equal parameters. step: "
            "requests join and leave the running batch between denoising steps, whatever their step count, "
            "guidance or scheduler (continuous batching; measured against request in bench/README.md and "
            "docs/serving.md: more images per forward, but slower on the first GPU measured)."
        ),
    )


class LimitsSpec(ApiModel):
    """Request limits enforced by the server."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            (
                "self.minSide <= self.maxWidth && self.minSide <= self.maxHeight",
                "limits.minSide must be <= limits.maxWidth and limits.maxHeight",
                ".minSide",
            ),
        )
    }

    min_side: int = Field(256, description="Smallest width or height in pixels.", ge=64, le=4096, multiple_of=8)
    max_width: int = Field(
        1024, description="Largest width in pixels (a multiple of 8).", ge=64, le=4096, multiple_of=8
    )
    max_height: int = Field(
        1024, description="Largest height in pixels (a multiple of 8).", ge=64, le=4096, multiple_of=8
    )
    max_steps: int = Field(50, description="Most denoising steps per request.", ge=1, le=500)
    max_images: int = Field(4, description="Most images per request (n).", ge=1, le=16)
    max_prompt_length: int = Field(1000, description="Most characters in a prompt.", ge=1, le=100000)
    queue_size: int = Field(
        64, description="Most requests waiting per replica; beyond it the server answers 429.", ge=1, le=100000
    )
    timeout_seconds: int = Field(
        120, description="Longest a request may wait and run before it fails with 504.", ge=1, le=3600
    )

    @model_validator(mode="after")
    def _sides(self) -> LimitsSpec:
        if self.min_side > self.max_width or self.min_side > self.max_height:
            raise ValueError("limits.minSide must be <= limits.maxWidth and limits.maxHeight")
        return self


class RedisSpec(ApiModel):
    """Where the Redis for the result cache (and shared rate limits) lives."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            (
                "has(self.urlSecretRef) != self.managed",
                "set exactly one of cache.redis.urlSecretRef and cache.redis.managed",
                None,
            )
        )
    }

    url_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding a redis:// or rediss:// URL of an existing Redis."
    )
    managed: bool = Field(False, description="Deploy a single Redis next to the service, owned by it.")
    image: str = Field("redis:7.4-alpine", description="Image of the managed Redis.")

    @model_validator(mode="after")
    def _one(self) -> RedisSpec:
        if (self.url_secret_ref is not None) == self.managed:
            raise ValueError("set exactly one of cache.redis.urlSecretRef and cache.redis.managed")
        return self


class CacheSpec(ApiModel):
    """Result cache for seeded requests (same model revision, same request, same seed: same image)."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            (
                "self.type == 'redis' ? has(self.redis) : !has(self.redis)",
                "cache.redis is required with cache.type redis and allowed only then",
                ".redis",
            )
        )
    }

    type: Literal["none", "memory", "redis"] = Field(
        "memory", description="none, memory (per replica LRU) or redis (shared)."
    )
    max_entries: int = Field(256, description="Most entries in the in-memory cache.", ge=1, le=1000000)
    max_memory: str | None = Field(
        None,
        description=(
            "Most memory the in-memory cache holds, a quantity (512Mi when unset): past it, or past maxEntries, the "
            "least recently used entries go. Count it in resources.memory."
        ),
        pattern=QUANTITY,
    )
    ttl_seconds: int = Field(86400, description="Entry lifetime in Redis.", ge=1, le=31536000)
    redis: RedisSpec | None = Field(None, description="Redis settings, with type redis.")

    @model_validator(mode="after")
    def _redis(self) -> CacheSpec:
        if (self.type == "redis") != (self.redis is not None):
            raise ValueError("cache.redis is required with cache.type redis and allowed only then")
        return self


class JwtSpec(ApiModel):
    """JSON Web Token validation."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            (
                "has(self.jwksUrl) != has(self.keySecretRef)",
                "set exactly one of auth.jwt.jwksUrl and auth.jwt.keySecretRef",
                None,
            )
        )
    }

    issuer: str = Field(description="Required iss claim.", min_length=1)
    audience: str = Field(description="Required aud claim.", min_length=1)
    jwks_url: str | None = Field(
        None, description="JWKS endpoint of the issuer (RS256/ES256 keys).", pattern=r"^https?://"
    )
    key_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key with an HS256 shared secret or a PEM public key."
    )
    algorithms: list[JwtAlgorithm] = Field(
        default_factory=_default_jwt_algorithms, description="Accepted signing algorithms.", min_length=1
    )

    @model_validator(mode="after")
    def _key(self) -> JwtSpec:
        if (self.jwks_url is None) == (self.key_secret_ref is None):
            raise ValueError("set exactly one of auth.jwt.jwksUrl and auth.jwt.keySecretRef")
        return self


class AuthSpec(ApiModel):
    """Who may call the API; open when neither is set."""

    api_keys_secret_ref: SecretKeyRef | None = Field(
        None,
        description=(
            "Secret key with API keys, one per line (optionally 'name:key'). Running replicas apply an edit within "
            "about a minute (no restart); a Secret that holds no key refuses every request."
        ),
    )
    jwt: JwtSpec | None = Field(None, description="Accept bearer JWTs.")


class RateLimitSpec(ApiModel):
    """Token bucket per API key (or client address when auth is off)."""

    enabled: bool = Field(False, description="Enforce the limit.")
    requests_per_second: float = Field(2.0, description="Sustained requests per second per key.", gt=0, le=10000)
    burst: int = Field(10, description="Requests a key may make at once.", ge=1, le=100000)
    trusted_proxies: list[Annotated[str, Field(pattern=IP_OR_CIDR, max_length=49)]] = Field(
        default_factory=list,
        description=(
            "Addresses or CIDRs of the proxies in front of the service (the ingress controller or gateway pods): "
            "their X-Forwarded-For names the client an anonymous request is limited as. Unset: only the pod's "
            "own loopback is trusted, so behind a proxy every anonymous client shares the proxy's bucket."
        ),
        max_length=32,
    )

    @model_validator(mode="after")
    def _networks(self) -> RateLimitSpec:
        for i, address in enumerate(self.trusted_proxies):
            try:
                ipaddress.ip_network(address, strict=False)
            except ValueError:
                raise ValueError(f"rateLimit.trustedProxies[{i}]: {address!r} is not an IP address or CIDR") from None
        return self


class SafetySpec(ApiModel):
    """Content safety."""

    blocklist_config_map_ref: ConfigMapKeyRef | None = Field(
        None,
        description=(
            "ConfigMap key with blocked words, one per line; lines 're:PATTERN' are regexes. Running replicas apply "
            "an edit within about a minute; one that does not parse leaves the last good list."
        ),
    )
    nsfw_check: bool = Field(
        False,
        description=(
            "Run a diffusers safety checker on every image; a flagged image fails its request (400 nsfw_content). "
            "The checker is safety.checker, or the model's own safety_checker folder (SD 1.x ships one)."
        ),
    )
    checker: str | None = Field(
        None,
        description=(
            "Hugging Face id or absolute path of a diffusers safety checker with its image processor, e.g. "
            "CompVis/stable-diffusion-safety-checker; needed with nsfwCheck for SDXL and single-file models."
        ),
        max_length=1024,
        pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*|/.*)$",
    )


class ThresholdsSpec(ApiModel):
    """Alert thresholds of the PrometheusRule."""

    gpu_temperature_celsius: int = Field(85, description="GPU temperature alert threshold.", ge=40, le=120)
    p95_latency_seconds: float = Field(30.0, description="p95 end-to-end latency alert threshold.", gt=0, le=3600)
    error_ratio: float = Field(0.05, description="Share of 5xx responses that alerts.", gt=0, le=1)
    rejection_ratio: float = Field(0.10, description="Share of 429 responses that alerts.", gt=0, le=1)
    for_duration: str = Field("5m", description="How long a condition holds before alerting.", pattern=DURATION)


class MonitoringSpec(ApiModel):
    """Prometheus Operator integration."""

    service_monitor: bool = Field(True, description="Render a ServiceMonitor (needs monitoring.coreos.com).")
    prometheus_rule: bool = Field(
        True, description="Render a PrometheusRule with the alerts (needs monitoring.coreos.com)."
    )
    dashboard: bool = Field(
        False, description="Render the Grafana dashboard as a ConfigMap labelled grafana_dashboard=1."
    )
    interval: str = Field("15s", description="Scrape interval.", pattern=DURATION)
    labels: Labels = Field(
        default_factory=dict,
        description="Extra labels on ServiceMonitor and PrometheusRule, e.g. release: prometheus.",
        json_schema_extra=key_rule("monitoring.labels"),
    )
    thresholds: ThresholdsSpec = Field(default_factory=ThresholdsSpec, description="Alert thresholds.")


class ServiceSpec(ApiModel):
    """The Service in front of the replicas."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")
    port: int = Field(80, description="Service port.", ge=1, le=65535)
    allowed_namespaces: list[DnsLabel] | None = Field(
        None,
        description=(
            "Namespaces whose pods may call the API, besides this one (e.g. the ingress controller's and "
            "Prometheus'). Unset: any source may reach the HTTP port."
        ),
        max_length=32,
    )
    restrict_egress: bool = Field(
        False,
        description=(
            "Let the replicas reach only DNS, HTTPS (model downloads, JWKS, object storage) and the managed Redis."
        ),
    )


class IngressTls(ApiModel):
    secret_name: DnsSubdomain = Field(description="Secret with the TLS certificate for ingress.host.")


class IngressSpec(ApiModel):
    """Optional Ingress."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            ("!self.enabled || has(self.host)", "ingress.host is required when ingress.enabled", ".host")
        )
    }

    enabled: bool = Field(False, description="Render an Ingress.")
    class_name: DnsSubdomain | None = Field(None, description="IngressClass name.")
    host: str | None = Field(None, description="Host name.", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    path: str = Field("/", description="Path prefix.", pattern=r"^/")
    tls: IngressTls | None = Field(None, description="TLS for the host.")
    annotations: Annotations = Field(
        default_factory=dict,
        description="Annotations, e.g. for cert-manager or body size.",
        json_schema_extra=key_rule("ingress.annotations"),
    )

    @model_validator(mode="after")
    def _host(self) -> IngressSpec:
        if self.enabled and not self.host:
            raise ValueError("ingress.host is required when ingress.enabled")
        return self


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


class ParentRef(ApiModel):
    """A Gateway the HTTPRoute attaches to (Gateway API ParentReference)."""

    name: DnsSubdomain = Field(description="Name of the Gateway.")
    namespace: DnsLabel | None = Field(None, description="Namespace of the Gateway; the service's own when unset.")
    section_name: DnsLabel | None = Field(None, description="Listener of the Gateway to attach to.")


class GatewaySpec(ApiModel):
    """Publish the image API through a Gateway API Gateway: an HTTPRoute (gateway.networking.k8s.io/v1).
    With a canary, the route splits traffic between stable and canary by weight."""

    parent_refs: list[ParentRef] = Field(description="Gateways to attach to.", min_length=1, max_length=32)
    hostnames: list[Hostname] = Field(
        default_factory=list,
        description="Host names the route answers for (any the Gateway accepts when empty).",
        max_length=16,
    )


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


class ImageSize(ApiModel):
    """An image size in pixels."""

    width: int = Field(description="Width in pixels (a multiple of 8).", ge=64, le=4096, multiple_of=8)
    height: int = Field(description="Height in pixels (a multiple of 8).", ge=64, le=4096, multiple_of=8)


class RequestDefaultsSpec(ApiModel):
    """What a request gets for what it does not name; unset: the server's defaults."""

    size: ImageSize | None = Field(
        None,
        description=(
            "Image size; unset: the model's native size (512x512 for SD 1.5, 768x768 for SD 2.x 768-v, 1024x1024 "
            "for SDXL), within limits.minSide, limits.maxWidth and limits.maxHeight. Also the warm-up's size."
        ),
    )
    steps: int | None = Field(
        None,
        description="Denoising steps; unset: 25, or limits.maxSteps when lower. SDXL Turbo and SD Turbo: 1 to 4.",
        ge=1,
        le=500,
    )
    guidance_scale: float | None = Field(
        None,
        description=(
            "Classifier-free guidance scale; unset: 7.5. 1 or less is no guidance (the prompt's prediction alone, "
            "the negative prompt ignored): SDXL Turbo and SD Turbo run at 0."
        ),
        ge=0,
        le=50,
    )
    negative_prompt: str | None = Field(
        None,
        description=(
            'Negative prompt of a request that names none (a request\'s "" is none), e.g. "blurry, low quality". '
            "Within limits.maxPromptLength."
        ),
        max_length=100000,
    )


class ServerSpec(ApiModel):
    """Inference server tuning."""

    compile: bool = Field(False, description="torch.compile the UNet (slower start, faster steps).")
    compile_mode: Literal["max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune", "default"] | None = Field(
        None,
        description=(
            "torch.compile mode when compile is true; unset: max-autotune-no-cudagraphs. reduce-overhead and "
            "max-autotune also record CUDA graphs, one per batch size: less CPU launch time per step (the gain "
            "at small batches), more GPU memory. Measured effect: bench/README.md."
        ),
    )
    channels_last: bool = Field(True, description="channels_last memory format for the UNet and VAE.")
    scheduler: Scheduler = Field("default", description="Default noise scheduler.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Server log level.")
    quantization: Literal["none", "int8_weight_only", "int8_dynamic", "fp8"] = Field(
        "none",
        description=(
            "Quantize the UNet with torchao: int8_weight_only (any GPU), int8_dynamic (int8 tensor cores), fp8 "
            "(compute capability 8.9+: L4, H100). Measured speed and image effect: bench/README.md."
        ),
    )
    warmup_sizes: list[ImageSize] = Field(
        default_factory=list,
        description=(
            "Sizes warmed before a replica reports ready, besides the default size (the model's native one). "
            "On a GPU each is run once at every batch size, so the first request of that size does not pay "
            "cuDNN's kernel tuning (seconds); each adds to the start-up time. Within limits.minSide, "
            "limits.maxWidth and limits.maxHeight."
        ),
        max_length=8,
    )
    stall_seconds: int | None = Field(
        None,
        description=(
            "One model call (a batch, a step, a decode) running longer than this fails the liveness probe, so the "
            "kubelet restarts a replica whose GPU or driver hangs. Unset: 600 (1800 with compile), or 3x "
            "limits.timeoutSeconds when that is longer. Keep it above the longest batch: maxBatchSize images at "
            "the largest size and step count."
        ),
        ge=30,
        le=86400,
    )


class S3Spec(ApiModel):
    """S3-compatible object storage for response_format "url"."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            (
                "has(self.accessKeyIdSecretRef) == has(self.secretAccessKeySecretRef)",
                "accessKeyIdSecretRef and secretAccessKeySecretRef are set together",
                ".accessKeyIdSecretRef",
            ),
        )
    }

    bucket: DnsSubdomain = Field(description="Bucket the images are stored in (content-addressed keys).")
    endpoint: str | None = Field(
        None,
        description="Endpoint URL of an S3-compatible store (MinIO, Ceph, R2, GCS interop); AWS S3 when unset.",
        pattern=r"^https?://[^\s]+$",
        max_length=2048,
    )
    region: str = Field("us-east-1", description="Region of the bucket.", max_length=64)
    prefix: str = Field("sdserve/", description="Key prefix of the stored images.", max_length=512)
    path_style: bool = Field(False, description="Path-style addressing (most S3-compatible stores need it).")
    access_key_id_secret_ref: SecretKeyRef | None = Field(
        None, description="Access key id; unset: the pod's own credentials (IRSA, workload identity)."
    )
    secret_access_key_secret_ref: SecretKeyRef | None = Field(None, description="Secret access key.")
    url_expiry_seconds: int = Field(3600, description="Lifetime of a presigned URL.", ge=1, le=604800)

    @model_validator(mode="after")
    def _keys_together(self) -> S3Spec:
        if (self.access_key_id_secret_ref is None) != (self.secret_access_key_secret_ref is None):
            raise ValueError("accessKeyIdSecretRef and secretAccessKeySecretRef are set together")
        return self


class OutputsSpec(ApiModel):
    """Where images answered as URLs are stored."""

    s3: S3Spec | None = Field(None, description="S3-compatible storage; without it, response_format url is a 422.")


class WebhooksSpec(ApiModel):
    """Where async jobs' webhooks may go (POST /v1/jobs with a webhook)."""

    allowed_hosts: list[Hostname] = Field(
        default_factory=list,
        max_length=64,
        description=(
            "Hosts a job's webhook URL may name ('*.example.com' for any subdomain). Empty: webhooks are refused; "
            "a webhook open to any host would let clients make the server call inside the cluster. With "
            "service.restrictEgress, only HTTPS (443) leaves the pods."
        ),
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
