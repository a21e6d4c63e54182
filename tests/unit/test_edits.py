"""POST /v1/images/edits through the official OpenAI SDK (in-process, the tiny model):
image-to-image without a mask, inpainting with one, and the 4xx of a bad upload."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI, BadRequestError, UnprocessableEntityError
from PIL import Image

from sdserve.app import create_app
from sdserve.settings import Settings
from sdtesting.asgi import BASE_URL, metric, serve
from sdtesting.imaging import decode

BASE = {"model": "tiny", "min_side": 64}
STEPS = {"num_inference_steps": 4}


@pytest.fixture
async def client(tiny) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(**BASE, max_batch_size=4, max_wait_ms=300, max_upload_bytes=200_000), tiny)
    async with serve(app) as c:
        yield c


def png(size=(64, 64), mode="RGB", colour=(200, 40, 40), alpha_box=None) -> bytes:
    im = Image.new(mode, size, colour if mode == "RGB" else (*colour, 255))
    if alpha_box:  # a fully transparent box: the part to repaint
        im.paste((0, 0, 0, 0), alpha_box)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def noise_png(width: int, height: int) -> bytes:
    """A PNG that does not compress: over the test server's 200 000-byte upload limit."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sdk(client) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=BASE_URL + "/v1", api_key="unused", http_client=client)


async def edit(client, **kwargs) -> np.ndarray:
    resp = await sdk(client).images.edit(
        prompt="a blue bird", response_format="b64_json", extra_body={"seed": 3, **STEPS}, **kwargs
    )
    assert len(resp.data) == kwargs.get("n", 1)
    return decode(resp.data[0].b64_json)


async def test_image_to_image_through_the_openai_sdk_follows_the_input_image(client):
    red = await edit(client, image=("red.png", png(), "image/png"))
    assert red.shape == (64, 64, 3)
    again = await edit(client, image=("red.png", png(), "image/png"))
    green = await edit(client, image=("green.png", png(colour=(30, 200, 30)), "image/png"))
    assert np.array_equal(red, again)  # same seed, same image: same result
    assert not np.array_equal(red, green)  # the input image matters
    strong = decode(
        (
            await sdk(client).images.edit(
                image=("red.png", png(), "image/png"),
                prompt="a blue bird",
                extra_body={"seed": 3, "strength": 0.3, **STEPS},
            )
        )
        .data[0]
        .b64_json
    )
    assert not np.array_equal(red, strong)  # strength changes how far the image is noised


async def test_inpainting_with_a_mask_through_the_openai_sdk(client):
    image = ("in.png", png(), "image/png")
    plain = await edit(client, image=image)
    masked = await edit(
        client, image=image, mask=("mask.png", png(mode="RGBA", alpha_box=(16, 16, 48, 48)), "image/png")
    )
    other = await edit(client, image=image, mask=("mask.png", png(mode="RGBA", alpha_box=(0, 0, 32, 64)), "image/png"))
    assert masked.shape == (64, 64, 3)
    assert not np.array_equal(masked, plain) and not np.array_equal(masked, other)
    two = await sdk(client).images.edit(
        image=image, prompt="x", n=2, size="64x64", extra_body={"seed": 1, **STEPS}, response_format="b64_json"
    )
    assert [d.seed for d in two.data] == [1, 2]


async def test_edits_are_counted_like_generations(client):
    before = metric("sdserve_images_generated_total")
    await edit(client, image=("in.png", png(), "image/png"))
    assert metric("sdserve_images_generated_total") == before + 1


@pytest.mark.parametrize(
    ("files", "fields", "status", "param"),
    [
        ({"image": ("x.png", b"not an image", "image/png")}, {}, 422, "image"),
        ({"image": ("x.png", png(), "image/png"), "mask": ("m.png", png(size=(32, 32)), "image/png")}, {}, 422, "mask"),
        ({"image": ("x.png", noise_png(300, 300), "image/png")}, {}, 413, "image"),
        ({"image": ("x.png", png(size=(2048, 64)), "image/png")}, {}, 422, "image"),
        ({"image": ("x.png", png(), "image/png")}, {"size": "64x2048"}, 422, "size"),
        ({"image": ("x.png", png(), "image/png")}, {"strength": "1.5"}, 422, "strength"),
        ({"image": ("x.png", png(), "image/png")}, {"strength": "0.1", "num_inference_steps": "4"}, 422, "strength"),
        ({"image": ("x.png", png(), "image/png")}, {"colour": "blue"}, 422, "colour"),
        ({}, {}, 422, "image"),
    ],
)
async def test_a_bad_edit_is_a_4xx_naming_the_field(client, files, fields, status, param):
    r = await client.post("/v1/images/edits", files=files, data={"prompt": "x", **fields})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text


async def test_the_sdk_raises_its_own_errors_for_a_bad_edit(client):
    with pytest.raises((UnprocessableEntityError, BadRequestError)) as e:
        await sdk(client).images.edit(image=("x.png", b"nope", "image/png"), prompt="x")
    assert "image" in str(e.value)
