"""The apply path against the test API server: each defect a real kube-apiserver exposed.

The reconciler runs in-process (the same code ``sdop operator`` runs per event), so each
test drives one converge at a time and checks what the API server holds afterwards.
"""

from __future__ import annotations

import copy

import pytest

from sdop.reconcile.children import HANDOVER_MANAGER, owns
from sdop.reconcile.service import Reconciler
from sdop.render import render
from sdtesting.apiserver import Cluster
from sdtesting.examples import example
from sdtesting.waiting import eventually

pytestmark = pytest.mark.integration

NS = "apply"
SDS = ("sdop.io/v1alpha1", "stablediffusionservices")


def production(name: str) -> dict:
    cr = example("sd15-production")
    cr["metadata"] = {"name": name, "namespace": NS}
    return cr


class Service:
    """One StableDiffusionService: create it, edit its spec, converge, read what it made."""

    def __init__(self, apiserver: Cluster, reconciler: Reconciler, cr: dict):
        self.apiserver, self.reconciler = apiserver, reconciler
        self.name = cr["metadata"]["name"]
        apiserver.create(cr)

    @property
    def body(self) -> dict:
        body = self.apiserver.get(*SDS, NS, self.name)
        assert body is not None
        return body

    def edit(self, spec: dict) -> None:
        self.apiserver.patch(*SDS, NS, self.name, {"spec": spec})

    async def converge(self):
        return await self.reconciler.converge(self.body, prune=True)

    def get(self, api_version: str, plural: str, name: str) -> dict | None:
        return self.apiserver.get(api_version, plural, NS, name)

    def kids(self) -> dict:
        return self.apiserver.children(NS, self.name)

    def condition(self, type_: str) -> dict:
        return next(c for c in self.body["status"]["conditions"] if c["type"] == type_)

    def rendered(self) -> list[dict]:
        return render(self.body)


def container(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


async def test_an_image_upgrade_replaces_the_prefetch_job_and_rolls_the_deployment(apiserver, reconciler):
    sd = Service(apiserver, reconciler, production("upgrade"))
    await sd.converge()
    jobs = {n for k, n in sd.kids() if k == "Job"}
    sd.edit({"image": {"tag": "9.9.9"}})
    await sd.converge()
    assert container(sd.get("apps/v1", "deployments", "upgrade"))["image"].endswith(":9.9.9")
    new_jobs = {n for k, n in sd.kids() if k == "Job"}
    assert len(new_jobs) == 1 and not new_jobs & jobs, (jobs, new_jobs)  # a new Job; the old one pruned
    job = sd.get("batch/v1", "jobs", new_jobs.pop())
    assert container({"spec": job["spec"]})["image"].endswith(":9.9.9")
    assert sd.condition("Degraded")["status"] == "False", sd.condition("Degraded")


async def test_a_new_storage_class_is_a_new_cache_claim_used_by_every_child(apiserver, reconciler):
    sd = Service(apiserver, reconciler, production("storage"))
    await sd.converge()
    sd.edit({"model": {"cache": {"storageClassName": "premium-rwx"}}})
    await sd.converge()
    claims = [n for k, n in sd.kids() if k == "PersistentVolumeClaim"]
    assert len(claims) == 1
    pvc = sd.get("v1", "persistentvolumeclaims", claims[0])
    assert pvc["spec"]["storageClassName"] == "premium-rwx"
    volumes = sd.get("apps/v1", "deployments", "storage")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "hf-cache", "persistentVolumeClaim": {"claimName": claims[0]}} in volumes
    assert sd.condition("Degraded")["status"] == "False"


async def test_one_rejected_child_does_not_block_the_others(apiserver, reconciler):
    sd = Service(apiserver, reconciler, production("shrink"))
    await sd.converge()
    # A smaller cache is refused by the API server (a claim never shrinks); the same edit's
    # batching change still reaches the ConfigMap and the Deployment.
    sd.edit({"model": {"cache": {"size": "5Gi"}}, "batching": {"maxBatchSize": 4}})
    await sd.converge()
    assert sd.get("v1", "configmaps", "shrink-config")["data"]["SDSERVE_MAX_BATCH_SIZE"] == "4"
    dep = sd.get("apps/v1", "deployments", "shrink")
    cm_hash = dep["spec"]["template"]["metadata"]["annotations"]["sdop.io/config-hash"]
    wanted = next(o for o in sd.rendered() if o["kind"] == "Deployment" and o["metadata"]["name"] == "shrink")
    assert cm_hash == wanted["spec"]["template"]["metadata"]["annotations"]["sdop.io/config-hash"]
    degraded = sd.condition("Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ApplyFailed"
    assert "PersistentVolumeClaim/" in degraded["message"] and "storage" in degraded["message"], degraded


async def test_an_object_we_do_not_control_is_never_adopted(apiserver, reconciler):
    payments = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "payments", "namespace": NS},
        "spec": {"selector": {"app": "payments"}, "ports": [{"name": "http", "port": 8080}]},
    }
    before = apiserver.apply(copy.deepcopy(payments), "services", manager="kubectl").json()
    sd = Service(apiserver, reconciler, production("payments"))
    report = await sd.converge()
    after = sd.get("v1", "services", "payments")
    assert after == before  # not one field written: same resourceVersion, selector, no owner reference
    assert "Service/payments" not in report.applied
    degraded = sd.condition("Degraded")
    assert degraded["reason"] == "Conflict" and "Service/payments" in degraded["message"], degraded
    assert sd.get("apps/v1", "deployments", "payments") is not None  # the rest is applied
    # Deleting the StableDiffusionService garbage-collects its children, never the Service.
    apiserver.delete(*SDS, NS, "payments")
    eventually(lambda: sd.get("apps/v1", "deployments", "payments") is None, timeout=5)
    assert sd.get("v1", "services", "payments") == before


async def test_turning_autoscaling_on_keeps_the_replicas_running(apiserver, reconciler):
    cr = production("handover")
    cr["spec"]["autoscaling"]["enabled"] = False
    cr["spec"]["replicas"] = {"min": 3, "max": 8}
    sd = Service(apiserver, reconciler, cr)
    await sd.converge()
    assert sd.get("apps/v1", "deployments", "handover")["spec"]["replicas"] == 3
    sd.edit({"autoscaling": {"enabled": True}})
    await sd.converge()
    dep = sd.get("apps/v1", "deployments", "handover")
    assert dep["spec"]["replicas"] == 3  # not reset to the default 1
    assert not owns(dep, "sdop", "spec", "replicas") and owns(dep, HANDOVER_MANAGER, "spec", "replicas")
    # The autoscaler now moves it, and the operator leaves it alone.
    apiserver.patch("apps/v1", "deployments", NS, "handover", {"spec": {"replicas": 6}})
    await sd.converge()
    assert sd.get("apps/v1", "deployments", "handover")["spec"]["replicas"] == 6
    # Turning autoscaling off again takes the field back.
    sd.edit({"autoscaling": {"enabled": False}})
    await sd.converge()
    assert sd.get("apps/v1", "deployments", "handover")["spec"]["replicas"] == 3


async def test_a_long_name_deploys_every_child_within_its_limits(apiserver, reconciler):
    name = "s" + "d" * 62  # 63 characters: the longest DNS-1035 label
    sd = Service(apiserver, reconciler, production(name))
    await sd.converge()
    kids = sd.kids()
    assert len(kids) == len(sd.rendered()), sorted(kids)
    assert all(len(n) <= 63 for _, n in kids)
    assert sd.condition("Degraded")["status"] == "False"


async def test_non_canonical_quantities_converge_and_a_resync_writes_nothing(apiserver, reconciler):
    cr = production("quantities")
    cr["spec"]["resources"] = {"cpu": "1.5", "memory": "49152Mi", "shmSize": "1024Mi"}
    sd = Service(apiserver, reconciler, cr)
    await sd.converge()
    assert container(sd.get("apps/v1", "deployments", "quantities"))["resources"]["requests"]["cpu"] == "1500m"
    await sd.converge()  # the status settles
    writes = reconciler.kube.writes
    report = await sd.converge()
    assert report.applied == [] and reconciler.kube.writes == writes


async def test_a_name_the_children_cannot_take_is_refused_by_the_crd(apiserver):
    cr = production("sd.v2")
    r = apiserver.http.post(apiserver.path(cr["apiVersion"], "stablediffusionservices", NS), json=cr)
    assert r.status_code == 422 and "DNS-1035" in r.text
