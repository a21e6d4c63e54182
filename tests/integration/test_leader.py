"""Leader election on a Lease, in-process against the test API server (resourceVersion conflicts included)."""

from __future__ import annotations

import asyncio

import pytest

from sdop.operator.leader import LeaderElector
from sdop.reconcile.kube import Credentials, Kube

pytestmark = pytest.mark.integration

LEASE = ("coordination.k8s.io/v1", "leases", "sdop", "lease")


@pytest.fixture
async def kube(apiserver):
    k = Kube(Credentials(apiserver.url))
    yield k
    await k.close()


def electors(kube: Kube, name: str, *ids: str) -> list[LeaderElector]:
    return [LeaderElector(kube, "sdop", name, i) for i in ids]


async def test_one_holder_at_a_time_and_release_hands_over(apiserver, kube):
    a, b = electors(kube, "handover", "a", "b")
    assert await a.try_acquire()
    assert not await b.try_acquire()
    assert await a.try_acquire()  # renewing keeps it
    await a.release()
    assert await b.try_acquire()
    spec = apiserver.get("coordination.k8s.io/v1", "leases", "sdop", "handover")["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1


async def test_an_expired_lease_is_taken_and_a_race_has_one_winner(apiserver, kube):
    a, b, c = electors(kube, "race", "a", "b", "c")
    assert await a.try_acquire()
    apiserver.patch(
        "coordination.k8s.io/v1", "leases", "sdop", "race", {"spec": {"renewTime": "2020-01-01T00:00:00.000000Z"}}
    )
    wins = await asyncio.gather(b.try_acquire(), c.try_acquire())
    assert sorted(wins) == [False, True]  # the slower write meets a 409 on the resourceVersion
