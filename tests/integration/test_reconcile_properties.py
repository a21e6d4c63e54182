"""Reconcile invariants, checked by hypothesis stateful testing against the test API server.

Random sequences of valid spec edits, outside edits and deletes of children, objects that
already hold a name the service will need, deleting and re-creating the service, and
operator restarts. After each settle:

- every rendered child exists, is controlled by the service and holds what render() asks for;
- every object the service does not control is untouched (same resourceVersion, not deleted);
- no child the spec no longer asks for is left;
- the status tells what happened (observedGeneration; Degraded=Conflict naming each
  foreign object in the way, else Degraded=False);
- a no-op resync writes nothing.

``make test`` runs a bounded number of examples; a longer run:

    SDOP_PROPERTY_EXAMPLES=300 .venv/bin/python -m pytest -o timeout=0 tests/integration/test_reconcile_properties.py
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import os
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from sdop.api import kind_of
from sdop.reconcile.children import contains
from sdop.reconcile.kube import Kube
from sdop.render import ClusterFacts, render
from sdtesting.apiserver import Cluster
from sdtesting.examples import example

from .conftest import reconciler_for

pytestmark = pytest.mark.integration

SDS = ("sdop.io/v1alpha1", "stablediffusionservices")


def where(kind: str) -> tuple[str, str]:
    """(apiVersion, plural) of a kind, from the operator's kinds table."""
    row = kind_of(kind)
    return row.api_version, row.plural


NAME = "prop"
_namespaces = (f"prop-{i}" for i in itertools.count())

# Valid spec edits (merge patches of spec).
EDITS = st.one_of(
    st.builds(lambda t: {"image": {"tag": t}}, st.sampled_from(["0.1.0", "0.2.0", "1.0.0-rc1"])),
    st.builds(lambda n: {"batching": {"maxBatchSize": n}}, st.integers(1, 8)),
    st.builds(lambda a, b: {"replicas": {"min": min(a, b), "max": max(a, b)}}, st.integers(1, 5), st.integers(1, 5)),
    st.builds(lambda on: {"autoscaling": {"enabled": on}}, st.booleans()),
    st.builds(
        lambda c: {"model": {"cache": {"storageClassName": c}}}, st.sampled_from(["standard-rwx", "premium-rwx"])
    ),
    st.builds(lambda c: {"resources": {"cpu": c}}, st.sampled_from(["1.5", "1500m", "2", "8", "2500m"])),
    st.builds(lambda on: {"monitoring": {"dashboard": on, "serviceMonitor": on}}, st.booleans()),
    st.builds(lambda on: {"ingress": {"enabled": on}}, st.booleans()),
    st.builds(
        lambda t: {"cache": {"type": t, "redis": {"managed": True} if t == "redis" else None}},
        st.sampled_from(["none", "memory", "redis"]),
    ),
)
# Names a service may come to need, that someone else may have taken first.
SQUATS = st.sampled_from([("ConfigMap", f"{NAME}-dashboard"), ("Service", f"{NAME}-redis"), ("Ingress", NAME)])


class Reconciling(RuleBasedStateMachine):
    cluster: Cluster

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.ns = next(_namespaces)
        self.squatted: dict[tuple[str, str], dict[str, Any]] = {}
        self.kube: Kube | None = None
        self._start_operator()

    # ---- the operator --------------------------------------------------------------------

    def _start_operator(self) -> None:
        if self.kube is not None:
            self.loop.run_until_complete(self.kube.close())
        self.reconciler = reconciler_for(self.cluster.url)
        self.kube = self.reconciler.kube

    def body(self) -> dict[str, Any] | None:
        return self.cluster.get(*SDS, self.ns, NAME)

    def converge(self):
        body = self.body()
        assert body is not None
        return self.loop.run_until_complete(self.reconciler.converge(body, prune=True))

    def settle(self) -> None:
        """Converge until a pass writes no child (the resync timer would do the same)."""
        for _ in range(20):
            report = self.converge()
            waiting = "waiting for garbage collection" in str((self.body() or {}).get("status"))
            if not report.applied and not report.pruned and not waiting:
                return
            if waiting:
                time.sleep(0.1)
        raise AssertionError("the service never settled")

    # ---- rules -----------------------------------------------------------------------------

    @initialize()
    def create(self) -> None:
        cr = example("sd15-production")
        cr["metadata"] = {"name": NAME, "namespace": self.ns}
        cr["spec"]["monitoring"]["dashboard"] = False
        cr["spec"]["cache"] = {"type": "memory"}
        self.cluster.create(cr)
        self.settle()

    @rule(edit=EDITS)
    def edit_spec(self, edit: dict[str, Any]) -> None:
        self.cluster.patch(*SDS, self.ns, NAME, {"spec": edit})
        self.settle()

    @rule(data=st.data())
    def edit_a_child_from_outside(self, data: st.DataObject) -> None:
        kids = sorted(self.cluster.children(self.ns, NAME))
        kind, name = data.draw(st.sampled_from(kids))
        api_version, plural = where(kind)
        self.cluster.patch(
            api_version, plural, self.ns, name, {"metadata": {"labels": {"app.kubernetes.io/name": "x"}}}
        )
        self.settle()

    @rule(data=st.data())
    def delete_a_child(self, data: st.DataObject) -> None:
        kids = sorted(self.cluster.children(self.ns, NAME))
        kind, name = data.draw(st.sampled_from(kids))
        self.cluster.delete(*where(kind), self.ns, name)
        self.settle()

    @rule(squat=SQUATS)
    def take_a_name_first(self, squat: tuple[str, str]) -> None:
        kind, name = squat
        api_version, plural = where(kind)
        if self.cluster.get(api_version, plural, self.ns, name) is not None:
            return  # ours already, or taken already
        obj: dict[str, Any] = {
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"name": name, "namespace": self.ns},
        }
        if kind == "ConfigMap":
            obj["data"] = {"owner": "someone else"}
        elif kind == "Service":
            obj["spec"] = {"selector": {"app": "theirs"}, "ports": [{"port": 6379}]}
        else:
            obj["spec"] = {"defaultBackend": {"service": {"name": "theirs", "port": {"number": 80}}}}
        created = self.cluster.apply(obj, plural, manager="someone-else")
        assert created.status_code == 201, created.text
        self.squatted[squat] = created.json()
        self.settle()

    @rule()
    def restart_the_operator(self) -> None:
        self._start_operator()
        self.settle()

    @rule()
    def delete_and_recreate_the_service(self) -> None:
        body = self.body()
        assert body is not None
        self.cluster.delete(*SDS, self.ns, NAME)
        cr = {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": {"name": NAME, "namespace": self.ns}}
        cr["spec"] = copy.deepcopy(body["spec"])
        self.cluster.create(cr)
        self.settle()

    # ---- invariants -------------------------------------------------------------------------

    @invariant()
    def children_are_what_render_asks_for(self) -> None:
        body = self.body()
        if body is None:
            return
        uid = body["metadata"]["uid"]
        wanted = {(o["kind"], o["metadata"]["name"]): o for o in render(body, ClusterFacts())}
        for key, desired in wanted.items():
            if key in self.squatted:
                continue
            live = self.cluster.get(*where(key[0]), self.ns, key[1])
            assert live is not None, f"{key} missing"
            refs = [r for r in live["metadata"].get("ownerReferences") or [] if r.get("controller")]
            assert [r["uid"] for r in refs] == [uid], (key, refs)
            assert contains(live, desired), f"{key} does not hold what render() asks for"
        left = set(self.cluster.children(self.ns, NAME)) - set(wanted) - set(self.squatted)
        assert not left, f"children the spec no longer asks for: {left}"

    @invariant()
    def foreign_objects_are_untouched(self) -> None:
        for (kind, name), before in self.squatted.items():
            now = self.cluster.get(*where(kind), self.ns, name)
            assert now == before, f"{kind}/{name} was changed or deleted"

    @invariant()
    def status_tells_what_happened(self) -> None:
        body = self.body()
        if body is None:
            return
        status = body.get("status") or {}
        assert status.get("observedGeneration") == body["metadata"]["generation"]
        degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
        wanted = {(o["kind"], o["metadata"]["name"]) for o in render(body, ClusterFacts())}
        in_the_way = [f"{k}/{n}" for k, n in self.squatted if (k, n) in wanted]
        if in_the_way:
            assert degraded["reason"] == "Conflict", degraded
            assert all(r in degraded["message"] for r in in_the_way), degraded
        else:
            assert degraded["status"] == "False", degraded

    @invariant()
    def a_no_op_resync_writes_nothing(self) -> None:
        if self.body() is None:
            return
        assert self.kube is not None
        writes = self.kube.writes
        report = self.converge()
        assert report.applied == [] and report.pruned == [] and self.kube.writes == writes, report

    def teardown(self) -> None:
        if self.kube is not None:
            self.loop.run_until_complete(self.kube.close())
        self.loop.close()


def test_reconcile_invariants_hold(apiserver):
    Reconciling.cluster = apiserver
    examples = int(os.environ.get("SDOP_PROPERTY_EXAMPLES", "12"))
    run_state_machine_as_test(
        Reconciling,
        settings=settings(
            max_examples=examples,
            stateful_step_count=8,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
