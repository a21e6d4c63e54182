"""The kopf operator: ``sdop operator`` runs it.

``handlers`` holds the kopf handlers, ``memo`` the state they share, ``settings`` the
SDOP_* environment, ``metrics`` the operator's own metrics.
"""

from __future__ import annotations

import asyncio
import logging

import kopf

from .handlers import build_registry
from .memo import Memo
from .settings import OperatorSettings


def run(verbose: bool = False, settings: OperatorSettings | None = None) -> int:
    """`sdop operator`: kopf with the namespaces, peering and liveness from SDOP_* settings."""
    settings = settings or OperatorSettings()
    logging.basicConfig(
        level=logging.DEBUG if verbose else settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    namespaces = settings.namespace_list
    liveness = f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None
    asyncio.run(
        kopf.operator(
            registry=build_registry(settings),
            memo=Memo.build(settings),
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=not settings.peering,
            peering_name=settings.peering or None,
            liveness_endpoint=liveness,
        )
    )
    return 0


__all__ = ["Memo", "OperatorSettings", "build_registry", "run"]
