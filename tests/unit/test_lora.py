"""LoRA adapters: loaded at start from SDSERVE_LORAS, chosen per request (``lora``, ``loras``),
batched apart by adapter set, part of the cache key; an unknown adapter is a 422."""

from __future__ import annotations

import asyncio

import pytest

from sdserve.app import create_app
from sdserve.pipeline import Pipeline
from sdserve.settings import Settings
from sdtesting.asgi import serve
from sdtesting.fakes import FakePipeline
from sdtesting.imaging import decode
from sdtesting.lora import make_adapter

SMALL = {"width": 64, "height": 64, "num_inference_steps": 3}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    pixel, ink = tmp_path_factory.mktemp("pixel"), tmp_path_factory.mktemp("ink")
    make_adapter(ink, 2)
    # One as a .safetensors file, one as a folder; ink's default weight is 0.5.
    return [{"name": "pixel", "source": make_adapter(pixel, 1)}, {"name": "ink", "source": str(ink), "weight": 0.5}]


@pytest.fixture(scope="module")
def tiny(loras) -> Pipeline:
    p = Pipeline(Settings(model="tiny", min_side=64, loras=loras))
    p.load()
    return p


async def image(client, **body) -> tuple:
    r = await client.post("/generate", json={"prompt": "a fox", "seed": 4, **SMALL, **body})
    assert r.status_code == 200, r.text
    return decode(r.json()["image"]), r.json()["cached"]


async def test_an_adapter_changes_the_image_and_is_off_for_requests_without_it(tiny, loras):
    async with serve(create_app(Settings(model="tiny", min_side=64, loras=loras, cache_type="none"), tiny)) as c:
        plain, _ = await image(c)
        pixel, _ = await image(c, lora="pixel")
        again, _ = await image(c, lora="pixel")
        after, _ = await image(c)
        ink, _ = await image(c, loras={"ink": 1.0})
        both, _ = await image(c, loras={"ink": 1.0, "pixel": 1.0})
    assert (pixel != plain).any() and (pixel == again).all()
    assert (after == plain).all()  # the adapter was switched off again
    assert (ink != pixel).any() and (both != ink).any() and (both != pixel).any()


async def test_the_cache_key_includes_the_adapters(tiny, loras):
    async with serve(create_app(Settings(model="tiny", min_side=64, loras=loras), tiny)) as c:
        _, first = await image(c, seed=77)
        _, with_lora = await image(c, seed=77, lora="pixel")
        _, repeated = await image(c, seed=77, lora="pixel")
    assert (first, with_lora, repeated) == (False, False, True)


@pytest.mark.parametrize(
    ("body", "field"),
    [({"lora": "nope"}, "lora"), ({"loras": {"pixel": 1.0, "nope": 1.0}}, "loras"), ({"loras": {"ink": 9}}, "loras")],
)
async def test_an_unknown_adapter_or_weight_is_a_422_naming_the_field(body, field):
    fake = FakePipeline()
    settings = Settings(
        model="fake", min_side=64, loras=[{"name": "pixel", "source": "/x"}, {"name": "ink", "source": "/y"}]
    )
    async with serve(create_app(settings, fake)) as c:
        r = await c.post("/generate", json={"prompt": "x", **SMALL, **body})
        assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text
        r = await c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", **body})
        assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text


async def test_requests_with_different_adapters_are_batched_apart():
    fake = FakePipeline(seconds_per_call=0.3)
    settings = Settings(
        model="fake",
        min_side=64,
        max_wait_ms=300,
        loras=[{"name": "pixel", "source": "/x"}, {"name": "ink", "source": "/y"}],
    )
    async with serve(create_app(settings, fake)) as c:
        bodies = [{"lora": "pixel"}, {"lora": "pixel"}, {"lora": "ink"}, {}]
        results = await asyncio.gather(
            *(c.post("/generate", json={"prompt": f"p{i}", "seed": i, **SMALL, **b}) for i, b in enumerate(bodies))
        )
    assert all(r.status_code == 200 for r in results)
    if settings.batching == "step":
        mixed = [keys for keys in fake.step_keys if len({k.loras for k in keys}) > 1]
        assert not mixed and any(len(keys) == 2 for keys in fake.step_keys)
    else:
        by_set: dict = {}
        for key, images in fake.calls:
            by_set.setdefault(key.loras, []).append(images)
        assert by_set[(("pixel", 1.0),)] == [2]  # the two pixel requests in one batch
        assert set(by_set) == {(("pixel", 1.0),), (("ink", 1.0),), ()}
