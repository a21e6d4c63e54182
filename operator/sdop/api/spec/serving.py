"""How the server serves: batching, request limits and defaults, server tuning, content safety."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..base import ApiModel, cel
from .common import ConfigMapKeyRef, Scheduler


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
