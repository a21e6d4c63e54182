"""The operator's state, built once at start-up and handed to every handler as kopf's ``memo``."""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field

from ..reconcile.discovery import Discovery
from ..reconcile.kube import Kube
from ..reconcile.service import Reconciler
from ..render import ClusterFacts
from .settings import OperatorSettings

DISCOVERY_TTL_SECONDS = 60.0


@dataclass
class Memo:
    """kopf shallow-copies the memo per object: these fields are shared by every handler call."""

    settings: OperatorSettings
    kube: Kube
    reconciler: Reconciler
    #: Bounded concurrency: a thousand services must not become a thousand API storms at once.
    slots: asyncio.Semaphore
    #: The resync loop (``handlers.resync_forever``), started at start-up, cancelled at cleanup.
    resync_task: asyncio.Task[None] | None = None
    #: One lock per service (by uid), so that its reconciles never overlap; a lock nobody
    #: holds or waits for is dropped.
    locks: weakref.WeakValueDictionary[str, asyncio.Lock] = field(default_factory=weakref.WeakValueDictionary)

    def lock(self, uid: str) -> asyncio.Lock:
        lock = self.locks.get(uid)
        if lock is None:
            lock = self.locks[uid] = asyncio.Lock()
        return lock

    @classmethod
    def build(cls, settings: OperatorSettings, kube: Kube | None = None) -> Memo:
        kube = kube or Kube()
        defaults = ClusterFacts(
            default_image_repository=settings.default_image_repository,
            default_image_tag=settings.default_image_tag,
        )
        reconciler = Reconciler(kube, Discovery(kube, DISCOVERY_TTL_SECONDS), defaults)
        return cls(settings, kube, reconciler, asyncio.Semaphore(settings.max_concurrent_reconciles))
