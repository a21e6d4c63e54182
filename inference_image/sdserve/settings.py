"""All server settings, from SDSERVE_* environment variables (the operator's ConfigMap).

This is the only place that reads the environment. The operator renders these names
(``sdop/render/config.py``); ``tests/unit/test_config_contract.py`` ties the two.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .schedulers import SchedulerName
from .schemas import parse_size


class LoraSetting(BaseModel):
    """A LoRA adapter loaded at start (SDSERVE_LORAS, a JSON list of these)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    source: str = Field(min_length=1, description="A Hugging Face id, a folder, or a .safetensors file.")
    weight_name: str | None = Field(None, description="The file inside a Hugging Face repo or folder.")
    weight: float = Field(1.0, ge=-4, le=4, description="Weight when a request names the adapter without one.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDSERVE_", extra="ignore", populate_by_name=True)

    # Model
    model: str = Field("tiny", description="'tiny', a Hugging Face id, a diffusers folder or a .safetensors file.")
    model_revision: str = "main"
    #: Other names a request's ``model`` may give, comma-separated: a canary's is the stable
    #: model's, so a client that names the model it knows is served by either track.
    model_aliases: str = ""
    pipeline: Literal["sd", "sdxl"] = "sd"
    variant: str | None = None
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    hf_token: str | None = Field(None, description="Hugging Face token (from a Secret).")
    compile: bool = False
    #: torch.compile mode for the UNet. "reduce-overhead" and "max-autotune" also record CUDA
    #: graphs (one per batch size; less CPU launch time per step, more GPU memory); the default
    #: leaves them out.
    compile_mode: Literal["max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune", "default"] = (
        "max-autotune-no-cudagraphs"
    )
    channels_last: bool = True
    scheduler: SchedulerName = "default"
    warmup: bool = True
    #: Sizes warmed besides the default size, "WIDTHxHEIGHT" comma-separated (e.g. "768x768,1024x576").
    warmup_sizes: str = Field("", pattern=r"^([1-9][0-9]*x[1-9][0-9]*(,[1-9][0-9]*x[1-9][0-9]*)*)?$")
    #: The content check's model (with nsfw_check): a Hugging Face id or a folder holding a diffusers
    #: safety checker and its image processor, e.g. CompVis/stable-diffusion-safety-checker. Unset:
    #: the model's own safety_checker and feature_extractor folders (SD 1.x ships them).
    safety_checker: str | None = None
    #: LoRA adapters loaded at start; requests choose among them by name (``lora``, ``loras``).
    loras: list[LoraSetting] = Field(default_factory=list)
    nsfw_check: bool = False

    # Batching and queue
    max_batch_size: int = Field(4, ge=1, le=64)
    max_wait_ms: int = Field(25, ge=0)
    #: "request": a batch runs all its steps together (requests with equal parameters only).
    #: "step": requests join and leave the running batch between denoising steps (sdserve.stepper).
    batching: Literal["request", "step"] = "request"
    #: Step batching: latent pixels (width/8 x height/8, summed over the running images) one UNet
    #: forward may hold; 0: max_batch_size images of 512x512.
    step_budget: int = Field(0, ge=0)
    #: Step batching: pad every UNet forward to max_batch_size images so an image does not
    #: depend on its company (bit-identical); "auto" pads on the CPU only (sdserve.denoise).
    step_pad: Literal["auto", "on", "off"] = "auto"
    #: Weight quantization of the UNet with torchao (sdserve.pipeline.QUANTIZATIONS).
    quantization: Literal["none", "int8_weight_only", "int8_dynamic", "fp8"] = "none"
    queue_size: int = Field(64, ge=1)
    timeout_seconds: float = Field(120, gt=0)
    #: One model call (a batch, a step, a decode) running longer than this fails /healthz, so
    #: the kubelet restarts a pod whose GPU or driver hangs instead of leaving it alive and idle.
    #: Unset: 600 s (1800 s with compile: a size not warmed up compiles inside its first call), or
    #: 3 x timeout_seconds when that is longer (a call past it fails every request it serves; a
    #: slow CPU deployment with a long timeout is not restarted for slowness).
    stall_seconds: float | None = Field(None, gt=0)

    # Request limits
    min_side: int = 256
    max_width: int = 1024
    max_height: int = 1024
    max_steps: int = 50
    max_images: int = 4
    max_prompt_length: int = 1000
    #: Edits: the largest uploaded image or mask, in bytes.
    max_upload_bytes: int = Field(16 * 2**20, ge=1024)
    #: Steps of a request that names none; unset: 25, or max_steps when lower.
    default_steps: int | None = Field(None, ge=1)
    #: 1 or less is no classifier-free guidance (SDXL Turbo and SD Turbo run at 0).
    default_guidance_scale: float = Field(7.5, ge=0, le=50)
    #: The negative prompt of a request that names none ("" in a request: none).
    default_negative_prompt: str | None = None
    #: The size of a request that names none (and of the warm-up): "auto" is the loaded model's
    #: native size (``default_width_height``), brought within the request limits.
    default_size: str = Field("auto", pattern=r"^(auto|[1-9][0-9]*x[1-9][0-9]*)$")

    # Result cache
    cache_type: Literal["none", "memory", "redis"] = "memory"
    cache_max_entries: int = Field(256, ge=1)
    #: The in-memory cache's bound in bytes, besides its entries (an SDXL entry of four images
    #: is about 10 MB of base64 PNG).
    cache_max_bytes: int = Field(512 * 2**20, ge=1)
    cache_ttl_seconds: int = Field(86400, ge=1)
    redis_url: str | None = None

    # Async jobs (sdserve.jobs): records in Redis when the cache is Redis, in memory otherwise.
    job_ttl_seconds: int = Field(86400, ge=60)
    #: Most async jobs a replica holds unfinished (waiting for room, queued, running); past it
    #: POST /v1/jobs answers 429. Jobs wait for room in the request queue instead of failing.
    job_queue_size: int = Field(1000, ge=1)
    #: Without Redis: the most bytes of job records (finished ones hold their images) a replica
    #: keeps in memory; past it the oldest finished records go first, as if expired.
    job_memory_bytes: int = Field(1024 * 2**20, ge=1)
    #: A running job's record is renewed this often (x3); a record not renewed in time reads as failed.
    job_lease_seconds: float = Field(15, gt=0)
    #: With Redis, a replica shutting down hands the jobs it has not queued yet to the others
    #: (sdserve.jobs): one no replica takes up within this long reads as failed (replica_lost).
    #: It covers a rolling update's new pod loading the model.
    job_handoff_seconds: float = Field(600, gt=0)
    #: Take up jobs other replicas handed off or lost (and count among the replicas that share
    #: them in sdserve_queue_depth). Off for a canary: it serves its share of the traffic, and
    #: jobs accepted by the stable model stay on the stable replicas.
    job_adopt: bool = True
    #: Hosts job webhooks may call, comma-separated ("*.example.com" for subdomains); empty: none.
    webhook_allowed_hosts: str = ""
    webhook_backoff_seconds: float = Field(1.0, gt=0)

    # URL outputs (response_format "url", sdserve.outputs): S3-compatible object storage.
    s3_bucket: str | None = None
    s3_endpoint: str | None = Field(None, description="Endpoint URL of an S3-compatible store; AWS when unset.")
    s3_region: str = "us-east-1"
    s3_prefix: str = "sdserve/"
    s3_path_style: bool = Field(False, description="Path-style addressing (most S3-compatible stores).")
    s3_access_key_id: str | None = Field(None, description="From a Secret; the default AWS chain when unset.")
    s3_secret_access_key: str | None = None
    s3_url_expiry_seconds: int = Field(3600, ge=1, le=604800)
    #: A URL job whose images cannot be stored at its end retries this long (its lease renewed)
    #: before it fails with storage_unavailable: a store restarting does not lose a finished job.
    job_storage_retry_seconds: float = Field(60, ge=0)

    # Auth
    api_keys_file: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_jwks_url: str | None = None
    jwt_key_file: str | None = None
    jwt_algorithms: str = "RS256"

    # Rate limit (token bucket per key)
    rate_limit_enabled: bool = False
    rate_limit_rps: float = Field(2.0, gt=0)
    rate_limit_burst: int = Field(10, ge=1)

    # Safety
    blocklist_file: str | None = None

    # Process
    host: str = "0.0.0.0"
    #: Proxies (addresses or CIDRs, comma-separated; "*": any) whose X-Forwarded-For names the
    #: client: the address an anonymous request is rate-limited as. Uvicorn's forwarded_allow_ips.
    forwarded_allow_ips: str = "127.0.0.1"
    port: int = 8000
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    drain_seconds: float = Field(
        150, ge=0, description="Longest a SIGTERM waits for queued and running work and the ends of jobs."
    )
    termination_log: str = Field(
        "", description="File the reason of a fatal failure is written to (Kubernetes: /dev/termination-log)."
    )
    exit_after_load_failure_seconds: float | None = Field(
        None,
        ge=0,
        description=(
            "After a model load failure, exit (code 3) this many seconds later, so that the failure shows in "
            "the pod's status (CrashLoopBackOff with the reason as its termination message). Unset: stay up, unready."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.cache_type == "redis" and not self.redis_url:
            raise ValueError("SDSERVE_CACHE_TYPE=redis needs SDSERVE_REDIS_URL")
        if self.jwt_issuer and not (self.jwt_jwks_url or self.jwt_key_file):
            raise ValueError("SDSERVE_JWT_ISSUER needs SDSERVE_JWT_JWKS_URL or SDSERVE_JWT_KEY_FILE")
        if self.default_steps is not None and self.default_steps > self.max_steps:
            raise ValueError(
                f"SDSERVE_DEFAULT_STEPS {self.default_steps} must be <= SDSERVE_MAX_STEPS {self.max_steps}"
            )
        for name, sizes in (("DEFAULT_SIZE", [self.default_width_height()]), ("WARMUP_SIZES", self.warmup_list)):
            for w, h in sizes:
                if (
                    not (self.min_side <= w <= self.max_width and self.min_side <= h <= self.max_height)
                    or w % 8
                    or h % 8
                ):
                    raise ValueError(
                        f"SDSERVE_{name} {w}x{h} must be multiples of 8 within the request limits "
                        f"({self.min_side}..{self.max_width} x {self.min_side}..{self.max_height})"
                    )
        return self

    @property
    def stall_limit(self) -> float:
        """``stall_seconds``, or its default."""
        return self.stall_seconds or max(1800.0 if self.compile else 600.0, 3 * self.timeout_seconds)

    @property
    def steps_default(self) -> int:
        """The steps of a request that names none."""
        return self.default_steps or min(25, self.max_steps)

    @property
    def warmup_list(self) -> list[tuple[int, int]]:
        return [size for z in self.warmup_sizes.split(",") if (size := parse_size(z))]

    def default_width_height(self, native: tuple[int, int] | None = None) -> tuple[int, int]:
        """SDSERVE_DEFAULT_SIZE; for "auto", ``native`` (the loaded model's size: its UNet's
        sample size in pixels, 768x768 for an SD 2.x 768-v model) or, before the model is
        loaded, its family's (1024x1024 for SDXL, 512x512 otherwise), within the request limits."""
        size = parse_size(self.default_size)  # None for "auto"
        if size:
            return size
        w, h = native or ((1024, 1024) if self.pipeline == "sdxl" else (512, 512))
        return max(self.min_side, min(w, self.max_width)), max(self.min_side, min(h, self.max_height))

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: an edit's image and mask at their limit, and 1 MiB of form
        fields or JSON (a prompt at the CR's largest maxPromptLength is 100 000 characters)."""
        return 2 * self.max_upload_bytes + 2**20

    @property
    def model_id(self) -> str:
        """What identifies the weights in cache keys and /v1/models."""
        return self.model

    @property
    def model_names(self) -> list[str]:
        """What a request's ``model`` may say: the model, then its aliases."""
        return [self.model_id, *(a.strip() for a in self.model_aliases.split(",") if a.strip())]

    @property
    def served_models(self) -> str:
        """The names a request's ``model`` may say, as an error message lists them."""
        return " or ".join(map(repr, self.model_names))

    @property
    def jwt_algorithm_list(self) -> list[str]:
        return [a.strip() for a in self.jwt_algorithms.split(",") if a.strip()]


def env_names() -> set[str]:
    """Every environment variable Settings reads."""
    return {f"SDSERVE_{name.upper()}" for name in Settings.model_fields}
