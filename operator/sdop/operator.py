"""The kopf operator: `kopf run -m sdop.operator` or `sdop operator`.

Handlers only call render(), apply the result through reconcile.children and report
status; every decision about what to create lives in sdop.render.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time

import kopf

from . import metrics
from .api import API_VERSION, GROUP, KIND, PLURAL, VERSION, SpecError
from .reconcile import conditions as cond
from .reconcile.children import owned, sync, up_to_date
from .reconcile.kube import Kube, KubeError
from .render import ClusterFacts, Ctx, load, render
from .render.context import KEDA_API, MONITORING_API
from .settings import OperatorSettings

log = logging.getLogger("sdop.operator")
SETTINGS = OperatorSettings()
OPTIONAL_APIS = (MONITORING_API, KEDA_API)

_kube: Kube | None = None


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = Kube()
    return _kube


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_discovered: tuple[float, set[str]] | None = None
DISCOVERY_TTL = 60.0


async def discover(k: Kube) -> set[str]:
    """Optional APIs present in the cluster, asked at most once a minute."""
    global _discovered
    now = time.monotonic()
    if _discovered is None or now - _discovered[0] > DISCOVERY_TTL:
        _discovered = (now, {api for api in OPTIONAL_APIS if await k.has_api(api)})
    return _discovered[1]


def _needed_apis(cr) -> list[str]:
    s = cr.spec
    need = []
    if s.monitoring.service_monitor or s.monitoring.prometheus_rule:
        need.append(MONITORING_API)
    if s.autoscaling.enabled and s.autoscaling.provider == "keda":
        need.append(KEDA_API)
    return need


_slots: asyncio.Semaphore | None = None


def slots() -> asyncio.Semaphore:
    """Bounded concurrency: a thousand services must not become a thousand API storms at once."""
    global _slots
    if _slots is None:
        _slots = asyncio.Semaphore(SETTINGS.max_concurrent_reconciles)
    return _slots


async def reconcile(body: dict, *, prune: bool, trigger: str) -> None:
    """Converge one service; idempotent, safe to run again at any time."""
    async with slots():
        with metrics.RECONCILE_SECONDS.time():
            try:
                await _reconcile(body, prune=prune)
            except Exception:
                metrics.RECONCILES.labels(trigger, "error").inc()
                raise
        metrics.RECONCILES.labels(trigger, "ok").inc()


async def _reconcile(body: dict, *, prune: bool) -> None:
    k = kube()
    meta = body["metadata"]
    ns, name, generation = meta["namespace"], meta["name"], meta.get("generation", 1)
    previous = body.get("status") or {}
    if meta.get("deletionTimestamp"):
        return  # children go with it by garbage collection (owner references)
    try:
        cr = load(body)
    except SpecError as e:
        metrics.INVALID.inc()
        new = cond.status(cond.Facts(generation=generation, spec_error=str(e)), previous, _now())
        await _write_status(body, previous, new)
        return
    apis, facts = await _cluster_facts(k)
    apply_error = None
    try:
        result = await sync(k, body, render(cr, facts), apis, prune=prune)
    except KubeError as e:
        if e.retryable:
            raise kopf.TemporaryError(f"applying children: {e}", delay=5)
        apply_error = str(e)  # rejected by the API server: report it, do not loop
        result = None
    for r in result.applied if result else []:
        metrics.APPLIED.labels(r.split("/")[0]).inc()
    for r in result.pruned if result else []:
        metrics.PRUNED.labels(r.split("/")[0]).inc()
    if result and result.applied:
        kopf.event(body, type="Normal", reason="Applied", message=", ".join(result.applied))
    if result and result.pruned:
        kopf.event(body, type="Normal", reason="Pruned", message=", ".join(result.pruned))
    dep = await k.get("apps/v1", "Deployment", ns, name)
    await _write_status(body, previous, _status(cr, generation, apis, facts, dep, apply_error, previous))


async def _cluster_facts(k: Kube) -> tuple[set[str], ClusterFacts]:
    apis = await discover(k)
    return apis, ClusterFacts(optional_apis=frozenset(apis), default_image_repository=SETTINGS.default_image_repository,
                              default_image_tag=SETTINGS.default_image_tag)


def _status(cr, generation: int, apis: set[str], facts: ClusterFacts, dep: dict | None, apply_error: str | None,
            previous: dict) -> dict:
    s = cr.spec
    return cond.status(cond.Facts(
        generation=generation, deployment=dep, apply_error=apply_error, min_replicas=s.replicas.min,
        endpoint=Ctx(cr, facts).endpoint, scale_to_zero=s.autoscaling.scale_to_zero, model_revision=s.model.revision,
        missing_apis=[a for a in _needed_apis(cr) if a not in apis], optional_apis=sorted(apis)), previous, _now())


async def _write_status(body: dict, previous: dict, new: dict) -> None:
    if cond.same(previous, new):
        return
    m = body["metadata"]
    try:
        await kube().patch_status(API_VERSION, KIND, m["namespace"], m["name"], new)
    except KubeError as e:
        if e.status == 404:
            return  # deleted meanwhile
        raise kopf.TemporaryError(f"writing status: {e}", delay=5)
    for type_, old, now, reason in cond.transitions(previous, new):
        if type_ in ("Ready", "Degraded"):
            bad = (type_ == "Ready" and now != "True") or (type_ == "Degraded" and now == "True")
            message = next(c["message"] for c in new["conditions"] if c["type"] == type_)
            kopf.event(body, type="Warning" if bad else "Normal", reason=reason, message=f"{type_}={now}: {message}")


# ---- handlers -----------------------------------------------------------------------


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    # kopf's own state in annotations under sdop.io/, never in our status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # Only our explicit events and warnings become Kubernetes Events, not every log line.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.reconnect_backoff = 1.0
    settings.networking.request_timeout = 30
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]
    if SETTINGS.peering:
        settings.peering.name = SETTINGS.peering
        settings.peering.standalone = False
    else:
        settings.peering.standalone = True
    logging.getLogger("sdop").setLevel(SETTINGS.log_level.upper())
    if SETTINGS.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(SETTINGS.metrics_port, registry=metrics.REGISTRY)


@kopf.on.cleanup()
async def close(**_):
    if _kube is not None:
        await _kube.close()


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
async def changed(body, reason, **_):
    await reconcile(dict(body), prune=True, trigger=str(reason))


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.resync_seconds, initial_delay=SETTINGS.resync_seconds)
async def resync(body, **_):
    """Drift repair: a child edited or deleted by someone else is put back. No-op: no writes.

    Reads only the rendered children (no listing): pruning follows spec changes, which the
    create/update/resume handlers see.
    """
    await reconcile(dict(body), prune=False, trigger="resync")


@kopf.on.event("apps", "v1", "deployments", labels={"app.kubernetes.io/managed-by": "sdop", "app.kubernetes.io/component": "server"})
async def deployment_event(event, body, **_):
    """Follow the serving Deployment: replicas into status at once; put it back if deleted or edited."""
    owner = next((r for r in body.get("metadata", {}).get("ownerReferences") or []
                  if r.get("kind") == KIND and r.get("controller")), None)
    if owner is None:
        return
    ns = body["metadata"]["namespace"]
    try:
        cr = await kube().get(API_VERSION, KIND, ns, owner["name"])
    except KubeError as e:
        log.warning("cannot read %s/%s after a Deployment event: %s", ns, owner["name"], e)
        return
    if cr is None or cr.get("metadata", {}).get("uid") != owner.get("uid") or cr["metadata"].get("deletionTimestamp"):
        return
    try:
        async with slots():
            if event.get("type") == "DELETED":
                await _reconcile(cr, prune=False)
            else:
                await _follow_deployment(cr, dict(body))
        metrics.RECONCILES.labels("deployment", "ok").inc()
    except kopf.TemporaryError as e:
        metrics.RECONCILES.labels("deployment", "error").inc()
        log.warning("after a Deployment %s event: %s (the resync timer retries)", event.get("type"), e)


async def _follow_deployment(cr: dict, dep: dict) -> None:
    """The Deployment changed: re-apply it if it drifted, and refresh the status from it."""
    meta = cr["metadata"]
    try:
        parsed = load(cr)
    except SpecError:
        return  # the change handlers own the InvalidSpec status
    k = kube()
    apis, facts = await _cluster_facts(k)
    deployment = [o for o in render(parsed, facts) if o["kind"] == "Deployment" and o["metadata"]["name"] == meta["name"]]
    desired = owned(cr, deployment)[0]
    if not up_to_date(dep, desired):
        try:
            dep = await k.apply(desired)
        except KubeError as e:
            raise kopf.TemporaryError(f"re-applying the Deployment: {e}", delay=5)
        metrics.APPLIED.labels("Deployment").inc()
        kopf.event(cr, type="Normal", reason="Applied", message=f"Deployment/{meta['name']} (drift repaired)")
    previous = cr.get("status") or {}
    new = _status(parsed, meta.get("generation", 1), apis, facts, dep, _carried_apply_error(previous), previous)
    await _write_status(cr, previous, new)


def _carried_apply_error(previous: dict) -> str | None:
    """An ApplyFailed from the last full reconcile stays until a full reconcile clears it."""
    for c in previous.get("conditions") or []:
        if c.get("type") == "Degraded" and c.get("reason") == "ApplyFailed" and c.get("status") == "True":
            return c.get("message")
    return None


def run(verbose: bool = False) -> int:
    """`sdop operator`: kopf with the namespaces, peering and liveness from SDOP_* settings."""
    logging.basicConfig(level=logging.DEBUG if verbose else SETTINGS.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    namespaces = SETTINGS.namespace_list
    liveness = f"http://0.0.0.0:{SETTINGS.liveness_port}/healthz" if SETTINGS.liveness_port else None
    asyncio.run(kopf.operator(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=not SETTINGS.peering,
        peering_name=SETTINGS.peering or None,
        liveness_endpoint=liveness,
    ))
    return 0
