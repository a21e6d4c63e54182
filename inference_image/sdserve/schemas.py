"""Request and response bodies, and the limit checks that depend on the settings."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .encode import ImageFormat, OutputFormat
from .errors import ApiError
from .schedulers import SchedulerName


class Extensions(BaseModel):
    """Stable Diffusion parameters beyond the OpenAI Images API."""

    negative_prompt: str | None = Field(
        None, description='What the image should not show; unset: the server\'s default, "" for none.'
    )
    num_inference_steps: int | None = Field(None, ge=1, description="Denoising steps (server default when unset).")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="Classifier-free guidance scale.")
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="Seed of the first image; image i uses seed+i. Seeded requests are cached."
    )
    scheduler: SchedulerName = Field("default", description="Noise scheduler.")
    lora: str | None = Field(None, description="A LoRA adapter of the server, by name, at its default weight.")
    loras: dict[str, float] | None = Field(None, description="LoRA adapters of the server by name, with weights.")


class OutputOptions(BaseModel):
    """How the Images API encodes its images."""

    output_format: OutputFormat = Field("png", description="png (lossless), jpeg or webp (smaller).")
    output_compression: int | None = Field(
        None,
        ge=0,
        le=100,
        description="jpeg and webp: quality 0-100, higher is better and larger; unset: 90 (OpenAI's default is 100).",
    )

    def image_format(self) -> ImageFormat:
        """422 naming output_compression for a PNG, which is lossless."""
        if self.output_compression is not None and self.output_format == "png":
            raise ApiError(
                422,
                "invalid_value",
                "output_compression applies to jpeg and webp; png is lossless",
                param="output_compression",
            )
        if self.output_compression is None:  # PNG, or the format's default quality
            return ImageFormat(self.output_format)
        return ImageFormat(self.output_format, self.output_compression)


class OpenAIImageRequest(Extensions, OutputOptions):
    """POST /v1/images/generations, as in the OpenAI Images API."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="Text prompt.")
    model: str | None = Field(None, description="Model id; must be the served model when set.")
    n: int = Field(1, ge=1, description="Number of images.")
    size: str | None = Field(
        None,
        description=(
            "WIDTHxHEIGHT in pixels, each a multiple of 8; unset or auto: the server's default size "
            "(the model's native size, e.g. 512x512 for SD 1.5, 768x768 for SD 2.1, 1024x1024 for SDXL: "
            "/v1/models lists it in defaults)."
        ),
    )
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="url: presigned URLs of images in object storage (when the server has it)."
    )
    quality: str | None = Field(None, description="Accepted for compatibility; ignored.")
    style: str | None = Field(None, description="Accepted for compatibility; ignored.")
    user: str | None = Field(None, description="Accepted for compatibility; ignored.")


class StreamOptions(BaseModel):
    """Streaming, as the OpenAI Images API has it (sdserve.stream)."""

    stream: bool = Field(
        False,
        description=(
            "Server-sent events instead of one JSON answer: image_generation.partial_image while the "
            "first image is denoised, then image_generation.completed for each image."
        ),
    )
    partial_images: int = Field(
        0,
        ge=0,
        le=3,
        description=(
            "With stream: how many previews of the first image to send while it is denoised (low "
            "resolution, from its latents; fewer when the request has too few steps)."
        ),
    )


class OpenAIGenerationsRequest(OpenAIImageRequest, StreamOptions):
    """POST /v1/images/generations: the Images API body, and its streaming options."""


class Webhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="Called with the job when it ends; its host must be allowed by the operator.")
    secret: str = Field("", description="Key of the HMAC-SHA256 signature in X-Sdserve-Signature.")


class JobRequest(OpenAIImageRequest):
    """POST /v1/jobs: a generations body, and where to report the end."""

    webhook: Webhook | None = None
    preview: bool = Field(False, description="Low-resolution previews in GET and the events while it runs.")


class OpenAIEditRequest(Extensions, OutputOptions):
    """POST /v1/images/edits (multipart), as in the OpenAI Images API: the form's fields other
    than ``image`` and ``mask``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="Text prompt.")
    model: str | None = Field(None, description="Model id; must be the served model when set.")
    n: int = Field(1, ge=1, description="Number of images.")
    size: str | None = Field(None, description="WIDTHxHEIGHT; the image's own size (rounded to 8) when unset.")
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="url: presigned URLs of images in object storage (when the server has it)."
    )
    strength: float | None = Field(
        None, gt=0, le=1, description="How far the image is noised: 0.8 without a mask, 1.0 with one when unset."
    )
    quality: str | None = Field(None, description="Accepted for compatibility; ignored.")
    user: str | None = Field(None, description="Accepted for compatibility; ignored.")


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int


class OpenAIImageResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    output_format: OutputFormat = "png"


class GenerateRequest(Extensions):
    """POST /generate: the classic Stable Diffusion service request."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    width: int | None = Field(None, ge=8, description="Default: the server's default size (see size).")
    height: int | None = Field(None, ge=8, description="Default: the server's default size.")
    num_images: int = Field(1, ge=1)


class Timings(BaseModel):
    queue_seconds: float
    inference_seconds: float
    total_seconds: float


class GenerateResponse(BaseModel):
    """The seed service's answer (``image``, ``status``), which its clients read, with sdserve's
    own fields beside it."""

    image: str = Field(description="The first image, a base64 PNG (the seed's field).")
    status: Literal["success"] = Field("success", description="The seed's field: errors are 4xx/5xx with a body.")
    images: list[str] = Field(description="Base64 PNGs, all of them.")
    seeds: list[int]
    model: str
    revision: str
    cached: bool
    timings: Timings


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_size(size: str) -> tuple[int, int] | None:
    m = _SIZE.match(size.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def limit_problems(
    settings,
    *,
    prompt: str,
    negative: str | None,
    width: int,
    height: int,
    n: int,
    steps: int,
    width_field: str,
    height_field: str,
    n_field: str,
) -> list[tuple[str, str]]:
    """(field, message) for every limit the request breaks."""
    s = settings
    out: list[tuple[str, str]] = []
    if len(prompt) > s.max_prompt_length:
        out.append(("prompt", f"prompt is {len(prompt)} characters; the limit is {s.max_prompt_length}"))
    if negative and len(negative) > s.max_prompt_length:
        out.append(
            ("negative_prompt", f"negative_prompt is {len(negative)} characters; the limit is {s.max_prompt_length}")
        )
    for name, value, top in ((width_field, width, s.max_width), (height_field, height, s.max_height)):
        if value % 8:
            out.append((name, f"{value} is not a multiple of 8"))
        elif not s.min_side <= value <= top:
            out.append((name, f"{value} is outside {s.min_side}..{top}"))
    if n > min(s.max_images, s.max_batch_size):
        out.append((n_field, f"{n} images requested; the limit is {min(s.max_images, s.max_batch_size)}"))
    if steps > s.max_steps:
        out.append(("num_inference_steps", f"{steps} steps requested; the limit is {s.max_steps}"))
    return out


class OpenAIEditsRequest(OpenAIEditRequest, StreamOptions):
    """POST /v1/images/edits: the form's fields other than the images, and streaming."""


class JobEditRequest(OpenAIEditRequest):
    """POST /v1/jobs as a multipart edits form, and where to report the end."""

    webhook: Webhook | None = None
    preview: bool = Field(False, description="Low-resolution previews in GET and the events while it runs.")
