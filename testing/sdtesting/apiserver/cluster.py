"""The test API server in a background thread, with kubectl-like helpers for tests.

``Cluster`` serves the built-in resources (kmock's bundled discovery data), the
StableDiffusionService CRD (schema, defaults and CEL rules from ``sdop crd``) and, on
request, the optional APIs. Tests talk to it over HTTP as the operator does; the helpers
here are a small ``kubectl``.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import kmock

from sdop.api.crd import crd
from sdop.api.resource import GROUP, PLURAL, VERSION

from .crdschema import CustomResource
from .server import ApiServer

_VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
OPTIONAL = {
    "monitoring": [
        ("monitoring.coreos.com/v1", "servicemonitors", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "prometheusrules", "PrometheusRule"),
    ],
    "keda": [("keda.sh/v1alpha1", "scaledobjects", "ScaledObject")],
    "keda_http": [("http.keda.sh/v1alpha1", "httpscaledobjects", "HTTPScaledObject")],
    "gateway": [("gateway.networking.k8s.io/v1", "httproutes", "HTTPRoute")],
    # prometheus-adapter's API; discovery finds the group/version (the metrics are not served).
    "custom_metrics": [("custom.metrics.k8s.io/v1beta1", "pods", "MetricValueList")],
}
# kopf's peering resources (the chart installs their CRDs): HA replicas agree who is active.
KOPF = [("kopfpeerings", "KopfPeering", True), ("clusterkopfpeerings", "ClusterKopfPeering", False)]


class Cluster:
    def __init__(
        self,
        *,
        monitoring: bool = True,
        keda: bool = True,
        keda_http: bool = True,
        custom_metrics: bool = True,
        gateway: bool = True,
    ):
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._api: ApiServer | None = None
        self.url = ""
        self._apis = [
            name
            for name, on in (
                ("monitoring", monitoring),
                ("keda", keda),
                ("keda_http", keda_http),
                ("gateway", gateway),
                ("custom_metrics", custom_metrics),
            )
            if on
        ]
        self._thread = threading.Thread(target=self._run, daemon=True, name="apiserver")
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the test API server did not start")
        self.http = httpx.Client(base_url=self.url, timeout=10)

    @property
    def api(self) -> ApiServer:
        assert self._api is not None, "the API server is not running"
        return self._api

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the API server is not running"
        return self._loop

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with ApiServer() as api, kmock.Server(api) as server:
            api.resources.load_bundled()
            definition = crd()
            names = definition["spec"]["names"]
            resource = f"{GROUP}/{VERSION}/{PLURAL}"
            api.resources[resource] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names["singular"],
                namespaced=True,
                shortnames=names["shortNames"],
                categories=names["categories"],
                subresources={"status"},
                verbs=_VERBS,
            )
            api.custom[resource] = CustomResource(definition)
            for plural, kind, namespaced in KOPF:
                api.resources[f"kopf.dev/v1/{plural}"] = kmock.ResourceInfo(
                    kind=kind, namespaced=namespaced, verbs=_VERBS
                )
            for name in self._apis:
                for group_version, plural, kind in OPTIONAL[name]:
                    api.resources[f"{group_version}/{plural}"] = kmock.ResourceInfo(
                        kind=kind, namespaced=True, verbs=_VERBS
                    )
            self._api = api
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.http.close()
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def kubeconfig(self, path: Any) -> str:
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
            f"clusters: [{{name: test, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: test, user: {token: test}}]\n"
            "contexts: [{name: test, context: {cluster: test, user: test, namespace: default}}]\n"
        )
        return str(path)

    # ---- kubectl-like helpers -----------------------------------------------------------
    @staticmethod
    def path(api_version: str, plural: str, ns: str | None, name: str = "", sub: str = "") -> str:
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        p = f"{base}/namespaces/{ns}/{plural}" if ns else f"{base}/{plural}"
        return p + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    def get(self, api_version: str, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        r = self.http.get(self.path(api_version, plural, ns, name))
        return r.json() if r.status_code == 200 else None

    def create(self, obj: dict[str, Any], plural: str = PLURAL) -> dict[str, Any]:
        ns = obj["metadata"].setdefault("namespace", "default")
        r = self.http.post(self.path(obj["apiVersion"], plural, ns), json=obj, params={"fieldValidation": "Strict"})
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result

    def patch(
        self, api_version: str, plural: str, ns: str, name: str, body: dict[str, Any], sub: str = ""
    ) -> dict[str, Any]:
        r = self.http.patch(
            self.path(api_version, plural, ns, name, sub),
            json=body,
            headers={"Content-Type": "application/merge-patch+json"},
            params={"fieldManager": "kubectl-edit"},
        )
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result

    def apply(
        self, obj: dict[str, Any], plural: str, *, manager: str = "kubectl", force: bool = False
    ) -> httpx.Response:
        """Server-side apply as another client would; the response is returned, not raised."""
        m = obj["metadata"]
        return self.http.patch(
            self.path(obj["apiVersion"], plural, m.get("namespace"), m["name"]),
            json=obj,
            headers={"Content-Type": "application/apply-patch+yaml"},
            params={"fieldManager": manager, "force": str(force).lower()},
        )

    def delete(self, api_version: str, plural: str, ns: str, name: str) -> None:
        self.http.delete(self.path(api_version, plural, ns, name)).raise_for_status()

    def children(self, ns: str, instance: str) -> dict[tuple[str, str], dict[str, Any]]:
        """Every stored object labelled as this instance's, keyed by (kind, name)."""
        out = {}
        for (_res, namespace, name), obj in list(self.api.objects.items()):
            if namespace != ns:
                continue
            labels = obj.get("metadata", {}).get("labels") or {}
            if labels.get("app.kubernetes.io/instance") == instance and obj.get("kind") != "StableDiffusionService":
                out[(str(obj.get("kind")), name)] = obj
        return out

    def objects_of(self, plural: str) -> list[dict[str, Any]]:
        return self.api.live(plural)

    def writes_since(self, mark: int) -> list[tuple[str, str]]:
        return list(self.api.writes[mark:])
