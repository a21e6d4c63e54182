"""Pipeline settings that change what runs: the default scheduler, per-request schedulers, compile."""

from __future__ import annotations

import threading

import pytest

from sdserve.pipeline import Pipeline
from sdserve.settings import Settings
from sdserve.work import BatchKey, Item


@pytest.fixture(scope="module")
def euler():
    p = Pipeline(Settings(model="tiny", scheduler="euler", warmup=False))
    p.load()
    return p


def test_server_default_scheduler_comes_from_settings(euler):
    assert type(euler.scheduler("default")).__name__ == "EulerDiscreteScheduler"
    assert type(euler.scheduler("")).__name__ == "EulerDiscreteScheduler"


def test_request_can_pick_another_scheduler_and_it_is_used(euler):
    assert type(euler.scheduler("dpmpp_2m")).__name__ == "DPMSolverMultistepScheduler"
    item = Item("x", None, 1, 1)
    euler.run(BatchKey(64, 64, 2, 7.5, "ddim"), [item])
    assert type(euler.pipe.scheduler).__name__ == "DDIMScheduler" and len(item.images) == 1


def test_model_loaded_on_cpu_in_float32_with_sdpa():
    p = Pipeline(Settings(model="tiny", warmup=False))
    p.load()
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert p.device == "cpu" and p.dtype == torch.float32 and p.revision == "tiny-v1"
    assert all(isinstance(proc, AttnProcessor2_0) for proc in p.pipe.unet.attn_processors.values())


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_diffusers_folder_loads_and_serves_what_the_same_weights_serve(tmp_path, family):
    """SDSERVE_MODEL=/path (spec.model.path, or a PVC's mount): the folder the tiny model saves
    loads offline and gives its images; the revision (part of every cache key) follows the folder."""
    import os

    import numpy as np

    from sdserve.tiny import build_tiny_pipeline, build_tiny_xl_pipeline

    folder = tmp_path / "model"
    (build_tiny_xl_pipeline if family == "sdxl" else build_tiny_pipeline)().save_pretrained(folder)
    images = []
    for model in ("tiny", str(folder)):
        p = Pipeline(Settings(model=model, pipeline=family, warmup=False, min_side=64))
        p.load()
        item = Item("a red fox", None, 1, 5)
        p.run(BatchKey(64, 64, 3, 7.5, "default"), [item])
        images.append(np.asarray(item.images[0]))
    assert type(p.pipe).__name__ == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    assert np.array_equal(images[0], images[1])
    assert p.revision.startswith("dir:")
    os.utime(folder / "model_index.json", (1, 1))  # the weights were replaced
    again = Pipeline(Settings(model=str(folder), pipeline=family, warmup=False))
    again.load()
    assert again.revision == "dir:1" != p.revision


def test_a_folder_loads_in_the_dtype_asked_for_without_a_deprecation_warning(tmp_path):
    """SDSERVE_DTYPE reaches every weight of the folder's pipeline (a dtype argument diffusers
    did not read would load float32: twice the GPU memory), through the argument the installed
    diffusers takes: no FutureWarning about ``torch_dtype`` at every load."""
    import warnings

    import torch

    from sdserve.tiny import build_tiny_pipeline

    build_tiny_pipeline().save_pretrained(tmp_path / "model")
    p = Pipeline(Settings(model=str(tmp_path / "model"), dtype="bfloat16", device="cpu", warmup=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p.load()
    assert {p.pipe.unet.dtype, p.pipe.vae.dtype, p.pipe.text_encoder.dtype} == {torch.bfloat16}
    assert not [w for w in caught if "torch_dtype" in str(w.message)], [str(w.message) for w in caught]


def test_a_model_that_cannot_load_names_itself_and_why(tmp_path):
    from sdserve.work import ModelLoadError

    (tmp_path / "empty").mkdir()
    for model, says in [
        (str(tmp_path / "empty"), "is not a diffusers folder (no model_index.json)"),
        (str(tmp_path / "missing.safetensors"), "no checkpoint file at"),
    ]:
        with pytest.raises(ModelLoadError) as e:
            Pipeline(Settings(model=model, warmup=False)).load()
        assert f"cannot load model {model!r}" in str(e.value) and says in str(e.value), str(e.value)


def test_warm_up_covers_every_batch_size_on_a_gpu_and_one_image_on_a_cpu():
    """cuDNN autotunes per input shape: on a GPU every batch size the server will run is warmed
    before ready; a CPU runs one image (its kernels are not tuned per shape)."""
    gpu = Pipeline(Settings(model="/models/sd15", device="cuda", max_batch_size=4))  # not loaded
    shapes = gpu.warmup_shapes()
    assert [n for _, n in shapes] == [1, 2, 3, 4, 1, 3, 1]
    assert {(k.width, k.height, k.steps) for k, _ in shapes} == {(512, 512, 2)}
    assert [k.task for k, _ in shapes] == ["generate"] * 6 + ["img2img"]  # and the VAE encoder
    # Every UNet batch a request can make: guided images two rows each, unguided ones one.
    every = set(range(1, 5)) | {2 * n for n in range(1, 5)}
    assert {gpu._rows(k, n) for k, n in shapes if k.task == "generate"} == every
    assert [(k.guidance_scale, n) for k, n in shapes[4:6]] == [(1.0, 1), (1.0, 3)]  # 2 and 4 rows: guided 1 and 2
    turbo = Pipeline(Settings(model="/m", device="cuda", max_batch_size=4, default_guidance_scale=0, warmup_sizes=""))
    shapes = [(k.guidance_scale, n) for k, n in turbo.warmup_shapes() if k.task == "generate"]
    assert shapes == [(0, 1), (0, 2), (0, 3), (0, 4), (7.5, 3), (7.5, 4)]  # and 6 and 8 rows
    cpu = Pipeline(Settings(model="tiny", device="cpu", max_batch_size=4, min_side=64))
    cpu.load()  # the warm-up is at the loaded model's native size
    assert [(k.width, n) for k, n in cpu.warmup_shapes()] == [(64, 1)]
    assert Pipeline(Settings(model="tiny", warmup=False)).warmup_shapes() == []
    sdxl = Pipeline(Settings(model="/m", pipeline="sdxl", device="cuda", max_batch_size=2, warmup_sizes="768x768"))
    assert [(k.width, k.height, n) for k, n in sdxl.warmup_shapes()] == [
        (1024, 1024, 1),
        (1024, 1024, 2),
        (768, 768, 1),
        (768, 768, 2),
        (1024, 1024, 1),  # one unguided image, at each size
        (768, 768, 1),
        (1024, 1024, 1),  # the edit
    ]
    with pytest.raises(ValueError, match="SDSERVE_WARMUP_SIZES 2048x512"):
        Settings(warmup_sizes="768x768,2048x512")


def test_adapters_apply_through_a_compiled_unet_warmed_up_for_each(tmp_path):
    """SDSERVE_COMPILE with LoRA adapters: the UNet is compiled in place, so diffusers still
    finds its adapters (a torch.compile wrapper in pipe.unet made every request naming one
    fail); the warm-up compiles each adapter, so no request compiles; and the compiled UNet
    gives the eager one's images with and without an adapter."""
    import numpy as np
    from torch._dynamo.utils import counters

    from sdtesting.lora import make_adapter

    loras = [{"name": "pixel", "source": make_adapter(tmp_path, 1)}]
    eager = Pipeline(Settings(model="tiny", min_side=64, loras=loras, warmup=False))
    compiled = Pipeline(Settings(model="tiny", min_side=64, loras=loras, compile=True, compile_mode="default"))
    eager.load()
    compiled.load()

    def pixels(p: Pipeline, lora: tuple) -> np.ndarray:
        key = BatchKey(64, 64, 3, 7.5, "default", loras=lora)
        return np.asarray(p.run(key, [Item("a fox", None, 1, 4)])[0].images[0], dtype=np.int16)

    shapes = compiled.warmup_shapes()
    assert [k.loras for k, _ in shapes] == [(), (("pixel", 1.0),)]
    for key, n in shapes:
        compiled.run(key, [Item("warm-up", None, n, 0)])
    compiles = counters["stats"]["unique_graphs"]
    pixel = (("pixel", 1.0),)
    plain, with_pixel = pixels(compiled, ()), pixels(compiled, pixel)
    assert counters["stats"]["unique_graphs"] == compiles  # the warm-up compiled both
    assert np.abs(with_pixel - plain).mean() > 1  # the adapter is on
    for lora, image in (((), plain), (pixel, with_pixel)):
        assert np.abs(image - pixels(eager, lora)).max() <= 2, lora  # compiled kernels round differently


async def test_a_request_naming_no_size_gets_the_loaded_models_native_size(tmp_path):
    """An SD 2.x 768-v model's UNet says sample_size 96 (768 pixels): a request naming no size,
    and the warm-up, run at its size, not SD 1.5's 512x512 (which such a model draws badly).
    Here a tiny model saved with sample_size 48 (96x96 pixels at its VAE scale of 2)."""
    from sdserve.app import create_app
    from sdserve.tiny import build_tiny_pipeline
    from sdtesting.asgi import serve
    from sdtesting.imaging import decode

    pipe = build_tiny_pipeline()
    pipe.unet.register_to_config(sample_size=48)
    pipe.save_pretrained(tmp_path / "model")
    p = Pipeline(Settings(model=str(tmp_path / "model"), min_side=64))
    assert p.native_size is None
    settings = Settings(model=str(tmp_path / "model"), min_side=64, cache_type="none")
    async with serve(create_app(settings, p)) as client:
        assert p.native_size == (96, 96)
        assert [(k.width, k.height) for k, _ in p.warmup_shapes()] == [(96, 96)]
        models = (await client.get("/v1/models")).json()["data"][0]
        assert models["defaults"] == {"size": "96x96", "steps": 25, "guidance_scale": 7.5, "negative_prompt": None}
        r = await client.post("/v1/images/generations", json={"prompt": "a", "num_inference_steps": 2})
        assert r.status_code == 200, r.text
        assert decode(r.json()["data"][0]["b64_json"]).shape == (96, 96, 3)
        r = await client.post("/generate", json={"prompt": "a", "num_inference_steps": 2})
        assert decode(r.json()["image"]).shape == (96, 96, 3)


def test_measuring_a_prompt_on_another_thread_leaves_the_models_encoding_alone(euler):
    """The request path measures every prompt (``revised_prompt``) on a thread of its own while
    the model's thread encodes a batch's prompts padded to 77 tokens, as diffusers does. The
    tokenizer keeps padding and truncation as state that each call sets before it encodes:
    shared, a measuring call in between made a batch's negative prompts 2 tokens long, and the
    batch failed with a 500 (found by a soak of the server). The request path has its own copy."""
    p = euler
    long = " ".join(f"Fox{i}, in the Snow;" for i in range(40))
    stop = threading.Event()
    measured: list[str | None] = []

    def measure() -> None:
        while not stop.is_set():
            measured.append(p.prompt_used(long))

    thread = threading.Thread(target=measure)
    thread.start()
    try:
        for _ in range(300):
            ids = p.pipe.tokenizer(["", "a fox"], padding="max_length", max_length=77, truncation=True).input_ids
            assert [len(row) for row in ids] == [77, 77]
    finally:
        stop.set()
        thread.join()
    assert measured and all(m is not None and long.startswith(m) for m in measured)
