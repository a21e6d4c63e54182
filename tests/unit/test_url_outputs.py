"""response_format "url": images stored in S3-compatible storage (moto's S3 server on loopback,
through boto3 as a user's deployment runs it) and answered as presigned URLs."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI

from sdserve.app import create_app
from sdserve.settings import Settings
from sdtesting.asgi import BASE_URL, metric, serve
from sdtesting.fakes import FakePipeline
from sdtesting.imaging import decode
from sdtesting.procs import S3Proc

BASE = {"model": "fake", "min_side": 64}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    store = S3Proc(tmp_path_factory.mktemp("s3"))
    yield store
    store.stop()


@pytest.fixture
async def client(s3) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(create_app(Settings(**BASE, **s3.settings(), s3_url_expiry_seconds=600), FakePipeline())) as c:
        yield c


def fetch(url: str) -> httpx.Response:
    """A presigned URL read as a user's browser would (moto's server is a real HTTP server)."""
    return httpx.get(url, timeout=10)


def fetch_png(url: str) -> np.ndarray:
    r = fetch(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    return decode(base64.b64encode(r.content).decode())


async def test_generations_answer_presigned_urls_through_the_openai_sdk(client, s3):
    sdk = AsyncOpenAI(base_url=BASE_URL + "/v1", api_key="unused", http_client=client)
    resp = await sdk.images.generate(
        prompt="a red fox", n=2, size="64x64", response_format="url", extra_body={"seed": 21, "num_inference_steps": 2}
    )
    urls = [d.url for d in resp.data]
    assert all(u and "X-Amz-Signature=" in u and "X-Amz-Expires=600" in u for u in urls)
    a, b = fetch_png(urls[0]), fetch_png(urls[1])
    assert a.shape == (64, 64, 3) and (a != b).any()
    b64 = await sdk.images.generate(
        prompt="a red fox", n=2, size="64x64", extra_body={"seed": 21, "num_inference_steps": 2}
    )
    assert np.array_equal(decode(b64.data[0].b64_json), a)  # the stored image is the generated one


async def test_the_same_image_is_stored_once(client, s3):
    body = {"prompt": "content addressed", "size": "64x64", "response_format": "url", "seed": 5}
    before = len(s3.keys())
    uploaded = metric("sdserve_url_outputs_total", outcome="uploaded")
    first = (await client.post("/v1/images/generations", json=body)).json()["data"][0]["url"]
    second = (await client.post("/v1/images/generations", json=body)).json()["data"][0]["url"]  # a cache hit
    assert len(s3.keys()) == before + 1
    assert metric("sdserve_url_outputs_total", outcome="uploaded") == uploaded + 1
    assert metric("sdserve_url_outputs_total", outcome="reused") >= 1
    assert first.split("?")[0] == second.split("?")[0] and first.split("?")[0].split("/")[-1].endswith(".png")
    assert all(k.startswith("out/") for k in s3.keys())


async def test_a_jpeg_or_webp_is_stored_as_such_for_a_url_and_kept_so_by_a_job(client, s3):
    """The stored object's key and Content-Type follow output_format, and so does a job's result
    (its record says which format its images are), for a URL job and a base64 one."""
    body = {"prompt": "formats", "size": "64x64", "seed": 8, "response_format": "url", "output_format": "jpeg"}
    r = (await client.post("/v1/images/generations", json=body)).json()
    assert r["output_format"] == "jpeg"
    got = fetch(r["data"][0]["url"])
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg" and got.content[:3] == b"\xff\xd8\xff"
    assert any(k.endswith(".jpeg") for k in s3.keys())
    for response_format in ("url", "b64_json"):
        job = {**body, "output_format": "webp", "response_format": response_format, "seed": 9}
        accepted = (await client.post("/v1/jobs", json=job)).json()
        done = await until_done(client, accepted["id"])
        assert done["status"] == "succeeded" and done["result"]["output_format"] == "webp", done
        image = done["result"]["data"][0]
        raw = fetch(image["url"]).content if "url" in image else base64.b64decode(image["b64_json"])
        assert raw[:4] == b"RIFF" and raw[8:12] == b"WEBP"


async def test_url_output_without_storage_is_a_422_naming_response_format():
    async with serve(create_app(Settings(**BASE), FakePipeline())) as c:
        r = await c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "response_format": "url"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "response_format"


async def test_storage_going_away_is_a_retryable_503(s3, tmp_path):
    down = S3Proc(tmp_path, bucket="gone")
    app = create_app(Settings(**BASE, **down.settings()), FakePipeline())
    down.stop()
    async with serve(app) as c:
        r = await c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "response_format": "url"})
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "storage_unavailable"


async def until_done(client: httpx.AsyncClient, job_id: str) -> dict:
    for _ in range(200):
        view = (await client.get(f"/v1/jobs/{job_id}")).json()
        if view["status"] in ("succeeded", "failed", "cancelled"):
            return view
        await asyncio.sleep(0.05)
    raise TimeoutError(job_id)


async def test_a_job_answers_urls_presigned_each_time_it_is_read_and_keeps_no_images(s3):
    """A job's images go to the store when it ends; its record keeps their keys, not megabytes
    of base64 (in Redis, for a day), and every read presigns them anew: a client reading the
    job hours later still gets URLs valid for the expiry."""
    app = create_app(Settings(**BASE, **s3.settings(), s3_url_expiry_seconds=600), FakePipeline())
    body = {"prompt": "a job with urls", "size": "64x64", "n": 2, "seed": 4, "response_format": "url"}
    async with serve(app) as client:
        job = (await client.post("/v1/jobs", json=body)).json()
        done = await until_done(client, job["id"])
        assert done["status"] == "succeeded", done
        urls = [d["url"] for d in done["result"]["data"]]
        assert [d["seed"] for d in done["result"]["data"]] == [4, 5] and "b64_json" not in done["result"]["data"][0]
        assert all("X-Amz-Expires=600" in u for u in urls)
        a, b = fetch_png(urls[0]), fetch_png(urls[1])
        assert a.shape == (64, 64, 3) and (a != b).any()
        record = await app.state.sd.jobs.store.get(job["id"])
        assert record.images == [] and len(record.keys) == 2 and all(k.startswith("out/") for k in record.keys)
        await asyncio.sleep(1.1)  # presigned again: another signing time, the same object
        again = (await client.get(f"/v1/jobs/{job['id']}")).json()["result"]["data"][0]["url"]
        assert again != urls[0] and again.split("?")[0] == urls[0].split("?")[0]
        sync = (await client.post("/v1/images/generations", json={**body, "response_format": "b64_json"})).json()
        assert np.array_equal(decode(sync["data"][0]["b64_json"]), a)


async def test_a_job_asking_for_urls_without_storage_is_a_422_naming_response_format():
    async with serve(create_app(Settings(**BASE), FakePipeline())) as c:
        r = await c.post("/v1/jobs", json={"prompt": "x", "size": "64x64", "response_format": "url"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "response_format"


async def test_a_url_job_waits_out_a_store_restart_and_fails_only_past_its_retry_time(tmp_path):
    """An image store restarting when a job ends (MinIO rolling, a network blip) does not lose
    the finished images: the upload is retried while the job reads as running, then succeeds.
    A store that stays away fails the job with storage_unavailable once the retry time is over."""
    flaky = S3Proc(tmp_path, bucket="flaky")
    settings = Settings(**BASE, **flaky.settings(), job_storage_retry_seconds=30, job_lease_seconds=2)
    flaky.stop()
    async with serve(create_app(settings, FakePipeline())) as client:
        body = {"prompt": "a store restart", "size": "64x64", "seed": 3, "response_format": "url"}
        job = (await client.post("/v1/jobs", json=body)).json()
        await asyncio.sleep(4)  # the images were made at once; the lease (2 s) was renewed since
        view = (await client.get(f"/v1/jobs/{job['id']}")).json()
        assert view["status"] == "running", view.get("error")
        # started off the event loop, which runs the job (and renews its lease) meanwhile
        back = await asyncio.to_thread(S3Proc, tmp_path, bucket="flaky", port=flaky.port)
        try:
            done = await until_done(client, job["id"])
            assert done["status"] == "succeeded", done.get("error")
            assert fetch_png(done["result"]["data"][0]["url"]).shape == (64, 64, 3)
        finally:
            back.stop()
    gone = Settings(**BASE, **flaky.settings(), job_storage_retry_seconds=1)
    async with serve(create_app(gone, FakePipeline())) as client:
        job = (await client.post("/v1/jobs", json={**body, "seed": 4})).json()
        done = await until_done(client, job["id"])
        assert done["status"] == "failed" and done["error"]["code"] == "storage_unavailable", done
