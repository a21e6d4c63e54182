"""The documented ArgoCD health check, run by a Lua interpreter on statuses the operator writes."""

from __future__ import annotations

import lupa
import pytest

from sdop.reconcile import conditions as cond
from sdtesting.examples import ROOT

SCRIPT = (ROOT / "docs" / "argocd-health.lua").read_text()


def health(obj):
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    fn = lua.eval("function(obj) " + SCRIPT + " end")

    def to_lua(v):
        if isinstance(v, dict):
            return lua.table_from({k: to_lua(x) for k, x in v.items()})
        return lua.table_from([to_lua(x) for x in v]) if isinstance(v, list) else v

    result = fn(to_lua(obj))
    return result["status"], result["message"]


def obj(status, generation=1):
    return {"metadata": {"generation": generation}, "status": status}


def ready_deployment(n):
    return {
        "metadata": {"generation": 1},
        "spec": {"replicas": n},
        "status": {"observedGeneration": 1, "replicas": n, "readyReplicas": n, "updatedReplicas": n},
    }


def test_no_status_is_progressing():
    assert health({"metadata": {"generation": 1}})[0] == "Progressing"


def test_ready_service_is_healthy():
    st = cond.status(
        cond.Facts(generation=1, deployment=ready_deployment(2), min_replicas=2, endpoint="http://x"), None, "t"
    )
    assert health(obj(st)) == ("Healthy", "2 replica(s) serving at http://x")


def test_invalid_spec_is_degraded_with_reason():
    st = cond.status(cond.Facts(generation=1, spec_error="spec.gpu.count: bad"), None, "t")
    status, message = health(obj(st))
    assert status == "Degraded" and message.startswith("InvalidSpec") and "spec.gpu.count" in message


def test_loading_is_progressing():
    st = cond.status(cond.Facts(generation=1, deployment=ready_deployment(0) | {"spec": {"replicas": 1}}), None, "t")
    assert health(obj(st))[0] == "Progressing"


def test_status_of_an_older_generation_is_not_healthy():
    st = cond.status(cond.Facts(generation=1, deployment=ready_deployment(1), endpoint="e"), None, "t")
    assert health(obj(st, generation=2))[0] == "Progressing"


@pytest.mark.parametrize("reason", ["RolloutStuck", "ApplyFailed"])
def test_stuck_rollout_or_rejected_apply_is_degraded(reason):
    dep = ready_deployment(1)
    if reason == "RolloutStuck":
        dep["status"]["conditions"] = [
            {"type": "Progressing", "reason": "ProgressDeadlineExceeded", "message": "deadline"}
        ]
        f = cond.Facts(generation=1, deployment=dep)
    else:
        f = cond.Facts(generation=1, deployment=dep, apply_error="HTTP 422: invalid")
    assert health(obj(cond.status(f, None, "t")))[0] == "Degraded"
