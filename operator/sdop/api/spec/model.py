"""``spec.model``: which weights to serve, from where, with which LoRA adapters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..base import ApiModel, cel
from ..k8s import DnsSubdomain
from .common import QUANTITY, SecretKeyRef


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
