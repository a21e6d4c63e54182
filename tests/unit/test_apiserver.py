"""The test API server refuses what kube-apiserver refuses (the fidelity the operator tests rely on)."""

from __future__ import annotations

import copy
import time

import pytest

from sdtesting.apiserver import Cluster
from sdtesting.apiserver.quantity import canonical
from sdtesting.examples import example

NS = "fidelity"


@pytest.fixture(scope="module")
def kube():
    c = Cluster()
    yield c
    c.close()


def deployment(name: str, **spec) -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "c", "image": "busybox:1.36", "resources": {}}]},
            },
            **spec,
        },
    }


def job(name: str, image: str = "busybox:1.36") -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": image}]}}},
    }


def pvc(name: str, size: str, storage_class: str = "fast") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": storage_class,
            "resources": {"requests": {"storage": size}},
        },
    }


def service(name: str, **spec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80}], **spec},
    }


def apply(kube, obj, plural, manager="sdop", force=True):
    return kube.apply(copy.deepcopy(obj), plural, manager=manager, force=force)


def causes(response) -> set[str]:
    return {c["field"] for c in response.json()["details"].get("causes", [])}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.5", "1500m"),
        ("1024Mi", "1Gi"),
        ("0.5Gi", "512Mi"),
        (2, "2"),
        ("2000m", "2"),
        ("1000", "1k"),
        ("0.1", "100m"),
    ],
)
def test_quantities_take_their_canonical_form(value, expected):
    assert canonical(value) == expected


def test_quantities_are_canonical_on_write(kube):
    d = deployment("quantities")
    d["spec"]["template"]["spec"]["containers"][0]["resources"] = {"requests": {"cpu": "1.5", "memory": "1024Mi"}}
    live = apply(kube, d, "deployments").json()
    assert live["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] == {
        "cpu": "1500m",
        "memory": "1Gi",
    }


def test_job_template_is_immutable(kube):
    assert apply(kube, job("immutable-job"), "jobs").status_code == 201
    r = apply(kube, job("immutable-job", image="busybox:1.37"), "jobs")
    assert r.status_code == 422 and "spec.template" in causes(r), r.text


def test_pvc_spec_is_immutable_except_growing_storage(kube):
    assert apply(kube, pvc("cache", "10Gi"), "persistentvolumeclaims").status_code == 201
    assert apply(kube, pvc("cache", "20Gi"), "persistentvolumeclaims").status_code == 200
    shrink = apply(kube, pvc("cache", "5Gi"), "persistentvolumeclaims")
    assert shrink.status_code == 422 and "spec.resources.requests.storage" in causes(shrink)
    other_class = apply(kube, pvc("cache", "20Gi", storage_class="slow"), "persistentvolumeclaims")
    assert other_class.status_code == 422 and "spec" in causes(other_class)


def test_service_cluster_ip_is_kept_and_immutable(kube):
    ip = apply(kube, service("keep-ip"), "services").json()["spec"]["clusterIP"]
    assert apply(kube, service("keep-ip"), "services").json()["spec"]["clusterIP"] == ip
    r = apply(kube, service("keep-ip", clusterIP="10.0.0.99"), "services")
    assert r.status_code == 422 and "spec.clusterIP" in causes(r)


def test_deployment_selector_is_immutable(kube):
    apply(kube, deployment("selector"), "deployments")
    d = deployment("selector")
    d["spec"]["selector"]["matchLabels"]["tier"] = "x"
    d["spec"]["template"]["metadata"]["labels"]["tier"] = "x"
    r = apply(kube, d, "deployments")
    assert r.status_code == 422 and "spec.selector" in causes(r)


def test_names_and_labels_have_limits(kube):
    long_job = apply(kube, job("j" * 64), "jobs")
    assert long_job.status_code == 422 and "metadata.name" in causes(long_job)
    dotted = apply(kube, service("a.b"), "services")
    assert dotted.status_code == 422 and "metadata.name" in causes(dotted)
    d = deployment("labels")
    d["metadata"]["labels"] = {"x": "v" * 64}
    assert apply(kube, d, "deployments").status_code == 422


def test_pod_rules_match_the_api_server(kube):
    d = deployment(
        "pod-rules", strategy={"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}
    )
    pod = d["spec"]["template"]["spec"]
    pod["tolerations"] = [
        {"key": "gpu", "operator": "Exists", "value": "x"},
        {"key": "a", "effect": "NoSchedule", "tolerationSeconds": 5},
    ]
    pod["nodeSelector"] = {"bad key!": "v"}
    pod["containers"][0]["resources"] = {"limits": {"nvidia gpu": 1}}
    r = apply(kube, d, "deployments")
    assert r.status_code == 422
    assert {
        "spec.strategy.rollingUpdate.maxUnavailable",
        "spec.template.spec.tolerations[0].operator",
        "spec.template.spec.tolerations[1].effect",
        "spec.template.spec.nodeSelector[bad key!]",
        "spec.template.spec.containers[0].resources.limits[nvidia gpu]",
    } <= causes(r), r.text


def test_a_field_dropped_from_apply_is_removed_and_defaulted(kube):
    assert apply(kube, deployment("drop", replicas=3), "deployments").json()["spec"]["replicas"] == 3
    # Only this manager owned replicas: dropping it removes it, and the default (1) returns.
    assert apply(kube, deployment("drop"), "deployments").json()["spec"]["replicas"] == 1


def test_a_field_another_manager_owns_survives_and_conflicts(kube):
    apply(kube, deployment("shared", replicas=3), "deployments")
    apply(kube, deployment("shared", replicas=3), "deployments", manager="handover")
    assert apply(kube, deployment("shared"), "deployments").json()["spec"]["replicas"] == 3
    # A different value without force is a conflict naming the owner; force takes the field.
    r = apply(kube, deployment("shared", replicas=5), "deployments", manager="other", force=False)
    assert r.status_code == 409 and "handover" in r.text and "spec.replicas" in causes(r)
    assert apply(kube, deployment("shared", replicas=5), "deployments", manager="other").json()["spec"]["replicas"] == 5


def test_a_no_op_apply_keeps_the_resource_version(kube):
    first = apply(kube, deployment("noop"), "deployments").json()
    again = apply(kube, deployment("noop"), "deployments").json()
    assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]


def test_stale_resource_version_is_a_conflict(kube):
    live = apply(kube, deployment("stale"), "deployments").json()
    kube.patch("apps/v1", "deployments", NS, "stale", {"metadata": {"labels": {"x": "1"}}})
    put = kube.http.put(kube.path("apps/v1", "deployments", NS, "stale"), json=live)
    assert put.status_code == 409
    patch = kube.http.patch(
        kube.path("apps/v1", "deployments", NS, "stale"),
        json={"metadata": {"resourceVersion": live["metadata"]["resourceVersion"], "labels": {"x": "2"}}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert patch.status_code == 409


def test_finalizers_hold_deletion(kube):
    d = deployment("final")
    d["metadata"]["finalizers"] = ["example.com/hold"]
    apply(kube, d, "deployments")
    kube.delete("apps/v1", "deployments", NS, "final")
    held = kube.get("apps/v1", "deployments", NS, "final")
    assert held is not None and held["metadata"]["deletionTimestamp"]
    add = kube.http.patch(
        kube.path("apps/v1", "deployments", NS, "final"),
        json={"metadata": {"finalizers": ["example.com/hold", "example.com/more"]}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert add.status_code == 422
    kube.patch("apps/v1", "deployments", NS, "final", {"metadata": {"finalizers": None}})
    assert kube.get("apps/v1", "deployments", NS, "final") is None


def test_deleting_an_owner_collects_its_dependents(kube):
    owner = apply(kube, service("owner"), "services").json()
    other = apply(kube, service("other-owner"), "services").json()

    def ref(o):
        return {"apiVersion": "v1", "kind": "Service", "name": o["metadata"]["name"], "uid": o["metadata"]["uid"]}

    only = deployment("dependent")
    only["metadata"]["ownerReferences"] = [ref(owner)]
    both = deployment("co-owned")
    both["metadata"]["ownerReferences"] = [ref(owner), ref(other)]
    apply(kube, only, "deployments")
    apply(kube, both, "deployments")
    kube.delete("v1", "services", NS, "owner")
    deadline = time.time() + 5
    while kube.get("apps/v1", "deployments", NS, "dependent") is not None and time.time() < deadline:
        time.sleep(0.05)
    assert kube.get("apps/v1", "deployments", NS, "dependent") is None
    assert kube.get("apps/v1", "deployments", NS, "co-owned") is not None


def test_custom_resources_get_schema_defaults_and_validation(kube):
    cr = example("minimal")
    cr["metadata"] = {"name": "defaults", "namespace": NS}
    assert "batching" not in cr["spec"]
    made = kube.create(cr)
    assert made["spec"]["batching"]["maxWaitMs"] == 25  # the schema's default, filled in by the server
    bad = example("minimal")
    bad["metadata"] = {"name": "unknown-field", "namespace": NS}
    bad["spec"]["nope"] = 1
    r = kube.http.post(
        kube.path(bad["apiVersion"], "stablediffusionservices", NS), json=bad, params={"fieldValidation": "Strict"}
    )
    assert r.status_code == 422 and "spec.nope" in r.text
    # Without Strict the unknown field is pruned, as the API server does.
    bad["metadata"]["name"] = "pruned"
    r = kube.http.post(kube.path(bad["apiVersion"], "stablediffusionservices", NS), json=bad)
    assert r.status_code == 201 and "nope" not in r.json()["spec"]
    cel = example("minimal")
    cel["metadata"] = {"name": "cel", "namespace": NS}
    cel["spec"]["replicas"] = {"min": 3, "max": 2}
    r = kube.http.post(kube.path(cel["apiVersion"], "stablediffusionservices", NS), json=cel)
    assert r.status_code == 422 and "replicas.min must be <= replicas.max" in r.text
