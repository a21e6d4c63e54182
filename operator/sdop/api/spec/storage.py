"""Where results live: the result cache (and its Redis), object storage for URL outputs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..base import ApiModel, cel
from ..k8s import DnsSubdomain
from .common import QUANTITY, SecretKeyRef


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
