"""The handlers' wrapper (``sdop.operator.handlers.reconcile``) in-process against the test API
server: a trigger holding an old copy of a service does not undo a spec change."""

from __future__ import annotations

import asyncio

import kopf
import pytest

from sdop.operator.handlers import changed, reconcile, resync_service
from sdop.operator.memo import Memo
from sdop.operator.settings import OperatorSettings
from sdop.reconcile.kube import Credentials, Kube
from sdtesting.examples import example

pytestmark = pytest.mark.integration

NS = "order"
SDS = ("sdop.io/v1alpha1", "stablediffusionservices")
OFF = {
    "monitoring": {"serviceMonitor": False, "prometheusRule": False, "dashboard": False},
    "ingress": {"enabled": False},
    "cache": {"type": "none", "redis": None},
}
EVENTS: list[str] = []
GONE = {
    ("ConfigMap", "svc-dashboard"),
    ("Ingress", "svc"),
    ("Deployment", "svc-redis"),
    ("Service", "svc-redis"),
    ("PrometheusRule", "svc"),
    ("ServiceMonitor", "svc"),
}


@pytest.fixture
async def memo(apiserver, monkeypatch):
    # kopf posts events through its running operator's queue; here they are only recorded.
    monkeypatch.setattr(kopf, "event", lambda body, **event: EVENTS.append(event["reason"]))
    m = Memo.build(OperatorSettings(), kube=Kube(Credentials(apiserver.url)))
    yield m
    await m.kube.close()


async def test_a_resync_listed_before_a_spec_change_does_not_put_back_what_it_pruned(apiserver, memo):
    cr = example("sd15-production")
    cr["metadata"] = {"name": "svc", "namespace": NS}
    apiserver.create(cr)
    await changed(body=apiserver.get(*SDS, NS, "svc"), reason="create", memo=memo, retry=0)
    listed = apiserver.get(*SDS, NS, "svc")  # what the resync loop listed, just before the edit
    assert GONE <= set(apiserver.children(NS, "svc"))

    apiserver.patch(*SDS, NS, "svc", {"spec": OFF})
    await changed(body=apiserver.get(*SDS, NS, "svc"), reason="update", memo=memo, retry=0)
    assert not GONE & set(apiserver.children(NS, "svc")) and "Pruned" in EVENTS

    report = await resync_service(memo, listed)
    assert not GONE & set(apiserver.children(NS, "svc")), report.applied
    # the old copy itself, converged, would have put them back: that is what the re-read prevents
    await reconcile(memo, listed, "resync", lambda r, body: r.converge(body, prune=False))
    assert GONE & set(apiserver.children(NS, "svc"))


async def test_a_resync_of_a_service_deleted_since_the_list_writes_nothing(apiserver, memo):
    cr = example("minimal")
    cr["metadata"] = {"name": "gone", "namespace": NS}
    apiserver.create(cr)
    listed = apiserver.get(*SDS, NS, "gone")
    apiserver.delete(*SDS, NS, "gone")
    report = await resync_service(memo, listed)
    assert not report.applied and not apiserver.children(NS, "gone")


async def test_a_resync_running_beside_a_spec_change_leaves_the_changed_children(apiserver, memo):
    """Reconciles of one service take turns (``Memo.lock``): whichever runs first, the pruned
    children stay gone."""
    cr = example("sd15-production")
    cr["metadata"] = {"name": "both", "namespace": NS}
    apiserver.create(cr)
    await changed(body=apiserver.get(*SDS, NS, "both"), reason="create", memo=memo, retry=0)
    for _ in range(3):
        listed = apiserver.get(*SDS, NS, "both")
        on = listed["spec"]["ingress"]["enabled"]
        spec = OFF if on else {"monitoring": {"dashboard": True}, "ingress": {"enabled": True}}
        apiserver.patch(*SDS, NS, "both", {"spec": spec})
        fresh = apiserver.get(*SDS, NS, "both")
        await asyncio.gather(
            resync_service(memo, listed),
            changed(body=fresh, reason="update", memo=memo, retry=0),
            resync_service(memo, listed),
        )
        kids = set(apiserver.children(NS, "both"))
        assert (("Ingress", "both") in kids) is not on and (("ConfigMap", "both-dashboard") in kids) is not on
