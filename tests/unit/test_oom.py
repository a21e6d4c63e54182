"""CUDA out-of-memory: the batch is split and retried; one image that still fails is a
retryable 503 for that request only; the worker keeps serving."""

from __future__ import annotations

import asyncio

import pytest
import torch

from sdserve import metrics
from sdserve.pipeline import Pipeline
from sdserve.queue import Batcher
from sdserve.settings import Settings
from sdserve.work import BatchKey, Item, OutOfMemory
from sdtesting.fakes import FakePipeline

KEY = BatchKey(64, 64, 1, 7.5, "default")


class SmallGpu(Pipeline):
    """The tiny model on a device that holds at most `fits` images per call."""

    def __init__(self, fits: int, too_big_prompt: str = "huge"):
        super().__init__(Settings(model="tiny", warmup=False))
        self.fits, self.too_big_prompt, self.calls = fits, too_big_prompt, []

    def _run(self, key, items, batch):
        total = sum(i.n for i in items)
        self.calls.append(total)
        if total > self.fits or any(i.prompt == self.too_big_prompt for i in items):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        super()._run(key, items, batch)


@pytest.fixture(scope="module")
def loaded():
    p = SmallGpu(fits=2)
    p.load()
    return p


def test_batch_is_split_until_it_fits_and_every_item_gets_its_images(loaded):
    loaded.calls.clear()
    splits = metrics.OOM_SPLITS._value.get()
    items = [Item(f"p{i}", None, 1, i) for i in range(4)] + [Item("multi", None, 3, 100)]
    loaded.run(KEY, items)
    assert [len(i.images) for i in items] == [1, 1, 1, 1, 3]
    # The first call tried all 7; the calls that fit (<= 2 images) covered each image exactly once.
    assert loaded.calls[0] == 7
    assert sum(c for c in loaded.calls if c <= 2) == 7
    assert metrics.OOM_SPLITS._value.get() > splits


def test_split_images_keep_their_seeds(loaded):
    whole = Item("same", None, 2, 42)
    SmallGpu.run(loaded, KEY, [whole])  # fits: 2 images in one call
    split = Item("same", None, 2, 42)
    tight = SmallGpu(fits=1)
    tight.pipe, tight._schedulers = loaded.pipe, loaded._schedulers
    tight.run(KEY, [split])  # split into 1 + 1 with seeds 42 and 43
    import numpy as np

    for a, b in zip(whole.images, split.images, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_one_image_that_never_fits_fails_alone_and_the_worker_lives_on():
    fake = FakePipeline(oom_prompt="huge")

    async def scenario():
        batcher = Batcher(fake, max_batch_size=4, max_wait_ms=200, queue_size=8)
        batcher.start()
        try:
            jobs = [batcher.submit(KEY, Item(p, None, 1, i)) for i, p in enumerate(["ok1", "huge", "ok2"])]
            await asyncio.wait([j.future for j in jobs], timeout=60)
            outcomes = [j.future.exception() for j in jobs]
            later = batcher.submit(KEY, Item("after", None, 1, 9))
            await asyncio.wait_for(later.future, 60)
            return outcomes, later.future.result()
        finally:
            await batcher.stop()

    outcomes, after = asyncio.run(scenario())
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], OutOfMemory)
    assert len(after.images) == 1


def test_a_split_batch_retries_only_after_the_failed_attempt_is_freed():
    from tests.unit.test_stepper import oom_above

    p = Pipeline(Settings(model="tiny", warmup=False))
    p.load()
    held: list = []
    alive_at_call: list[int] = []
    p.pipe.unet.forward = oom_above(2, p.pipe.unet.forward, held, alive_at_call)  # one image (CFG: 2 rows)
    items = [Item("a", None, 2, 1), Item("b", None, 1, 2)]
    p.run(KEY, items)
    assert [len(i.images) for i in items] == [2, 1]
    assert len(alive_at_call) > 3 and max(alive_at_call) == 0


def test_a_split_batch_stops_only_once_every_request_of_the_whole_batch_is_dropped(loaded):
    """The halves of a split batch watch the whole batch: a request dropped (its client left)
    does not stop the half it is in while another request of the batch is wanted, and once
    every one is dropped the call ends at its next step (Interrupted, not an out-of-memory)."""
    from sdserve.work import Interrupted

    tight = SmallGpu(fits=1)
    tight.pipe, tight._schedulers = loaded.pipe, loaded._schedulers
    gone, wanted = Item("gone", None, 1, 1), Item("wanted", None, 2, 2)
    gone.dropped = "client_disconnected"
    tight.run(KEY, [gone, wanted])  # split down to single images
    assert len(gone.images) == 1 and len(wanted.images) == 2
    wanted.images, wanted.dropped = [], "client_disconnected"
    tight.calls.clear()
    with pytest.raises(Interrupted):
        tight.run(KEY, [gone, wanted])
    assert tight.calls == [3, 1] and not wanted.images  # stopped in the first half that fit
