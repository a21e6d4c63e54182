"""The Grafana dashboard of a service (JSON model), one panel per question an operator asks."""

from __future__ import annotations

import json
from typing import Any

from .context import Ctx, digest


def _panel(pid: int, title: str, exprs: list[tuple[str, str]], unit: str, x: int, y: int) -> dict[str, Any]:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": legend} for i, (e, legend) in enumerate(exprs)],
    }


SEL = 'namespace="$namespace",service="$service"'

PANELS: list[tuple[str, list[tuple[str, str]], str]] = [
    (
        "Request rate by status",
        [(f"sum by (status) (rate(sdserve_http_requests_total{{{SEL}}}[5m]))", "{{status}}")],
        "reqps",
    ),
    (
        "Latency quantiles (generation)",
        [
            (
                f"histogram_quantile({q}, sum by (le) "
                f'(rate(sdserve_request_duration_seconds_bucket{{{SEL},route=~"/v1/images/generations|/v1/images/edits|/generate"}}[5m])))',
                f"p{int(q * 100)}",
            )
            for q in (0.5, 0.95, 0.99)
        ],
        "s",
    ),
    (
        "Queue depth and in flight",
        [
            (f"sum(sdserve_queue_depth{{{SEL}}})", "queued"),
            (f"sum(sdserve_inflight_requests{{{SEL}}})", "in flight"),
        ],
        "short",
    ),
    (
        "Queue wait and inference p95",
        [
            (
                f"histogram_quantile(0.95, sum by (le) (rate(sdserve_queue_wait_seconds_bucket{{{SEL}}}[5m])))",
                "queue wait p95",
            ),
            (
                f"histogram_quantile(0.95, sum by (le) (rate(sdserve_inference_duration_seconds_bucket{{{SEL}}}[5m])))",
                "batch inference p95",
            ),
            (f"max(sdserve_model_call_age_seconds{{{SEL}}})", "oldest model call now"),
        ],
        "s",
    ),
    (
        "Batch size",
        [
            (
                f"sum(rate(sdserve_batch_size_sum{{{SEL}}}[5m])) / sum(rate(sdserve_batch_size_count{{{SEL}}}[5m]))",
                "mean batch size",
            )
        ],
        "short",
    ),
    ("Images per second", [(f"sum(rate(sdserve_images_generated_total{{{SEL}}}[5m]))", "images/s")], "short"),
    (
        "Cache hit ratio",
        [
            (
                f"sum(rate(sdserve_cache_hits_total{{{SEL}}}[5m])) / "
                f"(sum(rate(sdserve_cache_hits_total{{{SEL}}}[5m])) + "
                f"sum(rate(sdserve_cache_misses_total{{{SEL}}}[5m])))",
                "hit ratio",
            )
        ],
        "percentunit",
    ),
    (
        "GPU temperature",
        [(f"max by (pod, gpu) (sdserve_gpu_temperature_celsius{{{SEL}}})", "{{pod}} gpu{{gpu}}")],
        "celsius",
    ),
    (
        "GPU memory used",
        [(f"sum by (pod, gpu) (sdserve_gpu_memory_used_bytes{{{SEL}}})", "{{pod}} gpu{{gpu}}")],
        "bytes",
    ),
    (
        "GPU utilisation",
        [(f"avg by (pod, gpu) (sdserve_gpu_utilization_ratio{{{SEL}}})", "{{pod}} gpu{{gpu}}")],
        "percentunit",
    ),
    (
        "Replicas (scraped / ready)",
        [
            (f"count(up{{{SEL}}} == 1)", "running"),
            (f"sum(sdserve_ready{{{SEL}}})", "ready"),
        ],
        "short",
    ),
    (
        "5xx ratio by model revision (stable vs canary)",
        [
            (
                f'sum by (revision) (rate(sdserve_http_requests_total{{{SEL},status=~"5.."}}[5m])) / '
                f"sum by (revision) (rate(sdserve_http_requests_total{{{SEL}}}[5m]))",
                "{{revision}}",
            )
        ],
        "percentunit",
    ),
    (
        "p95 latency by model revision",
        [
            (
                "histogram_quantile(0.95, sum by (revision, le) "
                f'(rate(sdserve_request_duration_seconds_bucket{{{SEL},route=~"/v1/images/generations|/v1/images/edits|/generate"}}[5m])))',
                "{{revision}}",
            )
        ],
        "s",
    ),
    (
        "Async jobs and webhooks",
        [
            (f"sum by (event) (rate(sdserve_jobs_total{{{SEL}}}[5m]))", "jobs {{event}}"),
            (f"sum by (status) (sdserve_jobs_in_flight{{{SEL}}})", "jobs {{status}} now"),
            (f"max(sdserve_jobs_offered{{{SEL}}})", "jobs waiting for a replica to take them up"),
            (f"sum by (outcome) (rate(sdserve_webhooks_total{{{SEL}}}[5m]))", "webhooks {{outcome}}"),
        ],
        "ops",
    ),
    (
        "Rejections",
        [
            (f"sum by (reason) (rate(sdserve_requests_rejected_total{{{SEL}}}[5m]))", "{{reason}}"),
            (f"sum(rate(sdserve_rate_limited_total{{{SEL}}}[5m]))", "rate limited"),
            (f"sum by (reason) (rate(sdserve_prompts_rejected_total{{{SEL}}}[5m]))", "prompt {{reason}}"),
        ],
        "reqps",
    ),
]


def dashboard_model(uid: str = "sdop-sdserve", title: str = "Stable Diffusion service (sdop)") -> dict[str, Any]:
    panels = [
        _panel(i + 1, title, exprs, unit, (i % 2) * 12, (i // 2) * 8) for i, (title, exprs, unit) in enumerate(PANELS)
    ]

    def var(name: str, query: str) -> dict[str, Any]:
        return {
            "name": name,
            "type": "query",
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": query,
            "refresh": 2,
            "includeAll": False,
        }

    return {
        "uid": uid,
        "title": title,
        "tags": ["sdop", "stable-diffusion"],
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                var("namespace", "label_values(sdserve_ready, namespace)"),
                var("service", 'label_values(sdserve_ready{namespace="$namespace"}, service)'),
            ]
        },
        "panels": panels,
    }


def dashboard_json(uid: str = "sdop-sdserve", title: str = "Stable Diffusion service (sdop)") -> str:
    return json.dumps(dashboard_model(uid, title), indent=1, sort_keys=True)


def dashboard_configmap(ctx: Ctx) -> dict[str, Any] | None:
    if not ctx.spec.monitoring.dashboard:
        return None
    meta = ctx.meta(ctx.child("dashboard"), "monitoring")
    meta["labels"]["grafana_dashboard"] = "1"  # the Grafana sidecar's default label
    # One dashboard per service, each with its own uid (Grafana keeps one dashboard per uid).
    uid = f"sdop-{digest([ctx.namespace, ctx.name], 12)}"
    title = f"Stable Diffusion: {ctx.namespace}/{ctx.name} (sdop)"
    data = {f"sdop-{ctx.namespace}-{ctx.name}.json": dashboard_json(uid, title)}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}
