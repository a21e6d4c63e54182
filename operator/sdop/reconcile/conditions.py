"""Status of a StableDiffusionService, computed from facts (pure; no API calls).

Conditions follow the Kubernetes API conventions: Ready is the summary; Progressing,
Degraded and ModelReady say why; lastTransitionTime changes only when status does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Facts:
    generation: int
    deployment: dict[str, Any] | None = None
    spec_error: str | None = None
    apply_error: str | None = None
    conflicts: list[str] = field(default_factory=list)
    #: Why replicas are not ready, from pods and ReplicaSets: (reason, message), worst first.
    problems: list[tuple[str, str]] = field(default_factory=list)
    #: The HPA's verdict when there is one: (able, reason, message).
    autoscaler: tuple[bool, str, str] | None = None
    missing_apis: list[str] = field(default_factory=list)
    min_replicas: int = 1
    scale_to_zero: bool = False
    endpoint: str = ""
    model_revision: str = ""
    optional_apis: list[str] = field(default_factory=list)
    #: A failed model is kept out (sdop.reconcile.rollout): what the Degraded condition says.
    rolled_back: str | None = None
    #: status.model and status.canary (sdop.reconcile.rollout.judge), carried as they are.
    model: dict[str, Any] | None = None
    canary: dict[str, Any] | None = None


def _cond(type_: str, ok: bool | None, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "Unknown" if ok is None else ("True" if ok else "False"),
        "reason": reason,
        "message": message,
    }


def _deployment_state(dep: dict[str, Any] | None) -> tuple[int, int, int, bool, str | None]:
    """(replicas, ready, updated, rolled out, failure message)."""
    if dep is None:
        return 0, 0, 0, False, None
    st = dep.get("status") or {}
    replicas = st.get("replicas", 0) or 0
    ready = st.get("readyReplicas", 0) or 0
    updated = st.get("updatedReplicas", 0) or 0
    desired = (dep.get("spec") or {}).get("replicas", replicas)
    observed = st.get("observedGeneration", 0) >= (dep.get("metadata") or {}).get("generation", 0)
    failure = None
    for c in st.get("conditions") or []:
        if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded":
            failure = c.get("message") or "the rollout exceeded its progress deadline"
    rolled_out = observed and updated >= desired and ready >= desired and replicas == updated
    return replicas, ready, updated, rolled_out, failure


def deployment_counts(dep: dict[str, Any] | None) -> tuple[int, int]:
    """(replicas, ready replicas) of a Deployment."""
    replicas, ready, *_ = _deployment_state(dep)
    return replicas, ready


def deadline_exceeded(dep: dict[str, Any] | None) -> str | None:
    """The Deployment controller's message when the rollout passed progressDeadlineSeconds."""
    return _deployment_state(dep)[4]


#: The prefix of the termination message sdserve writes when the model cannot load.
MODEL_LOAD_FAILED = "model_load_failed"

# Container states that keep a replica from ever becoming ready without a fix.
_STUCK = {
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
}


def workload_problems(pods: list[dict[str, Any]], replicasets: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(reason, message) for what keeps replicas from running, as kubectl describe would show it."""
    out: list[tuple[str, str]] = []
    for rs in replicasets:
        for c in (rs.get("status") or {}).get("conditions") or []:
            if c.get("type") == "ReplicaFailure" and c.get("status") == "True":
                out.append((c.get("reason") or "FailedCreate", f"{rs['metadata']['name']}: {c.get('message', '')}"))
    for pod in pods:
        name = pod["metadata"]["name"]
        st = pod.get("status") or {}
        for c in st.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                out.append(("Unschedulable", f"{name}: {c.get('message', '')}"))
        for cs in [*(st.get("initContainerStatuses") or []), *(st.get("containerStatuses") or [])]:
            last = ((cs.get("lastState") or {}).get("terminated") or {}).get("message") or ""
            if last.startswith(MODEL_LOAD_FAILED):  # sdserve's termination message (SDSERVE_TERMINATION_LOG)
                out.append(("ModelLoadFailed", f"{name}: {last.removeprefix(MODEL_LOAD_FAILED + ': ')}"))
                continue
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _STUCK:
                last = ((cs.get("lastState") or {}).get("terminated") or {}).get("message", "")
                message = waiting.get("message") or last or waiting["reason"]
                out.append((waiting["reason"], f"{name}/{cs.get('name')}: {message}"))
    return list(dict.fromkeys(out))  # each problem once, first seen first


def autoscaler_verdict(hpa: dict[str, Any] | None) -> tuple[bool, str, str] | None:
    """The HPA's AbleToScale and ScalingActive conditions, the first that is False, else OK."""
    if hpa is None:
        return None
    for c in (hpa.get("status") or {}).get("conditions") or []:
        if c.get("type") in ("AbleToScale", "ScalingActive") and c.get("status") == "False":
            return False, c.get("reason") or c["type"], c.get("message") or ""
    return True, "ScalingActive", "the autoscaler reads its metric"


def rolled_out(dep: dict[str, Any] | None) -> bool:
    """Every desired replica is updated and ready: no pod has anything to report."""
    return _deployment_state(dep)[3]


def conditions(f: Facts) -> list[dict[str, Any]]:
    if f.spec_error:
        return [
            _cond("Ready", False, "InvalidSpec", f.spec_error),
            _cond("Progressing", False, "InvalidSpec", "nothing was applied; fix the spec"),
            _cond("Degraded", True, "InvalidSpec", f.spec_error),
            _cond("ModelReady", None, "InvalidSpec", "not attempted"),
        ]
    replicas, ready, updated, rolled_out, failure = _deployment_state(f.deployment)
    if f.conflicts:
        degraded = _cond("Degraded", True, "Conflict", "; ".join([*f.conflicts, *filter(None, [f.apply_error])]))
    elif f.apply_error:
        degraded = _cond("Degraded", True, "ApplyFailed", f.apply_error)
    elif f.rolled_back:
        degraded = _cond("Degraded", True, "RolledBack", f.rolled_back)
    elif failure:
        degraded = _cond("Degraded", True, "RolloutStuck", failure)
    elif f.problems:
        degraded = _cond("Degraded", True, f.problems[0][0], "; ".join(m for _, m in f.problems[:5]))
    else:
        degraded = _cond("Degraded", False, "AsExpected", "all children applied")
    if f.deployment is None:
        progressing = _cond("Progressing", True, "Creating", "creating the Deployment")
    elif rolled_out:
        progressing = _cond("Progressing", False, "RolloutComplete", f"{ready}/{replicas} replicas ready")
    else:
        progressing = _cond(
            "Progressing", True, "RollingOut", f"{updated} updated, {ready} ready of {replicas} replicas"
        )
    if ready > 0:
        model = _cond("ModelReady", True, "ModelLoaded", f"model loaded on {ready} replica(s)")
    elif f.problems:
        model = _cond("ModelReady", False, f.problems[0][0], "no replica can load the model: " + f.problems[0][1])
    elif replicas == 0 and f.scale_to_zero and f.deployment is not None:
        model = _cond("ModelReady", None, "ScaledToZero", "no replicas; the model loads on the first request")
    else:
        model = _cond("ModelReady", False, "ModelLoading", "waiting for a replica to load the model")
    need = max(1, f.min_replicas)
    if degraded["status"] == "True" and degraded["reason"] != "RolledBack":
        # A rollback keeps the service serving: Ready follows the replicas of the good model.
        ready_c = _cond("Ready", False, degraded["reason"], degraded["message"])
    elif f.scale_to_zero and replicas == 0 and f.deployment is not None:
        ready_c = _cond("Ready", True, "ScaledToZero", "idle at zero replicas; scales up on demand")
    elif ready >= need:
        ready_c = _cond("Ready", True, "ServiceReady", f"{ready} replica(s) serving at {f.endpoint}")
    else:
        ready_c = _cond("Ready", False, "ReplicasNotReady", f"{ready}/{need} replicas ready")
    out = [ready_c, progressing, degraded, model]
    if f.autoscaler is not None:
        able, reason, message = f.autoscaler
        out.append(_cond("AutoscalerReady", able, reason, message))
    if f.missing_apis:
        out.append(
            _cond(
                "OptionalAPIsAvailable",
                False,
                "APINotInstalled",
                f"{', '.join(f.missing_apis)} not found in the cluster; the objects needing them are not created "
                "(without its autoscaler's API the Deployment keeps replicas.min)",
            )
        )
    return out


def status(f: Facts, previous: dict[str, Any] | None, now: str) -> dict[str, Any]:
    """The full status, carrying lastTransitionTime over for conditions whose status did not change."""
    prev = {c["type"]: c for c in (previous or {}).get("conditions") or []}
    conds = []
    for c in conditions(f):
        old = prev.get(c["type"])
        c["lastTransitionTime"] = (
            old["lastTransitionTime"]
            if old and old.get("status") == c["status"] and old.get("lastTransitionTime")
            else now
        )
        c["observedGeneration"] = f.generation
        conds.append(c)
    replicas, ready, *_ = _deployment_state(f.deployment)
    out: dict[str, Any] = {
        "observedGeneration": f.generation,
        "conditions": conds,
        "replicas": replicas,
        "readyReplicas": ready,
        "endpoint": f.endpoint if not f.spec_error else "",
        "modelRevision": f.model_revision,
        "optionalApis": f.optional_apis,
    }
    if f.model is not None:
        out["model"] = f.model
    # Without spec.canary the key is written as null, so a merge patch removes the old one.
    out["canary"] = f.canary
    return out


def same(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    """Whether writing b over a would change anything."""
    if not a:
        return False
    return all(a.get(k) == v for k, v in b.items())


def transitions(previous: dict[str, Any] | None, new: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(type, old status, new status, reason) of conditions that changed status: the events worth posting."""
    prev = {c["type"]: c.get("status") for c in (previous or {}).get("conditions") or []}
    return [
        (c["type"], prev.get(c["type"], "None"), c["status"], c["reason"])
        for c in new["conditions"]
        if prev.get(c["type"]) != c["status"]
    ]
