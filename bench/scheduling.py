"""Open-loop serving benchmark: request-level against step-level batching on one pipeline.

Requests arrive as a Poisson process at several offered loads, with a mix of step counts,
guidance scales, schedulers, sizes and image counts (half of them use the server's defaults,
as API traffic does). Each policy is sdserve's own batcher (``sdserve.queue.Batcher``,
``sdserve.stepper.StepBatcher``) driving the pipeline; requests are submitted straight to it
(no HTTP: this measures scheduling; server_overhead.py measures the HTTP path).

    python bench/scheduling.py                                  # tiny model on the CPU, for real
    python bench/scheduling.py --pipeline sim                   # simulated cost curve (see below)
    python bench/scheduling.py --arch sd15 --device cuda        # SD 1.5 architecture, random fp16 weights

--pipeline sim runs no model: every UNet step and VAE decode sleeps for the time a cost curve
gives (seconds per step against latent pixels in the forward), holding one device lock, as
kernels on one GPU do. The curve comes from --cost FILE (the ``step_cost`` a real run wrote,
e.g. results/scheduling_sd15_cuda.json) or, without one, from a built-in assumption that is
labelled as such in the output. Simulation results are named ``scheduling_sim*``.

--clients 4,8,16 runs a closed loop instead (each client sends its next request when the last
returns): each policy's capacity and occupancy on the mix at saturation, which an open loop
below the policies' capacity cannot show (at low load there is little to batch).

Per policy and load: throughput (images/s), p50/p99 latency, queue wait (arrival to first
denoising work) and mean batch occupancy (images per UNet forward, over forwards). A load is
sustained when every accepted request finished and the p99 latency is within the SLO (--slo,
default 6x the latency of a default request alone).
Targets (issue 12): at the highest load `request` sustains, `step` p99 <= 0.5x and
throughput >= 1.0x; mean occupancy of `step` >= 2x that of `request`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import percentile, table, write
from gpu_pipeline import sdserve_pipeline, sync

from sdserve.queue import Batcher, QueueFull, cancel
from sdserve.stepper import StepBatcher
from sdserve.work import BatchKey, Item

SCHEDULERS = ["default", "euler", "euler_a", "dpmpp_2m", "ddim"]

#: Built-in cost curve for --pipeline sim without --cost: an assumption, not a measurement.
#: Anchor: SD 1.5 at 512x512 runs ~31 it/s (32 ms a step, classifier-free guidance included)
#: in plain diffusers fp16 on an A100 80GB (fal.ai stable-diffusion-benchmarks); the growth
#: with batch (a forward of 8 images costing 4.5x one) is assumed.
ASSUMED_COST = {
    "source": "assumption: A100 SD1.5 512x512 batch-1 step 32 ms (fal.ai benchmark), batch scaling assumed",
    "points": [[4096, 0.032], [8192, 0.046], [16384, 0.078], [32768, 0.144], [65536, 0.28]],
    "decode_seconds": 0.03,
    "encode_seconds": 0.005,
}


# ---- the workload ---------------------------------------------------------------------------
@dataclass
class Mix:
    side: int  # the default size; 20% of the custom requests are 1.5x that
    steps: tuple[int, ...]
    default_steps: int
    defaults: float = 0.5  # the share of requests with the server's defaults (the rest: custom)
    edits: float = 0.0  # the share made image-to-image edits (strength 0.5, 0.75 or 1.0)


def mixes(arch: str, defaults: float = 0.5, edits: float = 0.0) -> Mix:
    if arch == "tiny":
        return Mix(side=64, steps=(6, 10, 16), default_steps=10, defaults=defaults, edits=edits)
    side = 1024 if arch == "sdxl" else 512
    return Mix(side=side, steps=(20, 30, 50), default_steps=30, defaults=defaults, edits=edits)


def draw(mix: Mix, rng: random.Random, index: int) -> tuple[BatchKey, Item]:
    """One request of the mix."""
    if rng.random() < mix.defaults:  # the server's defaults
        key = BatchKey(mix.side, mix.side, mix.default_steps, 7.5, "default")
    else:
        side = mix.side if rng.random() < 0.8 else mix.side * 3 // 2
        key = BatchKey(side, side, rng.choice(mix.steps), rng.choice([3.5, 5.0, 7.5, 9.0]), rng.choice(SCHEDULERS))
    n = 2 if rng.random() < 0.15 else 1
    item = Item(f"prompt {index}", None, n, rng.randrange(2**31))
    if mix.edits and rng.random() < mix.edits:  # no draw without edits: the same arrivals as before
        key = dataclasses.replace(key, task="img2img", strength=rng.choice([0.5, 0.75, 1.0]))
        from PIL import Image

        item.init_image = Image.new("RGB", (key.width, key.height), (128, 128, 128))
    return key, item


def workload(mix: Mix, rate: float, duration: float, seed: int) -> list[tuple[float, BatchKey, Item]]:
    """Poisson arrivals at ``rate`` requests/s for ``duration`` seconds."""
    rng = random.Random(seed)
    out = []
    t = rng.expovariate(rate)
    while t < duration:
        out.append((t, *draw(mix, rng, len(out))))
        t += rng.expovariate(rate)
    return out


# ---- pipelines ------------------------------------------------------------------------------
class Recorder:
    """Wraps a pipeline and records every UNet forward's image count (for occupancy)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.revision, self.device, self.dtype, self.load_seconds = inner.revision, inner.device, inner.dtype, 0.0
        self.forwards: list[int] = []  # images in each UNet forward

    def reset(self) -> None:
        self.forwards = []

    def load(self) -> None:
        self.inner.load()

    def warmup_shapes(self) -> list[tuple[BatchKey, int]]:
        return self.inner.warmup_shapes()

    def run(self, key: BatchKey, items: list[Item]) -> list[Item]:
        self.forwards += [sum(i.n for i in items)] * key.denoising_steps
        return self.inner.run(key, items)

    def begin(self, key: BatchKey, item: Item) -> list[Any]:
        return self.inner.begin(key, item)

    def step(self, states: list[Any]) -> None:
        self.forwards.append(len(states))
        self.inner.step(states)

    def finished(self, state: Any) -> bool:
        return self.inner.finished(state)

    def finish(self, states: list[Any]) -> list[Any]:
        return self.inner.finish(states)


class Cost:
    """Seconds of one UNet step against latent pixels in the forward (linear between points)."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.points = sorted((float(p), float(s)) for p, s in spec["points"])
        self.decode = float(spec["decode_seconds"])
        self.encode = float(spec["encode_seconds"])

    def step(self, pixels: float) -> float:
        pts = self.points
        if pixels <= pts[0][0]:
            return pts[0][1]
        for (p0, s0), (p1, s1) in zip(pts, pts[1:], strict=False):
            if pixels <= p1:
                return s0 + (s1 - s0) * (pixels - p0) / (p1 - p0)
        (p0, s0), (p1, s1) = pts[-2], pts[-1]
        return s1 + (s1 - s0) * (pixels - p1) / (p1 - p0)


@dataclass
class SimState:
    pixels: int
    steps: int
    i: int = 0


class SimPipeline:
    """No model: each step and decode sleeps as the cost curve says, under one device lock.
    An edit's VAE encode of its input image is costed as a decode (not measured)."""

    revision, device, dtype, load_seconds = "sim", "sim", None, 0.0

    def __init__(self, cost: Cost):
        self.cost = cost
        self._device = threading.Lock()

    def _busy(self, seconds: float) -> None:
        with self._device:
            time.sleep(seconds)

    def load(self) -> None:
        pass

    def warmup_shapes(self) -> list[tuple[BatchKey, int]]:
        return []  # sleeps need no warm-up

    def run(self, key: BatchKey, items: list[Item]) -> list[Item]:
        n = sum(i.n for i in items)
        px = (key.width // 8) * (key.height // 8)
        steps = key.denoising_steps * self.cost.step(n * px)
        self._busy(self.cost.encode * len(items) + self._inputs(key, n) + steps + self.cost.decode * n)
        for it in items:
            it.images = [object()] * it.n
        return items

    def _inputs(self, key: BatchKey, n: int) -> float:
        """An edit's VAE encode of its n input images, costed as decodes."""
        return self.cost.decode * n if key.task != "generate" else 0.0

    def begin(self, key: BatchKey, item: Item) -> list[SimState]:
        self._busy(self.cost.encode + self._inputs(key, item.n))
        return [SimState((key.width // 8) * (key.height // 8), key.denoising_steps) for _ in range(item.n)]

    def step(self, states: list[SimState]) -> None:
        self._busy(self.cost.step(sum(s.pixels for s in states)))
        for s in states:
            s.i += 1

    def finished(self, state: SimState) -> bool:
        return state.i >= state.steps

    def finish(self, states: list[SimState]) -> list[Any]:
        self._busy(self.cost.decode * len(states))
        return [object()] * len(states)


def real_pipeline(arch: str, device: str, max_batch: int, mix: Mix, step_pad: str = "auto", compile_mode: str = ""):
    """sdserve's Pipeline, set to warm up what the runs will see as a server would: the default
    size and the mix's large size (SDSERVE_WARMUP_SIZES), at every batch size on a GPU. Each
    batcher runs that warm-up on its own threads (cuDNN's tuning is kept per thread).
    ``compile_mode``: the UNet compiled so (SDSERVE_COMPILE), as a server with compile on."""
    big = mix.side * 3 // 2
    compiled = {"compile": True, "compile_mode": compile_mode} if compile_mode else {}
    return sdserve_pipeline(
        arch,
        device,
        max_batch_size=max_batch,
        step_pad=step_pad,
        **compiled,
        warmup_sizes=f"{big}x{big}",
        min_side=min(256, mix.side),
        max_width=max(1024, big),
        max_height=max(1024, big),
    )


def measure_cost(
    pipeline: Any, mix: Mix, max_batch: int, source: str, on_point: Callable[[dict], None] | None = None
) -> dict:
    """Seconds per UNet step at 1..max_batch images of the default size (and 1 and 2 of the
    large size), the decode and the text encode: the curve --pipeline sim replays. Run on the
    step batcher's worker thread, whose shapes its warm-up tuned (or, --cost-only, on a thread
    that tunes each shape in the untimed first steps: cuDNN's choice, a compile, a CUDA graph).
    The two ends of the default size's curve come first, and ``on_point`` is given the curve
    after each point: a run cut short (a compile that tunes for minutes) keeps what it measured."""
    points: list[list[float]] = []
    curve = {"source": source, "points": points, "decode_seconds": 0.0, "encode_seconds": 0.0}
    sizes = [(mix.side, b) for b in dict.fromkeys([1, max_batch, 2, max(1, max_batch // 2)])]
    sizes += [(mix.side * 3 // 2, b) for b in (1, 2)]
    decode = encode = 0.0
    for side, b in sizes:
        key = BatchKey(side, side, 8, 7.5, "default")
        t0 = time.perf_counter()
        states = [s for i in range(b) for s in pipeline.begin(key, Item("cost", None, 1, i))]
        sync(str(pipeline.device))
        t1 = time.perf_counter()
        if side == mix.side and b == 1:
            encode = t1 - t0
        for _ in range(2):  # untimed: a new shape is tuned or compiled, then (CUDA graphs) recorded
            pipeline.step(states)
        sync(str(pipeline.device))
        t1 = time.perf_counter()
        for _ in range(3):
            pipeline.step(states)
        sync(str(pipeline.device))
        t2 = time.perf_counter()
        if side == mix.side and b == 1:
            while not pipeline.finished(states[0]):
                pipeline.step(states)
            pipeline.finish(states)  # once to warm this thread's decode kernels, then timed
            sync(str(pipeline.device))
            t3 = time.perf_counter()
            pipeline.finish(states)
            sync(str(pipeline.device))
            decode = time.perf_counter() - t3
        points.append([(side // 8) ** 2 * b, (t2 - t1) / 3])
        points.sort()
        curve.update(decode_seconds=decode, encode_seconds=encode, complete=len(points) == len(sizes))
        if on_point is not None:
            on_point(curve)
    return curve


# ---- one run ----------------------------------------------------------------------------------
@dataclass
class Record:
    key: BatchKey
    n: int
    arrival: float
    started: float | None = None
    done: float | None = None
    outcome: str = "unfinished"  # ok, rejected, failed, unfinished
    job: Any = None


@dataclass
class Run:
    policy: str
    load: float
    rate: float
    records: list[Record] = field(default_factory=list)
    forwards: list[int] = field(default_factory=list)


def make(policy: str, pipeline: Any, max_batch: int) -> Batcher | StepBatcher:
    if policy == "step":
        return StepBatcher(pipeline, max_batch_size=max_batch, queue_size=100_000)
    return Batcher(pipeline, max_batch_size=max_batch, max_wait_ms=25, queue_size=100_000)


async def serve(batcher: Batcher | StepBatcher, jobs, drain: float) -> tuple[list[Record], float]:
    """Submit ``jobs`` at their arrival times to a started, warmed batcher; at ``drain`` seconds
    after the last arrival, cancel what is left and wait until the batcher is idle (it serves
    the next run: one batcher per policy, as one server lives through changing load)."""
    t0 = time.monotonic()
    records: list[Record] = []
    submitted = []

    async def arrive(at: float, key: BatchKey, item: Item) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        rec = Record(key, item.n, time.monotonic())
        records.append(rec)
        try:
            job = batcher.submit(key, Item(item.prompt, item.negative_prompt, item.n, item.seed))
        except QueueFull:
            rec.outcome = "rejected"
            return
        submitted.append(job)
        rec.job = job
        try:
            await job.future
            rec.outcome = "ok"
        except asyncio.CancelledError:
            return  # cut off at the end of the run: stays "unfinished"
        except Exception:  # noqa: BLE001 - counted, not raised
            rec.outcome = "failed"
        rec.done = time.monotonic()

    tasks = [asyncio.ensure_future(arrive(at, k, it)) for at, k, it in jobs]
    horizon = (jobs[-1][0] if jobs else 0.0) + drain
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, t0 + horizon - time.monotonic()))
    for job in submitted:
        cancel(job, "timeout")
    if pending:
        await asyncio.wait(pending, timeout=5)
    wall = time.monotonic() - t0
    # A request batch already running finishes; step work stops at its next step.
    while not batcher.idle:  # noqa: ASYNC110 - polled as sdserve's drain is: "idle" changes in several places
        await asyncio.sleep(0.05)
    for r in records:
        r.started = r.job.started if r.job is not None else None
        if r.outcome == "unfinished":
            r.done = t0 + wall  # a lower bound: counted as over the SLO
    return records, wall


async def saturate(
    batcher: Batcher | StepBatcher, pipeline: Recorder, mix: Mix, clients: int, duration: float, seed: int
) -> dict:
    """Closed loop: ``clients`` clients each send their next request of the mix as soon as the
    last one returns, for ``duration`` seconds. Throughput and occupancy count the window only
    (the requests still running at its end finish, outside it): the policy's capacity on
    this mix with ``clients`` requests in the system."""
    pipeline.reset()
    t0 = time.monotonic()
    records: list[Record] = []

    async def client(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        while time.monotonic() - t0 < duration:
            key, item = draw(mix, rng, len(records))
            rec = Record(key, item.n, time.monotonic())
            records.append(rec)
            rec.job = batcher.submit(key, item)
            await rec.job.future
            rec.outcome, rec.done = "ok", time.monotonic()

    tasks = [asyncio.ensure_future(client(c)) for c in range(clients)]
    await asyncio.sleep(duration)
    forwards = list(pipeline.forwards)
    images = sum(r.n for r in records if r.done is not None and r.done - t0 <= duration)
    await asyncio.gather(*tasks)
    lat = sorted(r.done - r.arrival for r in records if r.done is not None)
    return {
        "clients": clients,
        "requests": len(records),
        "images/s": images / duration,
        "p50 s": percentile(lat, 0.5),
        "p99 s": percentile(lat, 0.99),
        "occupancy": sum(forwards) / max(1, len(forwards)),
    }


SATURATION_COLUMNS = ["policy", "clients", "requests", "images/s", "p50 s", "p99 s", "occupancy"]


async def saturation(args, mix: Mix, label: str, pipeline: Recorder, batchers, cost_spec) -> list[dict]:
    """Each policy at each client count (--clients) on the same per-client request streams."""
    name = args.name or (
        "scheduling_saturation_sim"
        if args.pipeline == "sim"
        else f"scheduling_saturation_{args.arch}_{args.device.split(':')[0]}"
    )
    rows: list[dict] = []
    payload = {"settings": vars(args), "what": label, "step_cost": cost_spec, "runs": rows}
    print(label, flush=True)
    for clients in [int(c) for c in args.clients.split(",")]:
        for policy in args.policies.split(","):
            rows.append(
                {"policy": policy} | await saturate(batchers[policy], pipeline, mix, clients, args.duration, args.seed)
            )
            print(table(rows[-1:], SATURATION_COLUMNS), flush=True)
            write(name, payload)
    for clients in {r["clients"] for r in rows}:
        pair = {r["policy"]: r for r in rows if r["clients"] == clients}
        if len(pair) == 2:
            for k in ("images/s", "occupancy"):
                pair["step"][f"{k} step/request"] = pair["step"][k] / max(1e-9, pair["request"][k])
    print(table(rows, SATURATION_COLUMNS + ["images/s step/request", "occupancy step/request"]))
    print(f"wrote {write(name, payload)}")
    return rows


COLUMNS = ["policy", "load", "offered req/s", "requests", "ok", "unfinished", "images/s", "p50 s", "p99 s"]
COLUMNS += ["wait p50 s", "wait p99 s", "occupancy", "sustained"]


def summarise(run: Run, slo: float) -> dict:
    recs = run.records
    ok = [r for r in recs if r.outcome == "ok"]
    unfinished = [r for r in recs if r.outcome == "unfinished"]
    lat = sorted((r.done or 0) - r.arrival for r in recs if r.outcome in ("ok", "unfinished"))
    waits = [(r.started or r.done or 0) - r.arrival for r in recs if r.outcome in ("ok", "unfinished")]
    first = min((r.arrival for r in recs), default=0.0)
    last = max((r.done or 0 for r in ok), default=first)
    images = sum(r.n for r in ok)
    p99 = percentile(lat, 0.99) if lat else float("nan")
    return {
        "policy": run.policy,
        "load": run.load,
        "offered req/s": run.rate,
        "requests": len(recs),
        "ok": len(ok),
        "unfinished": len(unfinished),
        "rejected": sum(r.outcome == "rejected" for r in recs),
        "failed": sum(r.outcome == "failed" for r in recs),
        "images/s": images / max(1e-9, last - first),
        "p50 s": percentile(lat, 0.5) if lat else float("nan"),
        "p99 s": p99,
        "wait p50 s": percentile(waits, 0.5) if waits else float("nan"),
        "wait p99 s": percentile(waits, 0.99) if waits else float("nan"),
        "occupancy": sum(run.forwards) / max(1, len(run.forwards)),
        # Where the tail is: the slowest requests with their size, steps, images and wait.
        "slowest": [
            {
                "size": f"{r.key.width}x{r.key.height}",
                "steps": r.key.steps,
                "images": r.n,
                "wait s": round(((r.started or r.done or 0) - r.arrival), 3),
                "latency s": round((r.done or 0) - r.arrival, 3),
            }
            for r in sorted(
                (r for r in recs if r.outcome in ("ok", "unfinished")), key=lambda r: r.arrival - (r.done or 0)
            )[:3]
        ],
        "sustained": not unfinished and not any(r.outcome in ("rejected", "failed") for r in recs) and p99 <= slo,
    }


def verdict(rows: list[dict]) -> dict:
    """The highest load each policy sustains (every lower load sustained too), and the targets
    at request's highest sustained load."""
    out: dict[str, Any] = {}
    for policy in ("request", "step"):
        best = None
        for r in sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["load"]):
            if not r["sustained"]:
                break
            best = r["load"]
        out[f"max sustained load ({policy})"] = best
    at = out["max sustained load (request)"]
    pair = {r["policy"]: r for r in rows if r["load"] == at} if at is not None else {}
    if len(pair) == 2:
        req, stp = pair["request"], pair["step"]
        out["at load"] = at
        out["p99 step/request"] = stp["p99 s"] / req["p99 s"]
        out["throughput step/request"] = stp["images/s"] / req["images/s"]
        out["occupancy step/request"] = stp["occupancy"] / max(1e-9, req["occupancy"])
        out["targets met"] = {
            "p99 <= 0.5x": out["p99 step/request"] <= 0.5,
            "throughput >= 1.0x": out["throughput step/request"] >= 1.0,
            "occupancy >= 2x": out["occupancy step/request"] >= 2.0,
        }
    return out


async def alone_latency(batcher: Batcher, mix: Mix) -> float:
    """Latency of one default request with nothing else running (request policy)."""
    key = BatchKey(mix.side, mix.side, mix.default_steps, 7.5, "default")
    best = float("inf")
    for i in range(2):
        records, _ = await serve(batcher, [(0.0, key, Item("alone", None, 1, i))], 600)
        best = min(best, (records[0].done or 0) - records[0].arrival)
    return best


def direct_latency(pipeline: Any, mix: Mix) -> dict:
    """One default request straight through the pipeline on a new thread: its first call (a
    thread that has tuned nothing: cuDNN's autotuning is per thread) and its second. Against
    the served latency this shows what a warm-up on the wrong thread costs and what the
    batcher adds."""
    import concurrent.futures

    key = BatchKey(mix.side, mix.side, mix.default_steps, 7.5, "default")

    def once() -> float:
        t0 = time.perf_counter()
        pipeline.run(key, [Item("direct", None, 1, 0)])
        sync(str(pipeline.device))
        return time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(once).result()
        return {"new thread, first call s": first, "same thread, second call s": pool.submit(once).result()}


def mean_service_seconds(alone: float, mix: Mix) -> float:
    """Service time of the average request of the mix run alone, scaled from the measured
    default request by its steps, its size (latent pixels) and its images."""
    custom = 1 - mix.defaults
    big = 0.2 * custom * ((3 / 2) ** 2 - 1)  # custom requests are 1.5x the side a fifth of the time
    mean_steps = mix.defaults * mix.default_steps + custom * sum(mix.steps) / len(mix.steps)
    return alone * (mean_steps / mix.default_steps) * (1 + big) * 1.15


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", choices=["real", "sim"], default="real")
    ap.add_argument("--arch", choices=["tiny", "sd15", "sdxl"], help="default: tiny for real, sd15 for sim")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cost", help="sim: a results JSON with a step_cost (or a bare cost curve)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument(
        "--loads", default="0.5,0.8,1.1,1.5,2.0", help="offered loads, as multiples of the batch-1 capacity"
    )
    ap.add_argument("--duration", type=float, default=30, help="seconds of arrivals per run")
    ap.add_argument("--drain", type=float, default=0, help="seconds after the last arrival (0: 2x SLO)")
    ap.add_argument("--slo", type=float, default=0, help="p99 latency SLO in seconds (0: 6x a default request alone)")
    ap.add_argument(
        "--defaults-share",
        type=float,
        default=0.5,
        help="share of requests with the server's default parameters (0: every request mixes its own)",
    )
    ap.add_argument("--edits", type=float, default=0.0, help="share of requests that are image-to-image edits")
    ap.add_argument("--policies", default="request,step", help="which policies to run (comma-separated)")
    ap.add_argument(
        "--refine", type=int, default=0, help="bisection runs to place the load at which request breaks the SLO"
    )
    ap.add_argument(
        "--clients",
        help="closed loop instead of --loads: this many clients each keep one request in flight (comma-separated)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--step-pad",
        choices=["auto", "on", "off"],
        default="auto",
        help="real pipeline: SDSERVE_STEP_PAD (auto pads every step-batched forward to --max-batch on a CPU)",
    )
    ap.add_argument(
        "--compile-mode",
        default="",
        help="real pipeline: torch.compile the UNet in this mode (reduce-overhead: CUDA graphs), as SDSERVE_COMPILE",
    )
    ap.add_argument(
        "--cost-only",
        action="store_true",
        help="real pipeline: measure the step cost curve and stop (no batchers, no runs): for policy_model.py --cost",
    )
    ap.add_argument("--name", help="result file name (default from pipeline/arch/device)")
    args = ap.parse_args()
    args.arch = args.arch or ("sd15" if args.pipeline == "sim" else "tiny")
    spec = ASSUMED_COST
    if args.cost:
        raw = json.load(open(args.cost))
        spec = raw.get("step_cost", raw)
        spec = {**spec, "source": f"measured: {args.cost} ({spec.get('source', '')})"}
    return asyncio.run(run_benchmark(args, spec))


def cost_only(args: argparse.Namespace, mix: Mix, pipeline: Any, label: str) -> int:
    """The step cost curve alone, on this thread, each shape tuned (or compiled) before it is timed."""
    compiled = f" compiled {args.compile_mode}" if args.compile_mode else ""
    suffix = "_compiled" if args.compile_mode else ""
    name = args.name or f"scheduling_cost_{args.arch}{suffix}_{args.device.split(':')[0]}"
    print(label, flush=True)

    def written(curve: dict) -> None:
        path = write(name, {"settings": vars(args), "what": label, "step_cost": curve})
        print(
            f"step cost so far (latent pixels, seconds): {[(p, round(s, 4)) for p, s in curve['points']]}", flush=True
        )
        print(f"wrote {path}", flush=True)

    curve = measure_cost(pipeline, mix, args.max_batch, f"{args.arch} on {args.device}{compiled}", written)
    print(f"decode {curve['decode_seconds']:.4f} s, text encode {curve['encode_seconds']:.4f} s")
    return 0


async def run_benchmark(args: argparse.Namespace, spec: dict) -> int:
    """--pipeline sim replays ``spec``; a real pipeline measures its own cost curve."""
    mix = mixes(args.arch, args.defaults_share, args.edits)
    loads = [float(x) for x in args.loads.split(",")]

    if args.pipeline == "sim":
        inner: Any = SimPipeline(Cost(spec))
        label = f"SIMULATION: sleeps follow the cost curve ({spec['source']})"
    else:
        inner = real_pipeline(args.arch, args.device, args.max_batch, mix, args.step_pad, args.compile_mode)
        compiled = f", UNet compiled ({args.compile_mode})" if args.compile_mode else ""
        label = f"real pipeline: {args.arch} on {args.device}, step pad {args.step_pad}{compiled}"
        if args.cost_only:
            return cost_only(args, mix, inner, label)
    pipeline = Recorder(inner)
    policies = args.policies.split(",")
    batchers = {policy: make(policy, pipeline, args.max_batch) for policy in ("request", "step")}
    print("loading and warming up every batch shape on each policy's threads ...", flush=True)
    for b in batchers.values():
        b.start()
        await b.load()
    try:
        if args.pipeline == "sim":
            cost_spec = spec
        else:
            source = f"{args.arch} on {args.device}"
            cost_spec = await batchers["step"].on_worker(measure_cost, inner, mix, args.max_batch, source)
        if args.clients:
            await saturation(args, mix, label, pipeline, batchers, cost_spec)
            return 0
        rows = await compare(args, mix, loads, policies, label, pipeline, batchers, cost_spec)
    finally:
        for b in batchers.values():
            await b.stop()
    print("\n" + label)
    print(table(sorted(rows, key=lambda r: (r["load"], r["policy"])), COLUMNS))
    return 0


async def compare(
    args, mix: Mix, loads: list[float], policies: list[str], label: str, pipeline: Recorder, batchers, cost_spec
) -> list[dict]:
    """The policies at every load on the same arrivals; writes the JSON after every run."""
    cost = Cost(cost_spec)
    print(label, flush=True)
    print("step cost (latent pixels, seconds):", [(int(p), round(s, 4)) for p, s in cost.points], flush=True)

    direct = {} if args.pipeline == "sim" else direct_latency(pipeline.inner, mix)
    alone = await alone_latency(batchers["request"], mix)
    direct["served (request batcher) s"] = alone
    print("default request, direct vs served:", {k: round(v, 3) for k, v in direct.items()}, flush=True)
    slo = args.slo or 6 * alone
    drain = args.drain or 2 * slo
    capacity = 1 / mean_service_seconds(alone, mix)
    print(f"default request alone: {alone:.3f}s; SLO p99 <= {slo:.2f}s; batch-1 capacity ~{capacity:.2f} req/s")

    name = args.name or (
        f"scheduling_sim_{os.path.splitext(os.path.basename(args.cost))[0] if args.cost else 'assumed'}"
        if args.pipeline == "sim"
        else f"scheduling_{args.arch}_{args.device.split(':')[0]}"
    )
    rows: list[dict] = []
    payload = {
        "settings": vars(args),
        "what": label,
        "mix": {
            "defaults share": mix.defaults,
            "edits share (img2img, strength 0.5/0.75/1.0)": mix.edits,
            "default": [mix.side, mix.default_steps, 7.5, "default"],
            "custom steps": mix.steps,
            "custom guidance": [3.5, 5.0, 7.5, 9.0],
            "custom schedulers": SCHEDULERS,
            "custom sizes": {str(mix.side): 0.8, str(mix.side * 3 // 2): 0.2},
            "images per request": {"1": 0.85, "2": 0.15},
        },
        "step_cost": cost_spec,
        "default_request_alone_s": alone,
        "default_request_direct": direct,
        "slo_p99_s": slo,
        "batch1_capacity_req_s": capacity,
        "runs": rows,
    }

    async def at(load: float, policy: str) -> dict:
        jobs = workload(mix, load * capacity, args.duration, args.seed)
        pipeline.reset()
        records, _ = await serve(batchers[policy], jobs, drain)
        rows.append(summarise(Run(policy, load, load * capacity, records, pipeline.forwards), slo))
        print(table(rows[-1:], COLUMNS), "\nslowest:", rows[-1]["slowest"], flush=True)
        write(name, payload)  # a run cut short keeps the loads it finished
        return rows[-1]

    for load in loads:
        for policy in policies:
            await at(load, policy)
    # The targets are stated at the highest load `request` sustains: between the grid's last
    # sustained load and the next, bisect on request's runs, then run step at the load found.
    if args.refine and set(policies) == {"request", "step"}:
        low = verdict(rows)["max sustained load (request)"]
        above = [r["load"] for r in rows if r["policy"] == "request" and low is not None and r["load"] > low]
        if above:
            high = min(above)
            for _ in range(args.refine):
                mid = round((low + high) / 2, 3)
                if (await at(mid, "request"))["sustained"]:
                    low = mid
                else:
                    high = mid
            if not any(r["load"] == low and r["policy"] == "step" for r in rows):
                await at(low, "step")

    summary = verdict(rows)
    print(json.dumps(summary, indent=2))
    payload["summary"] = summary
    print(f"wrote {write(name, payload)}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
