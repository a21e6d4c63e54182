"""A job's record: what the store keeps of it and what clients see of it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass
class JobRecord:
    id: str
    owner: str
    status: str = "queued"  # queued, running, succeeded, failed, cancelled
    created: float = field(default_factory=time.time)
    step: int = 0
    steps: int = 0
    images: list[str] = field(default_factory=list)
    #: response_format "url": the images' keys in object storage (``images`` stays empty), each
    #: presigned anew whenever the job is shown, so a URL is valid for its expiry from then.
    keys: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    error: dict[str, Any] | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None
    lease_until: float = 0.0
    cancel_requested: bool = False
    preview: str | None = None  # a low-resolution PNG (base64) while it runs, when asked for
    output_format: str = "png"  # of its images (the request's output_format)
    revised_prompt: str | None = None  # what the model read of a prompt too long to read whole
    offered: float = 0.0  # when it was handed off (its replica shut down or died); 0 once one took it up
    runner: str = ""  # the replica that runs it (``Jobs.me``); none while offered
    attempts: int = 0  # the replicas that took it, the first included
    lost_runs: int = 0  # the replicas that stopped renewing it (died) while they ran it
    #: Ended with a webhook not yet delivered nor given up: the replica that wrote the end
    #: (``runner``) delivers it, holding ``lease_until`` across its retries; a replica that
    #: finds that lease lapsed (the deliverer died, or shut down first) delivers it instead.
    webhook_due: bool = False
    webhook_attempts: int = 0  # the POSTs of its webhook so far, by every replica

    @classmethod
    def parse(cls, raw: str | bytes) -> JobRecord:
        """A stored record. Fields this version does not know are left out: during a rolling
        update, replicas of two versions share one Redis and read each other's records."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(raw).items() if k in known})

    def lapsed(self, now: float) -> bool:
        return self.status not in TERMINAL and self.lease_until < now

    def delivery_lapsed(self, now: float) -> bool:
        """Ended, its webhook due, and no replica renewing its delivery."""
        return self.status in TERMINAL and self.webhook_due and self.lease_until < now

    def leased(self) -> bool:
        """Whether a replica holds it under ``lease_until``: running it, or delivering its webhook."""
        return self.status not in TERMINAL or self.webhook_due

    def public(self, presign: Callable[[str], str] | None = None) -> dict[str, Any]:
        """What GET, the events and the webhook show (never the webhook's secret); ``presign``
        turns the keys of a job answered with URLs into URLs."""
        out: dict[str, Any] = {
            "id": self.id,
            "object": "image.job",
            "status": self.status,
            "created": int(self.created),
            "progress": {"step": self.step, "steps": self.steps},
        }
        if self.status == "succeeded":
            if self.keys:  # no URL where the store is no longer configured (the CR dropped it)
                urls = [presign(k) if presign else None for k in self.keys]
                data = [{"url": u, "seed": s} for u, s in zip(urls, self.seeds, strict=True)]
            else:
                data = [{"b64_json": b, "seed": s} for b, s in zip(self.images, self.seeds, strict=True)]
            if self.revised_prompt is not None:
                data = [{**d, "revised_prompt": self.revised_prompt} for d in data]
            out["result"] = {"created": int(time.time()), "data": data, "output_format": self.output_format}
        if self.error:
            out["error"] = self.error
        if self.preview and self.status not in TERMINAL:
            out["preview"] = {"b64_json": self.preview, "step": self.step}
        return out


def keeping_cancel(record: JobRecord, stored: JobRecord | None) -> JobRecord:
    """``record``, to be written over ``stored``, with the cancel asked for there: no write
    undoes a cancel (the runner's progress, a hand-off or a take-up written between a client's
    DELETE and the runner's next look would otherwise drop it)."""
    if stored is not None and stored.cancel_requested:
        record.cancel_requested = True
    return record


def unless_ended(record: JobRecord) -> Callable[[JobRecord | None], JobRecord | None]:
    """A store ``update`` writing ``record`` over a stored record that has not ended (and is
    there), keeping its cancel."""

    def change(stored: JobRecord | None) -> JobRecord | None:
        if stored is None or stored.status in TERMINAL:
            return None
        return keeping_cancel(record, stored)

    return change
