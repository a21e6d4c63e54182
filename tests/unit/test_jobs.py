"""Async jobs (sdserve.jobs) in-process, on one replica: submit, poll, progress events, cancel,
signed webhooks to allowed hosts only, ownership, the job store's outages and bounds,
Idempotency-Key, listing. Between replicas (hand-off, drains, a replica's death):
test_jobs_replicas.py; Redis sharing between two server processes is in
tests/integration/test_server_redis.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from sdserve.app import create_app
from sdserve.jobs.record import JobRecord
from sdserve.jobs.redisstore import unavailable
from sdserve.jobs.store import MemoryJobs
from sdserve.jobs.webhook import signature
from sdserve.lifecycle import start_drain
from sdserve.settings import Settings
from sdtesting.asgi import metric, serve
from sdtesting.fakes import FakePipeline
from sdtesting.imaging import decode
from sdtesting.waiting import until

BODY = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 4, "seed": 3}


def app(keys, seconds=0.0, **settings):
    base = {"model": "fake", "min_side": 64, "api_keys_file": keys, "webhook_backoff_seconds": 0.05}
    return create_app(Settings(**{**base, **settings}), FakePipeline(seconds_per_call=seconds))


ALICE = {"authorization": "Bearer key-alice"}
BOB = {"authorization": "Bearer key-bob"}


async def until_done(client, job_id, headers=ALICE, within=30.0) -> dict:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        view = (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
        if view["status"] in ("succeeded", "failed", "cancelled"):
            return view
        await asyncio.sleep(0.05)
    raise TimeoutError(job_id)


async def test_a_job_is_accepted_at_once_and_polled_to_its_result(keys):
    async with serve(app(keys, seconds=0.5)) as client:
        r = await client.post("/v1/jobs", json=BODY, headers=ALICE)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] == "queued" and r.headers["location"] == f"/v1/jobs/{job['id']}"
        assert (
            metric("sdserve_jobs_in_flight", status="queued") + metric("sdserve_jobs_in_flight", status="running") == 1
        )
        done = await until_done(client, job["id"])
        assert done["status"] == "succeeded" and done["progress"] == {"step": 4, "steps": 4}
        assert metric("sdserve_jobs_in_flight", status="running") == 0
        (image,) = done["result"]["data"]
        assert image["seed"] == 3 and decode(image["b64_json"]).shape == (64, 64, 3)


async def test_events_stream_progress_then_the_finished_job(keys):
    async with serve(app(keys, seconds=0.6)) as client:
        job = (await client.post("/v1/jobs", json=BODY, headers=ALICE)).json()
        r = await client.get(f"/v1/jobs/{job['id']}/events", headers=ALICE)
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [block for block in r.text.split("\n\n") if block.strip()]
        kinds = [e.split("\n")[0] for e in events]
        assert kinds[0] == "event: progress" and kinds[-1] == "event: done"
        assert json.loads(events[-1].split("data: ", 1)[1])["status"] == "succeeded"


async def test_cancel_of_a_queued_job_and_another_principal_sees_no_job(keys):
    async with serve(app(keys, seconds=1.0, max_batch_size=1)) as client:
        first = (await client.post("/v1/jobs", json=BODY, headers=ALICE)).json()
        second = (await client.post("/v1/jobs", json={**BODY, "seed": 4}, headers=ALICE)).json()
        assert (await client.get(f"/v1/jobs/{second['id']}", headers=BOB)).status_code == 404
        assert (await client.delete(f"/v1/jobs/{second['id']}", headers=BOB)).status_code == 404
        assert (await client.delete(f"/v1/jobs/{second['id']}", headers=ALICE)).status_code == 200
        assert (await until_done(client, second["id"]))["status"] == "cancelled"
        assert (await until_done(client, first["id"]))["status"] == "succeeded"
        assert (await client.get("/v1/jobs/job_nope", headers=ALICE)).status_code == 404


@contextlib.asynccontextmanager
async def receiver(handler) -> AsyncIterator[str]:
    """A webhook receiver on loopback: its URL, ``handler`` answering POST /hook."""
    application = web.Application()
    application.router.add_post("/hook", handler)
    runner = web.AppRunner(application)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # the port bound to 0
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


async def test_a_webhook_is_signed_and_delivered_after_a_failed_attempt(keys):
    received: list[tuple[dict, bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(({k.lower(): v for k, v in request.headers.items()}, await request.read()))
        return web.Response(status=500 if len(received) == 1 else 204)  # the first delivery fails

    async with receiver(hook) as url, serve(app(keys, webhook_allowed_hosts="127.0.0.1")) as client:
        webhook = {"url": url, "secret": "s3cret"}
        before = metric("sdserve_webhooks_total", outcome="delivered")
        job = (await client.post("/v1/jobs", json={**BODY, "webhook": webhook}, headers=ALICE)).json()
        await until_done(client, job["id"])
        for _ in range(100):
            if metric("sdserve_webhooks_total", outcome="delivered") > before:
                break
            await asyncio.sleep(0.05)
    assert len(received) == 2
    headers, body = received[-1]
    assert json.loads(body)["id"] == job["id"] and json.loads(body)["status"] == "succeeded"
    assert "s3cret" not in body.decode()
    ts = headers["x-sdserve-timestamp"]
    assert abs(int(ts) - time.time()) < 60
    assert headers["x-sdserve-signature"] == signature("s3cret", ts, body)
    assert headers["x-sdserve-signature"] != signature("wrong", ts, body)


async def test_a_drain_waits_for_a_finished_job_to_store_and_report_its_end(keys):
    """SIGTERM while a job's images are done but its webhook is still being delivered: the
    drain waits for the job to end (the shutdown that follows cancels what is left), so the
    work is neither lost nor reported as replica_lost."""
    received: list[bytes] = []
    delivering = asyncio.Event()

    async def slow_hook(request: web.Request) -> web.Response:
        delivering.set()
        await asyncio.sleep(0.5)
        received.append(await request.read())
        return web.Response(status=204)

    served = app(keys, webhook_allowed_hosts="127.0.0.1")
    async with receiver(slow_hook) as url, serve(served) as client:
        job = (await client.post("/v1/jobs", json={**BODY, "webhook": {"url": url}}, headers=ALICE)).json()
        await asyncio.wait_for(delivering.wait(), 10)
        assert served.state.sd.batcher.idle  # the model's part is over
        assert await start_drain(served.state.sd)
        assert len(received) == 1 and json.loads(received[0])["id"] == job["id"]


@pytest.mark.parametrize(
    ("allowed", "url"),
    [
        ("", "http://127.0.0.1/hook"),
        ("hooks.example.com", "http://169.254.169.254/latest/meta-data"),
        ("*.example.com", "http://example.com.evil.test/hook"),
        ("hooks.example.com", "file:///etc/passwd"),
    ],
)
async def test_a_webhook_to_a_host_not_allowed_is_refused(keys, allowed, url):
    async with serve(app(keys, webhook_allowed_hosts=allowed)) as client:
        r = await client.post("/v1/jobs", json={**BODY, "webhook": {"url": url}}, headers=ALICE)
        assert r.status_code == 422 and r.json()["error"]["param"] == "webhook.url", r.text


async def test_a_job_with_a_bad_body_is_a_422_naming_the_field(keys):
    async with serve(app(keys)) as client:
        r = await client.post("/v1/jobs", json={**BODY, "size": "64x5000"}, headers=ALICE)
        assert r.status_code == 422 and r.json()["error"]["param"] == "size"
        r = await client.post("/v1/jobs", json={**BODY, "colour": "red"}, headers=ALICE)
        assert r.status_code == 422 and r.json()["error"]["param"] == "colour"


@pytest.mark.parametrize("batching", ["request", "step"])
async def test_a_running_job_is_cancelled_at_its_next_step(keys, batching):
    """Under step batching it leaves the batch; under request batching its batch, which holds
    no other request, ends."""
    async with serve(app(keys, seconds=4.0, batching=batching)) as client:  # 1 s a step
        job = (await client.post("/v1/jobs", json=BODY, headers=ALICE)).json()
        while (await client.get(f"/v1/jobs/{job['id']}", headers=ALICE)).json()["status"] != "running":  # noqa: ASYNC110 - polling the API is the point
            await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await client.delete(f"/v1/jobs/{job['id']}", headers=ALICE)
        done = await until_done(client, job["id"])
        assert done["status"] == "cancelled" and done["progress"]["step"] < 4
        assert time.monotonic() - t0 < 3.5  # well before its 4 steps were done


async def test_an_edit_runs_as_a_job_from_a_multipart_form(keys):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, format="PNG")
    files = {"image": ("in.png", buf.getvalue(), "image/png")}
    async with serve(app(keys, webhook_allowed_hosts="hooks.example.com")) as client:
        form = {"prompt": "a green field", "num_inference_steps": "3", "seed": "8"}
        r = await client.post("/v1/jobs", files=files, data=form, headers=ALICE)
        assert r.status_code == 202, r.text
        done = await until_done(client, r.json()["id"])
        assert done["status"] == "succeeded" and done["result"]["data"][0]["seed"] == 8
        assert decode(done["result"]["data"][0]["b64_json"]).shape == (64, 64, 3)
        bad = {**form, "webhook": json.dumps({"url": "http://10.0.0.1/steal"})}
        r = await client.post("/v1/jobs", files=files, data=bad, headers=ALICE)
        assert r.status_code == 422 and r.json()["error"]["param"] == "webhook.url", r.text


@pytest.mark.parametrize("batching", ["request", "step"])
async def test_an_edit_job_counts_the_steps_its_strength_leaves(tiny, batching):
    """The tiny model, for real: an image-to-image edit at strength 0.5 of 6 steps denoises 3,
    and its progress says 3 of 3 at the end (not 3 of 6)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, format="PNG")
    settings = Settings(model="tiny", min_side=64, batching=batching)
    async with serve(create_app(settings, tiny)) as client:
        form = {"prompt": "a green field", "num_inference_steps": "6", "strength": "0.5", "seed": "8"}
        r = await client.post("/v1/jobs", files={"image": ("in.png", buf.getvalue(), "image/png")}, data=form)
        assert r.status_code == 202, r.text
        assert r.json()["progress"] == {"step": 0, "steps": 3}
        done = await until_done(client, r.json()["id"], headers={})
    assert done["status"] == "succeeded" and done["progress"] == {"step": 3, "steps": 3}, done


@pytest.mark.parametrize("batching", ["request", "step"])
async def test_a_job_that_asks_for_previews_shows_them_while_it_runs(tiny, batching):
    """The tiny model, for real: the preview is its latents as a low-resolution image."""
    settings = Settings(model="tiny", min_side=64, batching=batching)
    async with serve(create_app(settings, tiny)) as client:
        body = {**BODY, "num_inference_steps": 40, "preview": True}
        job = (await client.post("/v1/jobs", json=body)).json()
        r = await client.get(f"/v1/jobs/{job['id']}/events")
    previews = [
        json.loads(e.split("data: ", 1)[1])["preview"]
        for e in r.text.split("\n\n")
        if e.startswith("event: progress") and "preview" in e
    ]
    assert previews, r.text[:500]
    side = 64 // tiny.pipe.vae_scale_factor  # one pixel per latent pixel
    assert decode(previews[-1]["b64_json"]).shape == (side, side, 3)
    assert 0 < previews[-1]["step"] <= 40
    assert '"preview"' not in r.text.split("event: done")[1]  # the finished job has its result instead


async def test_jobs_kept_in_memory_expire_as_in_redis(monkeypatch):
    """Without Redis a replica keeps its jobs (with their images) for SDSERVE_JOB_TTL_SECONDS
    after their last write, as Redis would, not for ever. (The store's clock is the test's.)"""
    import types

    import sdserve.jobs.store

    now = [1000.0]
    monkeypatch.setattr(sdserve.jobs.store, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    store = MemoryJobs(ttl_seconds=0.2)
    old = JobRecord(id="job_old", owner="alice")
    await store.put(old)
    now[0] += 0.15
    await store.put(JobRecord(id="job_new", owner="alice"))
    await store.put(old)  # written again (its progress, say): kept from now
    now[0] += 0.1  # past the first write's expiry
    assert (await store.get("job_old")) is not None and (await store.get("job_new")) is not None
    now[0] += 0.15
    assert (await store.get("job_old")) is None and (await store.get("job_new")) is None
    await store.put(JobRecord(id="job_last", owner="bob"))
    assert list(store._data) == ["job_last"]  # the expired ones are gone from memory too


async def test_jobs_kept_in_memory_are_bounded_in_bytes_oldest_finished_first():
    """Finished records hold their images: past SDSERVE_JOB_MEMORY_BYTES the oldest finished
    ones go (as if expired), never a queued or running job, so a busy day of jobs does not grow
    the replica until it is killed for memory."""
    store = MemoryJobs(ttl_seconds=3600, max_bytes=5 * 10_000)
    running = JobRecord(id="job_running", owner="alice", status="running")
    await store.put(running)
    for i in range(8):  # 8 finished jobs of about 10 kB each through a 50 kB bound
        await store.put(JobRecord(id=f"job_{i}", owner="alice", status="succeeded", images=["x" * 10_000]))
    kept = [i for i in range(8) if await store.get(f"job_{i}") is not None]
    assert kept == [4, 5, 6, 7]  # the newest that fit beside the running one
    assert await store.get("job_running") is not None
    assert store._bytes == sum(len(raw) for _, raw, _, _ in store._data.values()) <= store.max_bytes
    await store.put(running)  # its progress, written again: still counted once
    assert store._bytes == sum(len(raw) for _, raw, _, _ in store._data.values())


class Flaky(MemoryJobs):
    """A job store that can go away (as Redis restarting): every call is the store's 503 while down."""

    def __init__(self) -> None:
        super().__init__(3600)
        self.down = False

    async def get(self, job_id: str) -> JobRecord | None:
        if self.down:
            raise unavailable(ConnectionError("connection refused"))
        return await super().get(job_id)

    async def put(self, record: JobRecord, spec: str | None = None) -> None:
        if self.down:
            raise unavailable(ConnectionError("connection refused"))
        await super().put(record, spec)


async def running_when_the_store_goes(served, client) -> tuple[Flaky, dict]:
    """A job submitted to ``served`` with a Flaky store, which goes away once the job runs."""
    store = served.state.sd.jobs.store = Flaky()
    job = (await client.post("/v1/jobs", json=BODY, headers=ALICE)).json()
    batcher = served.state.sd.batcher
    await until(lambda: batcher.inflight == 1, what="the job runs")
    store.down = True
    return store, job


async def test_a_job_runs_on_through_an_outage_of_its_store_and_stores_its_end_after_it(keys):
    """The store goes away while the job runs and is still away when its images are done: the
    polls that fail are skipped (not a failed job), and its end is written once the store is
    back. Before, the first failed poll failed the job and its end was lost with the store."""
    served = app(keys, seconds=1.0)
    async with serve(served) as client:
        store, job = await running_when_the_store_goes(served, client)
        await until(lambda: served.state.sd.batcher.idle, what="the fake model's second ends, the store still away")
        store.down = False
        done = await until_done(client, job["id"])
        assert done["status"] == "succeeded" and done["result"]["data"][0]["seed"] == 3


async def test_a_job_reported_lost_while_its_store_was_away_stays_failed(keys):
    """Its lease ran out during the outage and another replica told a reader ``replica_lost``:
    that answer stands. The job stops at its next poll and writes nothing over it."""
    served = app(keys, seconds=1.5)
    async with serve(served) as client:
        store, job = await running_when_the_store_goes(served, client)
        lost = await MemoryJobs.get(store, job["id"])
        assert lost is not None
        lost.status, lost.error = "failed", {"code": "replica_lost", "message": "lost"}
        await MemoryJobs.put(store, lost)  # what another replica's reader wrote
        store.down = False
        await until(lambda: not served.state.sd.jobs.runs(job["id"]), what="the job stops at its next poll")
        view = (await client.get(f"/v1/jobs/{job['id']}", headers=ALICE)).json()
        assert view["status"] == "failed" and view["error"]["code"] == "replica_lost"
        assert not served.state.sd.jobs.runs(job["id"])


def images(answer: dict) -> list[tuple[str, int]]:
    return [(d["b64_json"], d["seed"]) for d in answer["data"]]


async def test_seeded_jobs_share_the_result_cache_with_synchronous_requests(keys):
    """A seeded job whose request was answered before (synchronously or as a job) is served
    from the cache without running the model; a job's result fills the cache in turn."""
    served = app(keys, cache_type="memory")
    async with serve(served) as client:
        sync = await client.post("/v1/images/generations", json=BODY, headers=ALICE)
        assert sync.status_code == 200, sync.text
        generated = metric("sdserve_images_generated_total")
        job = (await client.post("/v1/jobs", json=BODY, headers=ALICE)).json()
        done = await until_done(client, job["id"])
        assert done["status"] == "succeeded" and images(done["result"]) == images(sync.json())
        assert metric("sdserve_images_generated_total") == generated  # from the cache
        other = {**BODY, "seed": 11}
        first = await until_done(client, (await client.post("/v1/jobs", json=other, headers=ALICE)).json()["id"])
        assert metric("sdserve_images_generated_total") == generated + 1
        again = await client.post("/v1/images/generations", json=other, headers=ALICE)
        assert images(again.json()) == images(first["result"])
        assert metric("sdserve_images_generated_total") == generated + 1


async def test_the_event_stream_stays_open_through_an_outage_of_the_job_store(keys):
    """It asked the store every 0.25 s and died with the first 503 (a broken stream, which an
    EventSource then retries against a store still away). Now it asks again every second
    and ends with ``done`` once the store is back."""
    served = app(keys, seconds=1.0)
    async with serve(served) as client:
        store = served.state.sd.jobs.store = Flaky()
        job = (await client.post("/v1/jobs", json=BODY, headers=ALICE)).json()
        events = asyncio.create_task(client.get(f"/v1/jobs/{job['id']}/events", headers=ALICE))
        await asyncio.sleep(0.3)
        store.down = True
        await asyncio.sleep(2.0)
        assert not events.done()
        store.down = False
        body = (await asyncio.wait_for(events, 10)).text
        assert "event: progress" in body and "event: done" in body and '"succeeded"' in body


async def test_the_event_stream_ends_with_an_error_event_when_the_job_is_gone():
    class Forgetful(MemoryJobs):
        def __init__(self) -> None:
            super().__init__(3600)
            self.forgotten: set[str] = set()

        async def get(self, job_id: str) -> JobRecord | None:
            return None if job_id in self.forgotten else await super().get(job_id)

    served = app(None, seconds=1.0)
    async with serve(served) as client:
        store = served.state.sd.jobs.store = Forgetful()
        job = (await client.post("/v1/jobs", json=BODY)).json()
        events = asyncio.create_task(client.get(f"/v1/jobs/{job['id']}/events"))
        await asyncio.sleep(0.3)
        store.forgotten.add(job["id"])  # past its TTL, say
        last = (await asyncio.wait_for(events, 10)).text.strip().split("\n\n")[-1]
        assert last.startswith("event: error") and '"job_not_found"' in last


def test_a_record_written_by_another_version_reads_without_the_fields_this_one_lacks():
    """During a rolling update, replicas of two versions share one Redis: a record with a field
    this version does not know (a newer one's) is read, not a 500."""
    stored = json.dumps({"id": "job_1", "owner": "k", "status": "succeeded", "seeds": [3], "added_later": [1]})
    record = JobRecord.parse(stored)
    assert (record.id, record.status, record.seeds, record.output_format) == ("job_1", "succeeded", [3], "png")


async def test_a_burst_of_jobs_waits_for_room_in_order_and_leaves_half_the_queue_to_requests(keys):
    """Jobs past the queue's room were accepted (202) and then failed with queue_full. Now they
    wait, counted in the queue depth the autoscaler reads, and queue one at a time in the order
    they came while fewer than half of queue_size requests are queued; an interactive request
    still finds room meanwhile; a job cancelled while it waits never reaches the model; past
    job_queue_size unfinished jobs, POST /v1/jobs is a 429."""
    fake = FakePipeline(seconds_per_call=0.3)  # slow enough that none ends while the burst is sent
    settings = Settings(
        model="fake",
        min_side=64,
        api_keys_file=keys,
        queue_size=4,
        max_batch_size=1,
        job_queue_size=8,
        cache_type="none",
    )
    async with serve(create_app(settings, fake)) as client:
        ids = []
        for i in range(8):
            r = await client.post("/v1/jobs", json={**BODY, "prompt": f"job {i}"}, headers=ALICE)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        full = await client.post("/v1/jobs", json={**BODY, "prompt": "job 8"}, headers=ALICE)
        assert (
            full.status_code == 429 and full.json()["error"]["code"] == "too_many_jobs" and full.headers["retry-after"]
        )
        await asyncio.sleep(0.05)
        assert metric("sdserve_queue_depth") >= 6  # two queued, the rest waiting for room: all demand
        cancelled = (await client.delete(f"/v1/jobs/{ids[7]}", headers=ALICE)).json()
        interactive = await client.post("/v1/images/generations", json={**BODY, "prompt": "now"}, headers=ALICE)
        assert interactive.status_code == 200, interactive.text  # the other half of the queue was its
        done = [await until_done(client, job_id) for job_id in ids]
        assert [d["status"] for d in done] == ["succeeded"] * 7 + ["cancelled"]
    assert cancelled["status"] in ("queued", "cancelled")
    ran = [prompt for method, prompt, _ in fake.threads if method in ("run", "begin")]  # a batch, or a start
    assert [p for p in ran if p.startswith("job")] == [f"job {i}" for i in range(7)], ran  # in order; job 7 never ran
    assert ran.index("now") < ran.index("job 6")  # the request did not wait behind every job


async def test_an_idempotency_key_makes_a_retried_submission_answer_its_first_job(keys):
    """A client that retries POST /v1/jobs (its connection dropped after the 202) with the same
    Idempotency-Key gets the job it made, not a second one, even when both arrive at once; the
    key with another request behind it is a 422; another principal's same key is its own."""
    fake = FakePipeline(seconds_per_call=0.05)
    settings = Settings(model="fake", min_side=64, api_keys_file=keys, cache_type="none")
    async with serve(create_app(settings, fake)) as client:
        key = {"idempotency-key": "render-9f2"}
        a, b = await asyncio.gather(
            client.post("/v1/jobs", json=BODY, headers={**ALICE, **key}),
            client.post("/v1/jobs", json=BODY, headers={**ALICE, **key}),
        )
        assert a.status_code == b.status_code == 202 and a.json()["id"] == b.json()["id"]
        assert {a.headers.get("idempotent-replayed"), b.headers.get("idempotent-replayed")} == {None, "true"}
        await until_done(client, a.json()["id"])
        later = await client.post("/v1/jobs", json=BODY, headers={**ALICE, **key})
        assert later.json()["id"] == a.json()["id"] and later.json()["status"] == "succeeded"
        other = await client.post("/v1/jobs", json={**BODY, "prompt": "another"}, headers={**ALICE, **key})
        assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
        bobs = await client.post("/v1/jobs", json=BODY, headers={**BOB, **key})
        assert bobs.status_code == 202 and bobs.json()["id"] != a.json()["id"]
        await until_done(client, bobs.json()["id"], headers=BOB)
        bad = await client.post("/v1/jobs", json=BODY, headers={**ALICE, "idempotency-key": "x" * 300})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "Idempotency-Key"
    assert len(fake.calls) == 2  # Alice's one job and Bob's: the model ran for no retry


async def test_an_idempotency_key_refused_with_a_429_stays_free_for_the_retry(keys):
    """A keyed submission refused (too many jobs) made no job: its retry must make one, not
    wait for a job that never was and answer 404."""
    settings = Settings(model="fake", min_side=64, api_keys_file=keys, cache_type="none", job_queue_size=1)
    async with serve(create_app(settings, FakePipeline(seconds_per_call=0.3))) as client:
        first = (await client.post("/v1/jobs", json=BODY, headers=ALICE)).json()
        key = {**ALICE, "idempotency-key": "k-1"}
        refused = await client.post("/v1/jobs", json={**BODY, "seed": 8}, headers=key)
        assert refused.status_code == 429
        await until_done(client, first["id"])
        retried = await client.post("/v1/jobs", json={**BODY, "seed": 8}, headers=key)
        assert retried.status_code == 202 and "idempotent-replayed" not in retried.headers
        assert (await until_done(client, retried.json()["id"]))["status"] == "succeeded"


async def test_waiting_jobs_take_turns_by_principal(keys):
    """Jobs waiting for room queue round robin over their principals (arrival order within
    one): Bob's two jobs, sent after Alice's six, do not wait for all of hers."""
    fake = FakePipeline(seconds_per_call=0.3)  # none of hers ends before his arrive
    settings = Settings(
        model="fake", min_side=64, api_keys_file=keys, queue_size=2, max_batch_size=1, cache_type="none"
    )
    async with serve(create_app(settings, fake)) as client:
        alice = [
            (await client.post("/v1/jobs", json={**BODY, "prompt": f"alice {i}"}, headers=ALICE)).json()
            for i in range(6)
        ]
        bob = [
            (await client.post("/v1/jobs", json={**BODY, "prompt": f"bob {i}"}, headers=BOB)).json() for i in range(2)
        ]
        for job in alice:
            assert (await until_done(client, job["id"]))["status"] == "succeeded"
        for job in bob:
            assert (await until_done(client, job["id"], headers=BOB))["status"] == "succeeded"
    ran = [prompt for method, prompt, _ in fake.threads if method in ("run", "begin")]
    assert [p for p in ran if p.startswith("alice")] == [f"alice {i}" for i in range(6)]  # her order kept
    assert ran.index("bob 0") < ran.index("alice 4") and ran.index("bob 1") < ran.index("alice 5"), ran


async def test_the_caller_lists_its_own_jobs_newest_first_a_page_at_a_time(keys):
    """GET /v1/jobs: a client that lost its job ids finds them again; pages follow ``after``;
    no other principal's job appears, and no images (one GET away)."""
    async with serve(app(keys)) as client:
        mine = [(await client.post("/v1/jobs", json={**BODY, "seed": i}, headers=ALICE)).json()["id"] for i in range(5)]
        theirs = (await client.post("/v1/jobs", json=BODY, headers=BOB)).json()["id"]
        for job_id in mine:
            await until_done(client, job_id)
        first = (await client.get("/v1/jobs", params={"limit": 3}, headers=ALICE)).json()
        assert [j["id"] for j in first["data"]] == mine[::-1][:3] and first["has_more"] is True
        assert all(j["status"] == "succeeded" and "result" not in j for j in first["data"])
        rest = (await client.get("/v1/jobs", params={"limit": 3, "after": first["last_id"]}, headers=ALICE)).json()
        assert [j["id"] for j in rest["data"]] == mine[::-1][3:] and rest["has_more"] is False
        assert [j["id"] for j in (await client.get("/v1/jobs", headers=BOB)).json()["data"]] == [theirs]
        other = await client.get("/v1/jobs", params={"after": theirs}, headers=ALICE)
        assert other.status_code == 404 and other.json()["error"]["param"] == "after", other.text
        assert (await client.get("/v1/jobs", params={"limit": 500}, headers=ALICE)).json()["error"]["param"] == "limit"


async def test_a_cancel_sent_while_the_runner_writes_its_progress_is_kept(keys, monkeypatch):
    """The runner's poll renders a job's preview off the event loop between its look at the
    stored record and its write. A DELETE landing there was written over: the job ran on to
    succeeded, its cancel lost. The runner's write now keeps a cancel stored since its look."""
    from sdserve.work import Item

    rendering, release = threading.Event(), threading.Event()

    def held(item: Item) -> str | None:
        rendering.set()
        release.wait(10)
        return None

    monkeypatch.setattr(Item, "preview_png", held)
    async with serve(app(keys, seconds=3.0)) as client:
        job = (await client.post("/v1/jobs", json={**BODY, "preview": True}, headers=ALICE)).json()
        await until(rendering.is_set, what="the runner's poll rendering the preview")
        cancelled = await client.delete(f"/v1/jobs/{job['id']}", headers=ALICE)
        assert cancelled.status_code == 200 and cancelled.json()["status"] in ("queued", "running")
        release.set()
        done = await until_done(client, job["id"])
    assert done["status"] == "cancelled", done


async def test_a_cancel_does_not_write_over_an_end_stored_since_it_looked(keys):
    """DELETE reads the job, then writes the cancel. An end stored in between (the runner's
    last write) was written over with the running record it had read: the images were lost and
    the job, its lease lapsing, was run again or reported lost. Now the cancel is not written
    over an end, and the answer is that end."""
    from sdserve.jobs.record import JobRecord

    class EndsMeanwhile(MemoryJobs):
        end_on_look = False

        async def get(self, job_id: str) -> JobRecord | None:
            seen = await super().get(job_id)
            if self.end_on_look and seen is not None:  # the job's end lands right after the look
                self.end_on_look = False
                ended = JobRecord.parse(
                    json.dumps({**seen.__dict__, "status": "succeeded", "seeds": [3], "images": ["aW1n"]})
                )
                await self.put(ended)
            return seen

    served = app(keys, seconds=2.0)
    store = served.state.sd.jobs.store = EndsMeanwhile(3600)
    async with serve(served) as client:
        job = (await client.post("/v1/jobs", json=BODY, headers=ALICE)).json()
        await until(lambda: served.state.sd.batcher.inflight == 1, what="the job runs")
        store.end_on_look = True
        answer = await client.delete(f"/v1/jobs/{job['id']}", headers=ALICE)
        assert answer.status_code == 200 and answer.json()["status"] == "succeeded", answer.json()
        stored = await MemoryJobs.get(store, job["id"])
        assert stored.status == "succeeded" and stored.images == ["aW1n"]
