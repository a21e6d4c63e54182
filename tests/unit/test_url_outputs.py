"""response_format "url": images stored in S3-compatible storage (moto's S3 server on loopback,
through boto3 as a user's deployment runs it) and answered as presigned URLs."""

from __future__ import annotations

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


def fetch_png(url: str) -> np.ndarray:
    import base64

    r = httpx.get(url, timeout=10)
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
