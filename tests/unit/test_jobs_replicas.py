"""Async jobs between replicas sharing a job store (in-process: one store for two apps; Redis
between two server processes is in tests/integration/test_server_redis.py): a draining
replica hands its jobs off, a drain out of time drops what would not end, the jobs offered
count in the queue depth, a dead replica's jobs are run again or failed and reported."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from sdserve.app import create_app
from sdserve.jobs.record import JobRecord
from sdserve.jobs.store import MemoryJobs
from sdserve.lifecycle import start_drain
from sdserve.settings import Settings
from sdtesting.asgi import metric, serve
from sdtesting.fakes import FakePipeline
from sdtesting.waiting import until
from tests.unit.test_jobs import ALICE, BODY, app, receiver, until_done


async def test_a_draining_replica_ends_the_event_stream_of_another_replicas_job(keys):
    """With Redis, any replica streams any job's events. One that is shutting down ends the
    stream of a job it does not run with a retry hint, so the client reconnects elsewhere and
    the shutdown does not wait for that job; a job it runs streams on to its end."""
    served = app(keys, seconds=1.0)
    elsewhere = JobRecord(id="job_elsewhere", owner="alice", status="running", steps=4)
    elsewhere.lease_until = time.time() + 3600  # its replica renews the lease
    async with serve(served) as client:
        state = served.state.sd
        await state.jobs.store.put(elsewhere)
        mine = (await client.post("/v1/jobs", json=BODY, headers=ALICE)).json()
        theirs = asyncio.create_task(client.get("/v1/jobs/job_elsewhere/events", headers=ALICE))
        ours = asyncio.create_task(client.get(f"/v1/jobs/{mine['id']}/events", headers=ALICE))
        await asyncio.sleep(0.3)
        assert not theirs.done() and not ours.done()
        drained = asyncio.create_task(start_drain(state))
        body = (await asyncio.wait_for(theirs, 5)).text
        assert body.rstrip().endswith("retry: 1000") and "event: done" not in body
        assert "event: done" in (await asyncio.wait_for(ours, 10)).text  # this replica's job ends first
        assert await drained


def drain_settings(keys: str) -> Settings:
    """Room in the queue for one job (half of 2), one image a batch: a burst of jobs waits."""
    return Settings(model="fake", min_side=64, api_keys_file=keys, queue_size=2, max_batch_size=1, cache_type="none")


async def test_a_replica_shutting_down_hands_the_jobs_it_has_not_queued_to_another(keys):
    """A rolling update drains a replica with a backlog of jobs waiting for room. With a store
    the replicas share (Redis; here one in-process store for two apps), the draining one runs
    what it queued and hands the rest off: they stay queued under their ids, the next replica
    takes them up oldest first and runs them with their own seeds; one cancelled while no
    replica holds it is cancelled at once and never runs."""
    shared = MemoryJobs(3600, shared=True)
    leaving, taking = FakePipeline(seconds_per_call=0.6), FakePipeline(seconds_per_call=0.05)
    a, b = create_app(drain_settings(keys), leaving), create_app(drain_settings(keys), taking)
    a.state.sd.jobs.store = b.state.sd.jobs.store = shared
    handed, adopted = metric("sdserve_jobs_total", event="handed_off"), metric("sdserve_jobs_total", event="adopted")
    async with serve(a) as ca:
        ids = []
        for i in range(5):
            r = await ca.post("/v1/jobs", json={**BODY, "prompt": f"job {i}", "seed": 10 + i}, headers=ALICE)
            ids.append(r.json()["id"])
        batcher = a.state.sd.batcher
        await until(lambda: (batcher.inflight, batcher.depth, batcher.waiting) == (1, 1, 3), what="0 runs, 1 queued")
        assert await start_drain(a.state.sd)
        views = [(await ca.get(f"/v1/jobs/{i}", headers=ALICE)).json() for i in ids]
        assert [v["status"] for v in views] == ["succeeded"] * 2 + ["queued"] * 3, views
        assert metric("sdserve_jobs_total", event="handed_off") - handed == 3
        cancelled = (await ca.delete(f"/v1/jobs/{ids[4]}", headers=ALICE)).json()
        assert cancelled["status"] == "cancelled"
        deadline = time.monotonic() + 5
        while metric("sdserve_jobs_offered") != 2:  # every replica reports the store's count
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    async with serve(b) as cb:
        done = [await until_done(cb, i) for i in ids]
    assert [d["status"] for d in done] == ["succeeded"] * 4 + ["cancelled"], [d.get("error") for d in done]
    assert [d["result"]["data"][0]["seed"] for d in done[:4]] == [10, 11, 12, 13]
    assert metric("sdserve_jobs_total", event="adopted") - adopted == 2
    assert metric("sdserve_jobs_offered") == 0
    ran = [prompt for method, prompt, _ in taking.threads if method in ("run", "begin")]
    assert ran == ["job 2", "job 3"], ran  # oldest first; the cancelled one never ran
    assert not any(p in ("job 2", "job 3", "job 4") for _, p, _ in leaving.threads)


async def test_jobs_no_replica_has_taken_up_count_in_the_queue_depth_each_live_replica_its_share(keys):
    """Jobs offered and not taken up (here none is: no replica has room, say) are demand in no
    pod's queue: each live replica adds offered / live replicas to sdserve_queue_depth, so the
    autoscaler's sum over the pods counts them once. A draining replica leaves the count."""
    from sdserve.jobs.service import ALIVE_SECONDS

    class Held(MemoryJobs):
        async def take(self) -> tuple[str, str] | None:
            return None

    store = Held(3600, shared=True)
    served = create_app(drain_settings(keys), FakePipeline(seconds_per_call=0.05))
    served.state.sd.jobs.store = store

    async def depth_becomes(value: float) -> None:
        deadline = time.monotonic() + 5
        while metric("sdserve_queue_depth") != value:
            assert time.monotonic() < deadline, metric("sdserve_queue_depth")
            await asyncio.sleep(0.1)

    async with serve(served):
        for i in range(4):
            await store.offer(f"job_{i}", float(i))
        await store.beat("replica-b", time.time() + 60, ALIVE_SECONDS)  # another replica, alive
        await depth_becomes(2.0)  # 4 offered over 2 live replicas
        await store.leave("replica-b")
        await depth_becomes(4.0)  # the only one left: all of them
        assert await start_drain(served.state.sd)
        await depth_becomes(0.0)  # draining: out of the count, its share to whoever is left
        assert served.state.sd.jobs.me not in store._replicas


async def test_a_job_naming_what_is_no_longer_served_fails_naming_it_when_taken_up(keys):
    """A rolling update changed the model or removed a LoRA adapter while a job that names it
    waited for a replica: the replica that takes it up fails it at once, naming the model
    (model_not_found) or the adapters (unknown_lora) and the field; run, it would run on
    another model, or fail inside diffusers. A job naming what is served, or no model, runs."""
    from sdserve.jobs.spec import spec_of
    from sdserve.steps import Generation
    from sdserve.work import BatchKey

    store = MemoryJobs(3600, shared=True)
    served = app(keys)  # no adapters
    served.state.sd.jobs.store = store
    jobs = {
        "job_ink": ((("ink", 0.5), ("pixel", 1.0)), None),
        "job_old_model": ((), "org/old-model"),
        "job_named": ((), "fake"),  # the model served now
        "job_plain": ((), None),
    }
    for job_id, (loras, model) in jobs.items():
        key = BatchKey(64, 64, 4, 7.5, "default", loras=loras)
        record = JobRecord(id=job_id, owner="alice", steps=4, lease_until=time.time() + 3600, offered=time.time())
        await store.put(record, spec_of(Generation(key, "a fox", None, 1, 5, principal="alice", model=model), False))
        await store.offer(job_id, record.created)
    async with serve(served) as client:
        ends = {job_id: await until_done(client, job_id) for job_id in jobs}
    assert ends["job_named"]["status"] == ends["job_plain"]["status"] == "succeeded", ends
    lora, model = ends["job_ink"], ends["job_old_model"]
    assert lora["status"] == "failed" and lora["error"]["code"] == "unknown_lora", lora
    assert lora["error"]["param"] == "loras" and "'ink', 'pixel'" in lora["error"]["message"], lora
    assert model["status"] == "failed" and model["error"]["code"] == "model_not_found", model
    assert model["error"]["param"] == "model" and "'org/old-model'" in model["error"]["message"], model
    assert "'fake'" in model["error"]["message"], model


async def test_a_replica_that_adopts_no_jobs_leaves_them_and_their_share_to_the_others(keys):
    """SDSERVE_JOB_ADOPT=false (a canary's: another model, a share of the traffic): jobs offered
    by a replica that shut down or died are not taken up there, and it is not counted among the
    replicas that share them in sdserve_queue_depth. A replica that adopts takes them."""
    store = MemoryJobs(3600, shared=True)
    spec = json.dumps({"v": 0})  # never read: the canary must not take the job

    canary_app = app(keys, job_adopt=False)
    canary = canary_app.state.sd
    canary.jobs.store = store
    async with serve(canary_app):
        offered = JobRecord(id="job_offered", owner="alice", offered=time.time(), lease_until=time.time() + 60)
        await store.put(offered, spec)
        await store.offer(offered.id, offered.created)
        await asyncio.sleep(2.5)  # two looks for jobs to take up
        assert await store.offered() == 1 and not canary.jobs.runs(offered.id)
        assert canary.jobs.me not in store._replicas and canary.batcher.offered_share == 0.0
    adopter = app(keys)
    adopter.state.sd.jobs.store = store
    async with serve(adopter):
        deadline = time.monotonic() + 10
        while await store.offered():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    assert (await store.get(offered.id)).status == "failed"  # taken up, and its spec refused there


async def test_a_drain_out_of_time_hands_off_a_queued_job_and_refuses_a_queued_request(keys):
    """A drain that runs out of time (a batch longer than SDSERVE_DRAIN_SECONDS) drops what is
    still queued rather than leave it to be cut off at exit: a queued async job is handed off
    at once (not after its lease lapses), a queued request gets a 503 ``draining`` its client
    can retry elsewhere. The running one is left to finish."""
    shared = MemoryJobs(3600, shared=True)
    settings = drain_settings(keys).model_copy(update={"drain_seconds": 0.3})
    served = create_app(settings, FakePipeline(seconds_per_call=3.0))
    served.state.sd.jobs.store = shared
    handed = metric("sdserve_jobs_total", event="handed_off")
    async with serve(served) as client:
        batcher = served.state.sd.batcher
        running = asyncio.create_task(client.post("/v1/images/generations", json=BODY, headers=ALICE))
        await until(lambda: batcher.inflight == 1, what="a request runs")
        job = (await client.post("/v1/jobs", json={**BODY, "seed": 5}, headers=ALICE)).json()
        # Queued behind the running request (room for one job: half of 2).
        await until(lambda: batcher.depth == 1, what="the job is queued")
        queued = asyncio.create_task(client.post("/v1/images/generations", json=BODY, headers=ALICE))
        await until(lambda: batcher.depth == 2, what="a request is queued behind the job")
        assert not await start_drain(served.state.sd)  # out of time
        refused = await asyncio.wait_for(queued, 5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining", refused.text
        view = (await client.get(f"/v1/jobs/{job['id']}", headers=ALICE)).json()
        assert view["status"] == "queued" and metric("sdserve_jobs_total", event="handed_off") - handed == 1, view
        assert (await shared.get(job["id"])).offered > 0  # another replica's to take up now
        assert (await asyncio.wait_for(running, 10)).status_code == 200


async def test_a_drain_out_of_time_stops_running_work_that_would_not_end_before_the_exit(keys, monkeypatch):
    """Running work that would not end within the seconds the server has after a drain out of
    time stops at its next step rather than be cut off at exit: a request gets a 503
    ``draining`` its client can retry elsewhere, a job is handed off at once (not failed as
    ``replica_lost`` once its lease lapses) and another replica runs it from its first step,
    with its seed. (Work that would end in time ends: the test above.)"""
    from sdserve import lifecycle

    monkeypatch.setattr(lifecycle, "AFTER_DRAIN_SECONDS", 1.0)
    shared = MemoryJobs(3600, shared=True)
    settings = Settings(
        model="fake", min_side=64, api_keys_file=keys, queue_size=4, max_batch_size=2, max_wait_ms=300,
        cache_type="none", drain_seconds=0.3,
    )  # fmt: skip
    leaving, taking = FakePipeline(seconds_per_call=20.0), FakePipeline(seconds_per_call=0.05)  # 0.5 s a step
    a, b = create_app(settings, leaving), create_app(settings, taking)
    a.state.sd.jobs.store = b.state.sd.jobs.store = shared
    long = {**BODY, "num_inference_steps": 40}
    handed = metric("sdserve_jobs_total", event="handed_off")
    dropped = metric("sdserve_requests_cancelled_total", reason="drain_timeout")
    async with serve(a) as ca:
        job = (await ca.post("/v1/jobs", json={**long, "seed": 5}, headers=ALICE)).json()
        request = asyncio.create_task(ca.post("/v1/images/generations", json=long, headers=ALICE))
        deadline = time.monotonic() + 5
        while a.state.sd.batcher.inflight < 2:  # both running (one batch, under request batching)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        t0 = time.monotonic()
        assert not await start_drain(a.state.sd)  # out of time, 39 steps (~20 s) from the end
        refused = await asyncio.wait_for(request, 5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining", refused.text
        assert time.monotonic() - t0 < 3  # at the next step, not at the end of its 40
        view = (await ca.get(f"/v1/jobs/{job['id']}", headers=ALICE)).json()
        assert view["status"] == "queued" and view["progress"]["step"] == 0, view
        assert metric("sdserve_jobs_total", event="handed_off") - handed == 1
        assert metric("sdserve_requests_cancelled_total", reason="drain_timeout") - dropped == 2
        assert a.state.sd.batcher.inflight == 0
    async with serve(b) as cb:
        done = await until_done(cb, job["id"])
    assert done["status"] == "succeeded" and done["result"]["data"][0]["seed"] == 5, done
    assert (await shared.get(job["id"])).attempts == 2
    assert [p for m, p, _ in taking.threads if m in ("run", "begin")] == [BODY["prompt"]]


async def test_without_a_shared_store_a_drain_fails_the_jobs_it_has_not_queued(keys):
    """One replica's own store: no other replica could take a job up, so a job still waiting
    for room when the replica shuts down fails at once, saying why."""
    served = create_app(drain_settings(keys), FakePipeline(seconds_per_call=0.3))
    async with serve(served) as client:
        ids = [(await client.post("/v1/jobs", json=BODY, headers=ALICE)).json()["id"] for _ in range(3)]
        batcher = served.state.sd.batcher
        await until(lambda: (batcher.inflight, batcher.depth, batcher.waiting) == (1, 1, 1), what="1 runs, 1 queued")
        assert await start_drain(served.state.sd)
        views = [(await client.get(f"/v1/jobs/{i}", headers=ALICE)).json() for i in ids]
    assert [v["status"] for v in views] == ["succeeded", "succeeded", "failed"]
    assert views[2]["error"]["code"] == "draining"


def test_a_handed_off_edit_keeps_its_input_image_and_mask_to_the_pixel():
    """What a replica taking a job up reads is the request the first one validated: the key,
    the prompts, the seed, the output format and an edit's images, unchanged."""
    import numpy as np
    from PIL import Image

    from sdserve.encode import ImageFormat
    from sdserve.jobs.spec import generation_of, spec_of
    from sdserve.steps import Generation
    from sdserve.work import BatchKey

    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    mask = Image.fromarray((rng.random((64, 96)) > 0.5).astype(np.uint8) * 255, mode="L")
    key = BatchKey(96, 64, 20, 6.0, "euler", task="inpaint", strength=0.9, loras=(("pixel", 0.8),))
    gen = Generation(key, "a fox", "blurry", 2, 77, photo, mask, "abc", True, ImageFormat("webp", 70), "alice", "m/1")
    again, urls = generation_of(spec_of(gen, True))
    assert again.model == "m/1"
    assert urls is True and again.key == key and hash(again.key) == hash(key)
    assert (again.prompt, again.negative_prompt, again.n, again.seed) == ("a fox", "blurry", 2, 77)
    assert (again.inputs_digest, again.preview, again.output, again.principal) == ("abc", True, gen.output, "alice")
    assert np.array_equal(np.asarray(again.init_image), np.asarray(photo))
    assert again.mask_image.mode == "L" and np.array_equal(np.asarray(again.mask_image), np.asarray(mask))
    plain, _ = generation_of(spec_of(Generation(key, "a fox", None, 1, None), False))
    assert plain.init_image is None and plain.seed is None
    with pytest.raises(ValueError, match="spec version 2"):
        generation_of(json.dumps({"v": 2}))


async def test_the_jobs_of_a_replica_that_died_run_elsewhere_and_webhooks_say_so(keys):
    """A replica killed with jobs (no drain, nothing handed off): once their leases lapse, a
    replica sharing the store finds them by itself (nobody polls them: the client waits for
    its webhook) and runs them, with their seeds: those that never started, and the one that
    was running, from its first step. A job whose replica died while running it once before
    is not run again, nor one already given to MAX_ATTEMPTS replicas: they fail with
    replica_lost, and their webhooks say so."""
    from sdserve.jobs.service import MAX_ATTEMPTS, MAX_LOST_RUNS

    shared = MemoryJobs(3600, shared=True)
    calls: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        calls.append(json.loads(await request.read()))
        return web.Response()

    def settings() -> Settings:
        s = drain_settings(keys)
        return s.model_copy(update={"job_lease_seconds": 2.0, "webhook_allowed_hosts": "127.0.0.1"})

    dying, other = FakePipeline(seconds_per_call=3.0), FakePipeline(seconds_per_call=0.05)  # job 0 runs 3 s
    a, b = create_app(settings(), dying), create_app(settings(), other)
    a.state.sd.jobs.store = b.state.sd.jobs.store = shared
    async with receiver(hook) as url:
        async with serve(a) as ca:
            ids = []
            for i in range(3):
                job = {**BODY, "prompt": f"job {i}", "seed": 30 + i, "webhook": {"url": url}}
                ids.append((await ca.post("/v1/jobs", json=job, headers=ALICE)).json()["id"])
            deadline = time.monotonic() + 10
            while (await ca.get(f"/v1/jobs/{ids[0]}", headers=ALICE)).json()["status"] != "running":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        # A is gone without a drain: its tasks ended, its records stay as they were.
        assert [(await shared.get(i)).status for i in ids] == ["running", "queued", "queued"]
        spent = JobRecord(id="job_spent", owner="alice", attempts=MAX_ATTEMPTS, lease_until=time.time() - 1)
        twice = JobRecord(
            id="job_twice",
            owner="alice",
            status="running",
            attempts=2,
            lost_runs=MAX_LOST_RUNS,
            lease_until=time.time() - 1,
        )
        for lapsed in (spent, twice):
            lapsed.webhook_url, lapsed.webhook_secret = url, ""
            await shared.put(lapsed)
        async with serve(b):
            deadline = time.monotonic() + 30
            while len(calls) < 5:
                assert time.monotonic() < deadline, calls
                await asyncio.sleep(0.1)
    ends = {c["id"]: c for c in calls}
    assert [ends[i]["status"] for i in ids] == ["succeeded"] * 3, [ends[i] for i in ids]
    assert [ends[i]["result"]["data"][0]["seed"] for i in ids] == [30, 31, 32]
    rerun = await shared.get(ids[0])
    assert (rerun.attempts, rerun.lost_runs) == (2, 1)
    assert [(await shared.get(i)).lost_runs for i in ids[1:]] == [0, 0]  # never started: no run lost
    for lost in ("job_spent", "job_twice"):
        assert ends[lost]["status"] == "failed" and ends[lost]["error"]["code"] == "replica_lost"
    assert "2 times" in ends["job_twice"]["error"]["message"], ends["job_twice"]
    ran = [prompt for method, prompt, _ in other.threads if method in ("run", "begin")]
    assert sorted(ran) == ["job 0", "job 1", "job 2"], ran


async def test_a_webhook_goes_only_to_a_host_allowed_when_it_is_called(keys):
    """A job taken up by another replica, or whose end comes after the allowed hosts changed,
    calls its webhook only if its host is allowed then: the check at submission is not enough."""
    calls: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        calls.append(await request.read())
        return web.Response()

    async with receiver(hook) as url:
        served = app(keys, webhook_allowed_hosts="hooks.example.com")  # not 127.0.0.1 (any more)
        async with serve(served):
            record = JobRecord(id="job_moved", owner="alice", status="succeeded", webhook_url=url)
            failed = metric("sdserve_webhooks_total", outcome="failed")
            await served.state.sd.jobs._deliver(record)
            assert metric("sdserve_webhooks_total", outcome="failed") - failed == 1
        allowed = app(keys, webhook_allowed_hosts="127.0.0.1")
        async with serve(allowed):
            await allowed.state.sd.jobs._deliver(record)
    assert len(calls) == 1  # only the replica that allows the host called it


async def test_a_job_whose_replica_died_is_cancelled_at_once_and_never_offered_again(keys):
    """A cancel of a job no replica renews (its replica died, the lease lapsed) ends it there
    and then, whoever is settling its lapse: the reaper does not offer it again afterwards, and
    the cancel is not written over."""
    shared = MemoryJobs(3600, shared=True)
    served = app(keys)
    served.state.sd.jobs.store = shared
    async with serve(served) as client:
        lost = JobRecord(id="job_lost", owner="alice", attempts=1, lease_until=time.time() - 1)
        await shared.put(lost)
        await shared.reap(lost)  # another replica holds the settling of this lapse
        r = await client.delete("/v1/jobs/job_lost", headers=ALICE)
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text

        async def held(record: JobRecord) -> bool:
            return True  # the other replica's claim, taken before the cancel

        shared.reap = held  # type: ignore[method-assign]  # its settling goes on, from its old copy
        await served.state.sd.jobs._settled(lost)
        assert (await shared.get("job_lost")).status == "cancelled" and await shared.offered() == 0


async def test_a_webhook_whose_replica_stopped_before_delivering_it_is_delivered_by_another(keys):
    """Webhooks are delivered at least once. A replica that shuts down while its job's webhook
    is still being retried (the receiver down) ends its lease on the delivery; another replica
    sharing the store takes it over at its next look and goes on from the attempts made. One
    whose replica died (its lease lapsed) is taken over too, and given up once every attempt
    is spent, by whichever replicas made them. A delivered webhook is due no more."""
    from sdserve.jobs.webhook import WEBHOOK_ATTEMPTS

    shared = MemoryJobs(3600, shared=True)
    calls: list[tuple[str, dict]] = []
    up = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        calls.append((request.headers["x-sdserve-job-id"], body))
        return web.Response(status=204 if up.is_set() and body["id"] != "job_spent" else 503)

    def settings() -> Settings:
        base = drain_settings(keys)  # backoff 30 s: the first replica waits to retry when it stops
        return base.model_copy(update={"webhook_allowed_hosts": "127.0.0.1", "webhook_backoff_seconds": 30.0})

    a, b = create_app(settings(), FakePipeline()), create_app(settings(), FakePipeline())
    a.state.sd.jobs.store = b.state.sd.jobs.store = shared
    resumed, failed = (
        metric("sdserve_webhooks_total", outcome="resumed"),
        metric("sdserve_webhooks_total", outcome="failed"),
    )
    async with receiver(hook) as url:
        async with serve(a) as ca:
            job = (await ca.post("/v1/jobs", json={**BODY, "webhook": {"url": url}}, headers=ALICE)).json()["id"]
            await until(lambda: len(calls) == 1, what="the first attempt")
            await until(lambda: stored_now(shared, job).webhook_attempts == 1, what="the attempt written")
            stored = await shared.get(job)
            assert (stored.status, stored.webhook_due, stored.runner) == ("succeeded", True, a.state.sd.jobs.me)
        assert (await shared.get(job)).lease_until <= time.time()  # A's shutdown ended its lease
        spent = JobRecord(
            id="job_spent",
            owner="alice",
            status="succeeded",
            webhook_url=url,
            webhook_due=True,
            webhook_attempts=WEBHOOK_ATTEMPTS - 1,
            runner="a-replica-that-died",
            lease_until=time.time() - 1,
        )
        await shared.put(spent)
        up.set()
        async with serve(b):
            await until(lambda: len(calls) == 3, within=15, what="B's attempts")
            await until(lambda: not any(stored_now(shared, i).webhook_due for i in (job, "job_spent")), what="none due")
    assert [(i, body["status"]) for i, body in calls] == [(job, "succeeded")] * 2 + [("job_spent", "succeeded")]
    delivered, given_up = await shared.get(job), await shared.get("job_spent")
    assert (delivered.webhook_attempts, delivered.runner) == (2, b.state.sd.jobs.me)
    assert given_up.webhook_attempts == WEBHOOK_ATTEMPTS  # one more by B, then given up
    assert metric("sdserve_webhooks_total", outcome="resumed") - resumed == 2
    assert metric("sdserve_webhooks_total", outcome="failed") - failed == 1
    assert await shared.lapsed(time.time() + 3600, 10) == []  # no lease left to lapse


def stored_now(store: MemoryJobs, job_id: str) -> JobRecord:
    """A record as the in-memory store holds it, read without awaiting (for ``until``)."""
    return JobRecord.parse(store._data[job_id][1])
