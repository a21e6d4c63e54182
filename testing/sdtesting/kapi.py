"""A Kubernetes API emulator on loopback for running the operator for real.

kmock's KubernetesEmulator stores objects and serves list/watch/get/create/patch/delete.
This subclass adds what the operator relies on from a real API server:

- metadata.uid, creationTimestamp, resourceVersion on create; generation bumped on spec change;
- server-side apply (PATCH application/apply-patch+yaml) creates a missing object;
- injected faults (HTTP errors on matching requests) and dropped watch streams;
- a log of write calls, for "a no-op resync writes nothing".

It runs in a background thread with its own event loop; tests talk to it over HTTP.
kmock 0.8 fails on cluster-wide namespace listing, so the operator runs cluster-wide (-A).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import itertools
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import kmock
from kmock._internal import k8s as kmock_k8s

from sdop.api.crd import crd
from sdop.api.resource import GROUP, PLURAL, VERSION

_DROP = {"type": "__DROP__"}


@dataclass
class Fault:
    method: str
    path_part: str
    status: int
    times: int


class ApiServer(kmock.KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.faults: list[Fault] = []
        self.writes: list[tuple[str, str]] = []
        self._rv = itertools.count(1)
        self._index: dict[tuple, set[str]] = collections.defaultdict(set)  # (resource, namespace) -> names

    def _now(self) -> str:
        return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    async def _handle(self, request):
        # kmock keeps every request, and matching a request to a reaction scans that whole
        # history (View.__contains__): each request gets slower. Keep only this request;
        # tests read `writes` instead.
        del self._requests[:-1]
        path = str(request.url.path)
        method = str(request.method.value)
        for f in self.faults:
            if f.times > 0 and f.method == method and f.path_part in path:
                f.times -= 1
                return await self._render_error(
                    kmock.KubernetesError(status=f.status, reason="Injected", message=f"injected {f.status}")
                )
        if method in ("POST", "PATCH", "PUT", "DELETE"):
            self.writes.append((method, path))
        if request.resource is not None and isinstance(request.data, dict):
            self._emulate(request, method)
        response = await super()._handle(request)
        if method == "POST" and request.action == kmock.action.CREATE and response.status < 300:
            meta = request.data.get("metadata", {})
            self._index[(request.resource, request.namespace or meta.get("namespace"))].add(meta.get("name"))
        return response

    def _emulate(self, request, method: str) -> None:
        data = request.data
        meta = data.setdefault("metadata", {}) if method in ("POST", "PATCH") else {}
        if method == "POST" and request.action == kmock.action.CREATE:
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", self._now())
            meta["generation"] = 1
            meta["resourceVersion"] = str(next(self._rv))
        elif method == "PATCH" and request.name is not None:
            key = (request.resource, request.namespace, request.name)
            existing = self._objects[key] if key in self._objects else None
            if existing is None or existing.deleted:
                if "apply-patch" in request.headers.get("Content-Type", ""):
                    new = copy.deepcopy(data)
                    new["metadata"].update(
                        uid=str(uuid.uuid4()),
                        creationTimestamp=self._now(),
                        generation=1,
                        name=request.name,
                        namespace=request.namespace,
                    )
                    if existing is None:
                        self._objects[key] = new
                    else:
                        existing.create(new)
                    self._index[(request.resource, request.namespace)].add(request.name)
                return
            meta["resourceVersion"] = str(next(self._rv))
            if request.subresource is None and "spec" in data and data["spec"] != existing.get("spec"):
                meta["generation"] = (existing.get("metadata", {}).get("generation") or 1) + 1

    # kmock finds the object of a request by scanning every stored object; with thousands of
    # objects that dominates. These look it up by key, as an API server's storage does.
    def _lookup(self, request, name: str | None = None):
        key = (request.resource, request.namespace, name or request.name)
        return self._objects[key] if key in self._objects else None

    async def _serve_fetch(self, request):
        obj = self._lookup(request)
        if obj is None or obj.deleted:
            raise kmock_k8s.KubernetesObjectNotFoundError()
        return obj.raw

    async def _serve_create(self, request):
        return self._lookup(request, request.data.get("metadata", {}).get("name")).last.raw

    async def _serve_update(self, request):
        return self._lookup(request).last.raw

    async def _serve_delete(self, request):
        return self._lookup(request).last.raw

    async def _serve_list(self, request):
        # Namespace and equality label selectors filtered here, as the API server does.
        wanted = dict(p.split("=", 1) for p in request.params.get("labelSelector", "").split(",") if "=" in p)
        items = []
        groups = (
            [(request.resource, request.namespace)]
            if request.namespace
            else [k for k in list(self._index) if k[0] == request.resource]
        )
        for resource, namespace in groups:
            for name in sorted(self._index.get((resource, namespace), ())):
                obj = self._objects[(resource, namespace, name)]
                if obj.deleted:
                    continue
                raw = obj.raw
                labels = raw.get("metadata", {}).get("labels") or {}
                if all(labels.get(k) == v for k, v in wanted.items()):
                    items.append(raw)
        return {"metadata": {"resourceVersion": str(next(self._rv))}, "items": items}

    async def _serve_watch(self, request):
        async for event in super()._serve_watch(request):
            if event == _DROP:
                return
            yield event

    async def drop_watches(self) -> None:
        for bus in list(self._buses.values()):
            await bus.put(_DROP)


class EmulatedCluster:
    """kmock in a thread, with the built-in resources, our CRD and optionally the optional APIs."""

    def __init__(self, *, monitoring: bool = True, keda: bool = True):
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._api: ApiServer | None = None
        self.url = ""
        self._monitoring, self._keda = monitoring, keda
        self._thread = threading.Thread(target=self._run, daemon=True, name="kmock")
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("kmock did not start")
        self.http = httpx.Client(base_url=self.url, timeout=10)

    @property
    def api(self) -> ApiServer:
        assert self._api is not None, "the emulator is not running"
        return self._api

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the emulator is not running"
        return self._loop

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with ApiServer() as api, kmock.Server(api) as server:
            api.resources.load_bundled()
            names = crd()["spec"]["names"]
            api.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names["singular"],
                namespaced=True,
                shortnames=names["shortNames"],
                categories=names["categories"],
                subresources={"status"},
                verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
            )
            if self._monitoring:
                for plural, kind in (("servicemonitors", "ServiceMonitor"), ("prometheusrules", "PrometheusRule")):
                    api.resources[f"monitoring.coreos.com/v1/{plural}"] = kmock.ResourceInfo(
                        kind=kind, namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}
                    )
            if self._keda:
                api.resources["keda.sh/v1alpha1/scaledobjects"] = kmock.ResourceInfo(
                    kind="ScaledObject", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}
                )
            self._api = api
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def call(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.http.close()
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def kubeconfig(self, path) -> str:
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: kmock\n"
            f"clusters: [{{name: kmock, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: kmock, user: {token: test}}]\n"
            "contexts: [{name: kmock, context: {cluster: kmock, user: kmock, namespace: default}}]\n"
        )
        return str(path)

    # ---- kubectl-like helpers -----------------------------------------------------------
    @staticmethod
    def path(api_version: str, plural: str, ns: str, name: str = "", sub: str = "") -> str:
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        p = f"{base}/namespaces/{ns}/{plural}"
        return p + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    def get(self, api_version: str, plural: str, ns: str, name: str) -> dict | None:
        r = self.http.get(self.path(api_version, plural, ns, name))
        return r.json() if r.status_code == 200 else None

    def create(self, obj: dict) -> dict:
        ns = obj["metadata"].setdefault("namespace", "default")
        api_version = obj["apiVersion"]
        plural = {"StableDiffusionService": PLURAL}[obj["kind"]]
        r = self.http.post(self.path(api_version, plural, ns), json=obj)
        r.raise_for_status()
        return r.json()

    def patch(self, api_version: str, plural: str, ns: str, name: str, body: dict, sub: str = "") -> dict:
        r = self.http.patch(
            self.path(api_version, plural, ns, name, sub),
            json=body,
            headers={"Content-Type": "application/merge-patch+json"},
        )
        r.raise_for_status()
        return r.json()

    def delete(self, api_version: str, plural: str, ns: str, name: str) -> None:
        self.http.delete(self.path(api_version, plural, ns, name)).raise_for_status()

    def children(self, ns: str, instance: str) -> dict[tuple[str, str], dict[str, Any]]:
        """Every stored object labelled as this instance's, keyed by (kind, name)."""
        out = {}
        for (_resource, namespace, name), obj in list(self.api.objects.items()):
            if obj.deleted or namespace != ns:
                continue
            raw = obj.raw
            labels = raw.get("metadata", {}).get("labels") or {}
            if labels.get("app.kubernetes.io/instance") == instance and raw.get("kind") != "StableDiffusionService":
                out[(str(raw.get("kind")), name)] = raw
        return out

    def objects_of(self, plural: str) -> list[dict]:
        """Live objects of one resource, through the emulator's index (cheap at any scale)."""
        out = []
        for (resource, namespace), names in list(self.api._index.items()):
            if resource.plural == plural:
                for name in list(names):
                    obj = self.api.objects[(resource, namespace, name)]
                    if not obj.deleted:
                        out.append(obj.raw)
        return out

    def writes_since(self, mark: int) -> list[tuple[str, str]]:
        return list(self.api.writes[mark:])
