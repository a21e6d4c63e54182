"""Fixtures for the reconciler run in-process against the test API server."""

from __future__ import annotations

import pytest

from sdop.reconcile.discovery import Discovery
from sdop.reconcile.kube import Credentials, Kube
from sdop.reconcile.service import Reconciler
from sdop.render import ClusterFacts
from sdtesting.apiserver import Cluster


@pytest.fixture(scope="module")
def apiserver():
    """The test API server, one per module (tests use their own namespaces or names)."""
    c = Cluster()
    yield c
    c.close()


def reconciler_for(url: str) -> Reconciler:
    """What ``sdop operator`` runs per event, talking to the API server at ``url``."""
    kube = Kube(Credentials(url))
    return Reconciler(kube, Discovery(kube, ttl_seconds=60), ClusterFacts())


@pytest.fixture
async def reconciler(apiserver):
    r = reconciler_for(apiserver.url)
    yield r
    await r.kube.close()
