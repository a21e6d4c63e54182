"""Start-up and shut-down: load failures leave the server up but unready; SIGTERM drains."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
import pytest

pytestmark = pytest.mark.integration


def test_model_load_failure_is_logged_exported_and_unready(start_server, tmp_path):
    s = start_server(wait="/healthz", model=str(tmp_path / "no-such-model"))
    deadline = time.time() + 30
    while time.time() < deadline and s.metric("sdserve_model_load_failures_total") == 0:
        time.sleep(0.2)
    assert s.metric("sdserve_model_load_failures_total") == 1
    assert s.metric("sdserve_model_loaded") == 0
    r = httpx.get(s.url + "/readyz")
    assert r.status_code == 503 and r.json()["reason"] == "model_load_failed"
    assert "no-such-model" in r.json()["message"]
    g = httpx.post(
        s.url + "/generate", json={"prompt": "x", "width": 64, "height": 64}, headers={"x-request-id": "trace-7f3a"}
    )
    assert g.status_code == 503 and g.json()["error"]["code"] == "model_not_ready" and "Retry-After" in g.headers
    assert "MODEL LOAD FAILED" in s.log()
    # the access log line, with the id the caller (or its proxy) gave, echoed in the answer;
    # written once the answer has gone out, so a moment after the client has it
    assert g.headers["x-request-id"] == "trace-7f3a"
    deadline = time.time() + 10
    while "sdserve.access [trace-7f3a]: POST /generate 503" not in s.log() and time.time() < deadline:
        time.sleep(0.1)
    assert "sdserve.access [trace-7f3a]: POST /generate 503" in s.log()
    assert "GET /readyz" not in s.log()  # probes are not logged


def test_in_kubernetes_a_load_failure_is_the_termination_message_and_the_container_exits(start_server, tmp_path):
    """What the operator sets (SDSERVE_TERMINATION_LOG, SDSERVE_EXIT_AFTER_LOAD_FAILURE_SECONDS): the
    reason reaches the pod's status (lastState.terminated.message) instead of only /readyz."""
    log = tmp_path / "termination-log"
    s = start_server(
        wait="/healthz",
        model=str(tmp_path / "no-such-model"),
        termination_log=str(log),
        exit_after_load_failure_seconds=1,
    )
    assert s.proc.wait(60) == 3
    assert log.read_text().startswith("model_load_failed: ") and "no-such-model" in log.read_text()


def test_sigterm_drains_queued_and_inflight_work_and_refuses_new(start_server):
    s = start_server(max_batch_size=1, max_wait_ms=0, queue_size=16, cache_type="none", drain_seconds=60)
    body = {"prompt": "drain", "width": 128, "height": 128, "num_inference_steps": 5}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(httpx.post, s.url + "/generate", json=body, timeout=120) for _ in range(5)]
        time.sleep(1.0)
        assert s.metric("sdserve_queue_depth") >= 1
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(s.url + "/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["reason"] == "draining"
        late = httpx.post(s.url + "/generate", json=body, timeout=10)
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
        results = [f.result() for f in futures]
    assert [r.status_code for r in results] == [200] * 5, [r.text for r in results]
    assert s.proc.wait(timeout=30) == 0


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_drain_endpoint_only_from_localhost_and_preStop_command_and_ctrl_c(start_server, sigint):
    """The preStop command drains; then Ctrl-C exits 130, also in a process that started with
    SIGINT ignored (a background job of a non-interactive shell: `sdserve serve &`), where
    uvicorn's re-raise of the signal after its shutdown is ignored (it exited 0)."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler if sigint == "default" else signal.SIG_IGN)
    try:
        s = start_server(wait=None, cache_type="none")
    finally:
        signal.signal(signal.SIGINT, inherited)
    s.wait()
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "sdserve", "drain", "--port", str(s.port)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and '"drained":true' in out.stdout.replace(" ", "")
    assert httpx.get(s.url + "/readyz").status_code == 503
    # Ctrl-C in a terminal: shut down, exit 128 + SIGINT, no traceback in the log.
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(timeout=30) == 130, s.log()[-4000:]
    assert "Application shutdown complete" in s.log() and "Traceback" not in s.log()
