"""The warm-up runs on the threads that serve, in both batching modes.

On a GPU this is what makes a warm-up count: PyTorch keeps cuDNN's autotuned kernel choices
per thread (``cudnn.benchmark``), so a warm-up on another thread (as ``asyncio.to_thread``
gives) leaves the first request of every shape to tune again. Here the fake pipeline records
the thread of every call."""

from __future__ import annotations

import pytest

from sdserve.app import create_app
from sdserve.settings import Settings
from sdserve.work import BatchKey
from sdtesting.asgi import serve
from sdtesting.fakes import FakePipeline

KEY = BatchKey(64, 64, 2, 7.5, "default")
EDIT = BatchKey(64, 64, 2, 7.5, "default", task="img2img", strength=1.0)


@pytest.mark.parametrize("mode", ["request", "step"])
async def test_warm_up_runs_every_shape_on_the_threads_that_then_serve_requests(mode):
    fake = FakePipeline(warmup=[(KEY, 1), (KEY, 2), (KEY, 3), (EDIT, 1)])
    settings = Settings(model="fake", min_side=64, batching=mode, max_batch_size=4, cache_type="none")
    async with serve(create_app(settings, fake)) as client:
        body = {"prompt": "served", "width": 64, "height": 64, "num_inference_steps": 2}
        r = await client.post("/generate", json=body)
        assert r.status_code == 200, r.text

    warm = [(m, t) for m, p, t in fake.threads if p == "warm-up"]
    served = [(m, t) for m, p, t in fake.threads if p == "served"]
    # Every shape was warmed, through the path requests take in this mode.
    model_calls = "run" if mode == "request" else "begin"
    assert [n for k, n in fake.calls[:3]] == [1, 2, 3] and all(k == KEY for k, _ in fake.calls[:3])
    assert fake.calls[3] == (EDIT, 1)  # with an input image: the fake fails an edit without one
    assert sum(m == model_calls for m, _ in warm) == 4

    # The load, the warm-up and the request's model calls share one thread; step mode decodes
    # on its own (also warmed) thread.
    def threads(calls, *methods):
        return {t for m, t in calls if m in methods}

    (load_thread,) = {t for m, _, t in fake.threads if m == "load"}
    assert threads(warm, "run", "begin", "step") == threads(served, "run", "begin", "step") == {load_thread}
    assert load_thread.startswith("sdserve-gpu")
    if mode == "step":
        (decode_thread,) = threads(warm, "finish")
        assert threads(served, "finish") == {decode_thread} and decode_thread.startswith("sdserve-decode")
