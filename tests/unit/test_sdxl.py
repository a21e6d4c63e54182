"""SDXL (SDSERVE_PIPELINE=sdxl) on the tiny SDXL pipeline: two text encoders, the pooled
embedding and size ids the UNet takes besides the prompt, and the VAE that diffusers switches
to float32 to decode. Each batching policy serves it; the step path (sdserve.denoise) gives the
image the diffusers call gives; an edit does not break a decode running beside it."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
from PIL import Image

from sdserve.app import create_app
from sdserve.pipeline import Pipeline
from sdserve.settings import Settings
from sdserve.stepper import StepBatcher
from sdserve.tiny import build_tiny_xl_pipeline
from sdserve.work import BatchKey, Item, ModelLoadError
from sdtesting.asgi import serve
from sdtesting.imaging import decode

XL = {"model": "tiny", "pipeline": "sdxl", "min_side": 64, "warmup": False}


@pytest.fixture(scope="module")
def xl():
    p = Pipeline(Settings(**XL, max_batch_size=4))
    p.load()
    return p


def key(steps=5, guidance=7.5, scheduler="default", side=64, **kw) -> BatchKey:
    return BatchKey(side, side, steps, guidance, scheduler, **kw)


def pixels(item: Item) -> np.ndarray:
    return np.asarray(item.images[0]).astype(np.int16)


async def stepped(pipeline: Pipeline, jobs: list[tuple[BatchKey, Item]]) -> list[Item]:
    batcher = StepBatcher(pipeline, max_batch_size=4, queue_size=8)
    batcher.start()
    try:
        futures = [batcher.submit(k, it).future for k, it in jobs]
        return list(await asyncio.wait_for(asyncio.gather(*futures), 120))
    finally:
        await batcher.stop()


def test_the_tiny_model_is_an_sdxl_pipeline_when_asked(xl):
    assert type(xl.pipe).__name__ == "StableDiffusionXLPipeline" and xl.revision == "tiny-xl-v1"
    assert xl.pipe.unet.config.addition_embed_type == "text_time"  # pooled text + size ids


@pytest.mark.parametrize("guidance", [7.5, 0.0])
async def test_sdxl_step_batching_gives_the_request_image_alone_or_in_any_mix(xl, guidance):
    """Guidance 0 is how SDXL Turbo runs: no classifier-free guidance, the prompt's prediction alone."""
    fox = Item("a red fox", "blurry", 1, 42)
    xl.run(key(guidance=guidance), [fox])
    (alone,) = await stepped(xl, [(key(guidance=guidance), Item("a red fox", "blurry", 1, 42))])
    diff = np.abs(pixels(alone) - pixels(fox))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.mean(), diff.max())
    mix = [
        (key(3, 2.0, "euler"), Item("a bird", None, 2, 7)),
        (key(guidance=guidance), Item("a red fox", "blurry", 1, 42)),
    ]
    company, in_mix = await stepped(xl, mix)
    assert np.array_equal(pixels(in_mix), pixels(alone))  # bit-identical on the CPU (padded forward)
    assert np.abs(pixels(company) - pixels(alone)).mean() > 1  # the company was another image
    other = Item("a red fox", "blurry", 1, 43)
    xl.run(key(guidance=guidance), [other])
    assert np.abs(pixels(other) - pixels(fox)).mean() > 1  # the tolerance is far below a seed's difference


async def test_sdxl_image_to_image_is_stepped_and_gives_the_request_image_alone_or_in_a_mix(xl):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    k = key(6, task="img2img", strength=0.5)
    requested = Item("a bird", "blurry", 1, 9, init_image=init)
    xl.run(k, [requested])
    (alone,) = await stepped(xl, [(k, Item("a bird", "blurry", 1, 9, init_image=init))])
    assert alone.progress == requested.progress == 3
    diff = np.abs(pixels(alone) - pixels(requested))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.mean(), diff.max())
    mix = [(key(4, 3.0, "euler"), Item("a fox", None, 1, 7)), (k, Item("a bird", "blurry", 1, 9, init_image=init))]
    company, in_mix = await stepped(xl, mix)
    assert np.array_equal(pixels(in_mix), pixels(alone))  # bit-identical on the CPU (padded forward)
    flat = Item("a bird", "blurry", 1, 9, init_image=Image.new("RGB", (64, 64), (20, 200, 40)))
    xl.run(k, [flat])
    assert np.abs(pixels(flat) - pixels(requested)).mean() > 1  # the input image counts


@pytest.mark.parametrize("channels", [4, 9])
async def test_sdxl_inpainting_is_stepped_and_gives_the_request_image(xl, channels):
    """4: SDXL base inpaints (its latents blended with the input image's after each step),
    stepped beside a generation. 9: an SDXL inpainting model (as
    diffusers/stable-diffusion-xl-1.0-inpainting-0.1), whose UNet takes the mask and the masked
    image's latents in each forward beside SDXL's pooled embedding and size ids, stepped beside
    another inpainting request. Either way the image is the diffusers inpaint call's."""
    painter = xl
    if channels == 9:
        painter = Pipeline(Settings(**XL, max_batch_size=4))
        painter.use(build_tiny_xl_pipeline(in_channels=9))
        assert painter.tasks == ("inpaint",)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    company = (key(3), Item("a fox", None, 1, 7))
    if channels == 9:
        company = (key(6, 3.0, "ddim", task="inpaint"), Item("a fox", None, 1, 7, init_image=init, mask_image=mask))
    for scheduler, strength in (("default", 1.0), ("euler_a", 0.75)):
        k = key(4, scheduler=scheduler, task="inpaint", strength=strength)
        requested = Item("a bird", None, 1, 9, init_image=init, mask_image=mask)
        painter.run(k, [requested])
        fox, in_mix = await stepped(
            painter, [company, (k, Item("a bird", None, 1, 9, init_image=init, mask_image=mask))]
        )
        assert in_mix.progress == requested.progress == int(4 * strength)
        diff = np.abs(pixels(in_mix) - pixels(requested))
        assert diff.max() <= 2 and diff.mean() < 0.05, (scheduler, diff.mean(), diff.max())
        assert np.abs(pixels(fox) - pixels(in_mix))[24:40, 24:40].mean() > 1


def test_an_sdxl_request_batch_gives_each_request_the_image_it_gets_alone(xl):
    """SDXL encodes a missing negative prompt as zeros: a request without one keeps its image
    when it is batched with requests that have one (and so does the request that has one)."""
    plain, negative = Item("a red fox", None, 1, 1), Item("a cat", "ugly", 1, 2)
    xl.run(key(), [plain])
    xl.run(key(), [negative])
    together = [Item("a red fox", None, 1, 1), Item("a cat", "ugly", 1, 2)]
    xl.run(key(), together)
    for alone, batched in zip((plain, negative), together, strict=True):
        diff = np.abs(pixels(alone) - pixels(batched))
        assert diff.max() <= 1 and diff.mean() < 0.01, (diff.mean(), diff.max())
    assert np.abs(pixels(plain) - pixels(negative)).mean() > 1


async def test_an_sdxl_lora_applies_in_both_batching_policies(tmp_path):
    from sdserve.settings import LoraSetting
    from sdtesting.lora import make_adapter

    adapter = LoraSetting(name="style", source=make_adapter(tmp_path, seed=3, xl=True))
    p = Pipeline(Settings(**XL, max_batch_size=4, loras=[adapter]))
    p.load()
    styled = key(loras=(("style", 1.0),))
    plain, requested = Item("a red fox", None, 1, 1), Item("a red fox", None, 1, 1)
    p.run(key(), [plain])
    p.run(styled, [requested])
    in_steps, in_steps_plain = await stepped(
        p, [(styled, Item("a red fox", None, 1, 1)), (key(), Item("a red fox", None, 1, 1))]
    )
    assert np.abs(pixels(requested) - pixels(plain)).mean() > 1  # the adapter changes the image
    assert np.abs(pixels(in_steps) - pixels(requested)).max() <= 2  # the same adapter in step batching
    assert np.abs(pixels(in_steps_plain) - pixels(plain)).max() <= 2  # and it is off for the request without it


def png(colour=(200, 40, 40), mode="RGB", box=None) -> bytes:
    im = Image.new(mode, (64, 64), colour if mode == "RGB" else (*colour, 255))
    if box:
        im.paste((0, 0, 0, 0), box)  # transparent: the part to repaint
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("batching", ["request", "step"])
async def test_sdxl_generations_and_edits_through_the_api(xl, batching):
    app = create_app(Settings(**XL, batching=batching, max_batch_size=4, max_wait_ms=100), xl)
    async with serve(app) as client:
        body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 4, "seed": 5}
        gens = await asyncio.gather(
            client.post("/v1/images/generations", json={**body, "n": 2}),
            client.post("/v1/images/generations", json={**body, "guidance_scale": 3.0, "scheduler": "euler"}),
        )
        edits = await asyncio.gather(
            client.post("/v1/images/edits", files={"image": ("a.png", png())}, data={"prompt": "a bird", "seed": "3"}),
            client.post(
                "/v1/images/edits",
                files={"image": ("a.png", png()), "mask": ("m.png", png(mode="RGBA", box=(16, 16, 48, 48)))},
                data={"prompt": "a bird", "seed": "3"},
            ),
        )
    for r in (*gens, *edits):
        assert r.status_code == 200, r.text
    two = [decode(d["b64_json"]) for d in gens[0].json()["data"]]
    assert len(two) == 2 and two[0].shape == (64, 64, 3) and np.abs(two[0] - two[1]).mean() > 1
    img2img, inpaint = (decode(r.json()["data"][0]["b64_json"]) for r in edits)
    assert np.abs(img2img - inpaint).mean() > 0  # the mask changed what was repainted


def test_an_sdxl_image_to_image_start_during_a_decode_leaves_both_intact(monkeypatch):
    """float16: a stepped image-to-image request encodes its input image in float32 (as
    diffusers' SDXL img2img does), switching the VAE on the worker thread while the decode
    thread decodes. The decode below waits inside the VAE for the encode (2 s at most); with
    the VAE lock the encode waits for the decode instead, and both come out whole."""
    half = Pipeline(Settings(**XL, dtype="float16", device="cpu", max_batch_size=2))
    half.load()
    decoding, encoded = threading.Event(), threading.Event()
    real_decode, real_encode = half.pipe.vae.decode, half.pipe.vae.encode

    def decode_slowly(*args, **kwargs):
        decoding.set()
        encoded.wait(2)
        return real_decode(*args, **kwargs)

    def encode_and_tell(*args, **kwargs):
        try:
            return real_encode(*args, **kwargs)
        finally:
            encoded.set()

    monkeypatch.setattr(half.pipe.vae, "decode", decode_slowly)
    monkeypatch.setattr(half.pipe.vae, "encode", encode_and_tell)
    states = half.begin(key(2), Item("a red fox", None, 1, 1))
    while not all(half.finished(s) for s in states):
        half.step(states)
    decoded: list = []
    thread = threading.Thread(target=lambda: decoded.extend(half.finish(states)), name="sdserve-decode-test")
    thread.start()
    assert decoding.wait(5)
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    edit = half.begin(key(2, task="img2img", strength=0.5), Item("a bird", None, 1, 2, init_image=init))
    thread.join(10)
    assert len(decoded) == 1 and np.asarray(decoded[0]).std() > 0
    while not all(half.finished(s) for s in edit):
        half.step(edit)
    (image,) = half.finish(edit)
    assert np.isfinite(np.asarray(image)).all() and np.asarray(image).std() > 0


def test_an_sdxl_refiner_is_a_load_error_naming_it():
    """The refiner's UNet takes five size ids (an aesthetic score among them) where SDXL base
    takes six: refused when loaded, instead of a warm-up failing inside diffusers with "the
    model has an incorrect config"."""
    from sdserve import tiny

    refiner = build_tiny_xl_pipeline()
    refiner.unet = tiny._unet(
        cross_attention_dim=2 * tiny.TEXT_DIM,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=tiny.TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=5 * tiny.TIME_EMBED_DIM + tiny.TEXT_DIM,
    )
    with pytest.raises(ModelLoadError, match="takes 5 size ids, not SDXL base's 6: an SDXL refiner"):
        Pipeline(Settings(**XL)).use(refiner)
    Pipeline(Settings(**XL)).use(build_tiny_xl_pipeline())  # the base model's six pass
