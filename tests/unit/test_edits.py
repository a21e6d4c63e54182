"""POST /v1/images/edits through the official OpenAI SDK (in-process, the tiny model):
image-to-image without a mask, inpainting with one, and the 4xx of a bad upload."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import time
import zlib
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI, BadRequestError, UnprocessableEntityError
from PIL import Image

from sdserve.app import create_app
from sdserve.pipeline import Pipeline
from sdserve.settings import Settings
from sdserve.tiny import build_tiny_pipeline
from sdserve.work import ModelLoadError
from sdtesting.asgi import BASE_URL, metric, serve
from sdtesting.imaging import decode

BASE = {"model": "tiny", "min_side": 64}
STEPS = {"num_inference_steps": 4}


@pytest.fixture
async def client(tiny) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(**BASE, max_batch_size=4, max_wait_ms=300, max_upload_bytes=200_000), tiny)
    async with serve(app) as c:
        yield c


def encoded(fmt: str, size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, format=fmt)
    return buf.getvalue()


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


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose header claims a ``width`` x ``height`` RGB image (a
    decompression bomb's header: decoding it would take width x height x 3 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * 1024)  # a start of the rows; the decoder would want far more
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


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
    webp = await sdk(client).images.edit(
        image=image, prompt="x", size="64x64", output_format="webp", extra_body={"seed": 1, **STEPS}
    )
    raw = base64.b64decode(webp.data[0].b64_json)
    assert webp.output_format == "webp" and raw[:4] == b"RIFF" and raw[8:12] == b"WEBP"


async def test_edits_are_counted_like_generations(client):
    before = metric("sdserve_images_generated_total")
    await edit(client, image=("in.png", png(), "image/png"))
    assert metric("sdserve_images_generated_total") == before + 1


@pytest.mark.parametrize(
    ("files", "fields", "status", "param"),
    [
        ({"image": ("x.png", b"not an image", "image/png")}, {}, 422, "image"),
        ({"image": ("x.gif", encoded("GIF"), "image/gif")}, {}, 422, "image"),  # a format PIL reads, not the API
        ({"image": ("x.png", png()), "mask": ("m.tif", encoded("TIFF"), "image/tiff")}, {}, 422, "mask"),
        ({"image": ("x.png", png(size=(7, 64)), "image/png")}, {}, 422, "image"),  # nothing to round down to
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
    assert "object at 0x" not in r.json()["error"]["message"]  # no Python repr in what a client reads


@pytest.mark.parametrize("side", [9000, 20000])
async def test_an_upload_claiming_too_many_pixels_is_refused_from_its_header(client, side):
    files = {"image": ("x.png", png_claiming(side, side), "image/png")}
    r = await client.post("/v1/images/edits", files=files, data={"prompt": "x", "size": "64x64"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_value", r.text
    assert "the most pixels accepted are 16777216" in r.json()["error"]["message"]


async def test_the_sdk_raises_its_own_errors_for_a_bad_edit(client):
    with pytest.raises((UnprocessableEntityError, BadRequestError)) as e:
        await sdk(client).images.edit(image=("x.png", b"nope", "image/png"), prompt="x")
    assert "image" in str(e.value)


async def test_an_upload_is_decoded_off_the_event_loop(client, monkeypatch):
    """Decoding and resizing an upload (tens of megapixels at most) takes a while: the server
    goes on answering meanwhile."""
    from sdserve import routes

    real = routes.edit_inputs

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(routes, "edit_inputs", slow)
    files = {"image": ("x.png", png(), "image/png")}
    editing = asyncio.create_task(client.post("/v1/images/edits", files=files, data={"prompt": "x", **STEPS}))
    t0 = time.perf_counter()
    await asyncio.sleep(0.2)  # the edit reaches its decode; a blocked loop would wake us a second late
    assert (await client.get("/healthz")).status_code == 200
    assert time.perf_counter() - t0 < 0.7 and not editing.done()
    assert (await editing).status_code == 200


@pytest.fixture(scope="module")
def inpainter() -> Pipeline:
    """A tiny inpainting model (as runwayml/stable-diffusion-inpainting): a 9-channel UNet."""
    p = Pipeline(Settings(**BASE, max_batch_size=2))
    p.use(build_tiny_pipeline(in_channels=9))
    return p


@pytest.mark.parametrize("batching", ["request", "step"])
async def test_an_inpainting_model_warms_up_inpaints_and_refuses_the_other_tasks_naming_why(inpainter, batching):
    """Its UNet needs a mask: the warm-up inpaints (a generation there would fail, and the server
    never be ready), an edit with a mask is served, a generation or an edit without a mask is a
    422 saying it is an inpainting model, and /v1/models lists what it serves."""
    assert [key.task for key, _ in inpainter.warmup_shapes()] == ["inpaint"]
    settings = Settings(**BASE, batching=batching, max_batch_size=2, max_wait_ms=50)
    async with serve(create_app(settings, inpainter)) as c:
        assert (await c.get("/v1/models")).json()["data"][0]["tasks"] == ["inpaint"]
        mask = ("mask.png", png(mode="RGBA", alpha_box=(16, 16, 48, 48)), "image/png")
        painted = await edit(c, image=("in.png", png(), "image/png"), mask=mask)
        assert painted.shape == (64, 64, 3) and painted.std() > 0
        refusals = [
            (await c.post("/v1/images/generations", json={"prompt": "a bird", "size": "64x64"}), None),
            (await c.post("/generate", json={"prompt": "a bird", "width": 64, "height": 64}), None),
            (
                await c.post("/v1/images/edits", files={"image": ("in.png", png(), "image/png")}, data={"prompt": "x"}),
                "mask",
            ),
        ]
        for r, param in refusals:
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert error["code"] == "unsupported_task" and "inpainting model" in error["message"], error
            assert error["param"] == param


def test_a_model_whose_unet_takes_other_inputs_is_a_load_error():
    """An 8-channel UNet (InstructPix2Pix's): refused when loaded, with what sdserve serves."""
    with pytest.raises(
        ModelLoadError, match="UNet with 8 input channels.*text-to-image models \\(4\\) and inpainting models \\(9\\)"
    ):
        Pipeline(Settings(**BASE)).use(build_tiny_pipeline(in_channels=8))


def test_an_inpainting_model_saved_by_diffusers_loads_from_its_folder(tmp_path):
    """The path a PVC or a local copy takes: a StableDiffusionInpaintPipeline's folder."""
    from diffusers import StableDiffusionInpaintPipeline

    build_tiny_pipeline(StableDiffusionInpaintPipeline, in_channels=9).save_pretrained(tmp_path)
    p = Pipeline(Settings(model=str(tmp_path), min_side=64, device="cpu", dtype="float32"))
    p.load()
    assert p.tasks == ("inpaint",)
    assert [(key.task, key.width) for key, _ in p.warmup_shapes()] == [("inpaint", 64)]  # its native size
