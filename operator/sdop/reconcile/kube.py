"""The one place that talks to the Kubernetes API server (aiohttp, no generated client).

Reads: get, list, discovery. Writes: server-side apply (one field manager), delete,
status merge patch. Paths come from the kinds table (``sdop.api.kinds``). A failure raises
one exception class per kind of API error (``NotFound``, ``Conflict``, ``Gone``,
``Unprocessable``, ``Unauthorized``, ...), each saying whether it is worth retrying.
"""

from __future__ import annotations

import json
import os
import pathlib
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any

import aiohttp
import yaml

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


@dataclass
class Connection:
    server: str
    token: str | None = None
    ssl: ssl.SSLContext | bool = True


def _kubeconfig(path: str) -> Connection:
    cfg = yaml.safe_load(pathlib.Path(path).read_text())
    ctx_name = cfg.get("current-context")
    ctx = (
        next((c["context"] for c in cfg.get("contexts", []) if c["name"] == ctx_name), None)
        or cfg["contexts"][0]["context"]
    )
    cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
    user: dict[str, Any] = next((u["user"] for u in cfg.get("users", []) if u["name"] == ctx.get("user")), {}) or {}
    server = cluster["server"].rstrip("/")
    sslctx: ssl.SSLContext | bool = True
    if server.startswith("https"):
        if cluster.get("insecure-skip-tls-verify"):
            sslctx = False
        else:
            sslctx = ssl.create_default_context()
            if "certificate-authority" in cluster:
                sslctx.load_verify_locations(cluster["certificate-authority"])
            elif "certificate-authority-data" in cluster:
                import base64

                sslctx.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        cert, key = user.get("client-certificate"), user.get("client-key")
        if user.get("client-certificate-data"):
            import base64

            d = tempfile.mkdtemp(prefix="sdop-")
            cert, key = os.path.join(d, "cert"), os.path.join(d, "key")
            pathlib.Path(cert).write_bytes(base64.b64decode(user["client-certificate-data"]))
            pathlib.Path(key).write_bytes(base64.b64decode(user["client-key-data"]))
        if cert and isinstance(sslctx, ssl.SSLContext):
            sslctx.load_cert_chain(cert, key)
    token = user.get("token")
    if not token and user.get("tokenFile"):
        token = pathlib.Path(user["tokenFile"]).read_text().strip()
    return Connection(server, token, sslctx)


def connection() -> Connection:
    """In-cluster service account, else $KUBECONFIG or ~/.kube/config."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and (SA_DIR / "token").exists():
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        ctx = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
        return Connection(f"https://{host}:{port}", (SA_DIR / "token").read_text().strip(), ctx)
    path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or str(pathlib.Path.home() / ".kube" / "config")
    return _kubeconfig(path)


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
    def __init__(self, conn: Connection | None = None, timeout: float = 30):
        self.conn = conn or connection()
        self._session: aiohttp.ClientSession | None = None
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.writes = 0  # write calls made, for tests and the scale benchmark

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.conn.token}"} if self.conn.token else {}
            connector = aiohttp.TCPConnector(ssl=self.conn.ssl, limit=32)
            self._session = aiohttp.ClientSession(headers=headers, connector=connector, timeout=self.timeout)
        return self._session

    async def close(self) -> None:
        if self._session:
            await self._session.close()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> Any:
        s = await self.session()
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if body is not None else {}
        if method != "GET":
            self.writes += 1
        try:
            async with s.request(method, self.conn.server + path, data=data, headers=headers, params=params) as r:
                text = await r.text()
                if r.status >= 400:
                    try:
                        message = json.loads(text).get("message", text)
                    except ValueError:
                        message = text
                    raise error_for(r.status, f"{method} {path}: {message}")
                return json.loads(text) if text else None
        except aiohttp.ClientError as e:
            raise Unreachable(0, f"{method} {path}: {type(e).__name__}: {e}") from e
        except TimeoutError as e:
            raise Unreachable(0, f"{method} {path}: timed out") from e

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
