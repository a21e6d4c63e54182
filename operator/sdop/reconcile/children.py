"""Make the cluster hold exactly the rendered children of one StableDiffusionService.

A child is written only when it differs: either the rendered object changed (its hash
annotation differs) or someone changed a field the operator owns (live no longer contains
the desired fields). A resync that finds nothing to do makes no write call.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ..api import API_VERSION, KIND, MANAGED
from ..render import digest
from .kube import Kube

HASH_ANNOTATION = "sdop.io/applied-hash"


@dataclass
class SyncResult:
    applied: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)


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


def contains(live: Any, desired: Any) -> bool:
    """Whether live holds every desired field (the server adds defaults; it may stringify quantities)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and contains(live[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(contains(a, b) for a, b in zip(live, desired, strict=True))
        )
    if isinstance(desired, (int, float)) and not isinstance(desired, bool) and isinstance(live, str):
        return str(desired) == live
    return bool(live == desired)


def up_to_date(live: dict[str, Any] | None, desired: dict[str, Any]) -> bool:
    if live is None:
        return False
    ann = (live.get("metadata", {}).get("annotations") or {}).get(HASH_ANNOTATION)
    return ann == desired["metadata"]["annotations"][HASH_ANNOTATION] and contains(live, desired)


async def apply_children(kube: Kube, desired: list[dict[str, Any]], result: SyncResult) -> None:
    for obj in desired:
        m = obj["metadata"]
        live = await kube.get(obj["apiVersion"], obj["kind"], m["namespace"], m["name"])
        if up_to_date(live, obj):
            continue
        await kube.apply(obj)
        result.applied.append(ref(obj))


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
        for item in await kube.list(row.api_version, kind, meta["namespace"], labels):
            im = item["metadata"]
            mine = any(r.get("uid") == meta["uid"] and r.get("controller") for r in im.get("ownerReferences") or [])
            if mine and (kind, im["name"]) not in wanted and not im.get("deletionTimestamp"):
                await kube.delete(row.api_version, kind, meta["namespace"], im["name"])
                result.pruned.append(f"{kind}/{im['name']}")


async def sync(
    kube: Kube, owner: dict[str, Any], rendered: list[dict[str, Any]], apis: set[str], *, prune: bool
) -> SyncResult:
    result = SyncResult()
    desired = owned(owner, rendered)
    await apply_children(kube, desired, result)
    if prune:
        await prune_children(kube, owner, desired, apis, result)
    return result
