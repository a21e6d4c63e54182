"""The CUDA paths of sdserve on a real GPU: fp16, step batching's agreement alone vs in a mix,
out-of-memory splitting (request and step batching), torch.compile, quantization.

Opt-in: `pytest --run-gpu tests/gpu` on a machine with a CUDA GPU (the project's CI has
none). The SD 1.5 architecture is built from bench/configs with random fp16 weights.
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest

from sdserve import metrics
from sdserve.pipeline import Pipeline
from sdserve.settings import Settings
from sdserve.stepper import StepBatcher
from sdserve.work import BatchKey, Item, OutOfMemory
from sdtesting.examples import ROOT

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():  # collected only with --run-gpu, where a missing GPU is an error
    pytest.fail("tests/gpu need a CUDA GPU", pytrace=False)

sys.path.insert(0, str(ROOT / "bench"))
from gpu_pipeline import sdserve_pipeline  # noqa: E402 - bench/ is put on the path just above


def sd15_pipeline(**settings) -> Pipeline:
    return sdserve_pipeline("sd15", "cuda", max_batch_size=8, **settings)


@pytest.fixture(scope="module")
def sd15():
    return sd15_pipeline()


def arrays(item: Item) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.int16) for im in item.images]


def splits() -> float:
    return metrics.OOM_SPLITS._value.get()


async def step_all(p: Pipeline, jobs: list[tuple[BatchKey, Item]], max_batch: int = 8) -> list[Item]:
    b = StepBatcher(p, max_batch_size=max_batch, queue_size=64, budget=max_batch * 64 * 64 * 4)
    b.start()
    try:
        submitted = [b.submit(k, it) for k, it in jobs]
        return list(await asyncio.wait_for(asyncio.gather(*(j.future for j in submitted)), 300))
    finally:
        await b.stop()


def test_fp16_request_batch_gives_distinct_finite_images(sd15):
    assert sd15.pipe.unet.dtype == torch.float16 and sd15.device == "cuda"
    item = Item("a red fox in the snow", None, 2, 7)
    sd15.run(BatchKey(512, 512, 10, 7.5, "euler"), [item])
    a, b = arrays(item)
    assert a.shape == (512, 512, 3)
    assert np.abs(a - b).mean() > 1, "two seeds gave the same image"
    assert a.std() > 1, "a flat image: the fp16 run overflowed"


def test_step_batching_on_cuda_matches_the_request_alone_within_tolerance(sd15):
    fox = (BatchKey(512, 512, 20, 7.5, "default"), Item("a red fox", None, 1, 42))
    (alone,) = asyncio.run(step_all(sd15, [fox]))
    mix = [
        (BatchKey(512, 512, 12, 3.0, "euler"), Item("a blue house", "blurry", 2, 7)),
        (BatchKey(512, 512, 30, 9.0, "dpmpp_2m"), Item("a castle", None, 1, 1)),
        (fox[0], Item("a red fox", None, 1, 42)),
    ]
    *_, mixed = asyncio.run(step_all(sd15, mix))
    diff = np.abs(arrays(mixed)[0] - arrays(alone)[0])
    print(f"\nstep batching, alone vs in a mix of 4 images: mean |diff| {diff.mean():.4f}, max {diff.max()} (of 255)")
    assert diff.mean() <= 1.0 and np.percentile(diff, 99) <= 8


def test_an_unguided_request_on_cuda_steps_like_its_request_alone_and_beside_a_guided_one(sd15):
    """Guidance 0 (SDXL Turbo, SD Turbo): the prompt's prediction alone, the unconditional half
    skipped when no request in the step is guided; in fp16 within the stated tolerance of
    diffusers' call, and of itself beside a guided request (which computes both halves)."""
    key = BatchKey(512, 512, 4, 0.0, "euler")
    requested = Item("a red fox", "blurry", 1, 5)
    sd15.run(key, [requested])
    (alone,) = asyncio.run(step_all(sd15, [(key, Item("a red fox", "blurry", 1, 5))]))
    _, mixed = asyncio.run(
        step_all(
            sd15,
            [(BatchKey(512, 512, 6, 7.5, "euler"), Item("a castle", None, 1, 1)), (key, Item("a red fox", None, 1, 5))],
        )
    )
    for name, other in (("diffusers' call", requested), ("beside a guided request", mixed)):
        diff = np.abs(arrays(alone)[0] - arrays(other)[0])
        print(f"\nunguided step batching vs {name}: mean |diff| {diff.mean():.4f}, max {diff.max()} (of 255)")
        assert diff.mean() <= 1.0 and np.percentile(diff, 99) <= 8


def test_previews_read_off_the_model_thread_while_it_steps_leave_the_image_alone(sd15):
    """A job's or a stream's previews on CUDA: the model's thread keeps a device copy of the
    first image's latents each step, and a reader thread renders it (a host copy) while the
    steps go on. The previews are the latent size; the image is the one a request without
    previews gets, within the fp16 tolerance."""
    import base64
    import io
    import threading

    from PIL import Image

    key = BatchKey(512, 512, 20, 7.5, "default")
    (plain,) = asyncio.run(step_all(sd15, [(key, Item("a lighthouse", None, 1, 9))]))
    watched = Item("a lighthouse", None, 1, 9, preview=True)
    seen: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            if (png := watched.preview_png()) is not None:
                seen.append(png)
            done.wait(0.01)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        (previewed,) = asyncio.run(step_all(sd15, [(key, watched)]))
    finally:
        done.set()
        reader.join()
    assert len(set(seen)) >= 2  # the preview followed the steps
    with Image.open(io.BytesIO(base64.b64decode(seen[-1]))) as last:
        assert last.size == (64, 64)
    diff = np.abs(arrays(plain)[0] - arrays(previewed)[0])
    print(f"\nwith previews read while stepping: mean |diff| {diff.mean():.4f}, max {diff.max()} (of 255)")
    assert diff.mean() <= 0.2 and np.percentile(diff, 99) <= 4


def test_sdxl_fp16_steps_like_its_request_and_an_edit_beside_a_decode_leaves_both_intact():
    """The SDXL step path in fp16 on CUDA (the tiny SDXL: seconds): its image against diffusers'
    call, and edits beside decodes: image-to-image and inpainting starts switch the VAE's dtype
    to encode their input image."""
    from PIL import Image

    xl = Pipeline(Settings(model="tiny", pipeline="sdxl", device="cuda", dtype="float16", min_side=64, warmup=False))
    xl.load()
    key = BatchKey(128, 128, 10, 7.5, "default")
    requested = Item("a red fox", None, 1, 42)
    xl.run(key, [requested])
    init = Image.new("RGB", (128, 128), (200, 40, 40))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    edit = (
        BatchKey(128, 128, 10, 7.5, "default", task="img2img", strength=0.6),
        Item("a bird", None, 1, 3, init_image=init),
    )
    inpaint = (
        BatchKey(128, 128, 10, 7.5, "default", task="inpaint", strength=1.0),
        Item("a bird", None, 1, 4, init_image=init, mask_image=mask),
    )
    jobs = [(key, Item("a red fox", None, 1, 42)), edit, inpaint] * 3
    stepped, *others = asyncio.run(step_all(xl, jobs, max_batch=4))
    diff = np.abs(arrays(stepped)[0] - arrays(requested)[0])
    print(f"\nSDXL fp16, step vs request: mean |diff| {diff.mean():.4f}, max {diff.max()} (of 255)")
    assert diff.mean() <= 1.0 and np.percentile(diff, 99) <= 8
    assert all(len(o.images) == 1 and arrays(o)[0].std() > 0 for o in others)


def inpainting_model_steps_like_its_request(device: str, dtype: str) -> float:
    """An inpainting model's step path (the tiny one, 9-channel UNet: seconds), in a mix with
    another request of its own steps, scheduler, strength and two images, against diffusers'
    inpaint call: the mean difference of the image, of 255."""
    from PIL import Image

    from sdserve.tiny import build_tiny_pipeline

    p = Pipeline(Settings(model="tiny", device=device, dtype=dtype, min_side=64, warmup=False))
    p.use(build_tiny_pipeline(in_channels=9).to(p.device, p.dtype))
    init = Image.new("RGB", (128, 128), (200, 40, 40))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    key = BatchKey(128, 128, 10, 7.5, "default", task="inpaint", strength=1.0)
    requested = Item("a bird", None, 1, 4, init_image=init, mask_image=mask)
    p.run(key, [requested])
    other = BatchKey(128, 128, 6, 3.0, "euler", task="inpaint", strength=0.6)
    jobs = [(key, Item("a bird", None, 1, 4, init_image=init, mask_image=mask))]
    jobs.append((other, Item("a fox", None, 2, 5, init_image=init, mask_image=mask)))
    stepped, company = asyncio.run(step_all(p, jobs, max_batch=4))
    assert len(company.images) == 2 and all(a.std() > 0 for a in arrays(company))
    diff = np.abs(arrays(stepped)[0] - arrays(requested)[0])
    assert np.percentile(diff, 99) <= 8, np.percentile(diff, 99)
    return float(diff.mean())


def test_an_inpainting_model_in_fp16_steps_like_its_request():
    mean = inpainting_model_steps_like_its_request("cuda", "float16")
    print(f"\ninpainting model (9-channel UNet) fp16, step vs request: mean |diff| {mean:.4f} (of 255)")
    assert mean <= 1.0


def test_out_of_memory_splits_request_batches_and_fails_a_single_image_that_cannot_fit(sd15):
    key = BatchKey(1024, 1024, 4, 7.5, "default")
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sd15.run(key, [Item("one", None, 1, 0)])
    one = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction((base + 2.5 * one) / total)
        before = splits()
        item = Item("eight", None, 8, 0)
        sd15.run(key, [item])
        assert len(item.images) == 8 and splits() > before
        print(f"\none 1024x1024 image: {one / 2**30:.2f} GiB above the weights; batch 8 split {splits() - before:g}x")
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction((base + 0.3 * one) / total)
        with pytest.raises(OutOfMemory):
            sd15.run(key, [Item("too big", None, 1, 0)])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def test_out_of_memory_splits_a_step_and_a_decode_and_every_request_still_finishes(sd15):
    key = BatchKey(1024, 1024, 3, 7.5, "default")
    states = sd15.begin(key, Item("one", None, 1, 0))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sd15.step(states)  # one image's UNet step (its VAE decode needs more than this)
    one = torch.cuda.max_memory_allocated() - base
    del states
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction((base + 2.5 * one) / total)
        before = splits()
        done = asyncio.run(step_all(sd15, [(key, Item(f"r{i}", None, 2, i)) for i in range(4)]))
        assert [len(d.images) for d in done] == [2, 2, 2, 2] and splits() > before
        print(f"\none 1024x1024 UNet step: {one / 2**30:.2f} GiB; 8 images done, {splits() - before:g} splits")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_compiled_unet_gives_the_eager_images_within_tolerance(mode):
    """Request batching (Pipeline.run) and step batching (a StepBatcher warmed on its own
    threads, forwards of changing batch sizes) through the compiled UNet; reduce-overhead
    replays a CUDA graph per batch size."""
    key = BatchKey(64, 64, 6, 7.5, "default")
    eager = Pipeline(Settings(model="tiny", device="cuda", warmup=False))
    eager.load()
    compiled = Pipeline(Settings(model="tiny", device="cuda", max_batch_size=4, compile=True, compile_mode=mode))
    compiled.load()
    a, b = Item("a fox", None, 2, 3), Item("a fox", None, 2, 3)
    eager.run(key, [a])
    compiled.run(key, [b])
    diff = np.abs(np.stack(arrays(a)) - np.stack(arrays(b)))
    print(f"\ncompiled ({mode}) vs eager (tiny, fp16): mean |diff| {diff.mean():.4f}, max {diff.max()}")
    assert diff.mean() <= 1.0

    async def served() -> list[Item]:
        batcher = StepBatcher(compiled, max_batch_size=4, queue_size=16, budget=4 * 64 * 64)
        batcher.start()
        try:
            await batcher.load()  # the warm-up (every batch size) on the threads that serve
            jobs = [batcher.submit(BatchKey(64, 64, s, g, "default"), Item("a fox", None, 1, 3)) for s, g in mix]
            return list(await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 240))
        finally:
            await batcher.stop()

    mix = [(6, 7.5), (4, 3.0), (9, 9.0)]  # the running batch shrinks from 3 images to 1
    first = asyncio.run(served())[0]
    direct = Item("a fox", None, 1, 3)
    eager.run(key, [direct])
    diff = np.abs(arrays(first)[0] - arrays(direct)[0])
    print(f"compiled ({mode}) step-batched in a mix vs eager alone: mean |diff| {diff.mean():.4f}, max {diff.max()}")
    assert diff.mean() <= 1.0 and np.percentile(diff, 99) <= 8


@pytest.mark.parametrize("kind", ["int8_weight_only", "int8_dynamic", "fp8"])
def test_quantized_unet_generates_close_to_unquantized(sd15, kind):
    key = BatchKey(512, 512, 10, 7.5, "default")
    ref = Item("a lighthouse", None, 1, 5)
    sd15.run(key, [ref])
    q = sd15_pipeline(quantization=kind)
    item = Item("a lighthouse", None, 1, 5)
    q.run(key, [item])
    diff = np.abs(arrays(item)[0] - arrays(ref)[0])
    print(f"\n{kind}: mean |diff| {diff.mean():.3f} of 255")
    assert diff.mean() < 40, f"{kind} moved the image by {diff.mean():.1f}/255 on average"
