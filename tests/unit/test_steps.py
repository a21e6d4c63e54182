"""The request steps and the batcher, each on its own, on a fake pipeline (no HTTP, no model)."""

from __future__ import annotations

import asyncio
import time

import pytest

from sdserve import metrics, steps
from sdserve.cache import MemoryCache
from sdserve.errors import ApiError
from sdserve.queue import Batcher, QueueFull, cancel
from sdserve.ratelimit import MemoryBuckets
from sdserve.settings import Settings
from sdserve.state import State
from sdserve.work import BatchKey, Item
from sdtesting.fakes import FakePipeline
from sdtesting.waiting import until


def state(pipeline: FakePipeline | None = None, **settings) -> State:
    return State.build(Settings(model="fake", **settings), pipeline or FakePipeline())


def gen(key: BatchKey, prompt: str = "a cat", n: int = 1, seed: int | None = 1) -> steps.Generation:
    return steps.Generation(key, prompt, None, n, seed)


def test_batch_key_fills_the_server_defaults_and_resolves_the_default_scheduler():
    s = state(default_steps=7, default_guidance_scale=3.0, scheduler="ddim")
    assert steps.batch_key(s, 64, 64, None, None, "default") == BatchKey(64, 64, 7, 3.0, "ddim")
    assert steps.batch_key(s, 64, 64, 2, 0.0, "euler") == BatchKey(64, 64, 2, 0.0, "euler")
    # unset: 25 steps, or the most a request may take when that is fewer (a turbo model's 4)
    assert steps.batch_key(state(), 64, 64, None, None, "euler").steps == 25
    assert steps.batch_key(state(max_steps=4), 64, 64, None, None, "euler").steps == 4
    with_default = state(default_negative_prompt="blurry")
    assert [steps.negative_prompt(with_default, n) for n in (None, "", "ugly")] == ["blurry", "", "ugly"]
    with pytest.raises(ValueError, match="SDSERVE_DEFAULT_STEPS 30 must be <= SDSERVE_MAX_STEPS 20"):
        Settings(default_steps=30, max_steps=20)


def test_validate_names_the_first_field_and_refuses_blocked_words(tmp_path):
    (tmp_path / "block").write_text("dragon\n")
    s = state(blocklist_file=str(tmp_path / "block"))
    key = BatchKey(64, 64, 1, 7.5, "euler")
    with pytest.raises(ApiError) as e:
        steps.validate(s, gen(key), [("width", "too wide"), ("n", "too many")])
    assert (e.value.status, e.value.param) == (422, "width") and "n: too many" in e.value.message
    with pytest.raises(ApiError) as e:
        steps.validate(s, gen(key, prompt="a red DRAGON"), [])
    assert (e.value.status, e.value.code) == (400, "blocked_word")
    steps.validate(s, gen(key, prompt="a red dragonfly"), [])


async def test_rate_limit_is_429_with_retry_after_once_the_bucket_is_empty():
    s = state(rate_limit_enabled=True, rate_limit_rps=0.5, rate_limit_burst=2)
    assert await steps.rate_limit(s, "anonymous", "10.0.0.1") == "anonymous"
    assert await steps.rate_limit(s, "anonymous", "10.0.0.1") == "anonymous"
    with pytest.raises(ApiError) as e:
        await steps.rate_limit(s, "anonymous", "10.0.0.1")
    assert e.value.status == 429 and e.value.retry_after is not None and e.value.retry_after >= 1
    assert await steps.rate_limit(s, "anonymous", "10.0.0.2") == "anonymous"  # another client, another bucket


@pytest.mark.parametrize("batching", ["request", "step"])
async def test_a_request_whose_client_left_frees_its_queue_place_at_once(batching):
    """A queued request whose client leaves stops counting against the queue's size and its
    depth (the autoscaler's metric) at once, not when the scheduler next reaches it: a server
    whose queue filled with requests nobody waits for any more would answer 429 to live ones."""
    s = state(FakePipeline(seconds_per_call=1.0), batching=batching, queue_size=2, max_batch_size=1, max_wait_ms=0)
    s.batcher.start()
    key = BatchKey(64, 64, 20, 7.5, "euler")
    try:
        running = s.batcher.submit(key, Item("running", None, 1, 1))
        while running.started is None:  # noqa: ASYNC110 - the scheduler task starts it
            await asyncio.sleep(0.01)
        gone = [s.batcher.submit(key, Item(f"gone {i}", None, 1, i)) for i in range(2)]
        with pytest.raises(QueueFull):
            s.batcher.submit(key, Item("too many", None, 1, 9))
        for job in gone:
            cancel(job, "client_disconnected")
        await asyncio.sleep(0)  # the futures' done-callbacks run on the next loop turn
        assert s.batcher.depth == 0 and metrics.QUEUE_DEPTH._value.get() == 0
        live = s.batcher.submit(key, Item("live", None, 1, 3))  # not QueueFull
        assert not running.future.done()  # the running request still holds the model
        await asyncio.wait_for(asyncio.gather(running.future, live.future), 10)
    finally:
        await s.batcher.stop()


async def test_a_request_batch_runs_on_for_a_request_still_wanted_and_stops_once_none_is():
    """Request batching runs a batch in one pipeline call: a request dropped from it (its client
    left) is still made while another request in the batch is wanted; once every one is
    dropped, the batch ends at its next step, not after all its steps, and its requests count
    as cancelled with their reasons."""
    fake = FakePipeline(seconds_per_call=4.0)  # 40 steps of 0.1 s
    batcher = Batcher(fake, max_batch_size=4, max_wait_ms=100, queue_size=16)
    batcher.start()
    key = BatchKey(64, 64, 40, 7.5, "euler")

    def cancelled(reason: str) -> float:
        return metrics.CANCELLED.labels(reason)._value.get()

    before = cancelled("client_disconnected"), cancelled("timeout")
    try:
        kept, left = batcher.submit(key, Item("kept", None, 1, 1)), batcher.submit(key, Item("left", None, 1, 2))
        while kept.item.progress < 2:  # noqa: ASYNC110 - the fake steps on the worker thread
            await asyncio.sleep(0.01)
        cancel(left, "client_disconnected")
        await asyncio.wait_for(kept.future, 10)
        assert kept.item.progress == 40 and len(kept.item.images) == 1 and not left.future.cancelled()
        assert cancelled("client_disconnected") == before[0]  # it was made all the same

        a, b = batcher.submit(key, Item("a", None, 1, 3)), batcher.submit(key, Item("b", None, 1, 4))
        while a.item.progress < 2:  # noqa: ASYNC110 - as above
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        cancel(a, "client_disconnected")
        cancel(b, "timeout")
        await asyncio.wait({a.future, b.future}, timeout=5)
        assert time.monotonic() - t0 < 1.0 and a.future.cancelled() and b.future.cancelled()
        assert a.item.progress < 10 and not a.item.images
        assert (cancelled("client_disconnected"), cancelled("timeout")) == (before[0] + 1, before[1] + 1)
        await asyncio.sleep(0)  # the futures' done-callbacks run on the next loop turn
        assert batcher.inflight == 0 and batcher.idle
        nxt = batcher.submit(key, Item("next", None, 1, 5))  # the model is free for the next batch
        await asyncio.wait_for(nxt.future, 10)
    finally:
        await batcher.stop()


@pytest.mark.parametrize("batching", ["request", "step"])
async def test_a_seeded_request_given_up_on_in_a_batch_that_runs_on_is_cached_for_its_retry(batching):
    """Request batching: a seeded request whose client leaves while another request of its
    batch is still wanted is made all the same. Its images go to the cache once made, so the
    client's retry of the same body is a hit, not a second run. Step batching stops it at its
    next step instead: nothing is made, and nothing cached."""
    fake = FakePipeline(seconds_per_call=3.0)
    s = state(fake, batching=batching, max_batch_size=4, max_wait_ms=100, cache_type="memory")
    s.loaded = True
    s.batcher.start()
    key = BatchKey(64, 64, 10, 7.5, "euler")
    left = asyncio.Event()

    async def never() -> bool:
        return False

    async def gone() -> bool:
        return left.is_set()

    unclaimed = metrics.CACHED_AFTER_DROP._value.get()
    try:
        kept = asyncio.create_task(steps.generate(s, gen(key, "kept", seed=1), never))
        dropped = asyncio.create_task(steps.generate(s, gen(key, "dropped", seed=2), gone))
        await until(lambda: s.batcher.inflight == 2, what="both in one batch, running")
        left.set()
        with pytest.raises(ApiError) as e:
            await dropped
        assert e.value.status == 499
        await asyncio.wait_for(kept, 10)
        if batching == "request":
            await until(
                lambda: not s.caching and metrics.CACHED_AFTER_DROP._value.get() != unclaimed,
                within=5,
                what="the dropped request's images reach the cache",
            )
        retry = await steps.generate(s, gen(key, "dropped", seed=2), never)
        assert retry.cached == (batching == "request")
        assert metrics.CACHED_AFTER_DROP._value.get() == unclaimed + (batching == "request")
    finally:
        await s.batcher.stop()


async def test_a_full_queue_is_429_and_a_loaded_server_generates_through_the_cache():
    s = state(queue_size=1, max_batch_size=2)
    key = BatchKey(64, 64, 1, 7.5, "euler")
    with pytest.raises(ApiError) as e:
        steps.admit(s)
    assert (e.value.status, e.value.code) == (503, "model_not_ready")
    steps.enqueue(s, gen(key), 1)  # nobody drains the queue: the batcher is not started
    with pytest.raises(ApiError) as e:
        steps.enqueue(s, gen(key), 2)
    assert (e.value.status, e.value.code) == (429, "queue_full") and e.value.retry_after

    s = state(max_batch_size=2, max_wait_ms=0, cache_type="memory")
    s.loaded = True
    s.batcher.start()

    async def never() -> bool:
        return False

    try:
        first = await steps.generate(s, gen(key, seed=5, n=2), never)
        again = await steps.generate(s, gen(key, seed=5, n=2), never)
    finally:
        await s.batcher.stop()
    assert first.seeds == [5, 6] and not first.cached and len(first.images) == 2
    assert again.cached and again.images == first.images
    assert len(s.pipeline.calls) == 1  # type: ignore[attr-defined]  # FakePipeline counts its calls


async def test_the_batcher_groups_compatible_requests_into_one_call_and_keeps_others_apart():
    fake = FakePipeline(seconds_per_call=0.05)
    batcher = Batcher(fake, max_batch_size=4, max_wait_ms=100, queue_size=16)
    batcher.start()
    a, b = BatchKey(64, 64, 2, 7.5, "euler"), BatchKey(64, 64, 3, 7.5, "euler")
    try:
        jobs = [batcher.submit(k, Item(f"p{i}", None, 1, i)) for i, k in enumerate([a, b, a, a, b])]
        await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 10)
    finally:
        await batcher.stop()
    assert sorted(fake.calls, key=lambda c: c[0].steps) == [(a, 3), (b, 2)]
    assert all(len(j.item.images) == 1 for j in jobs)


async def test_the_in_memory_rate_limit_forgets_refilled_buckets_and_keeps_the_rest():
    """Anonymous clients are limited per address: buckets that have refilled are forgotten (a
    full bucket is what a new key gets), so memory stays bounded however many addresses call;
    a client still over its limit keeps its bucket."""
    buckets = MemoryBuckets(rate=1000.0, burst=2, prune_at=10)
    most = 0
    for r in range(10):  # 1000 addresses, 100 at a time
        for i in range(100):
            assert (await buckets.take(f"10.0.{r}.{i}"))[0]
            most = max(most, len(buckets._buckets))
        await asyncio.sleep(0.01)  # every bucket refills within 2 ms
    assert most <= 200  # twice the buckets that were not full, not one per address

    slow = MemoryBuckets(rate=0.001, burst=1, prune_at=10)
    assert (await slow.take("greedy"))[0]
    for i in range(100):
        await slow.take(f"10.0.0.{i}")
    allowed, wait = await slow.take("greedy")
    assert not allowed and wait > 900  # still limited: its empty bucket was kept


def test_the_result_cache_key_changes_with_what_shapes_the_images_served():
    """Replicas sharing a Redis cache, or one that outlives an edit of the CR, must not serve
    images made another way: above all, not images made before the content check was on."""
    request = gen(BatchKey(64, 64, 4, 7.5, "euler", loras=(("pixel", 1.0),)), seed=5)
    pixel = {"name": "pixel", "source": "org/pixel-lora"}

    def key(dtype: str = "float32", **settings) -> str:
        s = state(**{"loras": [pixel], **settings})
        s.pipeline.dtype = dtype  # the fake's resolved dtype
        return steps.result_key(s, request, 5)

    same = key()
    assert key() == same  # the same server, the same key: shared across replicas
    assert key(loras=[pixel, {"name": "ink", "source": "org/ink"}]) == same  # an adapter it does not use
    changed = [
        key(nsfw_check=True),
        key(nsfw_check=True, safety_checker="CompVis/stable-diffusion-safety-checker"),
        key(quantization="int8_weight_only"),
        key(dtype="float16"),
        key(loras=[{**pixel, "source": "org/pixel-lora-v2"}]),
    ]
    assert len({same, *changed}) == 1 + len(changed)


async def test_the_in_memory_result_cache_is_bounded_by_bytes_as_well_as_entries():
    """Past either bound the least recently used entries go; a value larger than the whole
    cache is not kept (it would evict everything and then itself)."""
    cache = MemoryCache(max_entries=10, max_bytes=1000)
    for i in range(4):
        await cache.set(f"k{i}", b"x" * 300)
    assert [k for k in ("k0", "k1", "k2", "k3") if await cache.get(k)] == ["k1", "k2", "k3"]
    await cache.get("k1")  # used last: k2 is the least recently used
    await cache.set("k1", b"y" * 400)  # replaced: 300 + 300 + 400, within the bound
    assert await cache.get("k2") == b"x" * 300
    await cache.set("k1", b"y" * 500)  # 300 + 300 + 500: k3, the least recently used now, goes
    assert await cache.get("k3") is None and await cache.get("k2") == b"x" * 300
    await cache.set("huge", b"z" * 1001)
    assert await cache.get("huge") is None and await cache.get("k1") == b"y" * 500
    small = MemoryCache(max_entries=2, max_bytes=1000)
    for i in range(3):
        await small.set(f"k{i}", b"x")
    assert await small.get("k0") is None and await small.get("k2") == b"x"
