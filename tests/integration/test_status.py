"""Status tells why replicas are not ready within one reconcile (one resync), from the pods,
their ReplicaSets and the HPA, instead of waiting for the rollout's progress deadline."""

from __future__ import annotations

import pytest

from sdtesting.apiserver import Cluster
from sdtesting.examples import example

from .conftest import reconciler_for

pytestmark = pytest.mark.integration

NS = "status"
SDS = ("sdop.io/v1alpha1", "stablediffusionservices")


def make(apiserver, name: str) -> dict:
    cr = example("sd15-production")
    cr["metadata"] = {"name": name, "namespace": NS}
    return apiserver.create(cr)


def server_labels(apiserver, name: str) -> dict:
    dep = apiserver.get("apps/v1", "deployments", NS, name)
    return dep["spec"]["selector"]["matchLabels"]


def add_pod(apiserver, name: str, pod: str, status: dict) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod, "namespace": NS, "labels": server_labels(apiserver, name)},
        "spec": {"containers": [{"name": "server", "image": "ghcr.io/sdop/sdserve:0.1.0"}]},
    }
    apiserver.http.post(apiserver.path("v1", "pods", NS), json=body).raise_for_status()
    apiserver.patch("v1", "pods", NS, pod, {"status": status}, sub="status")


def condition(apiserver, name: str, type_: str) -> dict:
    status = apiserver.get(*SDS, NS, name)["status"]
    return next(c for c in status["conditions"] if c["type"] == type_)


async def converge(apiserver, reconciler, name: str) -> None:
    await reconciler.converge(apiserver.get(*SDS, NS, name), prune=True)


def waiting(reason: str, message: str) -> dict:
    return {
        "phase": "Pending",
        "containerStatuses": [
            {
                "name": "server",
                "ready": False,
                "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": message}},
            }
        ],
    }


@pytest.mark.parametrize(
    ("reason", "status", "says"),
    [
        (
            "Unschedulable",
            {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                    }
                ],
            },
            "Insufficient nvidia.com/gpu",
        ),
        (
            "ImagePullBackOff",
            waiting("ImagePullBackOff", 'Back-off pulling image "ghcr.io/sdop/sdserve:0.1.0"'),
            "Back-off pulling",
        ),
        (
            "CreateContainerConfigError",
            waiting("CreateContainerConfigError", 'secret "hf-token" not found'),
            "hf-token",
        ),
        ("CrashLoopBackOff", waiting("CrashLoopBackOff", "back-off 5m0s restarting failed container"), "back-off"),
        (
            "ModelLoadFailed",
            {
                "phase": "Running",
                "containerStatuses": [
                    {
                        "name": "server",
                        "ready": False,
                        "restartCount": 2,
                        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s"}},
                        "lastState": {
                            "terminated": {
                                "exitCode": 3,
                                "reason": "Error",
                                "message": "model_load_failed: 401 Client Error: repository not found or token invalid",
                            }
                        },
                    }
                ],
            },
            "token invalid",
        ),
    ],
)
async def test_a_stuck_pod_is_named_in_status(apiserver, reconciler, reason, status, says):
    name = f"stuck-{reason.lower()}"
    make(apiserver, name)
    await converge(apiserver, reconciler, name)
    assert condition(apiserver, name, "Degraded")["status"] == "False"
    add_pod(apiserver, name, f"{name}-abc12", status)
    await converge(apiserver, reconciler, name)  # the next resync
    degraded = condition(apiserver, name, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == reason and says in degraded["message"], degraded
    model = condition(apiserver, name, "ModelReady")
    assert model["status"] == "False" and model["reason"] == reason
    assert condition(apiserver, name, "Ready")["status"] == "False"
    # Fixed (the pod replaced by a healthy one): the next resync clears it.
    apiserver.delete("v1", "pods", NS, f"{name}-abc12")
    await converge(apiserver, reconciler, name)
    assert condition(apiserver, name, "Degraded")["status"] == "False"


async def test_a_replicaset_that_cannot_create_pods_is_named(apiserver, reconciler):
    name = "quota"
    make(apiserver, name)
    await converge(apiserver, reconciler, name)
    rs = {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {"name": f"{name}-6d4cf56db6", "namespace": NS, "labels": server_labels(apiserver, name)},
        "spec": {
            "selector": {"matchLabels": server_labels(apiserver, name)},
            "template": {
                "metadata": {"labels": server_labels(apiserver, name)},
                "spec": {"containers": [{"name": "server", "image": "ghcr.io/sdop/sdserve:0.1.0"}]},
            },
        },
    }
    apiserver.http.post(apiserver.path("apps/v1", "replicasets", NS), json=rs).raise_for_status()
    message = 'pods "quota-6d4cf56db6-x" is forbidden: no PriorityClass with name inference-high was found'
    apiserver.patch(
        "apps/v1",
        "replicasets",
        NS,
        f"{name}-6d4cf56db6",
        {
            "status": {
                "replicas": 0,
                "conditions": [
                    {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": message}
                ],
            }
        },
        sub="status",
    )
    await converge(apiserver, reconciler, name)
    degraded = condition(apiserver, name, "Degraded")
    assert degraded["reason"] == "FailedCreate" and "PriorityClass" in degraded["message"], degraded


async def test_an_autoscaler_without_its_metric_is_reported(apiserver, reconciler):
    name = "nometric"
    make(apiserver, name)
    await converge(apiserver, reconciler, name)
    assert condition(apiserver, name, "AutoscalerReady")["status"] == "True"
    message = "unable to get metric sdserve_queue_depth: no custom metrics API (custom.metrics.k8s.io) registered"
    apiserver.patch(
        "autoscaling/v2",
        "horizontalpodautoscalers",
        NS,
        name,
        {
            "status": {
                "conditions": [
                    {"type": "ScalingActive", "status": "False", "reason": "FailedGetPodsMetric", "message": message}
                ]
            }
        },
        sub="status",
    )
    await converge(apiserver, reconciler, name)
    hpa = condition(apiserver, name, "AutoscalerReady")
    assert hpa["status"] == "False" and hpa["reason"] == "FailedGetPodsMetric" and "custom.metrics" in hpa["message"]


@pytest.mark.parametrize("provider", ["hpa", "keda"])
async def test_without_the_autoscalers_api_the_deployment_keeps_replicas_min(provider):
    bare = Cluster(custom_metrics=False, keda=False)
    reconciler = reconciler_for(bare.url)
    try:
        cr = example("sd15-production")
        cr["metadata"] = {"name": f"bare-{provider}", "namespace": NS}
        cr["spec"]["autoscaling"]["provider"] = provider
        bare.create(cr)
        await reconciler.converge(bare.get(*SDS, NS, f"bare-{provider}"), prune=True)
        dep = bare.get("apps/v1", "deployments", NS, f"bare-{provider}")
        assert dep["spec"]["replicas"] == cr["spec"]["replicas"]["min"] == 2  # not the Deployment default 1
        kinds = {k for k, _ in bare.children(NS, f"bare-{provider}")}
        assert not kinds & {"HorizontalPodAutoscaler", "ScaledObject"}
        apis = condition(bare, f"bare-{provider}", "OptionalAPIsAvailable")
        wanted = "custom.metrics.k8s.io/v1beta1" if provider == "hpa" else "keda.sh/v1alpha1"
        assert apis["status"] == "False" and wanted in apis["message"], apis
    finally:
        await reconciler.kube.close()
        bare.close()
