"""The content check (SDSERVE_NSFW_CHECK): a diffusers safety checker judges every image, in
either batching policy (with step batching it runs on the decode thread); a withheld image is a
400. A server asked to check that has no checker fails its load instead of serving unchecked."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from sdserve.app import create_app
from sdserve.pipeline import Pipeline
from sdserve.settings import Settings
from sdserve.work import ModelLoadError
from sdtesting.asgi import metric, serve
from sdtesting.imaging import decode
from sdtesting.safety import make_checker

BASE = {"model": "tiny", "min_side": 64, "warmup": False}
BODY = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 3, "seed": 11}


@pytest.fixture(scope="module")
def checkers(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkers")
    return {flag: str(make_checker(root / str(flag), flags_everything=flag)) for flag in (True, False)}


async def generate(pipeline: Pipeline, batching: str) -> tuple[int, dict]:
    app = create_app(Settings(**BASE, batching=batching, nsfw_check=pipeline.settings.nsfw_check), pipeline)
    async with serve(app) as client:
        r = await client.post("/v1/images/generations", json=BODY)
    return r.status_code, r.json()


@pytest.mark.parametrize("batching", ["request", "step"])
async def test_a_flagged_image_is_withheld_and_an_unflagged_one_served_unchanged(tiny, checkers, batching):
    strict = Pipeline(Settings(**BASE, nsfw_check=True, safety_checker=checkers[True]))
    lenient = Pipeline(Settings(**BASE, nsfw_check=True, safety_checker=checkers[False]))
    flagged0 = metric("sdserve_nsfw_flagged_images_total")
    status, body = await generate(strict, batching)
    assert status == 400 and body["error"]["code"] == "nsfw_content", body
    assert metric("sdserve_nsfw_flagged_images_total") == flagged0 + 1
    status, body = await generate(lenient, batching)
    assert status == 200, body
    unchecked_status, unchecked = await generate(tiny, batching)
    assert unchecked_status == 200
    assert np.array_equal(decode(body["data"][0]["b64_json"]), decode(unchecked["data"][0]["b64_json"]))
    assert metric("sdserve_nsfw_flagged_images_total") == flagged0 + 1  # the lenient checker ran and passed it


def test_the_checker_defaults_to_the_models_own_safety_checker_folder(tmp_path):
    """A diffusers folder with safety_checker/ and feature_extractor/ (as SD 1.x ships on the Hub)."""
    from sdserve.tiny import build_tiny_pipeline

    model = tmp_path / "model"
    build_tiny_pipeline().save_pretrained(model)
    make_checker(model / "safety_checker", flags_everything=True)
    (model / "feature_extractor").mkdir()
    shutil.move(model / "safety_checker" / "preprocessor_config.json", model / "feature_extractor")
    p = Pipeline(Settings(**{**BASE, "model": str(model)}, nsfw_check=True))
    p.load()
    assert p._safety is not None
    assert p._check_nsfw([_gray()]) == [None]  # that checker flags everything


def _gray():
    from PIL import Image

    return Image.new("RGB", (64, 64), (128, 128, 128))


@pytest.mark.parametrize(
    "settings,says",
    [
        ({}, "model 'tiny' ships no safety checker"),
        ({"pipeline": "sdxl"}, "an SDXL model ships no safety checker"),
        ({"safety_checker": "/nowhere"}, "no safety checker at /nowhere"),
    ],
)
def test_checking_without_a_checker_fails_the_load_naming_the_setting(settings, says):
    p = Pipeline(Settings(**BASE, nsfw_check=True, **settings))
    with pytest.raises(ModelLoadError) as e:
        p.load()
    assert says in str(e.value) and "SDSERVE_SAFETY_CHECKER" in str(e.value), str(e.value)


def test_a_model_folder_without_a_safety_checker_fails_the_load(tmp_path):
    from sdserve.tiny import build_tiny_pipeline

    build_tiny_pipeline().save_pretrained(tmp_path / "model")
    p = Pipeline(Settings(**{**BASE, "model": str(tmp_path / "model")}, nsfw_check=True))
    with pytest.raises(ModelLoadError) as e:
        p.load()
    assert f"no safety checker at {tmp_path / 'model'}/safety_checker" in str(e.value), str(e.value)
