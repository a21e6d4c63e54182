"""Result cache and rate limits in a real server process: shared through a real redis-server,
Redis going away, and clients behind a proxy."""

from __future__ import annotations

import asyncio

import httpx
import pytest

pytestmark = pytest.mark.integration

BODY = {"prompt": "redis cat", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 7}


def test_cache_hits_through_redis_and_survives_redis_going_away(start_server, redis_server):
    s = start_server(cache_type="redis", redis_url=redis_server.url)
    first = httpx.post(s.url + "/generate", json=BODY, timeout=60).json()
    assert first["cached"] is False
    keys = redis_server.client.keys("sdserve:result:*")
    assert len(keys) == 1 and redis_server.client.ttl(keys[0]) > 0
    second = httpx.post(s.url + "/generate", json=BODY, timeout=60).json()
    assert second["cached"] is True and second["images"] == first["images"]

    # A second replica sharing the Redis gets the hit without generating.
    other = start_server(cache_type="redis", redis_url=redis_server.url)
    assert httpx.post(other.url + "/generate", json=BODY, timeout=60).json()["cached"] is True
    assert other.metric("sdserve_images_generated_total") == 0

    redis_server.stop()
    r = httpx.post(s.url + "/generate", json={**BODY, "seed": 8}, timeout=60)
    assert r.status_code == 200 and r.json()["cached"] is False
    assert s.metric("sdserve_cache_backend_up") == 0
    assert s.metric("sdserve_cache_errors_total") >= 1
    assert "redis cache unavailable, serving without the cache" in s.log()


def test_rate_limit_is_shared_by_replicas_through_redis(start_server, tmp_path):
    from sdtesting.procs import RedisProc

    redis = RedisProc(tmp_path)
    try:
        keys = tmp_path / "keys"
        keys.write_text("shared:key-shared\n")
        common = dict(
            cache_type="none",
            redis_url=redis.url,
            rate_limit_enabled=True,
            rate_limit_rps=0.1,
            rate_limit_burst=2,
            api_keys_file=keys,
        )
        a, b = start_server(**common), start_server(**common)
        h = {"Authorization": "Bearer key-shared"}
        body = {**BODY, "seed": None}
        assert httpx.post(a.url + "/generate", json=body, headers=h, timeout=60).status_code == 200
        assert httpx.post(b.url + "/generate", json=body, headers=h, timeout=60).status_code == 200
        third = httpx.post(a.url + "/generate", json=body, headers=h, timeout=60)
        assert third.status_code == 429 and int(third.headers["Retry-After"]) >= 1
    finally:
        redis.stop()


def test_jobs_are_answered_by_any_replica_sharing_redis_and_a_lost_replicas_jobs_run_elsewhere(
    start_server, tmp_path, request
):
    import time

    import redis as redis_client

    from sdtesting.procs import RedisProc

    redis = RedisProc(tmp_path)  # its own: the module's Redis is stopped by the first test
    request.addfinalizer(redis.stop)
    shared = {"cache_type": "redis", "redis_url": redis.url, "job_lease_seconds": 2, "max_batch_size": 1}
    a, b = start_server(**shared), start_server(**shared)
    job = {"prompt": "a shared job", "size": "64x64", "num_inference_steps": 2, "seed": 5}

    def until(server, job_id, statuses, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=10).json()
            if view["status"] in statuses:
                return view
            time.sleep(0.1)
        raise TimeoutError(view)

    # Submitted to A, answered by B.
    first = httpx.post(a.url + "/v1/jobs", json=job, timeout=10).json()
    done = until(b, first["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded" and done["result"]["data"][0]["seed"] == 5

    # An Idempotency-Key retried against the other replica answers the first job (one Redis claim).
    keyed = {**job, "seed": 6}
    once = httpx.post(a.url + "/v1/jobs", json=keyed, headers={"idempotency-key": "order-42"}, timeout=10)
    again = httpx.post(b.url + "/v1/jobs", json=keyed, headers={"idempotency-key": "order-42"}, timeout=10)
    assert once.status_code == again.status_code == 202 and again.json()["id"] == once.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"

    # B lists the jobs A took (newest first); a record gone from Redis drops out of the list.
    listed = [j["id"] for j in httpx.get(b.url + "/v1/jobs", timeout=10).json()["data"]]
    assert listed[:2] == [once.json()["id"], first["id"]]
    redis_client.Redis.from_url(redis.url).delete("sdserve:job:" + first["id"])
    assert first["id"] not in [j["id"] for j in httpx.get(a.url + "/v1/jobs", timeout=10).json()["data"]]

    # A cancel sent to B reaches the queued job on A.
    slow = {**job, "size": "128x128", "num_inference_steps": 30}  # about 5 s each
    busy = [httpx.post(a.url + "/v1/jobs", json={**slow, "seed": i}, timeout=10).json() for i in range(4)]
    assert httpx.delete(f"{b.url}/v1/jobs/{busy[3]['id']}", timeout=10).status_code == 200
    assert until(a, busy[3]["id"], {"cancelled", "succeeded", "failed"})["status"] == "cancelled"

    # A dies with jobs in flight: once their leases lapse, B runs them (their requests were
    # stored with them), with their seeds: the one A was running from its first step, and
    # those that never started.
    until(b, busy[0]["id"], {"running"})
    a.proc.kill()
    for i in (0, 1, 2):
        rerun = until(b, busy[i]["id"], {"failed", "succeeded"}, timeout=120)
        assert rerun["status"] == "succeeded" and rerun["result"]["data"][0]["seed"] == i, rerun
    assert b.log().count("offered again") == 3 and b.log().count("took up job") == 3
    assert b.log().count("it starts again from its first step") == 1

    # Redis goes away: a retryable 503, not a 500.
    redis.stop()
    r = httpx.post(b.url + "/v1/jobs", json=job, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "job_store_unavailable"


def test_a_replica_stopped_with_a_backlog_hands_its_waiting_jobs_to_another_through_redis(
    start_server, tmp_path, request
):
    """A SIGTERM (a rolling update) on a replica with jobs waiting for room: it runs what it
    queued and exits 0; the jobs it had not queued go through Redis to the other replica,
    which runs them under their ids with their seeds. Before, they failed with ``draining``."""
    import signal
    import time

    from sdtesting.procs import RedisProc

    redis = RedisProc(tmp_path)
    request.addfinalizer(redis.stop)
    shared = {"cache_type": "redis", "redis_url": redis.url, "max_batch_size": 1, "queue_size": 2}
    a, b = start_server(**shared, drain_seconds=120), start_server(**shared)
    slow = {"prompt": "backlog", "size": "128x128", "num_inference_steps": 15}  # about 2.5 s each
    ids = [httpx.post(a.url + "/v1/jobs", json={**slow, "seed": 20 + i}, timeout=10).json()["id"] for i in range(4)]
    deadline = time.monotonic() + 30
    while httpx.get(f"{a.url}/v1/jobs/{ids[0]}", timeout=10).json()["status"] == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    a.proc.send_signal(signal.SIGTERM)  # job 0 runs, job 1 is queued, jobs 2 and 3 wait
    assert a.proc.wait(timeout=120) == 0
    done = []
    for job_id in ids:
        deadline = time.monotonic() + 120
        while (view := httpx.get(f"{b.url}/v1/jobs/{job_id}", timeout=10).json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, view
            time.sleep(0.1)
        done.append(view)
    assert [d["status"] for d in done] == ["succeeded"] * 4, done
    assert [d["result"]["data"][0]["seed"] for d in done] == [20, 21, 22, 23]
    assert a.log().count("handed off") == 2 and b.log().count("took up job") == 2
    assert b.metric("sdserve_jobs_total", event="adopted") == 2


def test_a_replica_whose_drain_runs_out_of_time_hands_its_running_job_to_another(start_server, tmp_path, request):
    """A SIGTERM on a replica running a job far longer than its drain: the job stops at its next
    step, the replica exits 0 at once (not after the job, nor killed under it), and the other
    replica runs the job from its first step with its seed. Before, it was cut off at exit and
    failed as ``replica_lost`` once its lease lapsed."""
    import signal
    import time

    from sdtesting.procs import RedisProc

    redis = RedisProc(tmp_path)
    request.addfinalizer(redis.stop)
    shared = {"cache_type": "redis", "redis_url": redis.url, "max_steps": 80, "max_batch_size": 1}  # no padding
    a, b = start_server(**shared, drain_seconds=0), start_server(**shared)
    long = {"prompt": "a long one", "size": "128x128", "num_inference_steps": 80, "seed": 7}  # 10-20 s
    job_id = httpx.post(a.url + "/v1/jobs", json=long, timeout=10).json()["id"]
    deadline = time.monotonic() + 30
    while httpx.get(f"{a.url}/v1/jobs/{job_id}", timeout=10).json()["progress"]["step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t0 = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(timeout=60) == 0
    stopped = time.monotonic() - t0
    deadline = time.monotonic() + 120
    while (view := httpx.get(f"{b.url}/v1/jobs/{job_id}", timeout=10).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, view
        time.sleep(0.1)
    ran = time.monotonic() - t0 - stopped
    assert view["status"] == "succeeded" and view["result"]["data"][0]["seed"] == 7, view
    assert stopped < ran / 2, (stopped, ran)  # the drain did not wait for the job
    assert a.log().count("drain out of time: a running request dropped") == 1 and a.log().count("handed off") == 1
    assert b.log().count("took up job") == 1 and b.metric("sdserve_jobs_total", event="adopted") == 1


async def test_the_shared_rate_limit_keeps_redis_time_not_each_replicas_clock(tmp_path, monkeypatch):
    """Two replicas whose clocks disagree by a minute share one bucket: the one ahead must not
    see a minute of refill in a bucket the other just emptied."""
    from sdserve import ratelimit
    from sdtesting.procs import RedisProc

    redis = RedisProc(tmp_path)  # its own: the module's is stopped by the test above
    try:
        behind = ratelimit.RedisBuckets(redis.url, rate=0.1, burst=2)
        ahead = ratelimit.RedisBuckets(redis.url, rate=0.1, burst=2)
        assert [(await behind.take("skewed"))[0] for _ in range(2)] == [True, True]
        real = ratelimit.time.time
        monkeypatch.setattr(ratelimit.time, "time", lambda: real() + 60)  # this replica's clock runs ahead
        allowed, wait = await ahead.take("skewed")
        assert not allowed and wait >= 5
        assert redis.client.exists("sdserve:ratelimit:skewed")  # decided by Redis, not a fallback
    finally:
        redis.stop()


@pytest.mark.parametrize(("trusted", "second"), [("10.0.0.0/8", 429), ("127.0.0.0/8", 200)])
def test_anonymous_clients_behind_a_trusted_proxy_are_limited_by_their_own_address(start_server, trusted, second):
    """Two clients behind one proxy (this test, on loopback): when the proxy is trusted their
    X-Forwarded-For addresses get a bucket each; when it is not, they share the proxy's."""
    s = start_server(
        cache_type="none", rate_limit_enabled=True, rate_limit_rps=0.01, rate_limit_burst=1, forwarded_allow_ips=trusted
    )
    body = {**BODY, "seed": None}
    for client, status in (("203.0.113.7", 200), ("198.51.100.9", second)):
        r = httpx.post(s.url + "/generate", json=body, headers={"X-Forwarded-For": client}, timeout=60)
        assert r.status_code == status, (client, r.text)


def managed_redis_args() -> list[str]:
    """The managed Redis's arguments, as the operator renders them."""
    from sdop.render import render
    from sdtesting.examples import example

    redis = next(
        o
        for o in render(example("jobs-webhooks-urls"))
        if o["kind"] == "Deployment" and "redis" in o["metadata"]["name"]
    )
    return redis["spec"]["template"]["spec"]["containers"][0]["args"]


async def test_a_full_managed_redis_evicts_cached_results_never_an_accepted_job(tmp_path):
    """The managed Redis's memory limit and eviction policy, on a real redis-server with a
    small limit: caching far more than fits evicts cached results, and the finished job's
    record (with its images) stays for its whole TTL, as does a waiting job's request (what
    another replica needs to take it up). A job's expiry is kept apart (the record has no
    Redis expiry), and a later write deletes the records past it; so with an Idempotency-Key's
    claim."""
    import time

    from sdserve.cache import RedisCache
    from sdserve.jobs.record import JobRecord
    from sdserve.jobs.redisstore import RedisJobs
    from sdtesting.procs import RedisProc

    args = managed_redis_args()
    policy = args[args.index("--maxmemory-policy") + 1]
    redis = RedisProc(tmp_path)
    try:
        redis.client.config_set("maxmemory", "4mb")
        redis.client.config_set("maxmemory-policy", policy)
        jobs = RedisJobs(redis.url, 3600)
        await jobs.put(JobRecord(id="job_done", owner="alice", status="succeeded", images=["i" * 300_000]))
        assert await jobs.claim("key-1", "job_done fp") is None
        waiting = JobRecord(id="job_waiting", owner="alice", lease_until=time.time() + 60)
        await jobs.put(waiting, spec="s" * 300_000)
        assert redis.client.ttl("sdserve:jobspec:job_waiting") == -1  # no expiry: never evicted
        cache = RedisCache(redis.url, 3600)
        for i in range(80):  # 8 MB of results through 4 MB
            await cache.set(f"sdserve:result:{i}", b"r" * 100_000)
        assert len(redis.client.keys("sdserve:result:*")) < 80  # the cache was evicted
        kept = await jobs.get("job_done")
        assert kept is not None and kept.images == ["i" * 300_000]
        assert await jobs.claim("key-1", "job_other fp") == "job_done fp"  # the Idempotency-Key too
        await jobs.offer("job_waiting", waiting.created)
        assert await jobs.take() == ("job_waiting", "s" * 300_000)  # and the waiting job's request
        waiting.status = "cancelled"
        await jobs.put(waiting)
        assert not redis.client.exists("sdserve:jobspec:job_waiting")  # gone with its end

        brief = RedisJobs(redis.url, 1)
        await brief.put(JobRecord(id="job_brief", owner="alice"))
        assert await brief.get("job_brief") is not None
        await asyncio.sleep(1.1)
        assert await brief.get("job_brief") is None  # past its time
        await brief.put(JobRecord(id="job_next", owner="alice"))
        assert not redis.client.exists("sdserve:job:job_brief")  # and deleted by the next write
        assert redis.client.zscore("sdserve:jobs:expiry", "job_brief") is None
        assert await brief.claim("key-2", "job_brief fp") is None
        assert await brief.claim("key-2", "job_again fp") == "job_brief fp"
        await asyncio.sleep(1.1)
        assert await brief.claim("key-2", "job_again fp") is None  # past its time: free again
        await brief.release("key-2")
        assert (
            not redis.client.exists("sdserve:jobkey:key-2")
            and redis.client.zscore("sdserve:jobkeys:expiry", "key-2") is None
        )
    finally:
        redis.stop()


async def test_replicas_are_counted_alive_in_redis_until_they_leave_or_go_quiet(tmp_path):
    """What each replica's share of the offered jobs divides by (``Jobs._share``)."""
    from sdserve.jobs.redisstore import RedisJobs
    from sdtesting.procs import RedisProc

    redis = RedisProc(tmp_path)
    try:
        jobs, now = RedisJobs(redis.url, 3600), 1000.0
        assert await jobs.beat("replica-a", now, 3) == 1
        assert await jobs.beat("replica-b", now + 1, 3) == 2
        assert await jobs.beat("replica-a", now + 3.5, 3) == 2  # b beat 2.5 s ago
        assert await jobs.beat("replica-a", now + 4.5, 3) == 1  # b quiet for 3.5 s: gone
        await jobs.leave("replica-a")
        assert await jobs.beat("replica-c", now + 4.5, 3) == 1
    finally:
        redis.stop()


async def test_an_ended_job_whose_webhook_is_due_keeps_a_lease_another_replica_can_find_lapsed(tmp_path):
    """Redis keeps the lease of an ended job while its webhook is being delivered, so the
    replicas' look for lapsed leases finds a delivery whose replica died; once delivered (or
    given up) it has no lease, and an ended job without a webhook never had one."""
    import time

    from sdserve.jobs.record import JobRecord
    from sdserve.jobs.redisstore import RedisJobs
    from sdtesting.procs import RedisProc

    redis = RedisProc(tmp_path)
    try:
        jobs, now = RedisJobs(redis.url, 3600), time.time()
        due = JobRecord(id="job_due", owner="alice", status="succeeded", webhook_url="http://h/", webhook_due=True)
        due.lease_until = now + 30
        await jobs.put(due)
        await jobs.put(JobRecord(id="job_plain", owner="alice", status="succeeded", lease_until=now - 30))
        assert await jobs.lapsed(now, 10) == []
        assert await jobs.lapsed(now + 60, 10) == ["job_due"]
        assert (await jobs.get("job_due")).delivery_lapsed(now + 60)
        due.webhook_due = False
        await jobs.put(due)
        assert await jobs.lapsed(now + 60, 10) == []
        assert redis.client.zscore(RedisJobs.LEASES, "job_due") is None
    finally:
        redis.stop()


def racing_jobs(redis, patch: dict):
    """A RedisJobs on ``redis`` in which, once ``armed``, another replica's write (``patch`` on
    the stored record) lands between the next write's look and its transaction."""
    import json

    from sdserve.jobs.redisstore import RedisJobs

    class Racing(RedisJobs):
        armed = False

        def _write(self, pipe, record, now, spec=None):
            if self.armed:
                self.armed = False
                raw = json.loads(redis.client.get(self.PREFIX + record.id))
                redis.client.set(self.PREFIX + record.id, json.dumps({**raw, **patch}))
            super()._write(pipe, record, now, spec)

    return Racing(redis.url, 3600)


async def test_taking_up_an_offered_job_never_writes_over_a_cancel(tmp_path):
    """The replica taking up an offered job writes its record only if it has not ended: a
    cancel written between its look and its write (here, from another client, at the worst
    moment) makes the transaction fail and the cancel stands."""
    import time

    from sdserve.jobs.record import JobRecord
    from sdtesting.procs import RedisProc

    redis = RedisProc(tmp_path)
    try:
        jobs = racing_jobs(redis, {"status": "cancelled"})
        await jobs.put(JobRecord(id="job_offered", owner="alice", offered=1.0, lease_until=time.time() + 60))
        jobs.armed = True
        taken = JobRecord(id="job_offered", owner="alice", runner="replica-b", lease_until=time.time() + 60)
        assert await jobs.put_unless_ended(taken) is False
        assert (await jobs.get("job_offered")).status == "cancelled"
        await jobs.put(JobRecord(id="job_free", owner="alice", offered=1.0, lease_until=time.time() + 60))
        assert await jobs.put_unless_ended(JobRecord(id="job_free", owner="alice", runner="replica-b")) is True
        assert (await jobs.get("job_free")).runner == "replica-b"
        assert await jobs.put_unless_ended(JobRecord(id="job_gone", owner="alice")) is False
    finally:
        redis.stop()


async def test_a_runners_progress_write_keeps_a_cancel_sent_after_its_look(tmp_path):
    """The replica running a job writes its progress over the record as it is stored at the
    write: a DELETE from another replica landing between its look and its write makes the
    transaction fail, and the write that follows keeps the cancel (the runner stops at its
    next look). A record that says the job is another's is not written over at all."""
    import time

    from sdserve.jobs.record import JobRecord, keeping_cancel
    from sdtesting.procs import RedisProc

    redis = RedisProc(tmp_path)
    try:
        jobs = racing_jobs(redis, {"cancel_requested": True})
        lease = time.time() + 60
        running = JobRecord(id="job_running", owner="alice", status="running", runner="replica-a", lease_until=lease)
        await jobs.put(running)
        jobs.armed = True
        progress = JobRecord(id="job_running", owner="alice", status="running", step=3, runner="replica-a")
        assert await jobs.update(progress.id, lambda stored: keeping_cancel(progress, stored)) is True
        stored = await jobs.get("job_running")
        assert stored.cancel_requested and stored.step == 3 and progress.cancel_requested

        def unless_another_runs(stored):
            return None if stored is not None and stored.runner != "replica-a" else progress

        taken = JobRecord(id="job_taken", owner="alice", status="running", runner="replica-b", lease_until=lease)
        await jobs.put(taken)
        progress.id = "job_taken"
        assert await jobs.update("job_taken", unless_another_runs) is False
        assert (await jobs.get("job_taken")).runner == "replica-b"
    finally:
        redis.stop()
