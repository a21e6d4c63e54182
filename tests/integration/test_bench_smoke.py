"""The benchmark scripts run (small sizes) and write their result files; figures live in bench/."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sdtesting.examples import ROOT

pytestmark = pytest.mark.integration


def bench(tmp_path, *args, timeout=300):
    env = dict(os.environ, SDOP_BENCH_RESULTS=str(tmp_path))
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_gpu_pipeline_bench_smoke_on_cpu(tmp_path):
    out = bench(tmp_path, "bench/gpu_pipeline.py", "--smoke")
    assert "sdop/plain" in out
    result = json.loads((tmp_path / "gpu_pipeline_tiny_smoke_cpu.json").read_text())
    assert [r["batch"] for r in result["sdop_eager"]] == [1, 2] and result["flops_per_image"] > 0
    assert set(result["ablation"]) == {"cudnn.benchmark", "channels_last", "fused QKV"}


def test_operator_scale_bench_small(tmp_path):
    out = bench(
        tmp_path,
        "bench/operator_scale.py",
        "--count",
        "6",
        "--namespaces",
        "2",
        "--resync-seconds",
        "4",
        "--quiet-seconds",
        "3",
    )
    result = json.loads((tmp_path / "operator_scale.json").read_text())
    assert result["reconciled"] == 6 and result["writes in no-op resync"] == 0, out
    assert result["resyncs in window"] >= 6


def test_scheduling_bench_compares_both_policies_on_a_simulated_cost_curve(tmp_path):
    out = bench(tmp_path, "bench/scheduling.py", "--pipeline", "sim", "--duration", "3", "--loads", "0.5,1.5")
    assert "SIMULATION" in out
    result = json.loads((tmp_path / "scheduling_sim_assumed.json").read_text())
    runs = {(r["policy"], r["load"]): r for r in result["runs"]}
    assert set(runs) == {("request", 0.5), ("step", 0.5), ("request", 1.5), ("step", 1.5)}
    assert all(r["ok"] == r["requests"] > 0 for r in runs.values() if r["load"] == 0.5)
    assert "max sustained load (step)" in result["summary"]


def test_scheduling_bench_saturates_both_policies_with_closed_loop_clients(tmp_path):
    bench(
        tmp_path,
        "bench/scheduling.py",
        "--pipeline",
        "sim",
        "--duration",
        "3",
        "--clients",
        "4",
        "--defaults-share",
        "0",
    )
    rows = json.loads((tmp_path / "scheduling_saturation_sim.json").read_text())["runs"]
    assert [(r["policy"], r["clients"]) for r in rows] == [("request", 4), ("step", 4)]
    assert all(r["requests"] >= 4 and r["images/s"] > 0 and r["occupancy"] >= 1 for r in rows), rows
    # Four clients with their own sampling parameters: request batches only identical ones.
    assert rows[1]["occupancy step/request"] > 1, rows


def test_quantization_bench_runs_on_the_tiny_model(tmp_path):
    bench(tmp_path, "bench/quantization.py", "--steps", "3", "--batch", "2")
    rows = json.loads((tmp_path / "quantization_tiny_cpu.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["none", "int8_weight_only"]
    assert not any("error" in r for r in rows), rows
    assert rows[0]["PSNR dB"] == float("inf") and rows[1]["PSNR dB"] > 20


def test_step_overhead_bench_splits_a_step_into_the_unet_and_the_rest(tmp_path):
    bench(tmp_path, "bench/step_overhead.py", "--batches", "1,2", "--repeats", "2")
    rows = json.loads((tmp_path / "step_overhead_tiny_cpu.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 < r["rest ms (host)"] < r["UNet call ms (host)"] <= r["step ms"] * 1.01, r


def test_policy_model_reproduces_the_real_time_simulation_it_stands_for(tmp_path):
    """The event-time model of both policies gives the p99 that the real-time simulation measured
    on the same arrivals (scheduling.py --pipeline sim, seed 2): request within 2%, the lead rule
    within 5% (the simulation adds the server's own time)."""
    sim = "bench/results/scheduling_sim_long_seed2_sd15_cuda.json"
    out = bench(tmp_path, "bench/policy_model.py", "--seeds", "2", "--validate", sim)
    assert "MODEL" in out
    result = json.loads((tmp_path / "policy_model_sd15_cuda.json").read_text())
    checks = result["validate"]
    assert {c["policy"] for c in checks} == {"request", "step"} and len(checks) == 12
    for c in checks:
        low = 0.98 if c["policy"] == "request" else 0.93
        assert low <= c["model/sim"] <= 1.02, c
    rows = {r["policy"]: r for r in result["rows"]}
    assert set(rows) == {"request", "lead", "round-robin", "deadline", "one shape (bound)", "free decode (bound)"}
    assert rows["request"]["p99 vs request"] == 1 and rows["lead"]["p99_s"] <= result["slo_p99_s"]
    assert rows["free decode (bound)"]["p99_s"] < rows["lead"]["p99_s"]  # decodes off the device's time


def test_scheduling_bench_measures_a_cost_curve_alone(tmp_path):
    """--cost-only: the step cost curve of the real (tiny) pipeline, for policy_model.py --cost."""
    out = bench(tmp_path, "bench/scheduling.py", "--cost-only", "--max-batch", "2")
    assert "step cost" in out
    curve = json.loads((tmp_path / "scheduling_cost_tiny_cpu.json").read_text())["step_cost"]
    assert [p for p, _ in curve["points"]] == [64, 128, 144, 288]  # 1 and 2 images of two sizes
    assert all(s > 0 for _, s in curve["points"]) and curve["decode_seconds"] > 0 and curve["complete"]
    assert out.count("wrote ") == 4  # after every point: a run its time cap cuts keeps what it measured


def test_scheduling_bench_mixes_in_edits(tmp_path):
    args = ["--pipeline", "sim", "--duration", "4", "--loads", "0.6", "--edits", "0.5", "--seed", "3"]
    bench(tmp_path, "bench/scheduling.py", *args, "--name", "edits")
    result = json.loads((tmp_path / "edits.json").read_text())
    assert result["mix"]["edits share (img2img, strength 0.5/0.75/1.0)"] == 0.5
    assert all(r["ok"] == r["requests"] > 0 for r in result["runs"]), result["runs"]
