"""Prometheus Operator integration: ServiceMonitor, PrometheusRule thresholds, dashboard."""

from __future__ import annotations

from pydantic import Field

from ..base import ApiModel
from ..k8s import Labels, key_rule
from .common import DURATION


class ThresholdsSpec(ApiModel):
    """Alert thresholds of the PrometheusRule."""

    gpu_temperature_celsius: int = Field(85, description="GPU temperature alert threshold.", ge=40, le=120)
    p95_latency_seconds: float = Field(30.0, description="p95 end-to-end latency alert threshold.", gt=0, le=3600)
    error_ratio: float = Field(0.05, description="Share of 5xx responses that alerts.", gt=0, le=1)
    rejection_ratio: float = Field(0.10, description="Share of 429 responses that alerts.", gt=0, le=1)
    for_duration: str = Field("5m", description="How long a condition holds before alerting.", pattern=DURATION)


class MonitoringSpec(ApiModel):
    """Prometheus Operator integration."""

    service_monitor: bool = Field(True, description="Render a ServiceMonitor (needs monitoring.coreos.com).")
    prometheus_rule: bool = Field(
        True, description="Render a PrometheusRule with the alerts (needs monitoring.coreos.com)."
    )
    dashboard: bool = Field(
        False, description="Render the Grafana dashboard as a ConfigMap labelled grafana_dashboard=1."
    )
    interval: str = Field("15s", description="Scrape interval.", pattern=DURATION)
    labels: Labels = Field(
        default_factory=dict,
        description="Extra labels on ServiceMonitor and PrometheusRule, e.g. release: prometheus.",
        json_schema_extra=key_rule("monitoring.labels"),
    )
    thresholds: ThresholdsSpec = Field(default_factory=ThresholdsSpec, description="Alert thresholds.")
