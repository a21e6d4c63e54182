"""Server-side apply field ownership (structured-merge-diff, reduced to what the operator meets).

A field set is a set of paths. A path is a tuple of FieldsV1 elements: ``f:<name>`` for a map
key, ``k:<json>`` for an item of an associative list (one keyed by merge keys, such as
containers by name), and ``.`` for "the list item itself". Lists without merge keys are
atomic: owned and replaced as a whole, as are scalars and empty maps.

- ``apply(live, config, manager, force)``: the applier now owns exactly the fields of its
  configuration; a field it owned before and no longer sends, and that nobody else owns, is
  removed; a field another manager owns with a different value is a conflict (409) unless
  forced, when ownership moves to the applier.
- ``update(old, new, manager)``: a non-apply write (create, merge patch, update, status) owns
  the fields it changed, taking them from whoever owned them.

``managedFields`` is kept in the real FieldsV1 shape, so a client can read who owns what.
"""

from __future__ import annotations

import copy
import datetime
import json
from typing import Any

Path = tuple[str, ...]

# Merge keys of the associative lists the operator writes (by the list's field name).
_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "imagePullSecrets": ("name",),
    "ownerReferences": ("uid",),
    "conditions": ("type",),
    "topologySpreadConstraints": ("topologyKey", "whenUnsatisfiable"),
}
_UNTRACKED_META = {
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "generateName",
}


class ApplyConflict(Exception):
    def __init__(self, conflicts: list[tuple[str, str]]):
        self.conflicts = conflicts  # (manager, field)
        super().__init__(
            f"Apply failed with {len(conflicts)} conflict(s): "
            + "; ".join(f'conflict with "{m}": {f}' for m, f in conflicts)
        )


def _keys(name: str, items: list[Any]) -> tuple[str, ...] | None:
    if name == "ports" and items and all(isinstance(i, dict) for i in items):
        port = "containerPort" if "containerPort" in items[0] else "port"
        return (port, "protocol")
    keys = _KEYS.get(name)
    if keys and all(isinstance(i, dict) for i in items):
        return keys
    return None


def _item_key(keys: tuple[str, ...], item: dict[str, Any]) -> str:
    values = {k: item.get(k, "TCP" if k == "protocol" else None) for k in keys}
    return "k:" + json.dumps(values, sort_keys=True, separators=(",", ":"))


def field_set(obj: dict[str, Any]) -> set[Path]:
    out: set[Path] = set()
    top = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
    if isinstance(top.get("metadata"), dict):
        top["metadata"] = {k: v for k, v in top["metadata"].items() if k not in _UNTRACKED_META}
        if not top["metadata"]:
            del top["metadata"]
    _walk(top, (), out)
    return out


def _walk(value: Any, path: Path, out: set[Path], name: str = "") -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _walk(v, (*path, f"f:{k}"), out, k)
    elif isinstance(value, list) and (keys := _keys(name, value)):
        for item in value:
            item_path = (*path, _item_key(keys, item))
            out.add((*item_path, "."))
            _walk(item, item_path, out)
    elif path:
        out.add(path)


def _find(obj: Any, element: str) -> Any:
    if element.startswith("f:"):
        return obj.get(element[2:]) if isinstance(obj, dict) else None
    if element.startswith("k:") and isinstance(obj, list):
        wanted = json.loads(element[2:])
        for item in obj:
            if isinstance(item, dict) and all(
                item.get(k, "TCP" if k == "protocol" else None) == v for k, v in wanted.items()
            ):
                return item
    return None


def value_at(obj: Any, path: Path) -> Any:
    for element in path:
        if element == ".":
            return obj
        obj = _find(obj, element)
        if obj is None:
            return None
    return obj


def remove(obj: dict[str, Any], path: Path) -> None:
    if path[-1] == ".":
        path = path[:-1]
    parent = value_at(obj, path[:-1]) if len(path) > 1 else obj
    last = path[-1]
    if isinstance(parent, dict) and last.startswith("f:"):
        parent.pop(last[2:], None)
    elif isinstance(parent, list):
        item = _find(parent, last)
        if item is not None:
            parent.remove(item)


def merge(live: Any, config: Any, name: str = "") -> Any:
    if isinstance(live, dict) and isinstance(config, dict):
        out = dict(live)
        for k, v in config.items():
            out[k] = merge(live.get(k), v, k)
        return out
    if isinstance(live, list) and isinstance(config, list) and (keys := _keys(name, config + live)):
        merged, seen = [], set()
        for item in config:
            key = _item_key(keys, item)
            seen.add(key)
            merged.append(merge(_find(live, key), item, name) if _find(live, key) is not None else item)
        return merged + [i for i in live if _item_key(keys, i) not in seen]
    return copy.deepcopy(config)


# ---- managedFields -------------------------------------------------------------------------


def encode(paths: set[Path]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in sorted(paths):
        node = tree
        for element in path:
            node = node.setdefault(element, {})
    return tree


def decode(tree: dict[str, Any], prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for element, sub in tree.items():
        path = (*prefix, element)
        if sub:
            out |= decode(sub, path)
        else:
            out.add(path)
    return out


def _entries(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return list(obj.get("metadata", {}).get("managedFields") or [])


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _store(
    obj: dict[str, Any], entries: list[dict[str, Any]], manager: str, operation: str, paths: set[Path], sub: str | None
) -> None:
    entries = [e for e in entries if not (e["manager"] == manager and e["operation"] == operation)]
    if paths:
        entry = {
            "manager": manager,
            "operation": operation,
            "apiVersion": obj.get("apiVersion", ""),
            "time": _now(),
            "fieldsType": "FieldsV1",
            "fieldsV1": encode(paths),
        }
        if sub:
            entry["subresource"] = sub
        entries.append(entry)
    obj.setdefault("metadata", {})["managedFields"] = [e for e in entries if e.get("fieldsV1")]


def apply(live: dict[str, Any], config: dict[str, Any], manager: str, force: bool) -> dict[str, Any]:
    entries = _entries(live)
    new = field_set(config)
    conflicts = []
    for e in entries:
        if e["manager"] == manager and e["operation"] == "Apply":
            continue
        owned = decode(e["fieldsV1"])
        clash = {p for p in owned & new if p[-1] != "." and value_at(live, p) != value_at(config, p)}
        if clash and not force:
            conflicts += [(e["manager"], ".".join(x[2:] for x in p)) for p in sorted(clash)]
        e["fieldsV1"] = encode(owned - clash)
    if conflicts:
        raise ApplyConflict(conflicts)
    mine = next((e for e in entries if e["manager"] == manager and e["operation"] == "Apply"), None)
    before = decode(mine["fieldsV1"]) if mine else set()
    others: set[Path] = set()
    for e in entries:
        if e is not mine:
            others |= decode(e["fieldsV1"])
    result = copy.deepcopy(live)
    gone = before - new - others
    # Whole list items first, then single fields; an item's key fields go only with the item.
    for path in sorted((p for p in gone if p[-1] == "."), key=len):
        item = path[:-1]
        if not any(o[: len(item)] == item for o in others | new):
            remove(result, path)
    for path in sorted((p for p in gone if p[-1] != "."), key=len, reverse=True):
        if len(path) > 1 and path[-2].startswith("k:") and path[-1][2:] in json.loads(path[-2][2:]):
            continue
        remove(result, path)
    body = {k: v for k, v in config.items() if k != "status"}
    meta = {k: v for k, v in body.get("metadata", {}).items() if k not in _UNTRACKED_META}
    body["metadata"] = meta
    result = merge(result, body)
    _store(result, entries, manager, "Apply", new, None)
    return result


def update(old: dict[str, Any] | None, new: dict[str, Any], manager: str, sub: str | None = None) -> None:
    """Record that ``manager`` wrote ``new`` over ``old`` (in place on ``new``)."""
    entries = _entries(old or {})
    changed = {p for p in field_set(new) if value_at(old or {}, p) != value_at(new, p)}
    if sub == "status":
        changed = {p for p in changed if p[0] == "f:status"}
    if not changed:
        new.setdefault("metadata", {})["managedFields"] = entries
        return
    for e in entries:
        if e["manager"] != manager or e["operation"] != "Update":
            e["fieldsV1"] = encode(decode(e["fieldsV1"]) - changed)
    mine = next((e for e in entries if e["manager"] == manager and e["operation"] == "Update"), None)
    paths = (decode(mine["fieldsV1"]) if mine else set()) | changed
    _store(new, entries, manager, "Update", paths, sub)


def owners(obj: dict[str, Any], path: Path) -> list[tuple[str, str]]:
    """(manager, operation) of every entry that owns ``path``."""
    return [(e["manager"], e["operation"]) for e in _entries(obj) if path in decode(e.get("fieldsV1") or {})]
