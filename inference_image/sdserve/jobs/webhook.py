"""Webhooks: where they may go, and their signed delivery.

Webhooks go only to hosts in SDSERVE_WEBHOOK_ALLOWED_HOSTS (an open webhook lets anyone make
the server call inside the cluster). The body is the job as GET shows it; the headers carry
``X-Sdserve-Timestamp`` and ``X-Sdserve-Signature: sha256=HMAC(secret, "{timestamp}.{body}")``
so a receiver can check who sent it and refuse a replay. Failed deliveries are retried with
exponential backoff, ``WEBHOOK_ATTEMPTS`` in all, by whichever replica holds the delivery
(``sdserve.jobs.Jobs``): at least once, so a receiver dedupes by ``X-Sdserve-Job-Id``."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import urllib.parse

import httpx

from ..errors import ApiError
from ..settings import Settings
from .record import JobRecord

log = logging.getLogger("sdserve.jobs")

#: POSTs of one webhook, by every replica, before it is given up.
WEBHOOK_ATTEMPTS = 4
#: The longest one POST may take.
WEBHOOK_TIMEOUT_SECONDS = 10.0


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


async def attempt(client: httpx.AsyncClient, record: JobRecord, body: bytes) -> str | None:
    """One signed POST of ``body`` (the job as GET shows it) to ``record``'s webhook: None when
    the receiver answered 2xx, else what went wrong. Retries, and the record of them, are the
    caller's (``sdserve.jobs.Jobs``): a delivery outlives the replica that began it."""
    assert record.webhook_url is not None
    ts = str(int(time.time()))
    headers = {
        "content-type": "application/json",
        "x-sdserve-job-id": record.id,
        "x-sdserve-timestamp": ts,
        "x-sdserve-signature": signature(record.webhook_secret or "", ts, body),
    }
    try:
        r = await client.post(record.webhook_url, content=body, headers=headers)
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}"
    return None if 200 <= r.status_code < 300 else f"HTTP {r.status_code}"
