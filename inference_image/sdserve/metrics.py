"""Every metric the server exports, declared once. Names: sdserve_<thing>_<unit>."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("sdserve.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300)

HTTP_REQUESTS = Counter(
    "sdserve_http_requests",
    "HTTP requests by route, method and status.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "sdserve_request_duration_seconds",
    "End-to-end request latency.",
    ["route"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "sdserve_queue_wait_seconds",
    "Time a request waited before its batch started.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
INFERENCE_DURATION = Histogram(
    "sdserve_inference_duration_seconds",
    "Time one batch spent in the pipeline.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
ENCODE_DURATION = Histogram(
    "sdserve_encode_duration_seconds",
    "Time to encode a response's images.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "sdserve_batch_size", "Images per pipeline call.", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=REGISTRY
)
MODEL_CALL_AGE = Gauge(
    "sdserve_model_call_age_seconds",
    "How long the oldest model call running now (a batch, a step, an admission, a decode) has run; 0 when none.",
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "sdserve_queue_depth",
    "Requests waiting for a batch, async jobs waiting to queue, and this replica's share of the async "
    "jobs handed off that no replica has taken up (their count over the live replicas: summed over the "
    "pods, each counts once).",
    registry=REGISTRY,
)
INFLIGHT = Gauge(
    "sdserve_inflight_requests",
    "Requests taken from the queue and not finished: being admitted, generated or decoded.",
    registry=REGISTRY,
)
IMAGES = Counter("sdserve_images_generated", "Images generated.", registry=REGISTRY)
CACHE_HITS = Counter("sdserve_cache_hits", "Result cache hits.", registry=REGISTRY)
CACHE_MISSES = Counter("sdserve_cache_misses", "Result cache misses (seeded requests only).", registry=REGISTRY)
CACHE_ERRORS = Counter(
    "sdserve_cache_errors", "Result cache backend errors (served without the cache).", registry=REGISTRY
)
CACHED_AFTER_DROP = Counter(
    "sdserve_cache_unclaimed_results",
    "Results of seeded requests given up on (client gone, timeout) whose request batch ran on anyway: "
    "cached for the client's retry.",
    registry=REGISTRY,
)
CACHE_UP = Gauge(
    "sdserve_cache_backend_up", "1 when the cache backend answers (always 1 for memory).", registry=REGISTRY
)
RATE_LIMITED = Counter("sdserve_rate_limited", "Requests refused by the per-key rate limit.", registry=REGISTRY)
PROMPTS_REJECTED = Counter(
    "sdserve_prompts_rejected", "Prompts refused by the blocklist.", ["reason"], registry=REGISTRY
)
PROMPTS_TRUNCATED = Counter(
    "sdserve_prompts_truncated",
    "Prompts longer than the text encoder reads (CLIP: 75 tokens); the answer's revised_prompt is what it read.",
    registry=REGISTRY,
)
REJECTED = Counter("sdserve_requests_rejected", "Requests refused before the queue.", ["reason"], registry=REGISTRY)
CANCELLED = Counter(
    "sdserve_requests_cancelled",
    "Requests dropped before their end: queued ones, and running ones at a step boundary "
    "(reason: client_disconnected, timeout, drain_timeout).",
    ["reason"],
    registry=REGISTRY,
)
AUTH_FAILURES = Counter("sdserve_auth_failures", "Requests refused by authentication.", ["reason"], registry=REGISTRY)
NSFW_FLAGGED = Counter("sdserve_nsfw_flagged_images", "Images withheld by the NSFW check.", registry=REGISTRY)
JOBS_IN_FLIGHT = Gauge(
    "sdserve_jobs_in_flight",
    "Async jobs this replica runs, by status (queued, running).",
    ["status"],
    registry=REGISTRY,
)
JOBS_OFFERED = Gauge(
    "sdserve_jobs_offered",
    "Async jobs handed off (their replica shut down or died) that no replica has taken up yet, "
    "in the store the replicas share: every replica reports the same count (read it with max).",
    registry=REGISTRY,
)
JOBS = Counter(
    "sdserve_jobs",
    "Async jobs by event: submitted, then succeeded, failed or cancelled; handed_off by a replica "
    "shutting down, adopted by the one that takes it up.",
    ["event"],
    registry=REGISTRY,
)
WEBHOOKS = Counter(
    "sdserve_webhooks",
    "Job webhook deliveries by outcome: delivered, retried, failed (given up), resumed (taken over from a "
    "replica that stopped before it ended).",
    ["outcome"],
    registry=REGISTRY,
)
OUTPUTS = Counter(
    "sdserve_url_outputs",
    "Images answered as URLs: uploaded, reused (already stored) or failed.",
    ["outcome"],
    registry=REGISTRY,
)
OOM_SPLITS = Counter("sdserve_oom_splits", "Batches split after a device out-of-memory error.", registry=REGISTRY)
MODEL_LOAD_SECONDS = Gauge("sdserve_model_load_seconds", "Time the model took to load and warm up.", registry=REGISTRY)
MODEL_LOAD_FAILURES = Counter("sdserve_model_load_failures", "Failed model loads.", registry=REGISTRY)
MODEL_LOADED = Gauge("sdserve_model_loaded", "1 once the model is loaded and warmed up.", registry=REGISTRY)
READY = Gauge("sdserve_ready", "1 while /readyz answers 200 (model loaded, not draining).", registry=REGISTRY)
MODEL_INFO = Gauge(
    "sdserve_model_info", "The served model.", ["model", "revision", "device", "dtype"], registry=REGISTRY
)


class GpuCollector:
    """GPU memory, utilisation and temperature through NVML, read at scrape time."""

    def __init__(self) -> None:
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                self._nvml = pynvml
        except Exception:  # noqa: BLE001 - no driver, no GPU: no GPU metrics
            self._nvml = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def collect(self):
        # The families are always declared (so dashboards and alerts find the names);
        # they carry samples only where NVML sees a GPU.
        used = GaugeMetricFamily("sdserve_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily("sdserve_gpu_memory_total_bytes", "GPU memory.", labels=["gpu"])
        util = GaugeMetricFamily(
            "sdserve_gpu_utilization_ratio", "GPU busy fraction over the last sample period.", labels=["gpu"]
        )
        temp = GaugeMetricFamily("sdserve_gpu_temperature_celsius", "GPU temperature.", labels=["gpu"])
        if self._nvml is None:
            return [used, total, util, temp]
        n = self._nvml
        try:
            for i in range(n.nvmlDeviceGetCount()):
                h = n.nvmlDeviceGetHandleByIndex(i)
                mem = n.nvmlDeviceGetMemoryInfo(h)
                used.add_metric([str(i)], mem.used)
                total.add_metric([str(i)], mem.total)
                util.add_metric([str(i)], n.nvmlDeviceGetUtilizationRates(h).gpu / 100.0)
                temp.add_metric([str(i)], n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))
        except Exception as e:  # noqa: BLE001 - a broken NVML read must not fail a /metrics scrape
            log.warning("NVML read failed: %s", e)
        return [used, total, util, temp]


GPU = GpuCollector()
REGISTRY.register(GPU)
