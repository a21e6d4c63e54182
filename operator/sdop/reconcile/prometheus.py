"""The one Prometheus query the operator makes: a canary's share of 5xx responses."""

from __future__ import annotations

import logging

import aiohttp

log = logging.getLogger("sdop.prometheus")

TIMEOUT = aiohttp.ClientTimeout(total=5)


def error_ratio_query(namespace: str, service: str, window: str) -> tuple[str, str]:
    """(5xx requests, all requests) of the canary's replicas over the window. The series carry
    namespace and service (the Prometheus Operator) and track (the ServiceMonitor's relabeling)."""
    sel = f'namespace="{namespace}",service="{service}",track="canary"'
    errors = f'sum(increase(sdserve_http_requests_total{{{sel},status=~"5.."}}[{window}]))'
    total = f"sum(increase(sdserve_http_requests_total{{{sel}}}[{window}]))"
    return errors, total


async def _scalar(session: aiohttp.ClientSession, address: str, query: str) -> float:
    async with session.get(f"{address.rstrip('/')}/api/v1/query", params={"query": query}) as r:
        body = await r.json()
    if body.get("status") != "success":
        raise ValueError(f"Prometheus answered {body.get('errorType')}: {body.get('error')}")
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


async def canary_errors(address: str, namespace: str, service: str, window: str) -> tuple[float, float] | None:
    """(5xx, total) canary requests in the window; None when Prometheus cannot say (no rollback
    is decided on missing data; the failure is logged)."""
    errors_q, total_q = error_ratio_query(namespace, service, window)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            return await _scalar(session, address, errors_q), await _scalar(session, address, total_q)
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as e:
        log.warning("canary error ratio of %s/%s: Prometheus at %s: %s", namespace, service, address, e)
        return None
