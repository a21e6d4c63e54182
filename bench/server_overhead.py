"""Server overhead: sdserve at saturation against the raw pipeline at the same batch size,
and the seed's naive service shape, in one run on one machine.

    python bench/server_overhead.py                 # tiny model on this machine's CPU
    python bench/server_overhead.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --size 512 --steps 30 --batch 8

Measures images/s, request latency p50/p95/p99, and /healthz latency while saturated.
Targets: sdserve >= 0.95x the raw pipeline's images/s; /healthz p99 < 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import free_port, percentile, spawn, table, wait_http, write


def raw_pipeline(args) -> dict:
    """The pipeline alone, called back to back with full batches: the ceiling."""
    from sdserve.pipeline import Pipeline
    from sdserve.settings import Settings
    from sdserve.work import BatchKey, Item

    p = Pipeline(Settings(model=args.model))
    p.load()
    key = BatchKey(args.size, args.size, args.steps, 7.5, "default")
    p.run(key, [Item("warm-up", None, 1, j) for j in range(args.batch)])  # this thread, this shape
    batches = max(2, args.requests // args.batch)
    t0 = time.perf_counter()
    for i in range(batches):
        p.run(key, [Item(f"raw {i} {j}", None, 1, i * 100 + j) for j in range(args.batch)])
    elapsed = time.perf_counter() - t0
    del p
    gc.collect()
    return {"images": batches * args.batch, "seconds": elapsed, "images_per_s": batches * args.batch / elapsed}


async def load(url: str, route: str, body_for, requests: int, concurrency: int) -> dict:
    """A bounded async load generator plus a /healthz prober running alongside it."""
    latencies: list[float] = []
    health: list[float] = []
    statuses: dict[int, int] = {}
    done = asyncio.Event()
    counter = iter(range(requests))

    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)
    ) as client:

        async def worker():
            for i in counter:
                t0 = time.perf_counter()
                r = await client.post(route, json=body_for(i))
                latencies.append(time.perf_counter() - t0)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        async def prober():
            async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
                await asyncio.sleep(0.5)  # let the queue fill first
                while not done.is_set():
                    t0 = time.perf_counter()
                    await probe.get("/healthz")
                    health.append(time.perf_counter() - t0)
                    await asyncio.sleep(0.05)

        probe_task = asyncio.create_task(prober())
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        done.set()
        await probe_task
    ok = statuses.get(200, 0)
    return {
        "requests": requests,
        "ok": ok,
        "statuses": statuses,
        "seconds": elapsed,
        "images_per_s": ok / elapsed,
        "p50_s": percentile(latencies, 0.50),
        "p95_s": percentile(latencies, 0.95),
        "p99_s": percentile(latencies, 0.99),
        "healthz_samples": len(health),
        "healthz_p50_ms": percentile(health, 0.50) * 1000,
        "healthz_p99_ms": percentile(health, 0.99) * 1000,
        "healthz_max_ms": max(health) * 1000 if health else float("nan"),
    }


def body(args, i: int) -> dict:
    return {
        "prompt": f"bench {i}",
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
        "seed": i,
    }


def run_sdserve(args) -> dict:
    port = free_port()
    env = {
        "SDSERVE_MODEL": args.model,
        "SDSERVE_MAX_BATCH_SIZE": str(args.batch),
        "SDSERVE_MAX_WAIT_MS": str(args.max_wait_ms),
        "SDSERVE_QUEUE_SIZE": str(args.requests * 2),
        "SDSERVE_CACHE_TYPE": "none",
        "SDSERVE_MIN_SIDE": "64",
        "SDSERVE_LOG_LEVEL": "warning",
        "SDSERVE_TIMEOUT_SECONDS": "3600",
    }
    proc = spawn(["-m", "sdserve", "serve", "--host", "127.0.0.1", "--port", str(port)], env)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz")
        return asyncio.run(
            load(f"http://127.0.0.1:{port}", "/generate", lambda i: body(args, i), args.requests, args.concurrency)
        )
    finally:
        proc.terminate()
        proc.wait(60)


def run_naive(args) -> dict:
    port = free_port()
    proc = spawn([os.path.join(os.path.dirname(os.path.abspath(__file__)), "naive_service.py")], {"PORT": str(port)})
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        n = max(args.batch * 2, args.requests // 3)  # it is slow; fewer requests give the same rate
        return asyncio.run(load(f"http://127.0.0.1:{port}", "/generate", lambda i: body(args, i), n, args.concurrency))
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-wait-ms", type=int, default=50)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--skip-naive", action="store_true", help="the naive service needs the tiny model")
    args = ap.parse_args()

    # The raw pipeline before and after the server run: this machine's drift shows, and the
    # ratio uses their mean.
    raw_before = raw_pipeline(args)
    served = run_sdserve(args)
    raw_after = raw_pipeline(args)
    raw = {
        "images_per_s": (raw_before["images_per_s"] + raw_after["images_per_s"]) / 2,
        "before": raw_before,
        "after": raw_after,
    }
    naive = None if args.skip_naive or args.model != "tiny" else run_naive(args)
    rows = [
        {"setup": f"raw pipeline, batch {args.batch} (before)", "images/s": raw_before["images_per_s"]},
        {"setup": f"raw pipeline, batch {args.batch} (after)", "images/s": raw_after["images_per_s"]},
        {
            "setup": "sdserve (queue + batcher)",
            "images/s": served["images_per_s"],
            "p50 s": served["p50_s"],
            "p95 s": served["p95_s"],
            "p99 s": served["p99_s"],
            "healthz p99 ms": served["healthz_p99_ms"],
            "healthz max ms": served["healthz_max_ms"],
        },
    ]
    if naive:
        rows.append(
            {
                "setup": "naive (pipeline in async handler)",
                "images/s": naive["images_per_s"],
                "p50 s": naive["p50_s"],
                "p95 s": naive["p95_s"],
                "p99 s": naive["p99_s"],
                "healthz p99 ms": naive["healthz_p99_ms"],
                "healthz max ms": naive["healthz_max_ms"],
            }
        )
    ratio = served["images_per_s"] / raw["images_per_s"]
    print(table(rows, ["setup", "images/s", "p50 s", "p95 s", "p99 s", "healthz p99 ms", "healthz max ms"]))
    print(
        f"\nsdserve / raw = {ratio:.3f} (target >= 0.95); healthz p99 {served['healthz_p99_ms']:.1f} ms (target < 50)"
    )
    path = write(
        "server_overhead",
        {
            "settings": vars(args),
            "raw": raw,
            "sdserve": served,
            "naive": naive,
            "sdserve_over_raw": ratio,
            "targets": {"sdserve_over_raw_min": 0.95, "healthz_p99_ms_max": 50},
            "met": {"throughput": ratio >= 0.95, "healthz": served["healthz_p99_ms"] < 50},
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
