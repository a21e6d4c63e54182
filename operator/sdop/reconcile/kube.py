"""The one place that talks to the Kubernetes API server, through kubernetes_asyncio.

kubernetes_asyncio (the asyncio port of the official client, maintained with every
Kubernetes release) loads the credentials and makes every call: its ``ApiClient`` is used
untyped (paths from the kinds table, JSON bodies), so one small client serves every kind
without a generated class per kind.

Reads: get, list, discovery. Writes: server-side apply (one field manager), delete,
status merge patch. Paths come from the kinds table (``sdop.api.kinds``). A failure raises
one exception class per kind of API error (``NotFound``, ``Conflict``, ``Gone``,
``Unprocessable``, ``Unauthorized``, ...), each saying whether it is worth retrying.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import load_incluster_config, load_kube_config

from ..api import FIELD_MANAGER, kind_of

SA_DIR = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeError(Exception):
    """An API call that failed; the subclass says which kind of failure (``error_for``)."""

    #: Worth trying again later: an outage, throttling or a lost race, not a rejection.
    retryable = False

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class Unreachable(KubeError):
    """No HTTP answer: connection refused, reset or timed out."""

    retryable = True


class Unauthorized(KubeError):
    """401: the credentials were refused."""


class Forbidden(KubeError):
    """403: RBAC does not allow the call."""


class NotFound(KubeError):
    """404: the object, or the whole API, is not there."""


class Conflict(KubeError):
    """409: a resourceVersion or field-manager conflict, or the object already exists."""

    retryable = True


class Gone(KubeError):
    """410: the resourceVersion is too old."""

    retryable = True


class Unprocessable(KubeError):
    """422: the API server rejected the object (validation, an immutable field)."""


class ServerError(KubeError):
    """429 or 5xx: throttled or the API server is failing."""

    retryable = True


_BY_STATUS: dict[int, type[KubeError]] = {
    0: Unreachable,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    422: Unprocessable,
    429: ServerError,
}


def error_for(status: int, message: str) -> KubeError:
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else KubeError)
    return cls(status, message)


class Credentials:
    """Where the operator's credentials come from, loaded by kubernetes_asyncio and loaded
    again when they may have changed (a 401, or kopf asking to log in again).

    In a pod: the service account (the token file is re-read as it rotates). Else
    ``$KUBECONFIG`` or ``~/.kube/config``, with everything kubectl supports there:
    exec credential plugins (EKS, GKE, AKS), client certificates, token files. ``server``
    (and ``token``) name an API server directly, for tests.
    """

    def __init__(self, server: str | None = None, token: str | None = None):
        self.server, self.token = server, token
        self._configuration: Configuration | None = None

    async def configuration(self, *, reload: bool = False) -> Configuration:
        if self._configuration is None or reload:
            self._configuration = await self._load()
        return self._configuration

    async def _load(self) -> Configuration:
        cfg = Configuration()
        if self.server:
            cfg.host = self.server.rstrip("/")
            if self.token:
                cfg.api_key["BearerToken"] = f"Bearer {self.token}"
        elif os.environ.get("KUBERNETES_SERVICE_HOST") and (SA_DIR / "token").exists():
            load_incluster_config(  # type: ignore[no-untyped-call]  # kubernetes_asyncio leaves it unannotated
                client_configuration=cfg, try_refresh_token=True
            )
        else:
            path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
            await load_kube_config(config_file=path, client_configuration=cfg, persist_config=False)
        return cfg

    async def bearer(self) -> str | None:
        """The current bearer token (after any refresh the loader does), or None."""
        cfg = await self.configuration()
        auth = (await cfg.auth_settings()).get("BearerToken")
        value = str(auth["value"]) if auth else ""
        return value.removeprefix("Bearer ") or None


def api_path(
    api_version: str, kind: str, namespace: str | None, name: str | None = None, sub: str | None = None
) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{kind_of(kind).plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


class Kube:
    def __init__(self, credentials: Credentials | None = None, timeout: float = 30):
        self.credentials = credentials or Credentials()
        self._api: ApiClient | None = None
        # Clients replaced after a 401: other calls may still be using them, so they are
        # closed with this Kube, not at once.
        self._retired: list[ApiClient] = []
        self.timeout = timeout
        self.writes = 0  # write calls made, for tests and the scale benchmark

    async def _client(self, *, reload: bool = False) -> ApiClient:
        if self._api is None or reload:
            if self._api is not None:
                self._retired.append(self._api)
            cfg = await self.credentials.configuration(reload=reload)
            cfg.connection_pool_maxsize = 32
            self._api = ApiClient(cfg)
        return self._api

    async def close(self) -> None:
        for api in [*self._retired, *([self._api] if self._api is not None else [])]:
            await api.close()
        self._api, self._retired = None, []

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> Any:
        if method != "GET":
            self.writes += 1
        for attempt in (1, 2):
            api = await self._client(reload=attempt == 2)
            try:
                return await api.call_api(
                    path,
                    method,
                    query_params=list((params or {}).items()),
                    header_params={"Content-Type": content_type, "Accept": "application/json"},
                    body=body,
                    auth_settings=["BearerToken"],
                    response_types_map={200: "object", 201: "object", 202: "object"},
                    _return_http_data_only=True,
                    _request_timeout=self.timeout,
                )
            except ApiException as e:
                if e.status == 401 and attempt == 1:
                    continue  # credentials rotated or expired: load them again and retry once
                try:
                    message = json.loads(e.body or "").get("message", e.body)
                except (ValueError, TypeError, AttributeError):
                    message = str(e.body or e.reason)
                raise error_for(e.status, f"{method} {path}: {message}") from None
            except aiohttp.ClientError as e:
                raise Unreachable(0, f"{method} {path}: {type(e).__name__}: {e}") from e
            except TimeoutError as e:
                raise Unreachable(0, f"{method} {path}: timed out") from e
        raise AssertionError("unreachable")  # the loop returns or raises

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = await self._request("GET", api_path(api_version, kind, namespace, name))
        except NotFound:
            return None
        return found

    async def list(
        self, api_version: str, kind: str, namespace: str | None, labels: dict[str, str]
    ) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        try:
            out = await self._request("GET", api_path(api_version, kind, namespace), params={"labelSelector": selector})
        except NotFound:
            return []
        items = (out or {}).get("items", [])
        # Filter here as well: a selector the server ignores must not widen what we prune.
        return [
            i for i in items if all((i.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in labels.items())
        ]

    async def apply(
        self, obj: dict[str, Any], *, field_manager: str = FIELD_MANAGER, force: bool = True
    ) -> dict[str, Any]:
        """Server-side apply; by default the operator's field manager, taking over conflicting fields."""
        meta = obj["metadata"]
        path = api_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        applied: dict[str, Any] = await self._request(
            "PATCH",
            path,
            body=obj,
            content_type="application/apply-patch+yaml",
            params={"fieldManager": field_manager, "force": str(force).lower()},
        )
        return applied

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        created: dict[str, Any] = await self._request(
            "POST", api_path(obj["apiVersion"], obj["kind"], meta.get("namespace")), body=obj
        )
        return created

    async def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        """PUT: an update that fails with ``Conflict`` if the object changed since its resourceVersion."""
        meta = obj["metadata"]
        replaced: dict[str, Any] = await self._request(
            "PUT", api_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]), body=obj
        )
        return replaced

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        try:
            await self._request(
                "DELETE",
                api_path(api_version, kind, namespace, name),
                body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
            )
        except NotFound:
            pass  # already gone

    async def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        await self._request(
            "PATCH",
            api_path(api_version, kind, namespace, name, "status"),
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    async def has_api(self, group_version: str) -> bool:
        try:
            await self._request("GET", f"/apis/{group_version}")
        except NotFound:
            return False
        return True
