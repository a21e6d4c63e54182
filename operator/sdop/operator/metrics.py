"""The operator's own metrics, served on SDOP_METRICS_PORT (the chart's ServiceMonitor scrapes it)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILES = Counter(
    "sdop_reconciles",
    "Reconciles of a StableDiffusionService by trigger and result.",
    ["trigger", "result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "sdop_reconcile_duration_seconds",
    "Time one reconcile took.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
APPLIED = Counter("sdop_children_applied", "Child objects written by server-side apply.", ["kind"], registry=REGISTRY)
PRUNED = Counter(
    "sdop_children_pruned",
    "Child objects deleted because the spec no longer asks for them.",
    ["kind"],
    registry=REGISTRY,
)
INVALID = Counter("sdop_invalid_specs", "Reconciles that found an invalid spec.", registry=REGISTRY)
