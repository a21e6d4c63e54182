"""The request handling of the test API server: kmock's scaffold for discovery and errors,
our own storage for objects.

kmock's ``KubernetesScaffold`` serves discovery (``/api``, ``/apis/<group>/<version>``) from
the declared resources and renders ``Status`` errors; its documented extension point,
``_handle``, serves object requests here. Watches go through a kmock stream reaction.

Every write goes through one pipeline, as in kube-apiserver: decode (create, merge patch,
update, server-side apply with field ownership) -> preconditions (resourceVersion) ->
normalise (quantities) -> defaults -> validation (names, labels, kind rules, the CRD's
schema and CEL rules for custom resources) -> immutable fields -> store (resourceVersion,
generation, managedFields) -> watch event. Deletion honours finalizers; removing an object
garbage-collects its dependents (owner references by uid, background propagation).

Not modelled: admission webhooks, quotas and LimitRanges, PodSecurity admission, RBAC
(every request is allowed), namespace existence, strategic merge (treated as a JSON merge
patch), JSON patch, the scale subresource, controllers (no pods appear; tests write
status themselves).
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import kmock
import yaml

from . import fields, rules
from .crdschema import CustomResource

Key = tuple[str, str, str]  # ("group/version/plural", namespace or "", name)
_STOP = object()


@dataclass
class Fault:
    """Answer ``times`` requests whose method and path match with an HTTP error."""

    method: str
    path_part: str
    status: int
    times: int


class ApiError(Exception):
    def __init__(
        self, code: int, reason: str, message: str, causes: list[dict[str, str]] | None = None, **details: Any
    ):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details = {**details, **({"causes": causes} if causes else {})}


def _clone(obj: Any) -> Any:
    """A deep copy of JSON data (several times faster than copy.deepcopy)."""
    return json.loads(json.dumps(obj))


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sans_times(obj: dict[str, Any]) -> dict[str, Any]:
    entries = [{k: v for k, v in e.items() if k != "time"} for e in obj["metadata"].get("managedFields") or []]
    return {**obj, "metadata": {**obj["metadata"], "managedFields": entries}}


def _resource(request: kmock.Request) -> kmock.resource:
    assert request.resource is not None, "only object requests get here"
    return request.resource


def _res(resource: kmock.resource) -> str:
    return (
        f"{resource.group}/{resource.version}/{resource.plural}"
        if resource.group
        else f"{resource.version}/{resource.plural}"
    )


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return _clone(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def json_patch(target: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902; a failed ``test`` or a missing path is a 422, as kube-apiserver answers."""
    doc = _clone(target)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = doc
        try:
            for p in parents:
                node = node[int(p)] if isinstance(node, list) else node[p]
            kind = op["op"]
            if kind == "test":
                current = node[int(last)] if isinstance(node, list) else node.get(last)
                if current != op.get("value"):
                    raise ApiError(422, "Invalid", f"the server rejected our request: test failed at {op['path']}")
            elif kind in ("add", "replace"):
                if isinstance(node, list):
                    index = len(node) if last == "-" else int(last)
                    node.insert(index, op["value"]) if kind == "add" else node.__setitem__(index, op["value"])
                else:
                    if kind == "replace" and last not in node:
                        raise KeyError(last)
                    node[last] = _clone(op["value"])
            elif kind == "remove":
                del node[int(last) if isinstance(node, list) else last]
            else:
                raise ApiError(422, "Invalid", f"unsupported JSON patch operation {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise ApiError(422, "Invalid", f"the server rejected our request: {op['op']} {op['path']}: {e}") from None
    return doc


def _selector(text: str) -> list[tuple[str, str, str | None]]:
    out: list[tuple[str, str, str | None]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "!=" in part:
            k, v = part.split("!=", 1)
            out.append(("!=", k, v))
        elif "=" in part:
            k, v = part.split("==", 1) if "==" in part else part.split("=", 1)
            out.append(("=", k, v))
        elif part.startswith("!"):
            out.append(("!", part[1:], None))
        else:
            out.append(("exists", part, None))
    return out


def _matches(labels: dict[str, str], selector: list[tuple[str, str, str | None]]) -> bool:
    for op, k, v in selector:
        if (
            (op == "=" and labels.get(k) != v)
            or (op == "!=" and labels.get(k) == v)
            or (op == "!" and k in labels)
            or (op == "exists" and k not in labels)
        ):
            return False
    return True


class ApiServer(kmock.KubernetesScaffold):
    """kube-apiserver, as far as the operator can tell; see the module docstring for the limits."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.objects: dict[Key, dict[str, Any]] = {}
        self._index: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
        self._rv = itertools.count(1)
        self.history: collections.deque[tuple[int, str, dict[str, Any]]] = collections.deque(maxlen=5000)
        self._watchers: dict[str, list[asyncio.Queue[Any]]] = collections.defaultdict(list)
        self.custom: dict[str, CustomResource] = {}  # resource -> schema of a custom resource
        self.faults: list[Fault] = []
        self.writes: list[tuple[str, str]] = []
        self.gc_delay = 0.2
        #: Bearer tokens the server accepts; None accepts any request (authentication off).
        self.tokens: set[str] | None = None
        self.seen_tokens: list[str] = []
        self.fallback[kmock.action.WATCH] << self._watch

    # ---- entry point -------------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # kmock keeps every request for assertions, and matching a request against its DSL
        # reactions scans that whole history. Tests here assert on ``writes``; keeping only
        # the current request bounds memory and time over a long run (the scale benchmark,
        # the property tests). This is the one place a kmock internal is touched.
        del self._requests[:-1]
        path, method = str(request.url.path), str(request.method.value)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.seen_tokens.append(token)
        if self.tokens is not None and token not in self.tokens:
            return self._status(ApiError(401, "Unauthorized", "Unauthorized"))
        for f in self.faults:
            if f.times > 0 and f.method == method and f.path_part in path:
                f.times -= 1
                return self._status(ApiError(f.status, "Injected", f"injected {f.status}"))
        if request.resource is None or not request.resource.plural:
            return await super()._handle(request)  # discovery: kmock's scaffold serves it
        if request.resource not in self.resources:
            return self._status(ApiError(404, "NotFound", f"the server could not find the requested resource ({path})"))
        if request.action == kmock.action.WATCH:
            return await super()._handle(request)
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            self.writes.append((method, path))
        try:
            status, body = await self._serve(request, method)
        except ApiError as e:
            return self._status(e)
        return aiohttp.web.json_response(body, status=status)

    @staticmethod
    def _status(e: ApiError) -> aiohttp.web.Response:
        body = {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "message": e.message,
            "reason": e.reason,
            "details": e.details,
            "code": e.code,
        }
        return aiohttp.web.json_response(body, status=e.code)

    async def _serve(self, request: kmock.Request, method: str) -> tuple[int, Any]:
        res = _res(_resource(request))
        info = self.resources[_resource(request)]
        ns = (request.namespace or "") if info.namespaced else ""
        if method == "GET" and request.name is None:
            return 200, self._list(res, info.kind or "", request.namespace, request.params)
        if method == "POST" and request.name is None:
            return 201, self._create(res, ns, self._body(request), request)
        if request.name is None:
            raise ApiError(405, "MethodNotAllowed", f"{method} needs an object name")
        key = (res, ns, request.name)
        if method == "GET":
            live = self.objects.get(key)
            if live is None:
                raise self._not_found(res, request.name)
            return 200, _clone(live)
        if method == "DELETE":
            return 200, self._delete(key, self._body(request) or {})
        if method in ("PUT", "PATCH"):
            return self._modify(key, method, request)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported")

    @staticmethod
    def _body(request: kmock.Request) -> Any:
        if request.data is not None:
            return request.data
        return yaml.safe_load(request.text) if request.text else None

    def _not_found(self, res: str, name: str) -> ApiError:
        plural = res.rsplit("/", 1)[-1]
        group = res.split("/")[0] if res.count("/") == 2 else ""
        return ApiError(
            404, "NotFound", f'{plural}{"." + group if group else ""} "{name}" not found', name=name, kind=plural
        )

    # ---- reads -------------------------------------------------------------------------

    def _list(self, res: str, kind: str, ns: str | None, params: Any) -> dict[str, Any]:
        selector = _selector(params.get("labelSelector", ""))
        fields_ = dict(p.split("=", 1) for p in params.get("fieldSelector", "").split(",") if "=" in p)
        spaces = [ns] if ns is not None else sorted({n for r, n in self._index if r == res})
        items = []
        for space in spaces:
            for name in sorted(self._index.get((res, space), ())):
                obj = self.objects[(res, space, name)]
                meta = obj["metadata"]
                if fields_.get("metadata.name", name) != name:
                    continue
                if _matches(meta.get("labels") or {}, selector):
                    items.append(_clone(obj))
        version = res.rsplit("/", 1)[0]
        return {
            "apiVersion": version,
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(self._last_rv)},
            "items": items,
        }

    @property
    def _last_rv(self) -> int:
        return self.history[-1][0] if self.history else 0

    async def _watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        yield b""  # send the headers: the stream is open even when nothing happens
        res = _res(_resource(request))
        ns = request.namespace
        since = request.params.get("resourceVersion", "")
        timeout = float(request.params.get("timeoutSeconds", 0) or 0)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._watchers[res].append(queue)
        try:
            if since in ("", "0"):
                for (r, space), names_ in list(self._index.items()):
                    if r == res and (ns is None or space == ns):
                        for name in sorted(names_):
                            yield {"type": "ADDED", "object": _clone(self.objects[(res, space, name)])}
            else:
                oldest = self.history[0][0] if self.history else 0
                if int(since) < oldest - 1 and len(self.history) == self.history.maxlen:
                    yield {
                        "type": "ERROR",
                        "object": {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "code": 410,
                            "reason": "Expired",
                            "message": f"too old resource version: {since}",
                        },
                    }
                    return
                for rv, r, event in list(self.history):
                    if (
                        rv > int(since)
                        and r == res
                        and (ns is None or event["object"]["metadata"].get("namespace") == ns)
                    ):
                        yield event
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout else None
            while True:
                wait = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    event = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    return
                if event is _STOP:
                    return
                if ns is None or event["object"]["metadata"].get("namespace") == ns:
                    yield event
        finally:
            self._watchers[res].remove(queue)

    async def drop_watches(self) -> None:
        """End every open watch stream, as an API server restart or a load balancer does."""
        for queues in self._watchers.values():
            for q in queues:
                q.put_nowait(_STOP)

    # ---- writes ------------------------------------------------------------------------

    def _manager(self, request: kmock.Request) -> str:
        agent = request.headers.get("User-Agent", "unknown")
        return request.params.get("fieldManager") or agent.split("/")[0].split(" ")[0]

    def _create(self, res: str, ns: str, body: Any, request: kmock.Request) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request must be an object")
        obj = _clone(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value: name or generateName is required")
        if ns:
            meta["namespace"] = ns
        key = (res, ns, meta["name"])
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{res.rsplit("/", 1)[-1]} "{meta["name"]}" already exists')
        if "status" in self.resources[_resource(request)].subresources:
            obj.pop("status", None)
        fields.update(None, obj, self._manager(request))
        return self._commit(key, None, obj, request)

    def _modify(self, key: Key, method: str, request: kmock.Request) -> tuple[int, dict[str, Any]]:
        live = self.objects.get(key)
        body = self._body(request)
        sub = request.subresource
        content = request.headers.get("Content-Type", "")
        manager = self._manager(request)
        if method == "PATCH" and "json-patch" in content:
            if live is None:
                raise self._not_found(key[0], key[2])
            if not isinstance(body, list):
                raise ApiError(400, "BadRequest", "a JSON patch is a list of operations")
            new = json_patch(live, body)
            fields.update(live, new, manager, sub)
            return 200, self._commit(key, live, new, request)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request must be an object")
        if method == "PATCH" and "apply-patch" in content:
            if not request.params.get("fieldManager"):
                raise ApiError(400, "BadRequest", "PATCH: fieldManager is required for apply requests")
            if body.get("metadata", {}).get("name") not in (None, key[2]):
                raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
            force = request.params.get("force") == "true"
            base = live or {
                "apiVersion": body.get("apiVersion"),
                "kind": body.get("kind"),
                "metadata": {"name": key[2]},
            }
            try:
                new = fields.apply(base, body, manager, force)
            except fields.ApplyConflict as e:
                causes = [
                    {"reason": "FieldManagerConflict", "message": f'conflict with "{m}"', "field": f}
                    for m, f in e.conflicts
                ]
                raise ApiError(409, "Conflict", str(e), causes) from None
            if live is None:
                if key[1]:
                    new["metadata"]["namespace"] = key[1]
                if "status" in self.resources[_resource(request)].subresources:
                    new.pop("status", None)
                return 201, self._commit(key, None, new, request)
            return 200, self._commit(key, live, new, request)
        if live is None:
            raise self._not_found(key[0], key[2])
        wanted_rv = body.get("metadata", {}).get("resourceVersion")
        if method == "PUT" and not wanted_rv:
            raise ApiError(
                422, "Invalid", "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"
            )
        if wanted_rv and wanted_rv != live["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {key[0].rsplit("/", 1)[-1]} "{key[2]}": '
                "the object has been modified; please apply your changes to the latest version and try again",
            )
        new = merge_patch(live, body) if method == "PATCH" else _clone(body)
        fields.update(live, new, manager, sub)
        return 200, self._commit(key, live, new, request)

    def _commit(
        self, key: Key, old: dict[str, Any] | None, new: dict[str, Any], request: kmock.Request
    ) -> dict[str, Any]:
        """Validate and store a write; the one place objects change."""
        info = self.resources[_resource(request)]
        sub = request.subresource
        meta = new.setdefault("metadata", {})
        if old is not None:
            # Identity and system fields are the server's; a subresource writes only its part.
            for k in ("name", "namespace", "uid", "creationTimestamp", "generation", "deletionTimestamp"):
                if k in old["metadata"]:
                    meta[k] = old["metadata"][k]
                else:
                    meta.pop(k, None)
            if sub == "status":
                new = {
                    **_clone(old),
                    "status": new.get("status"),
                    "metadata": {**old["metadata"], "managedFields": meta.get("managedFields")},
                }
                meta = new["metadata"]
            elif "status" in info.subresources:
                if "status" in old:
                    new["status"] = _clone(old["status"])
                else:
                    new.pop("status", None)
            if old["metadata"].get("deletionTimestamp"):
                added = set(meta.get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
                if added:
                    raise self._invalid(
                        new,
                        [
                            (
                                "metadata.finalizers",
                                "Forbidden: no new finalizers can be added if the object is being deleted",
                            )
                        ],
                    )
        else:
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
            meta.pop("resourceVersion", None)
            meta.pop("deletionTimestamp", None)
        new.setdefault("apiVersion", key[0].rsplit("/", 1)[0])
        new.setdefault("kind", info.kind)
        errors = rules.normalise(new)
        custom = self.custom.get(key[0])
        if custom is not None and sub == "status":
            pass  # a status write cannot change the spec; its rules were checked when the spec was written
        elif custom is not None:
            new, custom_errors = custom.admit(new, strict=request.params.get("fieldValidation") == "Strict")
            errors += custom_errors
        else:
            rules.default(new, old)
            errors += rules.validate(new)
        if old is not None:
            errors += rules.immutable(old, new)
        if errors:
            raise self._invalid(new, errors)
        if old is not None:
            if _sans_times(new) == _sans_times(old):
                return _clone(old)  # a no-op write changes nothing, not even the resourceVersion
            spec_of = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731 - local shorthand
            if spec_of(new) != spec_of(old):
                meta["generation"] = int(old["metadata"].get("generation") or 1) + 1
        rv = next(self._rv)
        meta["resourceVersion"] = str(rv)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(key, new)
            return _clone(new)
        self.objects[key] = new
        self._index[(key[0], key[1])].add(key[2])
        self._emit(rv, key[0], "ADDED" if old is None else "MODIFIED", new)
        return _clone(new)

    def _invalid(self, obj: dict[str, Any], errors: list[tuple[str, str]]) -> ApiError:
        kind, name = obj.get("kind", ""), obj.get("metadata", {}).get("name", "")
        group = obj.get("apiVersion", "").rpartition("/")[0]
        what = f"{kind}.{group}" if group else kind
        text = ", ".join(f"{f}: {m}" for f, m in errors)
        causes = [{"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in errors]
        return ApiError(422, "Invalid", f'{what} "{name}" is invalid: [{text}]', causes, name=name, kind=kind)

    def _emit(self, rv: int, res: str, type_: str, obj: dict[str, Any]) -> None:
        event = {"type": type_, "object": _clone(obj)}
        self.history.append((rv, res, event))
        for q in self._watchers.get(res, []):
            q.put_nowait(event)

    def _delete(self, key: Key, options: dict[str, Any]) -> dict[str, Any]:
        live = self.objects.get(key)
        if live is None:
            raise self._not_found(key[0], key[2])
        pre = options.get("preconditions") or {}
        if pre.get("uid") not in (None, live["metadata"]["uid"]) or pre.get("resourceVersion") not in (
            None,
            live["metadata"]["resourceVersion"],
        ):
            raise ApiError(409, "Conflict", f'Precondition failed on "{key[2]}"')
        if live["metadata"].get("finalizers"):
            if not live["metadata"].get("deletionTimestamp"):
                new = _clone(live)
                new["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
                rv = next(self._rv)
                new["metadata"]["resourceVersion"] = str(rv)
                self.objects[key] = new
                self._emit(rv, key[0], "MODIFIED", new)
            return _clone(self.objects[key])
        self._remove(key, live)
        return _clone(live)

    def _remove(self, key: Key, obj: dict[str, Any]) -> None:
        self.objects.pop(key, None)
        self._index[(key[0], key[1])].discard(key[2])
        rv = next(self._rv)
        obj["metadata"]["resourceVersion"] = str(rv)
        self._emit(rv, key[0], "DELETED", obj)
        uid = obj["metadata"]["uid"]
        asyncio.get_running_loop().call_later(self.gc_delay, self._collect, uid)

    def _collect(self, uid: str) -> None:
        """The garbage collector: dependents whose owners are all gone are deleted (background)."""
        alive = {o["metadata"]["uid"] for o in self.objects.values()}
        for key, obj in list(self.objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if any(r.get("uid") == uid for r in refs) and not any(r.get("uid") in alive for r in refs):
                if key in self.objects:
                    self._delete(key, {})

    # ---- helpers for tests -------------------------------------------------------------

    def live(self, plural: str) -> list[dict[str, Any]]:
        return [o for (res, _, _), o in list(self.objects.items()) if res.rsplit("/", 1)[-1] == plural]
