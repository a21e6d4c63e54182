"""The operator, run for real (`sdop operator`) against a Kubernetes API emulator on loopback."""

from __future__ import annotations

import time

import pytest

from sdop.render import render
from sdtesting.apiserver import Cluster, Fault
from sdtesting.examples import example
from sdtesting.procs import OperatorProc
from sdtesting.waiting import eventually

pytestmark = pytest.mark.integration

SDS = ("sdop.io/v1alpha1", "stablediffusionservices")
RESYNC = 1.5


def production(name: str, ns: str = "images") -> dict:
    cr = example("sd15-production")
    cr["metadata"] = {"name": name, "namespace": ns}
    return cr


# What render() asks for, with every optional API served (the emulator serves them all).
CHILDREN = len(render(production("count")))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster()
    tmp = tmp_path_factory.mktemp("op")
    op = OperatorProc(c.kubeconfig(tmp / "kubeconfig"), tmp, resync_seconds=RESYNC)
    c.operator = op
    yield c
    code = op.stop()
    c.close()
    assert code == 0, op.log()[-3000:]


def make(cluster, name, mutate=None, ns="images"):
    cr = production(name, ns)
    if mutate:
        mutate(cr["spec"])
    return cluster.create(cr)


def has_all_children(cluster, name, ns="images"):
    kids = cluster.children(ns, name)
    assert len(kids) == CHILDREN, sorted(kids)
    return kids


def status(cluster, name, ns="images"):
    return (cluster.get(*SDS, ns, name) or {}).get("status") or {}


def condition(cluster, name, type_, ns="images"):
    found = next((c for c in status(cluster, name, ns).get("conditions", []) if c["type"] == type_), None)
    assert found is not None, f"no {type_} condition yet"
    return found


def test_children_are_created_with_owner_references_and_status(cluster):
    cr = make(cluster, "owned")
    uid = cr["metadata"]["uid"]

    def created():
        kids = cluster.children("images", "owned")
        assert len(kids) == CHILDREN, sorted(kids)
        return kids

    kids = eventually(created)
    for (kind, name), obj in kids.items():
        refs = obj["metadata"]["ownerReferences"]
        assert refs == [
            {
                "apiVersion": "sdop.io/v1alpha1",
                "kind": "StableDiffusionService",
                "name": "owned",
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ], (kind, name)

    def has_status():
        st = status(cluster, "owned")
        assert st.get("observedGeneration") == 1
        assert {c["type"] for c in st["conditions"]} >= {"Ready", "Progressing", "Degraded", "ModelReady"}
        for c in st["conditions"]:
            assert c["observedGeneration"] == 1 and c["lastTransitionTime"] and c["reason"]
        assert st["endpoint"] == "https://images.example.com"
        assert condition(cluster, "owned", "Ready")["status"] == "False"

    eventually(has_status)

    def event_posted():
        reasons = [
            o.get("reason") for o in cluster.objects_of("events") if o.get("involvedObject", {}).get("name") == "owned"
        ]
        assert "Applied" in reasons, reasons

    eventually(event_posted)


def test_status_follows_the_deployment_and_ready_turns_true(cluster):
    make(cluster, "follow")
    eventually(lambda: cluster.get("apps/v1", "deployments", "images", "follow") is not None)
    gen = cluster.get("apps/v1", "deployments", "images", "follow")["metadata"].get("generation", 1)
    cluster.patch(
        "apps/v1",
        "deployments",
        "images",
        "follow",
        {
            "status": {
                "observedGeneration": gen,
                "replicas": 2,
                "readyReplicas": 2,
                "updatedReplicas": 2,
                "availableReplicas": 2,
            }
        },
        sub="status",
    )

    def ready():
        st = status(cluster, "follow")
        assert st.get("readyReplicas") == 2 and st.get("replicas") == 2
        assert condition(cluster, "follow", "Ready")["status"] == "True"
        assert condition(cluster, "follow", "ModelReady")["reason"] == "ModelLoaded"
        assert condition(cluster, "follow", "Progressing")["status"] == "False"

    eventually(ready)


def test_spec_change_updates_children_and_observed_generation(cluster):
    make(cluster, "change")
    eventually(lambda: ("ConfigMap", "change-config") in cluster.children("images", "change"))
    cluster.patch(*SDS, "images", "change", {"spec": {"batching": {"maxBatchSize": 4}}})

    def updated():
        cm = cluster.get("v1", "configmaps", "images", "change-config")
        assert cm["data"]["SDSERVE_MAX_BATCH_SIZE"] == "4"
        assert status(cluster, "change")["observedGeneration"] == 2

    eventually(updated)


def test_disabled_features_prune_their_children(cluster):
    make(cluster, "prune")
    eventually(lambda: has_all_children(cluster, "prune"))
    cluster.patch(
        *SDS,
        "images",
        "prune",
        {
            "spec": {
                "monitoring": {"serviceMonitor": False, "prometheusRule": False, "dashboard": False},
                "ingress": {"enabled": False},
                "cache": {"type": "none", "redis": None},
            }
        },
    )

    def pruned():
        kids = set(cluster.children("images", "prune"))
        gone = {
            ("ServiceMonitor", "prune"),
            ("PrometheusRule", "prune"),
            ("ConfigMap", "prune-dashboard"),
            ("Ingress", "prune"),
            ("Deployment", "prune-redis"),
            ("Service", "prune-redis"),
            ("NetworkPolicy", "prune-redis"),
        }
        assert not kids & gone, kids & gone
        assert ("Deployment", "prune") in kids and len(kids) == 9

    eventually(pruned)


def test_deleted_or_edited_children_are_repaired(cluster):
    make(cluster, "drift")
    eventually(lambda: has_all_children(cluster, "drift"))
    cluster.delete("apps/v1", "deployments", "images", "drift")
    cluster.delete("v1", "services", "images", "drift")
    cluster.patch("v1", "configmaps", "images", "drift-config", {"data": {"SDSERVE_QUEUE_SIZE": "1"}})

    def repaired():
        assert cluster.get("apps/v1", "deployments", "images", "drift") is not None
        assert cluster.get("v1", "services", "images", "drift") is not None
        assert cluster.get("v1", "configmaps", "images", "drift-config")["data"]["SDSERVE_QUEUE_SIZE"] == "128"

    eventually(repaired)


def test_an_existing_object_with_a_child_name_is_reported_not_adopted(cluster):
    taken = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "taken", "namespace": "images"},
        "spec": {"selector": {"app": "someone-else"}, "ports": [{"name": "http", "port": 8080}]},
    }
    before = cluster.apply(taken, "services", manager="kubectl").json()
    make(cluster, "taken")

    def reported():
        d = condition(cluster, "taken", "Degraded")
        assert d["status"] == "True" and d["reason"] == "Conflict" and "Service/taken" in d["message"], d
        assert cluster.get("apps/v1", "deployments", "images", "taken") is not None

    eventually(reported)
    time.sleep(RESYNC)  # a resync later, still untouched
    assert cluster.get("v1", "services", "images", "taken") == before


def test_a_resync_with_nothing_changed_writes_nothing(cluster):
    make(cluster, "quiet")
    eventually(lambda: status(cluster, "quiet").get("observedGeneration") == 1)
    time.sleep(2 * RESYNC)  # let the events and status settle
    mark = len(cluster.api.writes)
    time.sleep(3 * RESYNC)  # at least two timer resyncs of every service
    writes = cluster.writes_since(mark)
    assert writes == [], writes
    assert "resync: " in cluster.operator.log() and "services checked" in cluster.operator.log()


def test_no_finalizer_so_deletion_never_waits_for_the_operator(cluster):
    """Children go by garbage collection; nothing needs the operator at deletion, so an
    uninstalled operator cannot leave a StableDiffusionService (or its namespace) stuck."""
    make(cluster, "nofinal")
    eventually(lambda: has_all_children(cluster, "nofinal"))
    time.sleep(RESYNC * 1.5)  # a resync has run too
    assert not cluster.get(*SDS, "images", "nofinal")["metadata"].get("finalizers")
    cluster.delete(*SDS, "images", "nofinal")
    assert cluster.get(*SDS, "images", "nofinal") is None  # gone at once: nothing holds it
    eventually(lambda: cluster.children("images", "nofinal") == {})


def test_a_finalizer_left_by_an_older_operator_is_removed(cluster):
    cr = production("oldfinal")
    cr["metadata"]["finalizers"] = ["sdop.io/finalizer"]
    cluster.create(cr)
    eventually(lambda: not cluster.get(*SDS, "images", "oldfinal")["metadata"].get("finalizers"))


def test_invalid_spec_is_degraded_with_the_field_and_nothing_applied(cluster):
    def conflict(spec):
        spec["scheduling"]["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}

    make(cluster, "invalid", conflict)

    def degraded():
        d = condition(cluster, "invalid", "Degraded")
        assert d["status"] == "True" and d["reason"] == "InvalidSpec"
        assert "spec.scheduling.nodeSelector[nvidia.com/gpu.product]" in d["message"]
        assert condition(cluster, "invalid", "Ready")["status"] == "False"

    eventually(degraded)
    time.sleep(RESYNC)
    assert cluster.children("images", "invalid") == {}
    # Fixing the spec recovers.
    cluster.patch(*SDS, "images", "invalid", {"spec": {"scheduling": {"nodeSelector": None}}})
    eventually(lambda: has_all_children(cluster, "invalid"))
    eventually(lambda: condition(cluster, "invalid", "Degraded")["status"] == "False")


def test_api_errors_and_dropped_watches_are_retried_without_dying(cluster):
    cluster.api.faults += [
        Fault("PATCH", "/deployments/flaky", 500, 2),
        Fault("PATCH", "/configmaps/flaky-config", 409, 1),
        Fault("PATCH", "/stablediffusionservices/flaky/status", 500, 1),
    ]
    make(cluster, "flaky")

    def converged():
        assert len(cluster.children("images", "flaky")) == CHILDREN
        assert status(cluster, "flaky").get("observedGeneration") == 1

    eventually(converged, timeout=40)
    assert all(f.times == 0 for f in cluster.api.faults)
    cluster.call(cluster.api.drop_watches())
    time.sleep(1)
    cluster.patch(*SDS, "images", "flaky", {"spec": {"limits": {"queueSize": 100}}})
    eventually(
        lambda: cluster.get("v1", "configmaps", "images", "flaky-config")["data"]["SDSERVE_QUEUE_SIZE"] == "100",
        timeout=40,
    )
    assert cluster.operator.proc.poll() is None


def test_missing_optional_apis_are_reported_and_the_rest_works(tmp_path):
    c = Cluster(monitoring=False, keda=False)
    op = OperatorProc(c.kubeconfig(tmp_path / "kubeconfig"), tmp_path, resync_seconds=RESYNC)
    try:
        cr = example("sd15-production")
        c.create(cr)

        def reported():
            cond = condition(c, "sd15", "OptionalAPIsAvailable")
            assert cond and cond["status"] == "False" and "monitoring.coreos.com/v1" in cond["message"]
            kinds = {k for k, _ in c.children("images", "sd15")}
            assert "Deployment" in kinds and not kinds & {"ServiceMonitor", "PrometheusRule"}

        eventually(reported)
    finally:
        assert op.stop() == 0
        c.close()


def test_operator_exports_its_own_metrics(cluster):
    import httpx

    text = httpx.get(f"http://127.0.0.1:{cluster.operator.metrics_port}/metrics").text
    assert 'sdop_reconciles_total{result="ok",trigger="resync"}' in text
    assert "sdop_children_applied_total" in text and "sdop_reconcile_duration_seconds_bucket" in text
