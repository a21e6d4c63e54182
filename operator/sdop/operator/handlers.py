"""The kopf handlers: thin. Each one hands its object to ``reconcile()``, the one wrapper
every trigger uses (bounded concurrency, metrics, events, retries); what to create lives
in ``sdop.render`` and how to converge in ``sdop.reconcile``.

Handlers are registered into a registry built from the settings (``build_registry``), so
nothing reads the environment at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import kopf

from ..api import GROUP, PLURAL, VERSION
from ..reconcile.service import Reconciler, Report, RetryLater
from . import metrics
from .memo import Memo
from .settings import OperatorSettings

RETRY_DELAY_SECONDS = 5
SERVER_LABELS = {"app.kubernetes.io/managed-by": "sdop", "app.kubernetes.io/component": "server"}


async def reconcile(
    memo: Memo,
    body: dict[str, Any],
    trigger: str,
    work: Callable[[Reconciler], Awaitable[Report]],
) -> Report:
    """Run one convergence step for the service in ``body``: the wrapper every trigger uses."""
    async with memo.slots:
        with metrics.RECONCILE_SECONDS.time():
            try:
                report = await work(memo.reconciler)
            except RetryLater as e:
                metrics.RECONCILES.labels(trigger, "error").inc()
                raise kopf.TemporaryError(str(e), delay=RETRY_DELAY_SECONDS) from e
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


async def changed(body: kopf.Body, reason: str, memo: Memo, **_: Any) -> None:
    """Created, updated, or found on start-up: converge and prune what the spec no longer asks for."""
    cr = dict(body)
    await reconcile(memo, cr, str(reason), lambda r: r.converge(cr, prune=True))


async def resync(body: kopf.Body, memo: Memo, **_: Any) -> None:
    """Drift repair: a child edited or deleted by someone else is put back. No-op: no writes.

    Reads only the rendered children (no listing): pruning follows spec changes, which the
    create/update/resume handlers see.
    """
    cr = dict(body)
    await reconcile(memo, cr, "resync", lambda r: r.converge(cr, prune=False))


async def deployment_event(event: kopf.RawEvent, body: kopf.Body, memo: Memo, logger: kopf.Logger, **_: Any) -> None:
    """Follow the serving Deployment: replicas into status at once; put it back if deleted or edited."""
    dep = dict(body)
    try:
        cr = await memo.reconciler.owner_of(dep)
        if cr is None:
            return
        if event.get("type") == "DELETED":
            await reconcile(memo, cr, "deployment", lambda r: r.converge(cr, prune=False))
        else:
            await reconcile(memo, cr, "deployment", lambda r: r.follow_deployment(cr, dep))
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


def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    """kopf's own credentials: the pod's service account, else the kubeconfig (as ``Kube`` does)."""
    return kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)


async def close(memo: Memo, **_: Any) -> None:
    await memo.kube.close()


def build_registry(settings: OperatorSettings) -> kopf.OperatorRegistry:
    """Every handler, registered with the intervals from ``settings``."""
    registry = kopf.OperatorRegistry()
    kopf.on.startup(registry=registry)(configure)
    kopf.on.login(registry=registry)(login)
    kopf.on.cleanup(registry=registry)(close)
    for on in (kopf.on.create, kopf.on.update, kopf.on.resume):
        on(GROUP, VERSION, PLURAL, registry=registry, id="changed")(changed)
    kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        registry=registry,
        id="resync",
        interval=settings.resync_seconds,
        initial_delay=settings.resync_seconds,
    )(resync)
    kopf.on.event("apps", "v1", "deployments", labels=SERVER_LABELS, registry=registry)(deployment_event)
    return registry
