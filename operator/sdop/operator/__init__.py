"""The kopf operator: ``sdop operator`` runs it.

``handlers`` holds the kopf handlers, ``memo`` the state they share, ``settings`` the
SDOP_* environment, ``metrics`` the operator's own metrics, ``leader`` the Lease-based
leader election that lets several replicas run with exactly one reconciling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import kopf
from aiohttp import web
from prometheus_client import start_http_server

from ..reconcile.kube import Kube
from . import metrics
from .handlers import build_registry
from .leader import LeaderElector
from .memo import Memo
from .settings import OperatorSettings

log = logging.getLogger("sdop.operator")


def run(verbose: bool = False, settings: OperatorSettings | None = None) -> int:
    """`sdop operator`: kopf with the namespaces from SDOP_* settings; with leader election,
    only while this replica holds the Lease. The exit code is 1 when leadership was lost."""
    settings = settings or OperatorSettings()
    logging.basicConfig(
        level=logging.DEBUG if verbose else settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=metrics.REGISTRY)
    return asyncio.run(_main(settings))


async def _health(port: int) -> web.AppRunner | None:
    """/healthz answers while the event loop runs, on the leader and on a standby alike."""
    if not port:
        return None

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()  # all interfaces: the kubelet probes from outside the pod
    return runner


async def _kopf(settings: OperatorSettings, stop: asyncio.Event | None = None) -> None:
    namespaces = settings.namespace_list
    await kopf.operator(
        registry=build_registry(settings),
        memo=Memo.build(settings),
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=True,
        stop_flag=stop,
    )


async def _main(settings: OperatorSettings) -> int:
    health = await _health(settings.liveness_port)
    try:
        if not settings.leader_election:
            await _kopf(settings)
            return 0
        return await _lead(settings)
    finally:
        if health is not None:
            await health.cleanup()


async def _lead(settings: OperatorSettings) -> int:
    kube = Kube()
    elector = LeaderElector(
        kube, settings.lease_namespace_or_default, settings.lease_name, settings.identity_or_default
    )
    try:
        # Standing by: SIGTERM ends the wait cleanly (kopf installs its own handlers once it runs).
        loop = asyncio.get_running_loop()
        waiting = asyncio.create_task(elector.acquire())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, waiting.cancel)
        try:
            await waiting
        except asyncio.CancelledError:
            return 0
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        stop = asyncio.Event()
        operator = asyncio.create_task(_kopf(settings, stop))
        holding = asyncio.create_task(elector.hold())
        done, _ = await asyncio.wait({operator, holding}, return_when=asyncio.FIRST_COMPLETED)
        if holding in done:  # leadership lost: stop reconciling now, the pod restarts and stands by
            stop.set()
            await operator
            return 1
        holding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holding
        await elector.release()
        operator.result()
        return 0
    finally:
        await kube.close()


__all__ = ["Memo", "OperatorSettings", "build_registry", "run"]
