"""Model rollouts against the test API server: a canary created, served, promoted and
abandoned; a canary or a new spec.model that cannot load rolled back; and the decision kept
across an operator restart (a fresh reconciler, and the real `sdop operator` process).

There are no controllers here: the tests play the Deployment controller (status) and the
kubelet (pods with sdserve's termination message) the way test_status.py does.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from sdtesting.apiserver import Cluster
from sdtesting.examples import example
from sdtesting.procs import OperatorProc, PrometheusProc, free_port
from sdtesting.waiting import eventually

from .conftest import reconciler_for

pytestmark = pytest.mark.integration

SDS = ("sdop.io/v1alpha1", "stablediffusionservices")
NEW_REVISION = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"


def make(cluster: Cluster, ns: str, name: str, *, canary: bool = True) -> None:
    cr = example("canary-gateway")
    cr["metadata"] = {"name": name, "namespace": ns}
    if not canary:
        cr["spec"].pop("canary")
    cluster.create(cr)


def status(cluster: Cluster, ns: str, name: str) -> dict:
    return cluster.get(*SDS, ns, name).get("status") or {}


def condition(cluster: Cluster, ns: str, name: str, type_: str) -> dict:
    return next(c for c in status(cluster, ns, name)["conditions"] if c["type"] == type_)


def roll_out(cluster: Cluster, ns: str, name: str, replicas: int) -> None:
    """What the Deployment controller reports once every replica is updated and ready."""
    dep = cluster.get("apps/v1", "deployments", ns, name)
    st = {
        "observedGeneration": dep["metadata"]["generation"],
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": replicas,
        "availableReplicas": replicas,
    }
    cluster.patch("apps/v1", "deployments", ns, name, {"status": st}, sub="status")


def fail_model_load(cluster: Cluster, ns: str, deployment: str, pod: str) -> None:
    """A replica of this Deployment whose model cannot load (sdserve's termination message)."""
    labels = cluster.get("apps/v1", "deployments", ns, deployment)["spec"]["template"]["metadata"]["labels"]
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": "sdserve", "image": "ghcr.io/sdop/sdserve:0.1.0"}]},
    }
    cluster.http.post(cluster.path("v1", "pods", ns), json=body).raise_for_status()
    terminated = {"exitCode": 3, "reason": "Error", "message": "model_load_failed: revision not found: broken"}
    st = {
        "phase": "Running",
        "containerStatuses": [
            {
                "name": "sdserve",
                "ready": False,
                "restartCount": 1,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
                "lastState": {"terminated": terminated},
            }
        ],
    }
    cluster.patch("v1", "pods", ns, pod, {"status": st}, sub="status")


def backends(cluster: Cluster, ns: str, name: str) -> list[tuple[str, int | None]]:
    route = cluster.get("gateway.networking.k8s.io/v1", "httproutes", ns, name)
    return [(b["name"], b.get("weight")) for b in route["spec"]["rules"][0]["backendRefs"]]


def served_revision(cluster: Cluster, ns: str, name: str) -> str:
    return cluster.get("v1", "configmaps", ns, f"{name}-config")["data"]["SDSERVE_MODEL_REVISION"]


async def converge(cluster: Cluster, reconciler, ns: str, name: str):
    return await reconciler.converge(cluster.get(*SDS, ns, name), prune=True)


async def test_a_canary_is_created_gets_its_weight_once_ready_and_is_promoted(apiserver, reconciler):
    ns, name = "canary-promote", "sd"
    make(apiserver, ns, name)
    await converge(apiserver, reconciler, ns, name)
    kids = apiserver.children(ns, name)
    assert {("Deployment", "sd-canary"), ("Service", "sd-stable"), ("Service", "sd-canary")} <= set(kids)
    assert backends(apiserver, ns, name) == [("sd-stable", 100), ("sd-canary", 0)]  # not ready: no traffic
    assert status(apiserver, ns, name)["canary"]["phase"] == "Progressing"

    roll_out(apiserver, ns, name, 2)
    roll_out(apiserver, ns, "sd-canary", 1)
    await converge(apiserver, reconciler, ns, name)
    assert backends(apiserver, ns, name) == [("sd-stable", 90), ("sd-canary", 10)]
    st = status(apiserver, ns, name)
    assert st["canary"] | {"fingerprint": ""} == {
        "model": f"stable-diffusion-v1-5/stable-diffusion-v1-5@{NEW_REVISION}",
        "fingerprint": "",
        "phase": "Serving",
        "traffic": "gateway",
        "weight": 10,
        "readyReplicas": 1,
    }
    assert st["model"]["lastGood"]["revision"] == "main"
    assert condition(apiserver, ns, name, "Ready")["status"] == "True"

    # Promotion is a spec change: the canary's model becomes spec.model, the canary goes.
    cr = apiserver.get(*SDS, ns, name)
    apiserver.patch(*SDS, ns, name, {"spec": {"model": cr["spec"]["canary"]["model"], "canary": None}})
    await converge(apiserver, reconciler, ns, name)
    kids = apiserver.children(ns, name)
    assert not [k for k in kids if k[1] in ("sd-canary", "sd-canary-config", "sd-stable")], sorted(kids)
    assert backends(apiserver, ns, name) == [("sd", None)]
    assert served_revision(apiserver, ns, name) == NEW_REVISION
    assert status(apiserver, ns, name).get("canary") is None
    roll_out(apiserver, ns, name, 2)
    await converge(apiserver, reconciler, ns, name)
    assert status(apiserver, ns, name)["model"]["lastGood"]["revision"] == NEW_REVISION


async def test_an_abandoned_canary_is_removed_and_the_route_returns_to_stable(apiserver, reconciler):
    ns, name = "canary-abandon", "sd"
    make(apiserver, ns, name)
    await converge(apiserver, reconciler, ns, name)
    assert ("Deployment", "sd-canary") in apiserver.children(ns, name)
    apiserver.patch(*SDS, ns, name, {"spec": {"canary": None}})
    await converge(apiserver, reconciler, ns, name)
    kids = apiserver.children(ns, name)
    assert ("Deployment", "sd-canary") not in kids and ("ConfigMap", "sd-canary-config") not in kids
    assert backends(apiserver, ns, name) == [("sd", None)]
    assert served_revision(apiserver, ns, name) == "main"


async def test_a_canary_that_cannot_load_is_rolled_back_and_stays_out_after_a_restart(apiserver, reconciler):
    ns, name = "canary-fails", "sd"
    make(apiserver, ns, name)
    await converge(apiserver, reconciler, ns, name)
    roll_out(apiserver, ns, name, 2)
    fail_model_load(apiserver, ns, "sd-canary", "sd-canary-abc12")
    report = await converge(apiserver, reconciler, ns, name)

    kids = apiserver.children(ns, name)
    assert ("Deployment", "sd-canary") not in kids  # the failed model is kept out
    assert backends(apiserver, ns, name) == [("sd", None)]  # the stable replicas keep all traffic
    st = status(apiserver, ns, name)
    assert st["canary"]["phase"] == "RolledBack" and st["canary"]["weight"] == 0
    assert [(f["track"], f["reason"]) for f in st["model"]["failed"]] == [("canary", "ModelLoadFailed")]
    degraded = condition(apiserver, ns, name, "Degraded")
    assert degraded["reason"] == "RolledBack" and NEW_REVISION in degraded["message"], degraded
    assert "revision not found: broken" in degraded["message"]
    assert condition(apiserver, ns, name, "Ready")["status"] == "True"  # the service still serves
    assert any(e.type == "Warning" and e.reason == "RolledBack" for e in report.events), report.events

    # A new operator process knows nothing but what status says.
    fresh = reconciler_for(apiserver.url)
    try:
        for _ in range(2):
            await converge(apiserver, fresh, ns, name)
    finally:
        await fresh.kube.close()
    assert ("Deployment", "sd-canary") not in apiserver.children(ns, name)
    assert status(apiserver, ns, name)["canary"]["phase"] == "RolledBack"

    # Taking the canary out and putting it back tries it again.
    canary = apiserver.get(*SDS, ns, name)["spec"]["canary"]
    apiserver.patch(*SDS, ns, name, {"spec": {"canary": None}})
    await converge(apiserver, reconciler, ns, name)
    assert status(apiserver, ns, name)["model"]["failed"] == []
    apiserver.delete("v1", "pods", ns, "sd-canary-abc12")
    apiserver.patch(*SDS, ns, name, {"spec": {"canary": canary}})
    await converge(apiserver, reconciler, ns, name)
    assert ("Deployment", "sd-canary") in apiserver.children(ns, name)


async def test_a_new_model_that_cannot_load_rolls_back_to_the_last_good_one(apiserver, reconciler):
    ns, name = "model-fails", "sd"
    make(apiserver, ns, name, canary=False)
    await converge(apiserver, reconciler, ns, name)
    roll_out(apiserver, ns, name, 2)
    await converge(apiserver, reconciler, ns, name)
    assert status(apiserver, ns, name)["model"]["lastGood"]["revision"] == "main"

    apiserver.patch(*SDS, ns, name, {"spec": {"model": {"revision": "broken"}}})
    await converge(apiserver, reconciler, ns, name)
    assert served_revision(apiserver, ns, name) == "broken"  # tried
    fail_model_load(apiserver, ns, name, "sd-7d9f-broken")
    report = await converge(apiserver, reconciler, ns, name)

    assert served_revision(apiserver, ns, name) == "main"  # back on the last good model
    dep = apiserver.get("apps/v1", "deployments", ns, name)
    assert dep["spec"]["template"]["metadata"]["labels"]["sdop.io/model-revision"] == "main"
    st = status(apiserver, ns, name)
    assert st["modelRevision"] == "main" and st["model"]["serving"].endswith("@main")
    assert [(f["model"].split("@")[1], f["track"]) for f in st["model"]["failed"]] == [("broken", "stable")]
    degraded = condition(apiserver, ns, name, "Degraded")
    assert degraded["reason"] == "RolledBack" and "serving the last good model" in degraded["message"]
    assert any(e.reason == "RolledBack" for e in report.events)

    fresh = reconciler_for(apiserver.url)
    try:
        await converge(apiserver, fresh, ns, name)
    finally:
        await fresh.kube.close()
    assert served_revision(apiserver, ns, name) == "main"

    # A fixed revision is tried; the failed one is forgotten once the spec moves on.
    apiserver.patch(*SDS, ns, name, {"spec": {"model": {"revision": "fixed"}}})
    await converge(apiserver, reconciler, ns, name)
    assert served_revision(apiserver, ns, name) == "fixed"
    assert status(apiserver, ns, name)["model"]["failed"] == []
    assert condition(apiserver, ns, name, "Degraded")["reason"] != "RolledBack"


async def test_with_auto_rollback_off_a_failed_model_is_reported_not_rolled_back(apiserver, reconciler):
    ns, name = "no-rollback", "sd"
    make(apiserver, ns, name, canary=False)
    apiserver.patch(*SDS, ns, name, {"spec": {"rollout": {"autoRollback": False}}})
    await converge(apiserver, reconciler, ns, name)
    roll_out(apiserver, ns, name, 2)
    await converge(apiserver, reconciler, ns, name)
    apiserver.patch(*SDS, ns, name, {"spec": {"model": {"revision": "broken"}}})
    await converge(apiserver, reconciler, ns, name)
    fail_model_load(apiserver, ns, name, "sd-broken-1")
    await converge(apiserver, reconciler, ns, name)
    assert served_revision(apiserver, ns, name) == "broken"
    assert condition(apiserver, ns, name, "Degraded")["reason"] == "ModelLoadFailed"


def test_the_operator_process_rolls_back_and_a_restarted_one_keeps_the_decision(tmp_path):
    cluster = Cluster()
    ns, name = "restart", "sd"
    op = OperatorProc(cluster.kubeconfig(tmp_path / "kubeconfig"), tmp_path, resync_seconds=1)
    try:
        make(cluster, ns, name)
        eventually(lambda: ("Deployment", "sd-canary") in cluster.children(ns, name), timeout=30)
        roll_out(cluster, ns, name, 2)
        fail_model_load(cluster, ns, "sd-canary", "sd-canary-x1")
        eventually(lambda: (status(cluster, ns, name).get("canary") or {}).get("phase") == "RolledBack", timeout=30)
        eventually(lambda: ("Deployment", "sd-canary") not in cluster.children(ns, name), timeout=30)
        assert op.stop() == 0, op.log()[-3000:]

        (tmp_path / "second").mkdir()
        op = OperatorProc(cluster.kubeconfig(tmp_path / "kubeconfig"), tmp_path / "second", resync_seconds=1)
        # Proof the new process reconciles: a spec change reaches the ConfigMap.
        cluster.patch(*SDS, ns, name, {"spec": {"limits": {"maxSteps": 40}}})
        eventually(
            lambda: cluster.get("v1", "configmaps", ns, "sd-config")["data"]["SDSERVE_MAX_STEPS"] == "40", timeout=30
        )
        time.sleep(3)  # and a few resyncs after it
        assert ("Deployment", "sd-canary") not in cluster.children(ns, name), op.log()[-3000:]
        assert status(cluster, ns, name)["canary"]["phase"] == "RolledBack"
    finally:
        op.stop()
        cluster.close()


class Exporter:
    """A target exporting sdserve_http_requests_total as one replica would, through the real
    prometheus_client library, for a real Prometheus to scrape."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sdserve_http_requests", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.port = free_port()
        self.server, self.thread = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)

    def answer(self, status: int, n: int) -> None:
        self.requests.labels("/v1/images/generations", "POST", str(status)).inc(n)

    def close(self) -> None:
        self.server.shutdown()


async def until(prom: PrometheusProc, query: str) -> None:
    """Wait (30 s at most) for Prometheus to have scraped what the query asks (its first scrape
    can take ~5 s)."""
    deadline = time.time() + 30
    while not prom.query(query):
        assert time.time() < deadline, f"Prometheus never answered {query}"
        await asyncio.sleep(0.5)


async def test_a_serving_canary_answering_too_many_5xx_is_rolled_back(apiserver, reconciler, tmp_path):
    ns, name = "canary-errors", "sd"
    stable, canary = Exporter(), Exporter()
    # What the ServiceMonitor's relabeling gives each replica's series.
    jobs = [
        {
            "job_name": track,
            "static_configs": [
                {
                    "targets": [f"127.0.0.1:{exporter.port}"],
                    "labels": {"namespace": ns, "service": name, "track": track, "revision": revision},
                }
            ],
        }
        for track, exporter, revision in (("stable", stable, "main"), ("canary", canary, "451f4fe"))
    ]
    prom = PrometheusProc(tmp_path, jobs)
    try:
        cr = example("canary-gateway")
        cr["metadata"] = {"name": name, "namespace": ns}
        cr["spec"]["rollout"].update(maxErrorRatio=0.1, errorRatioWindow="1m", errorRatioMinRequests=10)
        cr["spec"]["autoscaling"] = {"prometheusAddress": prom.url}
        apiserver.create(cr)
        await converge(apiserver, reconciler, ns, name)
        roll_out(apiserver, ns, name, 2)
        roll_out(apiserver, ns, "sd-canary", 1)
        await converge(apiserver, reconciler, ns, name)
        assert status(apiserver, ns, name)["canary"]["phase"] == "Serving"

        # A healthy canary (2% errors) keeps serving.
        stable.answer(200, 0)
        canary.answer(200, 0)
        canary.answer(500, 0)
        await until(prom, 'count_over_time(sdserve_http_requests_total{track="canary",status="500"}[1m]) >= 2')
        stable.answer(200, 500)
        canary.answer(200, 49)
        canary.answer(500, 1)
        await until(prom, 'sum(increase(sdserve_http_requests_total{track="canary"}[1m])) > 40')
        await converge(apiserver, reconciler, ns, name)
        assert status(apiserver, ns, name)["canary"]["phase"] == "Serving"
        assert ("Deployment", "sd-canary") in apiserver.children(ns, name)

        # Then it starts failing: a third of its answers are 5xx.
        canary.answer(500, 30)
        deadline = time.time() + 30
        while status(apiserver, ns, name)["canary"]["phase"] != "RolledBack":
            assert time.time() < deadline, status(apiserver, ns, name)
            await asyncio.sleep(1)
            await converge(apiserver, reconciler, ns, name)
        failed = status(apiserver, ns, name)["model"]["failed"]
        assert [(f["track"], f["reason"]) for f in failed] == [("canary", "ErrorRatio")]
        assert "requests answered 5xx over 1m" in failed[0]["message"]
        assert ("Deployment", "sd-canary") not in apiserver.children(ns, name)
        assert backends(apiserver, ns, name) == [("sd", None)]
    finally:
        prom.stop()
        stable.close()
        canary.close()
