"""The alert rules of a service, with the CR's thresholds. Tested with promtool (tests/promtool)."""

from __future__ import annotations

from typing import Any

from .context import Ctx

RUNBOOK = "https://github.com/sdop/sdop/blob/main/docs/runbook.md"
GENERATE_ROUTES = "/v1/images/generations|/v1/images/edits|/generate"


def _alert(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity},
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": f"{RUNBOOK}#{name.lower()}",
        },
    }


def rule_groups(ctx: Ctx) -> list[dict[str, Any]]:
    t = ctx.spec.monitoring.thresholds
    sel = f'namespace="{ctx.namespace}",service="{ctx.name}"'
    by = "namespace, service"
    # Split by model revision (a ServiceMonitor relabeling), so a canary's errors or latency
    # alert on their own instead of being diluted by the stable replicas.
    by_rev = "namespace, service, revision"
    target = ctx.spec.autoscaling.target_queue_depth
    max_replicas = ctx.spec.replicas.max
    timeout = ctx.spec.limits.timeout_seconds
    svc = f"{ctx.namespace}/{ctx.name}"
    rules = [
        _alert(
            "SDGpuTemperatureHigh",
            f"max by ({by}, pod, gpu) (sdserve_gpu_temperature_celsius{{{sel}}}) > {t.gpu_temperature_celsius}",
            t.for_duration,
            "warning",
            f"GPU of {svc} is above {t.gpu_temperature_celsius} C",
            "GPU {{ $labels.gpu }} on pod {{ $labels.pod }} is at {{ $value }} C.",
        ),
        _alert(
            "SDInferenceLatencyHigh",
            f"histogram_quantile(0.95, sum by ({by_rev}, le) "
            f'(rate(sdserve_request_duration_seconds_bucket{{{sel},route=~"{GENERATE_ROUTES}"}}[5m]))) > '
            f"{t.p95_latency_seconds}",
            t.for_duration,
            "warning",
            f"p95 image latency of {svc} is above {t.p95_latency_seconds}s",
            "p95 end-to-end latency of generation requests is {{ $value | humanizeDuration }}.",
        ),
        _alert(
            "SDModelLoadFailed",
            # A new process starts its counter at 1, which increase() would miss.
            f"sdserve_model_load_failures_total{{{sel}}} > 0 and on ({by}, pod) sdserve_model_loaded{{{sel}}} == 0",
            "0m",
            "critical",
            f"{svc} failed to load its model",
            "Pod {{ $labels.pod }} could not load the model; it stays unready. See its log.",
        ),
        _alert(
            "SDTargetDown",
            f"up{{{sel}}} == 0",
            t.for_duration,
            "critical",
            f"A replica of {svc} cannot be scraped",
            "Prometheus cannot scrape {{ $labels.pod }}: the server is down or hung.",
        ),
        _alert(
            "SDModelCallSlow",
            f"max by ({by}, pod) (sdserve_model_call_age_seconds{{{sel}}}) > {timeout}",
            "1m",
            "warning",
            f"A model call of {svc} has run longer than a request may wait",
            "One batch, step or decode on pod {{ $labels.pod }} has run for {{ $value | humanizeDuration }}"
            f" (limits.timeoutSeconds {timeout}): requests time out behind it; at server.stallSeconds the pod"
            " is restarted.",
        ),
        _alert(
            "SDQueueBacklog",
            f"(sum by ({by}) (sdserve_queue_depth{{{sel}}}) / count by ({by}) (up{{{sel}}} == 1)) > {target}"
            f" and on ({by}) count by ({by}) (up{{{sel}}} == 1) >= {max_replicas}",
            "10m",
            "warning",
            f"{svc} is at max replicas and still backlogged",
            f"Queue depth per replica is {{{{ $value }}}} (target {target}) with all {max_replicas} replicas running.",
        ),
        _alert(
            "SDHighErrorRate",
            f'sum by ({by_rev}) (rate(sdserve_http_requests_total{{{sel},status=~"5.."}}[5m]))'
            f" / sum by ({by_rev}) (rate(sdserve_http_requests_total{{{sel}}}[5m])) > {t.error_ratio}",
            t.for_duration,
            "critical",
            f"{svc} answers more than {t.error_ratio:.0%} of requests with 5xx",
            "{{ $value | humanizePercentage }} of requests fail with a server error.",
        ),
        _alert(
            "SDHighRejectionRate",
            f'sum by ({by}) (rate(sdserve_http_requests_total{{{sel},status="429"}}[5m]))'
            f" / sum by ({by}) (rate(sdserve_http_requests_total{{{sel}}}[5m])) > {t.rejection_ratio}",
            t.for_duration,
            "warning",
            f"{svc} rejects more than {t.rejection_ratio:.0%} of requests with 429",
            "{{ $value | humanizePercentage }} of requests are rejected (queue full or rate limited).",
        ),
        _alert(
            "SDJobsFailing",
            f'sum by ({by}) (increase(sdserve_jobs_total{{{sel},event="failed"}}[15m]))'
            f' / sum by ({by}) (increase(sdserve_jobs_total{{{sel},event="submitted"}}[15m])) > {t.error_ratio}'
            f' and sum by ({by}) (increase(sdserve_jobs_total{{{sel},event="submitted"}}[15m])) >= 5',
            t.for_duration,
            "warning",
            f"{svc} fails more than {t.error_ratio:.0%} of its async jobs",
            "{{ $value | humanizePercentage }} of the jobs submitted in 15 minutes failed.",
        ),
        _alert(
            "SDJobWebhooksFailing",
            f'sum by ({by}) (increase(sdserve_webhooks_total{{{sel},outcome="failed"}}[15m])) > 0',
            "0m",
            "warning",
            f"{svc} could not deliver job webhooks",
            "{{ $value }} webhook(s) were given up after every retry in the last 15 minutes.",
        ),
        _alert(
            "SDPodsNotReady",
            f"count by ({by}) (up{{{sel}}} == 1) - sum by ({by}) (sdserve_ready{{{sel}}}) > 0",
            "15m",
            "warning",
            f"Replicas of {svc} are running but not ready",
            "{{ $value }} replica(s) have not been ready for 15 minutes (model loading or draining).",
        ),
    ]
    return [{"name": f"sdop.{ctx.namespace}.{ctx.name}", "rules": rules}]
