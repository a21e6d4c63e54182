"""The kopf handlers: thin. Each one hands its object to ``reconcile()``, the one wrapper
every trigger uses (bounded concurrency, metrics, events, retries); what to create lives
in ``sdop.render`` and how to converge in ``sdop.reconcile``.

Handlers are registered into a registry built from the settings (``build_registry``), so
nothing reads the environment at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import kopf

from ..api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from ..reconcile.kube import KubeError
from ..reconcile.service import Reconciler, Report, RetryLater
from . import metrics
from .memo import Memo
from .settings import OperatorSettings

RETRY_DELAY_SECONDS = 5
RETRY_DELAY_MAX_SECONDS = 300


def retry_delay(retry: int) -> float:
    """Exponential backoff for a transient failure: 5 s, 10 s, 20 s ... at most 5 minutes."""
    return float(min(RETRY_DELAY_MAX_SECONDS, RETRY_DELAY_SECONDS * 2 ** min(retry, 10)))


SERVER_LABELS = {"app.kubernetes.io/managed-by": "sdop", "app.kubernetes.io/component": "server"}


async def reconcile(
    memo: Memo,
    body: dict[str, Any],
    trigger: str,
    work: Callable[[Reconciler, dict[str, Any]], Awaitable[Report]],
    retry: int = 0,
    *,
    reread: bool = False,
) -> Report:
    """Run one convergence step for the service in ``body``: the wrapper every trigger uses.

    Reconciles of one service never overlap (``Memo.lock``). A trigger whose body may be older
    than a spec change another handler already applied and pruned for (the resync's list, a
    Deployment event's owner) passes ``reread``: the service is read again once its lock is
    held, so that an old spec cannot put back what the change removed, which no later prune
    would take out."""
    async with memo.lock(body["metadata"]["uid"]), memo.slots:
        with metrics.RECONCILE_SECONDS.time():
            try:
                if reread:
                    current = await memo.reconciler.current(body)
                    if current is None:
                        return Report()  # deleted, or being deleted: its children go by garbage collection
                    body = current
                report = await work(memo.reconciler, body)
            except RetryLater as e:
                metrics.RECONCILES.labels(trigger, "error").inc()
                raise kopf.TemporaryError(str(e), delay=retry_delay(retry)) from e
            except Exception:
                metrics.RECONCILES.labels(trigger, "error").inc()
                raise
    metrics.RECONCILES.labels(trigger, "ok").inc()
    if report.invalid:
        metrics.INVALID.inc()
    for r in report.applied:
        metrics.APPLIED.labels(r.split("/")[0]).inc()
    for r in report.pruned:
        metrics.PRUNED.labels(r.split("/")[0]).inc()
    for ev in report.events:
        # kopf reads only apiVersion, kind and metadata of the body: a plain dict serves.
        kopf.event(cast(kopf.Body, body), type=ev.type, reason=ev.reason, message=ev.message)
    return report


async def changed(body: kopf.Body, reason: str, memo: Memo, retry: int, **_: Any) -> None:
    """Created, updated, or found on start-up: converge and prune what the spec no longer asks for."""
    cr = dict(body)
    await reconcile(memo, cr, str(reason), lambda r, cr: r.converge(cr, prune=True), retry=retry)


async def resync_forever(memo: Memo, logger: logging.Logger) -> None:
    """Drift repair for every service, every ``resync_seconds``: a child edited or deleted by
    someone else is put back; a no-op makes no writes.

    One list call per interval (per watched namespace), then one read of each service once
    its lock is held (``reconcile``'s ``reread``: the list may predate a spec change that
    another handler has applied since). Not a kopf timer per object: a kopf
    timer makes kopf put a finalizer on every StableDiffusionService, so deleting one (or
    its namespace) would hang once the operator is uninstalled. Pruning follows spec
    changes, which the create/update/resume handlers see.
    """
    interval = memo.settings.resync_seconds
    spaces = memo.settings.namespace_list
    literal = spaces and not any(ch in n for n in spaces for ch in "*?[")
    while True:
        await asyncio.sleep(interval)
        try:
            if literal:
                items = [cr for ns in spaces for cr in await memo.kube.list(API_VERSION, KIND, ns, {})]
            else:
                found = await memo.kube.list(API_VERSION, KIND, None, {})
                items = [
                    cr
                    for cr in found
                    if not spaces or any(fnmatch.fnmatch(cr["metadata"]["namespace"], n) for n in spaces)
                ]
        except KubeError as e:
            logger.warning("resync: listing StableDiffusionServices: %s (next try in %s s)", e, interval)
            continue

        async def one(cr: dict[str, Any]) -> None:
            try:
                await resync_service(memo, cr)
            except kopf.TemporaryError as e:
                logger.warning("resync of %s/%s: %s", cr["metadata"]["namespace"], cr["metadata"]["name"], e)
            except Exception:
                logger.exception("resync of %s/%s failed", cr["metadata"]["namespace"], cr["metadata"]["name"])

        await asyncio.gather(*(one(cr) for cr in items if not cr["metadata"].get("deletionTimestamp")))
        logger.debug("resync: %d services checked", len(items))


async def resync_service(memo: Memo, cr: dict[str, Any]) -> Report:
    """One service's drift repair: converge without pruning, on the service as it is now."""
    return await reconcile(memo, cr, "resync", lambda r, cr: r.converge(cr, prune=False), reread=True)


async def start_resync(memo: Memo, **_: Any) -> None:
    memo.resync_task = asyncio.create_task(resync_forever(memo, logging.getLogger("sdop.resync")))


async def deployment_event(event: kopf.RawEvent, body: kopf.Body, memo: Memo, logger: kopf.Logger, **_: Any) -> None:
    """Follow the serving Deployment: replicas into status at once; put it back if deleted or edited."""
    dep = dict(body)
    owner = memo.reconciler.owner_of(dep)
    if owner is None:
        return
    try:
        if event.get("type") == "DELETED":
            await reconcile(memo, owner, "deployment", lambda r, cr: r.converge(cr, prune=False), reread=True)
        else:
            await reconcile(memo, owner, "deployment", lambda r, cr: r.follow_deployment(cr, dep), reread=True)
    except (RetryLater, kopf.TemporaryError) as e:
        # Event handlers are not retried by kopf; the resync timer is the retry.
        logger.warning("after a Deployment %s event: %s (the resync timer retries)", event.get("type"), e)


def configure(settings: kopf.OperatorSettings, memo: Memo, **_: Any) -> None:
    """kopf's own settings: its state in annotations under sdop.io/, few Events, sane timeouts."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # Only our explicit events and warnings become Kubernetes Events, not every log line.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.reconnect_backoff = 1.0
    settings.networking.request_timeout = 30
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]
    # One replica reconciles at a time by leader election (sdop.operator.leader), not kopf peering.
    settings.peering.standalone = True


async def login(memo: Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf logs in with the operator's own credentials, loaded as ``Kube`` loads them
    (service account, or a kubeconfig with exec plugins, client certificates, token files).
    kopf calls this again after a 401, and each call loads the credentials anew, so a
    rotated token file or an expired exec-plugin token is picked up."""
    credentials = memo.kube.credentials
    cfg = await credentials.configuration(reload=True)
    token = await credentials.bearer()
    return kopf.ConnectionInfo(
        server=str(cfg.host),
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        scheme="Bearer" if token else None,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


async def close(memo: Memo, **_: Any) -> None:
    if memo.resync_task is not None:
        memo.resync_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await memo.resync_task
    await memo.kube.close()


def build_registry(settings: OperatorSettings) -> kopf.OperatorRegistry:
    """Every handler, registered with the intervals from ``settings``."""
    registry = kopf.OperatorRegistry()
    kopf.on.startup(registry=registry)(configure)
    kopf.on.startup(registry=registry)(start_resync)
    kopf.on.login(registry=registry)(login)
    kopf.on.cleanup(registry=registry)(close)
    for on in (kopf.on.create, kopf.on.update, kopf.on.resume):
        on(GROUP, VERSION, PLURAL, registry=registry, id="changed")(changed)
    kopf.on.event("apps", "v1", "deployments", labels=SERVER_LABELS, registry=registry)(deployment_event)
    return registry
