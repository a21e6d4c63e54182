"""Webhooks: where they may go, and their signed delivery.

Webhooks go only to hosts in SDSERVE_WEBHOOK_ALLOWED_HOSTS (an open webhook lets anyone make
the server call inside the cluster). The body is the job as GET shows it; the headers carry
``X-Sdserve-Timestamp`` and ``X-Sdserve-Signature: sha256=HMAC(secret, "{timestamp}.{body}")``
so a receiver can check who sent it and refuse a replay. Failed deliveries are retried with
exponential backoff."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import urllib.parse

from .. import metrics
from ..errors import ApiError
from ..settings import Settings
from .record import JobRecord

log = logging.getLogger("sdserve.jobs")

WEBHOOK_ATTEMPTS = 4


def check_webhook(s: Settings, url: str) -> None:
    """422 naming webhook.url unless it is http(s) to an allowed host."""
    parsed = urllib.parse.urlsplit(url)
    host = (parsed.hostname or "").lower()
    if parsed.scheme not in ("http", "https") or not host:
        raise ApiError(422, "invalid_value", "webhook.url must be an http or https URL", param="webhook.url")
    allowed = [h.strip().lower() for h in s.webhook_allowed_hosts.split(",") if h.strip()]
    if not any(host == a or (a.startswith("*.") and host.endswith(a[1:])) for a in allowed):
        raise ApiError(
            422,
            "webhook_host_not_allowed",
            f"webhook host {host!r} is not allowed (SDSERVE_WEBHOOK_ALLOWED_HOSTS, spec.webhooks.allowedHosts)",
            param="webhook.url",
        )


def signature(secret: str, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


async def deliver(s: Settings, record: JobRecord, body: bytes) -> None:
    """POST ``body`` (the job as GET shows it) to ``record``'s webhook, signed, up to
    ``WEBHOOK_ATTEMPTS`` times with exponential backoff; a host no longer allowed is not called."""
    import httpx

    assert record.webhook_url is not None
    try:  # as allowed now: another replica took the job, or the allowed hosts changed since
        check_webhook(s, record.webhook_url)
    except ApiError as e:
        metrics.WEBHOOKS.labels("failed").inc()
        log.warning("webhook of %s not called: %s", record.id, e.message)
        return
    delay = s.webhook_backoff_seconds
    async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
        for attempt in range(WEBHOOK_ATTEMPTS):
            ts = str(int(time.time()))
            headers = {
                "content-type": "application/json",
                "x-sdserve-job-id": record.id,
                "x-sdserve-timestamp": ts,
                "x-sdserve-signature": signature(record.webhook_secret or "", ts, body),
            }
            try:
                r = await client.post(record.webhook_url, content=body, headers=headers)
                if 200 <= r.status_code < 300:
                    metrics.WEBHOOKS.labels("delivered").inc()
                    return
                problem = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__}: {e}"
            metrics.WEBHOOKS.labels("retried" if attempt + 1 < WEBHOOK_ATTEMPTS else "failed").inc()
            log.warning("webhook of %s, attempt %d: %s", record.id, attempt + 1, problem)
            await asyncio.sleep(delay * 2**attempt)
