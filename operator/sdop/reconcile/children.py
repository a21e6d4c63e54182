"""Make the cluster hold exactly the rendered children of one StableDiffusionService.

A child is written only when it differs: either the rendered object changed (its hash
annotation differs) or someone changed a field the operator owns (live no longer contains
the desired fields; quantities compare by value, as the API server rewrites them). A
resync that finds nothing to do makes no write call.

Each child is applied on its own: one child's rejection never keeps the others (the
Deployment above all) from being applied; every failure is collected for the status.
An object with a child's name that this StableDiffusionService does not control is never
touched: it is reported as a conflict, so creating a StableDiffusionService cannot take
over (or, through garbage collection, delete) a Service or ConfigMap it does not own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ..api import API_VERSION, FIELD_MANAGER, KIND, MANAGED, quantity
from ..render import digest
from .kube import Kube, KubeError

HASH_ANNOTATION = "sdop.io/applied-hash"

#: The field manager that keeps ``spec.replicas`` when autoscaling takes it over (see
#: ``hand_over_replicas``).
HANDOVER_MANAGER = "sdop-handover"

# Maps whose values are resource quantities: container requests/limits, PVC requests.
_QUANTITY_MAPS = {"requests", "limits"}


@dataclass
class SyncResult:
    applied: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    failed: list[tuple[str, KubeError]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    @property
    def retryable(self) -> list[tuple[str, KubeError]]:
        return [(r, e) for r, e in self.failed if e.retryable]

    def error(self) -> str | None:
        """The rejections, one per child, for the status; None when every child was applied."""
        if not self.failed:
            return None
        return "; ".join(f"{r}: {e.message}" for r, e in self.failed)


def ref(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def owned(owner: dict[str, Any], objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Children with the controller owner reference and the hash of what is applied."""
    meta = owner["metadata"]
    out = []
    for obj in objs:
        obj = copy.deepcopy(obj)
        h = digest(obj, 16)
        obj["metadata"]["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta["name"],
                "uid": meta["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        obj["metadata"].setdefault("annotations", {})[HASH_ANNOTATION] = h
        out.append(obj)
    return out


def contains(live: Any, desired: Any, key: str = "", parent: str = "") -> bool:
    """Whether live holds every desired field (the server adds defaults and canonicalises quantities)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and contains(live[k], v, k, key) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(contains(a, b, key, parent) for a, b in zip(live, desired, strict=True))
        )
    if (parent in _QUANTITY_MAPS or key == "sizeLimit") and live != desired:
        return quantity.equal(live, desired)
    if isinstance(desired, (int, float)) and not isinstance(desired, bool) and isinstance(live, str):
        return str(desired) == live
    return bool(live == desired)


def up_to_date(live: dict[str, Any] | None, desired: dict[str, Any]) -> bool:
    if live is None:
        return False
    ann = (live.get("metadata", {}).get("annotations") or {}).get(HASH_ANNOTATION)
    return ann == desired["metadata"]["annotations"][HASH_ANNOTATION] and contains(live, desired)


def controller_uid(obj: dict[str, Any]) -> str | None:
    for r in obj.get("metadata", {}).get("ownerReferences") or []:
        if r.get("controller"):
            uid: str | None = r.get("uid")
            return uid
    return None


def foreign(live: dict[str, Any], owner: dict[str, Any]) -> str | None:
    """Why ``live`` is not ours to change, or None when this owner controls it."""
    uid = controller_uid(live)
    if uid == owner["metadata"]["uid"]:
        return None
    r = ref(live)
    for o in live["metadata"].get("ownerReferences") or []:
        if o.get("controller") and o.get("kind") == KIND and o.get("name") == owner["metadata"]["name"]:
            return f"{r} still belongs to a deleted {KIND} of the same name (waiting for garbage collection)"
    return f"{r} already exists and is not controlled by this {KIND}; rename or delete it"


def owns(obj: dict[str, Any], manager: str, *path: str) -> bool:
    """Whether ``manager`` owns a field by server-side apply (``managedFields``)."""
    for entry in obj.get("metadata", {}).get("managedFields") or []:
        if entry.get("manager") == manager and entry.get("operation") == "Apply":
            node = entry.get("fieldsV1") or {}
            for name in path:
                node = node.get(f"f:{name}")
                if node is None:
                    break
            else:
                return True
    return False


async def hand_over_replicas(kube: Kube, live: dict[str, Any] | None, desired: dict[str, Any]) -> bool:
    """Keep today's replica count when autoscaling takes ``spec.replicas`` over.

    Server-side apply removes a field its only owner stops sending, and the Deployment
    default (1) would come back: N-1 GPU pods would drain before the autoscaler scales up
    again. As the Kubernetes docs on transferring ownership describe, first apply the live
    count under a second manager, then the configuration without ``replicas``; the
    autoscaler takes the field from there.
    """
    if desired["kind"] != "Deployment" or live is None or "replicas" in desired.get("spec", {}):
        return False
    if not owns(live, FIELD_MANAGER, "spec", "replicas"):
        return False
    m = desired["metadata"]
    keep = {
        "apiVersion": desired["apiVersion"],
        "kind": desired["kind"],
        "metadata": {"name": m["name"], "namespace": m["namespace"]},
        "spec": {"replicas": live["spec"]["replicas"]},
    }
    await kube.apply(keep, field_manager=HANDOVER_MANAGER, force=False)
    return True


async def apply_child(
    kube: Kube, owner: dict[str, Any], obj: dict[str, Any], result: SyncResult, live: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Apply one child unless it is up to date or not ours; failures go to ``result``. Returns the live object."""
    m = obj["metadata"]
    try:
        if live is None:
            live = await kube.get(obj["apiVersion"], obj["kind"], m["namespace"], m["name"])
        if live is not None and (why := foreign(live, owner)):
            result.conflicts.append(why)
            return live
        if up_to_date(live, obj):
            return live
        await hand_over_replicas(kube, live, obj)
        applied = await kube.apply(obj)
    except KubeError as e:
        result.failed.append((ref(obj), e))
        return live
    result.applied.append(ref(obj))
    return applied


async def prune_children(
    kube: Kube, owner: dict[str, Any], desired: list[dict[str, Any]], apis: set[str], result: SyncResult
) -> None:
    """Delete children this owner no longer renders (a feature turned off, a renamed Job)."""
    meta = owner["metadata"]
    wanted = {(o["kind"], o["metadata"]["name"]) for o in desired}
    labels = {"app.kubernetes.io/instance": meta["name"], "app.kubernetes.io/managed-by": "sdop"}
    for row in MANAGED:
        if row.optional_api and row.optional_api not in apis:
            continue
        kind = row.kind
        try:
            items = await kube.list(row.api_version, kind, meta["namespace"], labels)
        except KubeError as e:
            result.failed.append((f"{kind} (listing)", e))
            continue
        for item in items:
            im = item["metadata"]
            mine = controller_uid(item) == meta["uid"]
            if mine and (kind, im["name"]) not in wanted and not im.get("deletionTimestamp"):
                try:
                    await kube.delete(row.api_version, kind, meta["namespace"], im["name"])
                except KubeError as e:
                    result.failed.append((f"{kind}/{im['name']} (deleting)", e))
                    continue
                result.pruned.append(f"{kind}/{im['name']}")


async def sync(
    kube: Kube, owner: dict[str, Any], rendered: list[dict[str, Any]], apis: set[str], *, prune: bool
) -> SyncResult:
    result = SyncResult()
    desired = owned(owner, rendered)
    for obj in desired:
        await apply_child(kube, owner, obj, result)
    if prune:
        await prune_children(kube, owner, desired, apis, result)
    return result
