"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does.

With two or more operator replicas exactly one reconciles: a replica starts kopf only
after it holds the Lease, renews it every ``RENEW_SECONDS``, and stops (the pod restarts
and stands by) when it cannot renew within ``LEASE_SECONDS``. A standby takes the Lease
once the holder's last renewal is ``LEASE_SECONDS`` old, so a dead leader is replaced
within ``LEASE_SECONDS + RETRY_SECONDS``. A replica that stops cleanly releases the Lease,
so a rolling update hands over at once. Writes use the Lease's resourceVersion: two
standbys racing for it cannot both win (the API server answers 409 to the second).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

from ..reconcile.kube import Conflict, Kube, KubeError

LEASE_SECONDS = 15
RENEW_SECONDS = 5
RETRY_SECONDS = 2

log = logging.getLogger("sdop.leader")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _stamp(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # MicroTime


def _parse(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str):
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity

    def _lease(self, spec: dict[str, Any], resource_version: str | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if resource_version:
            meta["resourceVersion"] = resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    async def try_acquire(self) -> bool:
        """Take or renew the Lease if it is free, expired or ours; False when another replica holds it."""
        now = _now()
        lease = await self.kube.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
        mine = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": LEASE_SECONDS,
            "acquireTime": _stamp(now),
            "renewTime": _stamp(now),
            "leaseTransitions": 0,
        }
        try:
            if lease is None:
                await self.kube.create(self._lease(mine))
                return True
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity")
            renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
            duration = datetime.timedelta(seconds=spec.get("leaseDurationSeconds") or LEASE_SECONDS)
            if holder and holder != self.identity and renewed is not None and renewed + duration > now:
                return False
            if holder == self.identity:
                mine["acquireTime"] = spec.get("acquireTime") or mine["acquireTime"]
                mine["leaseTransitions"] = spec.get("leaseTransitions") or 0
            else:
                mine["leaseTransitions"] = (spec.get("leaseTransitions") or 0) + 1
            await self.kube.replace(self._lease(mine, lease["metadata"]["resourceVersion"]))
            return True
        except Conflict:
            return False  # another replica wrote first

    async def acquire(self) -> None:
        """Wait until this replica holds the Lease."""
        waiting_logged = False
        while True:
            try:
                if await self.try_acquire():
                    log.info("leader election: %s holds Lease %s/%s", self.identity, self.namespace, self.name)
                    return
            except KubeError as e:
                log.warning("leader election: %s", e)
            if not waiting_logged:
                log.info("leader election: standing by; another replica holds Lease %s/%s", self.namespace, self.name)
                waiting_logged = True
            await asyncio.sleep(RETRY_SECONDS)

    async def hold(self) -> None:
        """Renew until renewal fails for a whole lease duration; then return (leadership is lost)."""
        last = _now()
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            try:
                if await self.try_acquire():
                    last = _now()
                    continue
                log.error("leader election: another replica took Lease %s/%s", self.namespace, self.name)
                return
            except KubeError as e:
                log.warning("leader election: renewing: %s", e)
            if (_now() - last).total_seconds() >= LEASE_SECONDS:
                log.error("leader election: could not renew for %d s; stopping", LEASE_SECONDS)
                return

    async def release(self) -> None:
        """Give the Lease up on a clean stop, so a standby takes over at once."""
        try:
            lease = await self.kube.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            spec = {**lease["spec"], "holderIdentity": None, "leaseDurationSeconds": 1}
            await self.kube.replace(self._lease(spec, lease["metadata"]["resourceVersion"]))
        except KubeError as e:
            log.warning("leader election: releasing: %s", e)
