"""Which optional APIs the cluster serves, asked at most once per TTL."""

from __future__ import annotations

import time

from ..api import OPTIONAL_APIS
from .kube import Kube


class Discovery:
    def __init__(self, kube: Kube, ttl_seconds: float):
        self.kube = kube
        self.ttl = ttl_seconds
        self._seen: tuple[float, frozenset[str]] | None = None

    async def optional_apis(self) -> frozenset[str]:
        now = time.monotonic()
        if self._seen is None or now - self._seen[0] > self.ttl:
            found = frozenset([api for api in OPTIONAL_APIS if await self.kube.has_api(api)])
            self._seen = (now, found)
        return self._seen[1]
