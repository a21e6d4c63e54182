"""Streamed generations (``stream: true``, sdserve.stream) in-process: through the official
OpenAI SDK with partial images, refusals before the stream as HTTP errors, and a client that
leaves mid-stream."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI
from PIL import Image

from sdserve.app import create_app
from sdserve.settings import Settings
from sdserve.stream import marks
from sdtesting.asgi import BASE_URL, metric, serve
from sdtesting.fakes import FakePipeline
from sdtesting.imaging import decode
from sdtesting.waiting import until

BASE = {"model": "tiny", "min_side": 64}


@pytest.fixture
async def client(tiny) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(**BASE, max_batch_size=4, max_wait_ms=0, cache_type="none"), tiny)
    async with serve(app) as c:
        yield c


def test_partial_images_are_spread_over_the_steps_before_the_last():
    assert marks(30, 2) == [10, 20]
    assert marks(30, 3) == [7, 15, 22]
    assert marks(4, 3) == [1, 2, 3]
    assert marks(2, 3) == [1]  # too few steps for three
    assert marks(1, 2) == [] and marks(30, 0) == []


async def test_a_streamed_generation_through_the_openai_sdk_sends_partial_images_then_the_image(client, tiny):
    """``client.images.generate(stream=True, partial_images=2)``: partial images (the first
    image's latent preview, one pixel per latent pixel) in order, then one completed event per
    image, each the image a plain request with the same seed gets."""
    sdk = AsyncOpenAI(base_url=BASE_URL + "/v1", api_key="unused", http_client=client)
    asked = {"num_inference_steps": 40, "seed": 11}
    events = [
        e
        async for e in await sdk.images.generate(
            model="tiny", prompt="a red fox", size="64x64", n=2, stream=True, partial_images=2, extra_body=asked
        )
    ]
    kinds = [e.type for e in events]
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    assert kinds == ["image_generation.partial_image"] * len(partials) + ["image_generation.completed"] * 2, kinds
    assert 1 <= len(partials) <= 2  # a mark passed between two looks gives one image for both
    assert [e.partial_image_index for e in partials] == list(range(len(partials)))
    for e in partials:
        with Image.open(io.BytesIO(base64.b64decode(e.b64_json))) as preview:
            latent = 64 // tiny.pipe.vae_scale_factor  # 8 for SD; the tiny model's VAE scales by 2
            assert preview.size == (latent, latent) and e.output_format == "png" and e.size == "64x64"
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert [(e.index, e.seed) for e in completed] == [(0, 11), (1, 12)]  # type: ignore[attr-defined]  # sdop's fields
    plain = await client.post("/v1/images/generations", json={"prompt": "a red fox", "size": "64x64", "n": 2, **asked})
    assert plain.status_code == 200, plain.text
    for e, d in zip(completed, plain.json()["data"], strict=True):
        assert np.array_equal(decode(e.b64_json), decode(d["b64_json"]))
    spec = (await client.get("/openapi.json")).json()["paths"]
    for route in ("/v1/images/generations", "/v1/images/edits"):  # both answers documented
        assert set(spec[route]["post"]["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}


async def test_an_edit_streams_too(client):
    """``client.images.edit(stream=True)``: the multipart form's ``stream`` and
    ``partial_images``; the completed image is the plain edit's."""
    photo = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(photo, format="PNG")
    sdk = AsyncOpenAI(base_url=BASE_URL + "/v1", api_key="unused", http_client=client)
    asked = {"num_inference_steps": 40, "seed": 4}
    events = [
        e
        async for e in await sdk.images.edit(
            image=("photo.png", photo.getvalue(), "image/png"),
            prompt="a blue bird",
            stream=True,
            partial_images=1,
            extra_body=asked,
        )
    ]
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    plain = await client.post(
        "/v1/images/edits",
        files={"image": ("photo.png", photo.getvalue(), "image/png")},
        data={"prompt": "a blue bird", **{k: str(v) for k, v in asked.items()}},
    )
    assert plain.status_code == 200, plain.text
    assert np.array_equal(decode(events[-1].b64_json), decode(plain.json()["data"][0]["b64_json"]))


async def test_what_a_plain_request_is_refused_with_a_stream_is_refused_with_before_it_starts():
    """A refusal is the HTTP error a plain request gets, not a 200 stream: a full queue is a 429
    with Retry-After; options that do not go together are 422s naming the field."""
    settings = Settings(model="fake", min_side=64, queue_size=1, max_batch_size=1, max_wait_ms=0, cache_type="none")
    app = create_app(settings, FakePipeline(seconds_per_call=1.0))
    async with serve(app) as client:
        body = {"prompt": "a boat", "size": "64x64", "num_inference_steps": 4}
        batcher = app.state.sd.batcher
        first = asyncio.create_task(client.post("/v1/images/generations", json=body))
        await until(lambda: batcher.inflight == 1, what="the first request runs")
        second = asyncio.create_task(client.post("/v1/images/generations", json=body))
        await until(lambda: batcher.depth == 1, what="the second is queued: the queue is full")
        full = await client.post("/v1/images/generations", json={**body, "stream": True})
        assert full.status_code == 429 and full.headers["retry-after"], full.text
        assert full.json()["error"]["code"] == "queue_full"
        assert (await first).status_code == (await second).status_code == 200
        for wrong, param in (
            ({"stream": True, "response_format": "url"}, "response_format"),
            ({"partial_images": 2}, "partial_images"),
            ({"stream": True, "partial_images": 4}, "partial_images"),
        ):
            r = await client.post("/v1/images/generations", json={**body, **wrong})
            assert r.status_code == 422 and r.json()["error"]["param"] == param, (wrong, r.text)
        ok = await client.post("/v1/images/generations", json={**body, "stream": True, "seed": 3})
        assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/event-stream")
        assert ok.text.count("event: image_generation.completed") == 1


async def test_a_client_that_leaves_mid_stream_cancels_its_request(tiny):
    """The client reads the first partial image and hangs up: its request stops at the next
    step (sdserve_requests_cancelled_total counts it), under step batching by leaving the
    batch, under request batching by ending its batch, which holds no other request (the
    pipeline's step callback raises). The stream ends without a completed event."""
    settings = Settings(**BASE, max_batch_size=4, max_wait_ms=0, cache_type="none", max_steps=300)
    app = create_app(settings, tiny)
    steps = 300
    body = {"prompt": "a long walk", "size": "64x64", "num_inference_steps": steps, "stream": True}
    body["partial_images"] = 3
    forwards = 0

    def counted(*_):
        nonlocal forwards
        forwards += 1

    hook = tiny.pipe.unet.register_forward_hook(counted)
    async with serve(app):
        before = metric("sdserve_requests_cancelled_total", reason="client_disconnected")
        sent: list[bytes] = []
        hang_up = asyncio.Event()
        request_sent = False

        async def receive() -> dict:
            nonlocal request_sent
            if not request_sent:
                request_sent = True
                return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
            await hang_up.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                sent.append(message["body"])
                if b"image_generation.partial_image" in message["body"]:
                    hang_up.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/images/generations",
            "raw_path": b"/v1/images/generations",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"sdserve.test"), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 40001),
            "server": ("sdserve.test", 80),
            "state": {},
        }
        await asyncio.wait_for(app(scope, receive, send), 60)
        text = b"".join(sent).decode()
        assert "image_generation.partial_image" in text and "image_generation.completed" not in text
        batcher = app.state.sd.batcher
        await until(
            lambda: metric("sdserve_requests_cancelled_total", reason="client_disconnected") != before,
            what="the request is counted as cancelled",
        )
        # It leaves the running batch at the step boundary after the cancel: polled, as that
        # step may still be on the model's thread (a loaded CI machine: a fixed sleep flaked).
        await until(lambda: not getattr(batcher, "_running", []) and batcher.idle, what="the cancelled request stops")
        assert batcher.inflight == 0
        stopped_at = forwards
        await asyncio.sleep(0.3)
        hook.remove()
        assert forwards == stopped_at, "the model still steps after the request left"
        # The first partial image is sent after step 75: it stopped long before its 300th.
        assert 75 <= forwards < 200, forwards


async def test_previews_are_rendered_when_read_never_on_the_model_thread(client, monkeypatch):
    """A preview rendered at each step on the model's thread would copy the latents to the host
    (on a GPU, a sync that stalls the next step for the whole batch): the model's thread keeps
    a copy of the latents, and a reader renders them, only as often as it reads."""
    import threading

    import sdserve.preview

    threads: list[str] = []
    render = sdserve.preview.latent_preview

    def spied(latents, family):
        threads.append(threading.current_thread().name)
        return render(latents, family)

    monkeypatch.setattr(sdserve.preview, "latent_preview", spied)
    body = {"prompt": "a kite", "size": "64x64", "num_inference_steps": 40, "stream": True, "partial_images": 3}
    r = await client.post("/v1/images/generations", json=body)
    assert r.status_code == 200 and r.text.count("event: image_generation.partial_image") >= 1
    assert threads and not any(t.startswith("sdserve-gpu") for t in threads), threads
    assert len(threads) <= 3  # once per partial image sent, not once per step (40)


async def test_a_stream_that_fails_after_its_200_is_counted_as_the_error_it_is(caplog):
    """The 200 went out before the model ran out of memory: the client gets an ``error``
    event, and the request metric and the access log count it as the 503 a plain request
    would have been, so the error-ratio alert sees streamed failures too."""
    import logging

    settings = Settings(model="fake", min_side=64, max_wait_ms=0, cache_type="none")
    labels = {"route": "/v1/images/generations", "method": "POST"}
    async with serve(create_app(settings, FakePipeline(oom_prompt="too big"))) as client:
        before = metric("sdserve_http_requests_total", **labels, status="503")
        ok_before = metric("sdserve_http_requests_total", **labels, status="200")
        with caplog.at_level(logging.INFO, logger="sdserve.access"):
            r = await client.post("/v1/images/generations", json={"prompt": "too big", "size": "64x64", "stream": True})
        assert r.status_code == 200 and "event: error" in r.text
        error = json.loads(r.text.split("data: ", 1)[1])["error"]
        assert error["code"] == "out_of_memory" and error["type"] == "server_error"
        assert metric("sdserve_http_requests_total", **labels, status="503") - before == 1
        assert metric("sdserve_http_requests_total", **labels, status="200") == ok_before
        assert any("POST /v1/images/generations 503" in m for m in caplog.messages), caplog.messages
