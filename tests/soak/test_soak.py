"""Soaks: real `sdserve serve` processes (the tiny model) under a random mix of what clients do,
for a minute or more each; opt-in with --run-soak (`make soak`), SDOP_SOAK_SECONDS sets the
load's length (default 60) and SDOP_SOAK_SEED the clients' random choices (default 0; another
seed is another mix, and a failing one replays).

Each unit and integration test drives one path at a time. A soak runs them all at once, at
random, where threads and shared objects meet: it found the tokenizer the request path shared
with the model's thread (a batch's negative prompts encoded 2 tokens long, a 500), which no
test alone could. What must hold after any mix:
- no answer is a 5xx other than 503 (draining, out of memory) or 504 (timeout); a 429 carries
  Retry-After; a bad request is a 4xx;
- every streamed answer ends with its completed event (or the error event of one of those
  503s and 504s), every job's event stream with done;
- once the load stops, the in-flight, queue-depth and model-call-age gauges are 0 and no
  job is in flight; the log holds no traceback and no ERROR line;
- with step batching (bit-identical on the CPU), a seeded request gives one image whatever
  company it kept, with LoRA adapters or without them while others use them;
- jobs on replicas that share Redis all end as succeeded, or cancelled when a cancel was
  sent, through one replica draining (SIGTERM) and another dying (SIGKILL): none fails, none
  is lost; and each one's webhook is delivered (a third fail their first call), saying so.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import io
import json
import os
import random
import signal
import time

import httpx
import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from sdtesting.lora import make_adapter
from sdtesting.procs import RedisProc, ServerProc
from sdtesting.waiting import until
from tests.unit.test_jobs import receiver

pytestmark = pytest.mark.soak

SECONDS = float(os.environ.get("SDOP_SOAK_SECONDS", "60"))
SEED = int(os.environ.get("SDOP_SOAK_SEED", "0"))
SCHEDULERS = ["default", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim"]
SEEDED = {"prompt": "the same", "size": "64x64", "num_inference_steps": 4, "seed": 1234, "scheduler": "euler_a"}
#: The error events that end a stream as 504 and 503 end an answer that is not streamed.
RETRYABLE_STREAM_ERRORS = {"timeout", "draining", "out_of_memory"}
SEEDED_LORA = {**SEEDED, "loras": {"ink": 0.5, "pixel": 1.0}}
BAD = [
    {"prompt": "", "size": "64x64"},
    {"prompt": "x", "size": "65x64"},
    {"prompt": "x", "num_inference_steps": 999},
    {"prompt": "x", "n": 50},
    {"prompt": "x", "scheduler": "nope"},
    {"prompt": "x", "partial_images": 2},
    {"prompt": "x", "model": "another"},
]


class Tally:
    """What the clients saw: answers by kind and status, and what broke a rule."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.problems: list[str] = []
        self.seeded_images: dict[str, set[str]] = collections.defaultdict(set)  # by request kind

    def answer(self, kind: str, r: httpx.Response) -> None:
        self.counts[(kind, r.status_code)] += 1
        if r.status_code >= 500 and r.status_code not in (503, 504):
            self.problems.append(f"{kind}: {r.status_code} {r.text[:300]}")
        if r.status_code == 429 and "retry-after" not in r.headers:
            self.problems.append(f"{kind}: a 429 without Retry-After")

    def stream_ended(self, last: str) -> None:
        """A stream that did not complete: its headers (200) went out before the outcome, so a
        timeout, a drain or an out-of-memory (a 504 or 503 unstreamed) ends it with an error event."""
        event, _, data = last.partition("\ndata: ")
        code = json.loads(data)["error"]["code"] if event == "event: error" else None
        if code in RETRYABLE_STREAM_ERRORS:
            self.counts[("stream error", code)] += 1
        else:
            self.problems.append(f"a stream ended with {last[:300]}")

    def report(self) -> str:
        seen = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items(), key=str))
        return f"{len(self.problems)} problems: {self.problems[:20]}\nanswers: {seen}"


def png(side: int, hole: bool = False) -> bytes:
    im = Image.new("RGBA", (side, side), (200, 40, 40, 255))
    if hole:  # a transparent box: the part an inpainting edit repaints
        im.paste((0, 0, 0, 0), (10, 10, 40, 40))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def generation(rng: random.Random) -> dict:
    side = rng.choice([64, 64, 96, 128])
    body = {
        "prompt": rng.choice(["a fox", "a red house", "snow", "a long prompt, " * 30]),
        "size": f"{side}x{rng.choice([side, 64])}",
        "num_inference_steps": rng.randint(2, 8),
        "n": rng.choice([1, 1, 1, 2, 3]),
        "guidance_scale": rng.choice([0, 1, 3.5, 7.5]),
        "scheduler": rng.choice(SCHEDULERS),
    }
    if rng.random() < 0.3:
        body["output_format"] = rng.choice(["jpeg", "webp"])
    if rng.random() < 0.3:
        body["negative_prompt"] = rng.choice(["blurry", "a dog, " * 30])
    if rng.random() < 0.3:  # adapters switch between batches, and steps, that share a set
        body[rng.choice(["lora", "loras"])] = rng.choice(["ink", "pixel"])
        if "loras" in body:
            body["loras"] = rng.choice([{"ink": 1.0}, {"ink": 0.5, "pixel": 1.0}])
    return body


async def a_job(c: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    r = await c.post("/v1/jobs", json={**generation(rng), "preview": rng.random() < 0.5})
    tally.answer("job", r)
    if r.status_code != 202:
        return
    job = r.json()["id"]
    if rng.random() < 0.4:  # followed as server-sent events to its end
        events = await c.get(f"/v1/jobs/{job}/events", timeout=120)
        last = events.text.strip().split("\n\n")[-1]
        if "event: done" not in last or '"succeeded"' not in last:
            tally.problems.append(f"job {job}'s events ended with {last[:300]}")
        return
    cancel_after = rng.uniform(0, 1) if rng.random() < 0.3 else None
    t0 = time.monotonic()
    while True:
        await asyncio.sleep(rng.uniform(0.05, 0.5))
        if cancel_after is not None and time.monotonic() - t0 > cancel_after:
            tally.answer("job cancel", await c.delete(f"/v1/jobs/{job}"))
            cancel_after = None
        view = (await c.get(f"/v1/jobs/{job}")).json()
        if view["status"] in ("succeeded", "failed", "cancelled"):
            tally.counts[("job end", view["status"])] += 1
            if view["status"] == "failed":
                tally.problems.append(f"job {job} failed: {view.get('error')}")
            return
        if time.monotonic() - t0 > 120:
            tally.problems.append(f"job {job} not ended in 120 s: {view}")
            return


async def one_client(url: str, seed: int, stop_at: float, tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        while time.monotonic() < stop_at:
            roll = rng.random()
            try:
                if roll < 0.30:
                    tally.answer("generation", await c.post("/v1/images/generations", json=generation(rng)))
                elif roll < 0.38:
                    kind, body = rng.choice([("seeded", SEEDED), ("seeded with adapters", SEEDED_LORA)])
                    r = await c.post("/v1/images/generations", json=body)
                    tally.answer(kind, r)
                    if r.status_code == 200:
                        tally.seeded_images[kind].add(r.json()["data"][0]["b64_json"])
                elif roll < 0.48:
                    body = {**generation(rng), "stream": True, "partial_images": rng.randint(0, 3)}
                    async with c.stream("POST", "/v1/images/generations", json=body) as r:
                        text = (await r.aread()).decode()
                        tally.answer("stream", r)
                        last = text.strip().split("\n\n")[-1]
                        if r.status_code == 200 and "image_generation.completed" not in last:
                            tally.stream_ended(last)
                elif roll < 0.60:
                    await a_job(c, rng, tally)
                elif roll < 0.70:
                    side = rng.choice([64, 96])
                    files = {"image": ("in.png", png(side), "image/png")}
                    if rng.random() < 0.5:
                        files["mask"] = ("mask.png", png(side, hole=True), "image/png")
                    fields = {
                        "prompt": "an edit",
                        "num_inference_steps": str(rng.randint(2, 6)),
                        "strength": str(rng.choice([0.3, 0.6, 1.0])),
                        "scheduler": rng.choice(SCHEDULERS),
                    }
                    tally.answer("edit", await c.post("/v1/images/edits", files=files, data=fields))
                elif roll < 0.82:  # a client that gives up: its work is dropped
                    try:
                        await c.post("/v1/images/generations", json=generation(rng), timeout=rng.uniform(0.05, 1.0))
                    except httpx.TimeoutException:
                        tally.counts[("given up", 0)] += 1
                elif roll < 0.90:
                    bad = rng.choice(BAD)
                    r = await c.post("/v1/images/generations", json=bad)
                    tally.counts[("bad request", r.status_code)] += 1
                    if not 400 <= r.status_code < 500:
                        tally.problems.append(f"{bad} answered {r.status_code}")
                elif roll < 0.93:  # the seed's own route
                    body = {"prompt": "a fox", "width": 64, "height": rng.choice([64, 96]), "num_inference_steps": 3}
                    tally.answer("/generate", await c.post("/generate", json=body))
                else:
                    tally.answer("get", await c.get(rng.choice(["/healthz", "/readyz", "/v1/models", "/metrics"])))
            except httpx.HTTPError as e:
                tally.problems.append(f"{type(e).__name__}: {e}")


def log_problems(server: ServerProc) -> list[str]:
    return [line[:300] for line in server.log().splitlines() if "Traceback" in line or " ERROR " in line]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> str:
    """Two LoRA adapters for the tiny model, as SDSERVE_LORAS names them."""
    ink, pixel = tmp_path_factory.mktemp("ink"), tmp_path_factory.mktemp("pixel")
    return json.dumps(
        [{"name": "ink", "source": make_adapter(ink, 2)}, {"name": "pixel", "source": make_adapter(pixel, 1)}]
    )


@pytest.mark.parametrize("batching", ["request", "step"])
async def test_a_random_mix_of_everything_clients_do_breaks_no_rule(tmp_path, batching, adapters):
    server = ServerProc(
        tmp_path,
        batching=batching,
        loras=adapters,
        max_batch_size=4,
        queue_size=12,
        max_steps=10,
        max_images=3,
        cache_type="none",
        timeout_seconds=30,
    )
    tally = Tally()
    try:
        await asyncio.to_thread(server.wait)
        stop_at = time.monotonic() + SECONDS
        await asyncio.gather(*(one_client(server.url, SEED * 100 + i, stop_at, tally) for i in range(16)))
        gauges = ("sdserve_inflight_requests", "sdserve_queue_depth", "sdserve_model_call_age_seconds")
        with contextlib.suppress(AssertionError):  # the given-up requests' batches end; checked below
            await until(lambda: not any(server.metric(g) for g in gauges), within=30, what="the server idle")
        for gauge in gauges:
            if (value := server.metric(gauge)) != 0:
                tally.problems.append(f"{gauge} is {value} with no load")
        for status in ("queued", "running"):
            if (value := server.metric("sdserve_jobs_in_flight", status=status)) != 0:
                tally.problems.append(f"sdserve_jobs_in_flight{{status={status}}} is {value} with no load")
        tally.problems += log_problems(server)
    finally:
        server.stop()
    assert not tally.problems, tally.report()
    assert tally.counts[("generation", 200)] and tally.counts[("edit", 200)] and tally.counts[("job end", "succeeded")]
    assert tally.counts[("/generate", 200)] and set(tally.seeded_images) == {"seeded", "seeded with adapters"}
    for images in tally.seeded_images.values():
        if batching == "step":  # padded on the CPU: bit-identical in any company
            assert len(images) == 1, tally.report()
        elif len(images) > 1:  # a batch's rounding depends on its size (docs/serving.md)
            first, *others = (np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in images)
            for other in others:
                assert np.abs(other.astype(int) - first).max() <= 2
    plain, adapted = (next(iter(tally.seeded_images[k])) for k in ("seeded", "seeded with adapters"))
    assert plain != adapted  # the adapters were on for the one, off for the other


@pytest.mark.parametrize("batching", ["request", "step"])
async def test_jobs_end_through_a_replica_draining_and_one_dying_under_load(tmp_path, batching):
    redis = RedisProc(tmp_path)
    shared = {
        "batching": batching,
        "cache_type": "redis",
        "redis_url": redis.url,
        "max_batch_size": 2,
        "queue_size": 8,
        "drain_seconds": 3,
        "job_lease_seconds": 3,
        "max_steps": 10,
        "webhook_allowed_hosts": "127.0.0.1",
        "webhook_backoff_seconds": 4,  # a retry waits long enough to meet the drain or the kill
    }
    jobs: dict[str, bool] = {}  # id -> a cancel was accepted
    tally = Tally()
    hooks: dict[str, list[str]] = collections.defaultdict(list)  # id -> the statuses its webhooks said
    delivered: set[str] = set()

    async def hook(request: web.Request) -> web.Response:
        """Every job's webhook: the first call for a third of them fails (a retry follows)."""
        job = json.loads(await request.read())
        first = not hooks[job["id"]]
        hooks[job["id"]].append(job["status"])
        if first and int(job["id"][-2:], 16) % 3 == 0:
            return web.Response(status=503)
        delivered.add(job["id"])
        return web.Response(status=204)

    stack = contextlib.AsyncExitStack()
    hooks_at = await stack.enter_async_context(receiver(hook))
    started = [ServerProc(tmp_path, **shared), ServerProc(tmp_path, **shared)]
    serving = list(started)

    async def submit(seed: int, stop_at: float) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(timeout=30) as c:
            while time.monotonic() < stop_at:
                live = [s for s in serving if s.proc.poll() is None]
                try:
                    if rng.random() < 0.4:  # a synchronous request: the client waits, which paces it
                        sync = await c.post(rng.choice(live).url + "/v1/images/generations", json=generation(rng))
                        tally.answer("generation", sync)
                        continue
                    body = {**generation(rng), "webhook": {"url": hooks_at}}
                    r = await c.post(rng.choice(live).url + "/v1/jobs", json=body)
                    tally.answer("job", r)
                    if r.status_code == 202:
                        jobs[r.json()["id"]] = False
                        if rng.random() < 0.15:
                            await asyncio.sleep(rng.uniform(0, 1.5))
                            live = [s for s in serving if s.proc.poll() is None]
                            job = r.json()["id"]
                            d = await c.delete(rng.choice(live).url + f"/v1/jobs/{job}")
                            tally.answer("job cancel", d)
                            jobs[job] = d.status_code < 300
                except httpx.TransportError:  # the replica went away under the request
                    tally.counts[("transport error", 0)] += 1
                finally:
                    await asyncio.sleep(rng.uniform(0.1, 0.6))

    async def roll(began: float) -> None:
        """A third of the way in, one replica drains as a rolling update stops it; two thirds
        in, another dies (OOM-killed, its node lost). A new one comes up after each."""
        for at, stop in ((1 / 3, lambda: started[0].proc.send_signal(signal.SIGTERM)), (2 / 3, started[1].proc.kill)):
            await asyncio.sleep(max(0.0, began + at * SECONDS - time.monotonic()))
            stop()
            new = ServerProc(tmp_path, **shared)
            started.append(new)
            await asyncio.to_thread(new.wait)
            serving.append(new)

    try:
        for s in started:
            await asyncio.to_thread(s.wait)
        began = time.monotonic()
        await asyncio.gather(roll(began), *(submit(SEED * 100 + i, began + SECONDS) for i in range(8)))
        assert await asyncio.to_thread(started[0].proc.wait, 60) == 0  # the drained one exited cleanly
        live = [s for s in serving if s.proc.poll() is None]
        async with httpx.AsyncClient(base_url=live[0].url, timeout=10) as c:
            for job, cancelled in jobs.items():
                deadline = time.monotonic() + 120
                while (view := (await c.get(f"/v1/jobs/{job}")).json())["status"] in ("queued", "running"):
                    assert time.monotonic() < deadline, view
                    await asyncio.sleep(0.5)
                tally.counts[("job end", view["status"])] += 1
                # A cancel reaches the runner at its next look: a job can end first.
                if not (view["status"] == "succeeded" or cancelled and view["status"] == "cancelled"):
                    tally.problems.append(f"job {job} (cancel accepted: {cancelled}) ended {view}")
        # Every webhook arrives, those the stopped replicas were retrying too (another takes
        # each over: at once from the drained one, once its lease lapses from the killed one),
        # and says how its job ended.
        with contextlib.suppress(AssertionError):
            await until(lambda: delivered >= set(jobs), within=60, what="every webhook delivered")
        async with httpx.AsyncClient(base_url=live[0].url, timeout=10) as c:
            for job in jobs:
                status = (await c.get(f"/v1/jobs/{job}")).json()["status"]
                if job not in delivered or status not in hooks[job]:
                    tally.problems.append(f"job {job} ended {status}; its webhooks said {hooks[job]}")
                tally.counts[("webhook calls", len(hooks[job]))] += 1
        for s in live:
            for gauge in ("sdserve_inflight_requests", "sdserve_queue_depth"):
                if (value := s.metric(gauge)) != 0:
                    tally.problems.append(f"{s.url} {gauge} is {value} with no load")
        for s in started:
            tally.problems += log_problems(s)
        tally.counts[("webhooks resumed", 0)] = sum(s.log().count("delivering the webhook of job") for s in started)
    finally:
        for s in started:
            s.stop()
        redis.stop()
        await stack.aclose()
    assert not tally.problems, tally.report()
    assert tally.counts[("job end", "succeeded")] > 10, tally.report()
