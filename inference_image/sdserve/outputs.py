"""``response_format: "url"``: images stored in S3-compatible object storage and answered as
presigned URLs instead of megabytes of base64.

Keys are content-addressed (``{prefix}{sha256 of the file}.png``, ``.jpeg``, ``.webp``): the same image is stored
once, so a cached result, or a seeded request repeated, does not upload again. boto3 is
synchronous: every call runs in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from typing import Any

from . import metrics
from .encode import PNG, ImageFormat
from .errors import ApiError
from .settings import Settings

log = logging.getLogger("sdserve.outputs")


class S3Outputs:
    def __init__(self, s: Settings):
        import boto3
        from botocore.config import Config

        assert s.s3_bucket
        self.bucket, self.prefix, self.expiry = s.s3_bucket, s.s3_prefix, s.s3_url_expiry_seconds
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=s.s3_endpoint or None,
            region_name=s.s3_region,
            aws_access_key_id=s.s3_access_key_id or None,
            aws_secret_access_key=s.s3_secret_access_key or None,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path" if s.s3_path_style else "auto"},
                connect_timeout=5,
                read_timeout=30,
                retries={"max_attempts": 3},
            ),
        )

    def _store(self, data: bytes, fmt: ImageFormat) -> str:
        """Upload one image file unless stored already; its key."""
        from botocore.exceptions import ClientError

        key = f"{self.prefix}{hashlib.sha256(data).hexdigest()}.{fmt.kind}"
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
            metrics.OUTPUTS.labels("reused").inc()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=fmt.mime)
            metrics.OUTPUTS.labels("uploaded").inc()
        return key

    def presign(self, key: str) -> str:
        """A URL to GET a stored image, valid ``s3_url_expiry_seconds`` from now (computed
        locally: no call to the store)."""
        url: str = self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.expiry
        )
        return url

    async def store(self, images_b64: list[str], fmt: ImageFormat = PNG) -> list[str]:
        """The images' keys once stored; 503 (retryable) when the storage cannot be reached."""
        try:
            return [await asyncio.to_thread(self._store, base64.b64decode(b), fmt) for b in images_b64]
        except Exception as e:
            metrics.OUTPUTS.labels("failed").inc()
            log.warning("storing images in s3://%s failed: %s", self.bucket, e)
            raise ApiError(503, "storage_unavailable", "the image store cannot be reached; retry", retry_after=5) from e

    async def urls(self, images_b64: list[str], fmt: ImageFormat = PNG) -> list[str]:
        """One presigned URL per image, stored first; 503 (retryable) when the storage cannot be reached."""
        return [self.presign(key) for key in await self.store(images_b64, fmt)]


def make_outputs(s: Settings) -> S3Outputs | None:
    return S3Outputs(s) if s.s3_bucket else None
