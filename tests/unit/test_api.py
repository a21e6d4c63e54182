"""The HTTP API in-process (httpx over ASGITransport, the app's lifespan, the tiny model).

Real processes are kept where only a process proves it (tests/integration/test_server_*).
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI
from PIL import Image

from sdserve.app import create_app
from sdserve.settings import Settings
from sdtesting.asgi import BASE_URL, metric, serve
from sdtesting.fakes import FakePipeline
from sdtesting.imaging import decode

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}
BASE = {"model": "tiny", "min_side": 64}


@pytest.fixture
async def client(tiny) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(**BASE, max_batch_size=4, max_wait_ms=300, cache_type="memory"), tiny)
    async with serve(app) as c:
        yield c


async def gen(client, **body) -> httpx.Response:
    return await client.post("/generate", json={"prompt": "a cat", **SMALL, **body})


async def test_healthz_and_readyz_fail_while_a_model_call_hangs_and_when_the_batcher_stops(monkeypatch, caplog):
    """Liveness is more than an event loop that answers: a model call running past
    SDSERVE_STALL_SECONDS (a hung GPU) or a batcher task that raised fails /healthz, so the
    kubelet restarts the pod; once the call returns, /healthz passes again."""
    settings = Settings(model="fake", min_side=64, stall_seconds=0.5, cache_type="none")
    async with serve(create_app(settings, FakePipeline(seconds_per_call=3.5))) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        slow = asyncio.create_task(gen(client, num_inference_steps=1))  # one call of 3.5 s, either mode
        reasons = []
        for _ in range(2):
            await asyncio.sleep(1.1)
            hung = await client.get("/healthz")
            assert hung.status_code == 503 and "over SDSERVE_STALL_SECONDS (0.5 s)" in hung.json()["reason"], hung.text
            reasons.append(hung.json()["reason"])
            unready = await client.get("/readyz")  # traffic leaves it before the restart
            assert unready.status_code == 503 and unready.json()["reason"] == "unhealthy", unready.text
            assert metric("sdserve_model_call_age_seconds") > 1.0  # what an alert sees before the restart
        assert reasons[0] != reasons[1]  # "has run for 1 s", then "2 s": one stall all the same
        assert sum("a model call has run" in m for m in caplog.messages) == 1  # logged once per stalled call
        assert (await slow).status_code == 200
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).status_code == 200
        assert metric("sdserve_model_call_age_seconds") == 0

    app = create_app(Settings(model="fake", min_side=64), FakePipeline())

    async def broken() -> None:
        raise RuntimeError("a bug in the schedule")

    monkeypatch.setattr(app.state.sd.batcher, "_loop", broken)
    async with serve(app, wait_ready=False) as client:
        r = await client.get("/healthz")
        assert r.status_code == 503, r.text
        assert r.json()["reason"] == "the batcher stopped: RuntimeError('a bug in the schedule')"
        await app.state.sd.load_task  # the model loads all the same; the replica stays unready
        ready = (await client.get("/readyz")).json()
        assert ready["reason"] == "unhealthy" and "a bug in the schedule" in ready["message"]
    assert "the batcher stopped" in caplog.text and "a bug in the schedule" in caplog.text
    # The default limit: 600 s (1800 s when a first call may compile), or 3 request timeouts when
    # that is longer (slow, not hung).
    assert Settings(model="fake").stall_limit == 600
    assert Settings(model="fake", compile=True).stall_limit == 1800
    assert Settings(model="fake", timeout_seconds=1800).stall_limit == 5400


async def test_health_endpoints_and_models(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json()["model"] == "tiny"
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert (await client.get("/docs")).status_code == 200
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert {"/v1/images/generations", "/generate", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(paths)


async def test_openai_sdk_is_a_client_unchanged(client):
    sdk = AsyncOpenAI(base_url=BASE_URL + "/v1", api_key="unused", http_client=client)
    resp = await sdk.images.generate(
        model="tiny",
        prompt="a red fox",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 11, "num_inference_steps": 2},
    )
    assert len(resp.data) == 2
    a, b = decode(resp.data[0].b64_json), decode(resp.data[1].b64_json)
    assert a.shape == (64, 64, 3) and b.shape == (64, 64, 3)
    assert (a != b).any(), "image 2 uses seed+1 and must differ"


def luma(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("L")).astype(np.int16)


async def test_images_come_as_jpeg_or_webp_when_asked_at_the_quality_asked(client):
    """output_format and output_compression of the Images API (the SDK passes them as they are):
    the bytes are that format, a lower quality is smaller, and a seeded PNG already cached is
    not served for a JPEG request (the format is part of the cache key)."""
    sdk = AsyncOpenAI(base_url=BASE_URL + "/v1", api_key="unused", http_client=client)
    common = {"prompt": "a red fox", "size": "64x64", "extra_body": {"seed": 12, "num_inference_steps": 2}}
    png = await sdk.images.generate(**common)
    assert base64.b64decode(png.data[0].b64_json)[:8] == b"\x89PNG\r\n\x1a\n" and png.output_format == "png"
    jpeg = await sdk.images.generate(**common, output_format="jpeg")
    assert base64.b64decode(jpeg.data[0].b64_json)[:3] == b"\xff\xd8\xff" and jpeg.output_format == "jpeg"
    small = await sdk.images.generate(**common, output_format="jpeg", output_compression=10)
    assert len(small.data[0].b64_json) < len(jpeg.data[0].b64_json)
    # the same image: its brightness within a few levels (the tiny model's noisy colours lose more
    # to JPEG's halved colour resolution); another seed's is ten times as far
    assert np.abs(luma(jpeg.data[0].b64_json) - luma(png.data[0].b64_json)).mean() < 5
    webp = await sdk.images.generate(**common, output_format="webp", output_compression=80)
    raw = base64.b64decode(webp.data[0].b64_json)
    assert raw[:4] == b"RIFF" and raw[8:12] == b"WEBP" and webp.output_format == "webp"


async def test_every_answer_carries_a_request_id_and_is_logged_once(client, caplog):
    """X-Request-ID: the caller's (an ingress's) when it is a plain token, else a new one;
    every request but probes and scrapes gets one access log line, carrying the id."""
    import logging

    with caplog.at_level(logging.INFO, logger="sdserve.access"):
        given = await client.post(
            "/v1/images/generations", json={"prompt": "a", "size": "60x64"}, headers={"x-request-id": "abc-123"}
        )
        odd = await client.get("/v1/models", headers={"x-request-id": "no spaces\tor tabs"})
        none = await client.get("/v1/models")
        await client.get("/healthz")
    assert given.status_code == 422 and given.headers["x-request-id"] == "abc-123"
    assert len(odd.headers["x-request-id"]) == 32 and odd.headers["x-request-id"] != none.headers["x-request-id"]
    lines = [(r.getMessage(), r.request_id) for r in caplog.records if r.name == "sdserve.access"]
    assert [m.split(" ")[:3] for m, _ in lines] == [
        ["POST", "/v1/images/generations", "422"],
        ["GET", "/v1/models", "200"],
        ["GET", "/v1/models", "200"],
    ]
    assert lines[0][1] == "abc-123" and lines[2][1] == none.headers["x-request-id"]


async def test_generate_shape(client):
    r = await gen(client, num_images=2, seed=5, width=96, height=64)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seeds"] == [5, 6] and body["model"] == "tiny" and body["revision"] == "tiny-v1"
    assert decode(body["images"][0]).shape == (64, 96, 3)
    assert set(body["timings"]) == {"queue_seconds", "inference_seconds", "total_seconds"}


async def test_generate_answers_the_seed_services_contract(client):
    """A client written for the seed reads r.json()["image"] and checks status == "success"."""
    r = await gen(client, seed=9)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "success"
    assert decode(body["image"]).shape == (64, 64, 3)
    assert body["image"] == body["images"][0]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"width": 100}, "width"),
        ({"height": 4096}, "height"),
        ({"num_inference_steps": 500}, "num_inference_steps"),
        ({"num_images": 9}, "num_images"),
        ({"prompt": "x" * 5000}, "prompt"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"colour": "blue"}, "colour"),
        ({"seed": -3}, "seed"),
    ],
)
async def test_bad_generate_request_is_422_naming_the_field(client, body, field):
    r = await gen(client, **body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == field
    assert field in r.json()["error"]["message"]


async def test_missing_prompt_is_422(client):
    r = await client.post("/generate", json={"width": 64})
    assert r.status_code == 422 and r.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"size": "64by64"}, 422, "size"),
        ({"size": "60x64"}, 422, "size"),
        ({"response_format": "url"}, 422, "response_format"),
        ({"model": "dall-e-3"}, 404, "model"),
        ({"n": 0}, 422, "n"),
        ({"output_format": "gif"}, 422, "output_format"),
        ({"output_compression": 50}, 422, "output_compression"),  # png is lossless
        ({"output_format": "jpeg", "output_compression": 101}, 422, "output_compression"),
    ],
)
async def test_bad_openai_request(client, body, status, param):
    r = await client.post("/v1/images/generations", json={"prompt": "p", "size": "64x64", **body})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


async def test_a_server_with_aliases_answers_to_each_name_and_lists_them():
    """SDSERVE_MODEL_ALIASES (a canary's: the stable model's id): a request naming an alias is
    served, one naming another model is still a 404 that lists the names it would take."""
    app = create_app(Settings(model="fake", min_side=64, model_aliases="sd15, acme/old"), FakePipeline())
    async with serve(app) as client:
        body = {"prompt": "p", "size": "64x64", "num_inference_steps": 2}
        for name in ("fake", "sd15", "acme/old"):
            r = await client.post("/v1/images/generations", json={**body, "model": name})
            assert r.status_code == 200, r.text
        r = await client.post("/v1/jobs", json={**body, "model": "dall-e-3"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", r.text
        assert "'fake' or 'sd15' or 'acme/old'" in r.json()["error"]["message"]
        listed = (await client.get("/v1/models")).json()["data"][0]
        assert (listed["id"], listed["aliases"]) == ("fake", ["sd15", "acme/old"])


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ('{"prompt": "p", "size": "64x64", "guidance_scale": NaN}', "guidance_scale"),
        ('{"prompt": "p", "size": "64x64", "guidance_scale": -Infinity}', "guidance_scale"),
        ('{"prompt": "p", "size": "64x64", "output_format": "jpeg", "output_compression": NaN}', "output_compression"),
    ],
)
async def test_nan_or_infinity_in_a_body_is_a_422_naming_the_field_not_a_500(client, raw, param):
    """Python's JSON parser takes NaN and Infinity; the 422 echoing them must still be JSON."""
    for route in ("/v1/images/generations", "/v1/jobs"):
        r = await client.post(route, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize(
    ("method", "route", "content_type", "raw", "status", "code", "said"),
    [
        ("POST", "/generate", "application/json", b"nul", 422, "invalid_json", "at character 0"),
        ("POST", "/v1/images/generations", "application/json", b'{"prompt": "p",', 422, "invalid_json", "character 15"),
        ("POST", "/v1/jobs", "application/json", b'{"prompt": "p",', 422, "invalid_json", "character 15"),
        ("POST", "/v1/images/generations", "application/json", b"[1]", 422, "invalid_value", "body: "),
        ("POST", "/v1/images/edits", "multipart/form-data; boundary=x", b"{}", 400, "invalid_multipart", "multipart"),
        ("POST", "/v1/jobs", "multipart/form-data", b"--x\r\n", 400, "invalid_multipart", "boundary"),
        ("GET", "/v1/images/generate", None, b"", 404, "not_found", "GET /v1/images/generate"),
        ("GET", "/v1/images/generations", None, b"", 405, "method_not_allowed", "it takes POST"),
    ],
)
async def test_a_body_or_route_the_server_cannot_read_is_a_4xx_in_the_api_error_shape(
    client, method, route, content_type, raw, status, code, said
):
    """Malformed JSON (its loc is a character position, not a field), a broken multipart form,
    an unknown route or method: the same ``{"error": ...}`` body as every other error, saying
    what was wrong (FastAPI's defaults are ``{"detail": ...}`` or name character 15 a field)."""
    headers = {"content-type": content_type} if content_type else {}
    r = await client.request(method, route, content=raw, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and said in error["message"] and error["param"] is None, error
    if status == 405:
        assert r.headers["allow"] == "POST"


async def test_a_prompt_longer_than_clip_reads_is_answered_with_the_part_it_read(client, tiny):
    """CLIP reads 75 tokens and diffusers drops the rest with only a log line. The answer's
    revised_prompt (the Images API's field for the prompt used) is the longest start of the
    prompt, cut between words, that the text encoder read; a prompt read whole has none."""

    def tokens(text: str) -> int:
        return len(tiny.pipe.tokenizer(text, add_special_tokens=False).input_ids)

    long = " ".join(f"Fox{i}, in the Snow;" for i in range(40))
    truncated = metric("sdserve_prompts_truncated_total")
    body = {"prompt": long, "size": "64x64", "num_inference_steps": 2}
    answer = (await client.post("/v1/images/generations", json=body)).json()
    job = (await client.post("/v1/jobs", json=body)).json()
    for _ in range(200):
        job = (await client.get(f"/v1/jobs/{job['id']}")).json()
        if job["status"] == "succeeded":
            break
        await asyncio.sleep(0.05)
    for read in (answer["data"][0]["revised_prompt"], job["result"]["data"][0]["revised_prompt"]):
        next_word_end = long.index(" ", len(read) + 1)
        assert long.startswith(read) and tokens(read) <= 75 < tokens(long[:next_word_end]), read
    assert metric("sdserve_prompts_truncated_total") == truncated + 2
    short = (await client.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64"})).json()
    assert short["data"][0]["revised_prompt"] is None
    one_word = tiny.prompt_used("y" * 400)  # nowhere to cut between words: the tokens it read
    assert one_word and set(one_word) == {"y"} and tokens(one_word) <= 75


async def test_a_request_without_a_negative_prompt_gets_the_servers_default(tiny):
    """SDSERVE_DEFAULT_NEGATIVE_PROMPT (spec.defaults.negativePrompt): a request naming none is
    drawn as if it named the default; "" names none."""
    body = {"prompt": "a fox", "size": "64x64", "seed": 4, "num_inference_steps": 3}
    images = {}
    for default in (None, "blurry, text"):
        settings = Settings(**BASE, cache_type="none", default_negative_prompt=default)
        async with serve(create_app(settings, tiny)) as c:
            for name, extra in (
                ("unset", {}),
                ("given", {"negative_prompt": "blurry, text"}),
                ("none", {"negative_prompt": ""}),
            ):
                r = await c.post("/v1/images/generations", json={**body, **extra})
                images[default, name] = decode(r.json()["data"][0]["b64_json"])
    assert np.array_equal(images["blurry, text", "unset"], images[None, "given"])
    assert np.array_equal(images["blurry, text", "none"], images[None, "unset"])
    assert not np.array_equal(images[None, "unset"], images[None, "given"])


async def test_seeded_request_is_cached_and_unseeded_is_not(client):
    hits = metric("sdserve_cache_hits_total")
    first = await gen(client, seed=99, prompt="cache me")
    second = await gen(client, seed=99, prompt="cache me")
    assert first.json()["cached"] is False and second.json()["cached"] is True
    assert first.json()["images"] == second.json()["images"]
    assert metric("sdserve_cache_hits_total") == hits + 1
    a, b = await gen(client, prompt="no seed"), await gen(client, prompt="no seed")
    assert a.json()["cached"] is False and b.json()["cached"] is False
    assert a.json()["seeds"] != b.json()["seeds"]


async def test_same_seed_same_image_whatever_else_is_in_the_batch(tiny):
    app = create_app(Settings(**BASE, max_batch_size=4, max_wait_ms=1500, cache_type="none"), tiny)
    async with serve(app) as c:
        body = {"prompt": "a lighthouse", "seed": 1234, **SMALL}
        alone = (await c.post("/generate", json=body)).json()["images"][0]
        count0, sum0 = metric("sdserve_batch_size_count"), metric("sdserve_batch_size_sum")
        others = [{"prompt": f"other {i}", "seed": i, **SMALL} for i in range(3)]
        bodies = [others[0], body, others[1], others[2]]
        results = await asyncio.gather(*(c.post("/generate", json=b) for b in bodies))
    assert all(r.status_code == 200 for r in results)
    batches = metric("sdserve_batch_size_count") - count0
    images = metric("sdserve_batch_size_sum") - sum0
    # request batching: one observation per batch of images; step batching: one per step
    assert images / batches > 1, "the four requests were expected to share batches"
    together = results[1].json()["images"][0]
    diff = abs(decode(alone) - decode(together))
    # Batched GEMMs may round differently in the last bit of float32; after 8-bit
    # quantisation that is at most one level on a few pixels.
    assert diff.max() <= 1 and diff.mean() < 0.01


async def test_metrics_count_requests_by_route_and_status(client):
    labels = {"route": "/generate", "method": "POST", "status": "422"}
    before = metric("sdserve_http_requests_total", **labels)
    await gen(client, width=7)
    assert metric("sdserve_http_requests_total", **labels) == before + 1
    text = (await client.get("/metrics")).text
    for name in (
        "sdserve_request_duration_seconds_bucket",
        "sdserve_queue_wait_seconds_bucket",
        "sdserve_inference_duration_seconds_bucket",
        "sdserve_queue_depth",
        "sdserve_inflight_requests",
        "sdserve_batch_size_bucket",
        "sdserve_images_generated_total",
        "sdserve_model_load_seconds",
        "sdserve_ready",
    ):
        assert name in text, name


async def test_request_not_done_in_time_is_504_and_its_queued_work_is_dropped():
    settings = Settings(
        model="fake", min_side=64, max_batch_size=1, max_wait_ms=0, cache_type="none", timeout_seconds=1
    )
    fake = FakePipeline(seconds_per_call=0.7)
    async with serve(create_app(settings, fake)) as c:
        body = {"prompt": "slow", **SMALL}
        results = await asyncio.gather(*(c.post("/generate", json={**body, "seed": i}) for i in range(3)))
    codes = sorted(r.status_code for r in results)
    assert codes[0] == 200 and 504 in codes, codes
    assert next(r for r in results if r.status_code == 504).json()["error"]["code"] == "timeout"
    assert len(fake.calls) < 3, "a request that timed out while queued must not reach the model"


@pytest.mark.parametrize(
    ("pipeline", "default_size", "expected"),
    [("sdxl", "auto", (1024, 1024)), ("sd", "auto", (512, 512)), ("sd", "768x512", (768, 512))],
)
async def test_a_request_without_a_size_gets_the_models_native_size(pipeline, default_size, expected):
    """SDXL is trained at 1024x1024 and SD 1.5 at 512x512: a request that names no size gets
    the model's own (SDSERVE_DEFAULT_SIZE overrides it), on both APIs, and so does the warm-up."""
    fake = FakePipeline()
    settings = Settings(model="fake", pipeline=pipeline, default_size=default_size, cache_type="none")
    async with serve(create_app(settings, fake)) as client:
        assert (await client.post("/v1/images/generations", json={"prompt": "a"})).status_code == 200
        assert (await client.post("/v1/images/generations", json={"prompt": "b", "size": "auto"})).status_code == 200
        r = await client.post("/generate", json={"prompt": "c", "num_inference_steps": 2})
        assert r.status_code == 200 and decode(r.json()["image"]).shape == (expected[1], expected[0], 3)
    assert [(k.width, k.height) for k, _ in fake.calls] == [expected] * 3


def test_a_default_size_outside_the_request_limits_is_refused_at_start():
    with pytest.raises(ValueError, match="SDSERVE_DEFAULT_SIZE 2048x2048"):
        Settings(default_size="2048x2048")
    assert Settings(pipeline="sdxl", max_width=768).default_width_height() == (768, 1024)
    assert Settings(min_side=768).default_width_height() == (768, 768)  # auto stays within the limits
    assert Settings().default_width_height((768, 768)) == (768, 768)  # the loaded model's (SD 2.x 768-v)
    assert Settings(max_height=640).default_width_height((768, 768)) == (768, 640)
    assert Settings(default_size="640x512").default_width_height((768, 768)) == (640, 512)
