"""Scale to zero against the test API server, with and without the KEDA HTTP add-on.

The add-on's interceptor (the part that holds a request while the service wakes) is a Go
binary that cannot be installed here: these tests cover what the operator does (the
objects, the routing, the refusal without the add-on, the status at zero); the rendered
HTTPScaledObject is checked against the add-on's CRD in tests/unit. A request held through
a real cold start is not tested here.
"""

from __future__ import annotations

import pytest

from sdtesting.apiserver import Cluster
from sdtesting.examples import example

from .conftest import reconciler_for

pytestmark = pytest.mark.integration

SDS = ("sdop.io/v1alpha1", "stablediffusionservices")
NS = "tools"


def condition(cluster: Cluster, type_: str) -> dict:
    status = cluster.get(*SDS, NS, "sd-on-demand")["status"]
    return next(c for c in status["conditions"] if c["type"] == type_)


async def test_with_the_http_add_on_the_service_can_idle_at_zero_and_wake(apiserver, reconciler):
    cr = example("keda-scale-to-zero")
    apiserver.create(cr)
    await reconciler.converge(apiserver.get(*SDS, NS, "sd-on-demand"), prune=True)
    kids = apiserver.children(NS, "sd-on-demand")
    assert ("HTTPScaledObject", "sd-on-demand") in kids and ("Service", "sd-on-demand-wake") in kids
    assert ("ScaledObject", "sd-on-demand") not in kids
    status = apiserver.get(*SDS, NS, "sd-on-demand")["status"]
    assert status["endpoint"] == "http://sd-on-demand-wake.tools.svc:8080"
    assert "OptionalAPIsAvailable" not in {c["type"] for c in status["conditions"]}  # everything it needs is there
    # KEDA took it to zero: Ready, idle.
    apiserver.patch("apps/v1", "deployments", NS, "sd-on-demand", {"spec": {"replicas": 0}})
    apiserver.patch(
        "apps/v1",
        "deployments",
        NS,
        "sd-on-demand",
        {"status": {"observedGeneration": 2, "replicas": 0, "readyReplicas": 0, "updatedReplicas": 0}},
        sub="status",
    )
    await reconciler.converge(apiserver.get(*SDS, NS, "sd-on-demand"), prune=True)
    ready = condition(apiserver, "Ready")
    assert ready["status"] == "True" and ready["reason"] == "ScaledToZero", ready
    assert condition(apiserver, "ModelReady")["reason"] == "ScaledToZero"


async def test_without_the_http_add_on_scale_to_zero_is_refused_and_said():
    bare = Cluster(keda_http=False)
    reconciler = reconciler_for(bare.url)
    try:
        bare.create(example("keda-scale-to-zero"))
        await reconciler.converge(bare.get(*SDS, NS, "sd-on-demand"), prune=True)
        kids = bare.children(NS, "sd-on-demand")
        assert ("HTTPScaledObject", "sd-on-demand") not in kids and ("Service", "sd-on-demand-wake") not in kids
        so = bare.get("keda.sh/v1alpha1", "scaledobjects", NS, "sd-on-demand")
        assert so["spec"]["minReplicaCount"] == 1  # nothing could wake it at zero
        apis = condition(bare, "OptionalAPIsAvailable")
        assert apis["status"] == "False" and "http.keda.sh/v1alpha1" in apis["message"], apis
        assert bare.get(*SDS, NS, "sd-on-demand")["status"]["endpoint"] == "http://sd-on-demand.tools.svc"
    finally:
        await reconciler.kube.close()
        bare.close()
