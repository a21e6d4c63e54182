"""HA: two `sdop operator` replicas against the test API server; exactly one reconciles (the
one holding the Lease), and when it is killed the other takes over within 30 s."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from sdtesting.apiserver import Cluster
from sdtesting.examples import example
from sdtesting.procs import OperatorProc, free_port
from sdtesting.waiting import eventually

pytestmark = pytest.mark.integration

SDS = ("sdop.io/v1alpha1", "stablediffusionservices")


def reconciles(op: OperatorProc) -> float:
    text = httpx.get(op.metrics_url, timeout=5).text
    return sum(float(v) for v in re.findall(r"^sdop_reconciles_total\{[^}]*\} ([0-9.e+]+)$", text, re.M))


def observed(cluster: Cluster, name: str) -> bool:
    cr = cluster.get(*SDS, "ha", name) or {}
    return (cr.get("status") or {}).get("observedGeneration") == 1


def test_one_replica_reconciles_and_another_takes_over_when_it_dies(tmp_path):
    cluster = Cluster()
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
    ops = []
    health = free_port()
    for i in range(2):
        d = tmp_path / f"op{i}"
        d.mkdir()
        ops.append(
            OperatorProc(
                kubeconfig,
                d,
                resync_seconds=2,
                leader_election="true",
                lease_namespace="sdop",
                identity=f"op{i}",
                liveness_port=health if i == 1 else 0,
            )
        )
        if i == 0:  # the first one takes the Lease; the second starts while it holds it
            eventually(
                lambda: bool(
                    (cluster.get("coordination.k8s.io/v1", "leases", "sdop", "sdop-operator") or {}).get("spec")
                ),
                20,
            )
    leader, standby = ops
    try:
        cr = example("sd15-production")
        cr["metadata"] = {"name": "first", "namespace": "ha"}
        cluster.create(cr)
        eventually(lambda: observed(cluster, "first"), 30)
        time.sleep(3)  # a resync or two
        assert reconciles(leader) > 0 and reconciles(standby) == 0, (reconciles(leader), reconciles(standby))
        # A standby is alive (its liveness probe passes) while it waits.
        assert httpx.get(f"http://127.0.0.1:{health}/healthz", timeout=5).status_code == 200

        leader.kill()
        cr["metadata"] = {"name": "second", "namespace": "ha"}
        cluster.create(cr)
        t0 = time.monotonic()
        eventually(lambda: observed(cluster, "second"), 30)
        took = time.monotonic() - t0
        assert reconciles(standby) > 0
        lease = cluster.get("coordination.k8s.io/v1", "leases", "sdop", "sdop-operator")
        assert lease["spec"]["holderIdentity"] == "op1" and lease["spec"]["leaseTransitions"] == 1
        print(f"standby took over and reconciled a new service {took:.1f} s after the leader died")
    finally:
        for op in ops:
            if op.proc.poll() is None:
                op.stop()
        cluster.close()
