"""Metrics as Prometheus sees them: names used by alerts and dashboard exist on a live server,
and a real Prometheus on loopback scrapes a server under load."""

from __future__ import annotations

import concurrent.futures
import re
import time

import httpx
import pytest
import yaml

from sdop.render import render
from sdop.render.dashboard import dashboard_json
from sdtesting.examples import example
from sdtesting.procs import PrometheusProc

pytestmark = pytest.mark.integration

NOT_SDSERVE = {"up"}  # made by Prometheus itself


def referenced_names() -> set[str]:
    cr = example("sd15-production")
    rules = next(o for o in render(cr) if o["kind"] == "PrometheusRule")
    text = yaml.safe_dump(rules["spec"]) + dashboard_json()
    return set(re.findall(r"\b(sdserve_[a-z_]+)\b", text))


def exported_names(metrics_text: str) -> set[str]:
    names = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "counter":
                names.add(name + "_total")
            if kind == "histogram":
                names |= {name + s for s in ("_bucket", "_sum", "_count")}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(max_batch_size=2, max_wait_ms=50, queue_size=32, cache_type="memory")


def test_every_metric_in_alerts_and_dashboard_exists_on_the_live_server(server):
    used = referenced_names()
    assert len(used) >= 15
    missing = used - exported_names(httpx.get(server.url + "/metrics").text)
    assert missing == set()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    d = tmp_path_factory.mktemp("prom")
    rules = next(o for o in render(example("sd15-production")) if o["kind"] == "PrometheusRule")
    (d / "rules.yaml").write_text(yaml.safe_dump(rules["spec"], width=400))
    job = {
        "job_name": "sd15",
        "static_configs": [
            {
                "targets": [f"127.0.0.1:{server.port}"],
                # what the Prometheus Operator adds from the ServiceMonitor
                "labels": {"namespace": "images", "service": "sd15", "pod": "sd15-0"},
            }
        ],
    }
    prom = PrometheusProc(d, [job], [str(d / "rules.yaml")])
    yield prom.url
    prom.stop()


def query(url: str, q: str) -> list[dict]:
    r = httpx.get(url + "/api/v1/query", params={"query": q}, timeout=10).json()
    assert r["status"] == "success", r
    return r["data"]["result"]


def eventually(check, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def test_prometheus_scrapes_queue_depth_and_latency_under_load(server, prometheus):
    def scraped() -> None:
        up = query(prometheus, 'up{job="sd15"}')
        assert up and up[0]["value"][1] == "1"

    eventually(scraped)  # the load below is seen only by scrapes that follow the first
    body = {"prompt": "load", "width": 64, "height": 64, "num_inference_steps": 6}
    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        # 8 clients against batches of 2 keep about 6 requests queued; for 3 s at least, so that
        # several 1-s scrapes fall inside the load (one round of 16 can end between two).
        while time.time() - start < 3:
            futures = [pool.submit(httpx.post, server.url + "/generate", json=body, timeout=120) for _ in range(16)]
            assert all(f.result().status_code == 200 for f in futures)
    time.sleep(3)  # a few more scrapes after the load

    def settled() -> None:
        up = query(prometheus, 'up{job="sd15"}')
        assert up and up[0]["value"][1] == "1"
        peak = query(prometheus, 'max_over_time(sdserve_queue_depth{service="sd15"}[5m])')
        assert peak and float(peak[0]["value"][1]) >= 1, peak
        p95 = query(
            prometheus,
            "histogram_quantile(0.95, sum by (le) "
            '(rate(sdserve_request_duration_seconds_bucket{service="sd15",route="/generate"}[1m])))',
        )
        assert p95 and float(p95[0]["value"][1]) > 0, p95
        batch = query(prometheus, 'max_over_time(sdserve_batch_size_count{service="sd15"}[5m])')
        assert batch and float(batch[0]["value"][1]) >= 8

    eventually(settled)
    # The KEDA trigger's query, as rendered, evaluates to one number for the service.
    cr = example("sd15-production")
    cr["spec"]["autoscaling"]["provider"] = "keda"
    scaled = next(o for o in render(cr) if o["kind"] == "ScaledObject")
    demand = query(prometheus, scaled["spec"]["triggers"][0]["metadata"]["query"])
    assert len(demand) == 1 and float(demand[0]["value"][1]) >= 0, demand
    rules = httpx.get(prometheus + "/api/v1/rules").json()["data"]["groups"][0]["rules"]
    assert len(rules) == 11 and all(r["health"] == "ok" for r in rules), [
        (r["name"], r.get("lastError")) for r in rules
    ]
