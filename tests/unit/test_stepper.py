"""Step-level continuous batching (sdserve.stepper, sdserve.denoise): outputs independent of
the company a request keeps, mixed parameters in one UNet forward, admission in arrival
order within a budget, cancel of running work, and out-of-memory handling."""

from __future__ import annotations

import asyncio
import time
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from sdserve import metrics, stepper
from sdserve.pipeline import Pipeline
from sdserve.queue import cancel
from sdserve.settings import Settings
from sdserve.stepper import LATENT_512, StepBatcher
from sdserve.tiny import build_tiny_pipeline
from sdserve.work import TASKS, BatchKey, Item, OutOfMemory
from sdtesting.fakes import FakePipeline
from sdtesting.waiting import until


@pytest.fixture(scope="module")
def tiny():
    p = Pipeline(Settings(model="tiny", min_side=64, warmup=False, max_batch_size=6))
    p.load()
    return p


@pytest.fixture(scope="module")
def inpainter():
    """A tiny inpainting model (as runwayml/stable-diffusion-inpainting): its UNet takes the mask
    and the masked input image's latents beside the latents, 9 channels."""
    p = Pipeline(Settings(model="tiny", min_side=64, warmup=False, max_batch_size=6))
    p.use(build_tiny_pipeline(in_channels=9))
    return p


def key(steps=6, guidance=7.5, scheduler="default", side=64) -> BatchKey:
    return BatchKey(side, side, steps, guidance, scheduler)


async def run_all(batcher: StepBatcher, jobs: list[tuple[BatchKey, Item]]) -> list[Item]:
    batcher.start()
    try:
        submitted = [batcher.submit(k, it) for k, it in jobs]
        return list(await asyncio.wait_for(asyncio.gather(*(j.future for j in submitted)), 120))
    finally:
        await batcher.stop()


def pixels(item: Item) -> list[np.ndarray]:
    return [np.asarray(im) for im in item.images]


def observed(histogram) -> tuple[float, float]:
    return histogram._sum.get(), sum(b.get() for b in histogram._buckets)


async def test_a_request_gives_the_same_image_alone_or_in_any_mix(tiny):
    fox = (key(8, 7.5, "default"), Item("a red fox", None, 1, 42))
    (alone,) = await run_all(StepBatcher(tiny, max_batch_size=6, queue_size=16), [fox])
    mixes = [
        [(key(4, 3.0, "euler"), Item("blue", "ugly", 2, 7)), fox],
        [(key(12, 1.0, "dpmpp_2m"), Item("c", None, 1, 1)), (key(6, 5.0, "euler_a"), Item("d", None, 1, 3)), fox],
    ]
    for mix in mixes:
        fresh = [(k, Item(i.prompt, i.negative_prompt, i.n, i.seed)) for k, i in mix]
        done = await run_all(StepBatcher(tiny, max_batch_size=6, queue_size=16), fresh)
        assert np.array_equal(pixels(done[-1])[0], pixels(alone)[0])  # bit-identical on the CPU
    # and the company was really there: different seeds, different images
    assert not np.array_equal(pixels(done[0])[0], pixels(alone)[0])


@pytest.mark.parametrize(
    "scheduler,negative,guidance",
    [
        ("default", None, 7.5),
        ("euler_a", "ugly", 7.5),
        ("dpmpp_2m", None, 7.5),
        ("default", None, 0.0),
        ("euler", None, 1.0),
        ("dpmpp_2m_karras", None, 7.5),
        ("lcm", None, 1.5),
    ],
)
async def test_step_batching_gives_the_image_request_batching_gives(tiny, scheduler, negative, guidance):
    """Switching SDSERVE_BATCHING keeps every seed's image: the step path (denoise.begin/step/
    finish) does what the diffusers pipeline call does. Not bit-identical: the forward is padded
    to max_batch_size rows here, one image there. A guidance scale at or below 1 (SDXL Turbo,
    SD Turbo: 0) is no guidance in diffusers: the prompt's prediction alone, not the empty one's."""
    k = key(8, guidance, scheduler)
    requested = Item("a red fox", negative, 1, 42)
    tiny.run(k, [requested])
    (stepped,) = await run_all(
        StepBatcher(tiny, max_batch_size=6, queue_size=16), [(k, Item("a red fox", negative, 1, 42))]
    )
    diff = np.abs(pixels(stepped)[0].astype(np.int16) - pixels(requested)[0].astype(np.int16))
    assert diff.max() <= 2 and diff.mean() < 0.01, (diff.mean(), diff.max())
    other = Item("a red fox", negative, 1, 43)
    tiny.run(k, [other])
    assert np.abs(pixels(other)[0].astype(np.int16) - pixels(requested)[0].astype(np.int16)).mean() > 1


async def test_an_unguided_request_skips_the_unconditional_half_and_is_the_same_in_any_company(tiny):
    """A guidance scale at or below 1 (SD Turbo's 0) needs no unconditional prediction: a step
    of such requests alone runs the UNet on half the rows (unpadded, as on a GPU), its negative
    prompt changes nothing, and beside a guided request (whose step computes both halves) it
    gives the same image."""
    turbo = key(4, 0.0, "euler")
    rows: list[int] = []
    hook = tiny.pipe.unet.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    try:
        unpadded = Pipeline(Settings(model="tiny", min_side=64, warmup=False, max_batch_size=6, step_pad="off"))
        unpadded.use(tiny.pipe)
        await run_all(StepBatcher(unpadded, max_batch_size=6, queue_size=16), [(turbo, Item("a fox", None, 2, 1))])
        assert rows == [2] * 4  # two images, four steps, no unconditional rows
        rows.clear()
        await run_all(
            StepBatcher(unpadded, max_batch_size=6, queue_size=16),
            [(turbo, Item("a fox", None, 2, 1)), (key(4, 7.5, "euler"), Item("a cat", None, 1, 2))],
        )
        assert max(rows) == 6  # with a guided request: both halves of three images
    finally:
        hook.remove()
    (alone,) = await run_all(StepBatcher(tiny, max_batch_size=6, queue_size=16), [(turbo, Item("a fox", None, 1, 5))])
    (negative,) = await run_all(
        StepBatcher(tiny, max_batch_size=6, queue_size=16), [(turbo, Item("a fox", "ugly", 1, 5))]
    )
    _, mixed = await run_all(
        StepBatcher(tiny, max_batch_size=6, queue_size=16),
        [(key(4, 7.5, "euler"), Item("a cat", "blurry", 1, 2)), (turbo, Item("a fox", None, 1, 5))],
    )
    assert np.array_equal(pixels(alone)[0], pixels(negative)[0])
    assert np.array_equal(pixels(alone)[0], pixels(mixed)[0])


async def test_a_guidance_distilled_unet_gets_its_scale_as_an_embedding_not_as_guidance():
    """An LCM-distilled model (``SimianLuo/LCM_Dreamshaper_v7``: ``time_cond_proj_dim``) takes the
    guidance scale as an embedding in each forward and runs no classifier-free guidance: step
    batching gives the image diffusers' call gives, the scale changes it, the negative prompt not."""
    from sdserve.tiny import TEXT_DIM, _unet

    lcm = Pipeline(Settings(model="tiny", min_side=64, warmup=False, max_batch_size=6))
    pipe = build_tiny_pipeline()
    pipe.unet = _unet(cross_attention_dim=TEXT_DIM, time_cond_proj_dim=32)
    lcm.use(pipe)
    images = {}
    for guidance, negative in ((8.0, None), (8.0, "ugly"), (2.0, None)):
        requested = Item("a red fox", negative, 1, 42)
        lcm.run(key(4, guidance, "euler"), [requested])
        (stepped,) = await run_all(
            StepBatcher(lcm, max_batch_size=6, queue_size=16),
            [(key(4, guidance, "euler"), Item("a red fox", negative, 1, 42))],
        )
        diff = np.abs(pixels(stepped)[0].astype(np.int16) - pixels(requested)[0].astype(np.int16))
        assert diff.max() <= 2 and diff.mean() < 0.01, (guidance, negative, diff.mean(), diff.max())
        images[guidance, negative] = pixels(stepped)[0]
    assert np.array_equal(images[8.0, None], images[8.0, "ugly"])
    assert not np.array_equal(images[8.0, None], images[2.0, None])
    assert lcm._rows(key(4, 8.0, "euler"), 3) == 3  # one UNet row an image: what its warm-up counts


def photo(seed: int = 0) -> Image.Image:
    """Seed 0: noise; another seed: one flat colour."""
    if seed:
        return Image.new("RGB", (64, 64), (seed * 90 % 256, 200, 40))
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def edit(steps=8, scheduler="default", strength=0.6, seed=42, n=1, init=0) -> tuple[BatchKey, Item]:
    k = BatchKey(64, 64, steps, 7.5, scheduler, task="img2img", strength=strength)
    return k, Item("a red fox", None, n, seed, init_image=photo(init))


@pytest.mark.parametrize(
    "scheduler,strength",
    [("default", 0.6), ("euler", 0.8), ("ddim", 0.5), ("dpmpp_2m", 1.0), ("dpmpp_2m_karras", 0.5), ("lcm", 0.75)],
)
async def test_image_to_image_is_stepped_and_gives_the_image_request_batching_gives(tiny, scheduler, strength):
    """An image-to-image request starts from its input image's latents, noised to the timestep
    ``strength`` of the way into the schedule, and takes only the steps after it: the step path
    gives the diffusers img2img call's images (each with its own seed) and takes its steps."""
    k, requested = edit(8, scheduler, strength, n=2)
    tiny.run(k, [requested])
    (stepped,) = await run_all(StepBatcher(tiny, max_batch_size=6, queue_size=16), [edit(8, scheduler, strength, n=2)])
    assert stepped.progress == requested.progress == int(8 * strength)
    for a, b in zip(pixels(stepped), pixels(requested), strict=True):
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert diff.max() <= 2 and diff.mean() < 0.01, (diff.mean(), diff.max())
    assert np.abs(pixels(stepped)[0].astype(np.int16) - pixels(stepped)[1]).mean() > 1  # seeds 42 and 43
    if strength > 0.6:  # near 1 the input is mostly noised away (random weights: barely visible)
        return
    (other_input,) = await run_all(
        StepBatcher(tiny, max_batch_size=6, queue_size=16), [edit(8, scheduler, strength, init=1)]
    )
    assert np.abs(pixels(other_input)[0].astype(np.int16) - pixels(stepped)[0]).mean() > 1  # the input image counts


def inpainting(steps=8, scheduler="default", strength=1.0, seed=42, n=1, guidance=7.5) -> tuple[BatchKey, Item]:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))  # white: repaint
    k = BatchKey(64, 64, steps, guidance, scheduler, task="inpaint", strength=strength)
    return k, Item("a red fox", None, n, seed, init_image=photo(), mask_image=mask)


@pytest.mark.parametrize("model", ["tiny", "inpainter"])
@pytest.mark.parametrize(
    "scheduler,strength,guidance",
    [("default", 1.0, 7.5), ("euler_a", 1.0, 7.5), ("ddim", 0.75, 7.5), ("dpmpp_2m", 0.5, 7.5), ("euler", 0.75, 0.0)],
)
async def test_inpainting_is_stepped_and_gives_the_image_request_batching_gives(
    request, model, scheduler, strength, guidance
):
    """tiny: the model's own (4-channel) UNet, where after each step the unmasked part goes back
    to the input image noised to the next timestep (so the part outside the mask does not
    depend on the seed). inpainter: an inpainting model, whose 9-channel UNet takes the mask and
    the masked image's latents in every forward; at strength 1 it starts from noise without
    encoding the input image. Either way the step path gives the diffusers inpaint call's
    images, with a stochastic scheduler too (euler_a): the generator's stream is drawn as
    diffusers draws it. Guidance 0: no unconditional rows, the mask's channels still in each forward."""
    pipeline = request.getfixturevalue(model)
    assert pipeline.tasks == (("inpaint",) if model == "inpainter" else TASKS)
    k, requested = inpainting(8, scheduler, strength, n=2, guidance=guidance)
    pipeline.run(k, [requested])
    (stepped,) = await run_all(
        StepBatcher(pipeline, max_batch_size=6, queue_size=16),
        [inpainting(8, scheduler, strength, n=2, guidance=guidance)],
    )
    assert stepped.progress == requested.progress == int(8 * strength)
    for a, b in zip(pixels(stepped), pixels(requested), strict=True):
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert diff.max() <= 2 and diff.mean() < 0.01, (diff.mean(), diff.max())
    seeds = np.abs(pixels(stepped)[0].astype(np.int16) - pixels(stepped)[1])  # seeds 42 and 43
    assert seeds[24:40, 24:40].mean() > 1
    if model == "tiny":
        assert seeds[:8, :8].mean() < seeds[24:40, 24:40].mean() / 4


async def test_edits_share_the_unet_forward_with_generations_and_keep_their_images(tiny):
    (alone,) = await run_all(StepBatcher(tiny, max_batch_size=6, queue_size=16), [edit(8, "euler", 0.5)])
    (painted_alone,) = await run_all(StepBatcher(tiny, max_batch_size=6, queue_size=16), [inpainting(5, "euler_a")])
    sum0, count0 = observed(metrics.BATCH_SIZE)
    generated, in_mix, painted = await run_all(
        StepBatcher(tiny, max_batch_size=6, queue_size=16),
        [(key(6, 3.0, "ddim"), Item("a", None, 1, 1)), edit(8, "euler", 0.5), inpainting(5, "euler_a")],
    )
    images, steps = observed(metrics.BATCH_SIZE)
    # Admitted together: 4 forwards hold all three (the edit's 4 steps), 1 more the generation
    # and the inpainting (5 steps), 1 more the generation alone (6).
    assert (images - sum0, steps - count0) == (4 * 3 + 2 + 1, 6)
    assert np.array_equal(pixels(in_mix)[0], pixels(alone)[0])  # bit-identical on the CPU
    assert np.array_equal(pixels(painted)[0], pixels(painted_alone)[0])
    assert len(generated.images) == 1


async def test_mixed_steps_guidance_and_schedulers_share_one_unet_forward(tiny):
    sum0, count0 = observed(metrics.BATCH_SIZE)
    jobs = [
        (key(3, 7.5, "euler"), Item("a", None, 1, 1)),
        (key(5, 2.0, "ddim"), Item("b", None, 2, 2)),
        (key(4, 9.0, "dpmpp_2m"), Item("c", None, 1, 3)),
    ]
    done = await run_all(StepBatcher(tiny, max_batch_size=6, queue_size=16), jobs)
    assert [len(d.images) for d in done] == [1, 2, 1]
    images, steps = observed(metrics.BATCH_SIZE)
    images, steps = images - sum0, steps - count0
    # Admitted together: the first step holds all four images; 5 steps in all (the longest).
    assert steps == 5 and images == 4 * 3 + 3 + 2, (images, steps)


async def test_requests_step_in_arrival_order_across_shapes_within_the_budget():
    """The oldest request's group takes each step. A younger request passes a queued one of
    another shape into free budget, and is paused (kept, not stepped) while that one, older,
    takes its steps; nobody waits for a younger request."""
    fake = FakePipeline(seconds_per_call=0.05)
    # Budget: two 64x64 images (64 latent pixels each).
    batcher = StepBatcher(fake, max_batch_size=8, queue_size=16, budget=2 * 64)
    jobs = [
        (key(4), Item("a", None, 1, 1)),
        (key(4), Item("b", None, 1, 2)),
        (key(4), Item("c", None, 1, 3)),  # waits for a slot
        (key(4, side=128), Item("big", None, 1, 4)),  # another shape: waits for a, b and c, which are older
        (key(8), Item("d", None, 1, 5)),  # younger than big: takes the slot beside c, pauses for big
    ]
    await run_all(batcher, jobs)
    assert fake.step_prompts == [["a", "b"]] * 4 + [["c", "d"]] * 4 + [["big"]] * 4 + [["d"]] * 4


async def test_inpainting_requests_on_an_inpainting_model_share_forwards_and_keep_their_images(inpainter):
    (alone,) = await run_all(
        StepBatcher(inpainter, max_batch_size=6, queue_size=16), [inpainting(6, "euler_a", seed=5)]
    )
    sum0, count0 = observed(metrics.BATCH_SIZE)
    other, in_mix = await run_all(
        StepBatcher(inpainter, max_batch_size=6, queue_size=16),
        [inpainting(8, "dpmpp_2m", 0.5, seed=1), inpainting(6, "euler_a", seed=5)],
    )
    images, steps = observed(metrics.BATCH_SIZE)
    assert (images - sum0, steps - count0) == (4 * 2 + 2, 6)  # 4 forwards hold both, 2 the longer one
    assert np.array_equal(pixels(in_mix)[0], pixels(alone)[0])  # bit-identical on the CPU
    assert np.abs(pixels(other)[0].astype(np.int16) - pixels(alone)[0]).mean() > 1


class SlowStart(FakePipeline):
    """Admission (text encoding, an edit's VAE encode) that takes a while."""

    def begin(self, key, item):
        states = super().begin(key, item)  # records the call
        time.sleep(0.6)
        return states


async def test_a_drain_waits_for_a_request_being_admitted():
    """A request is in flight from the moment it leaves the queue, while it is admitted too
    (between the queue and the running batch). The drain (SIGTERM) waits for it instead of
    calling an idle server done and losing it."""
    fake, k, item = SlowStart(), key(4), Item("x", None, 1, 2)
    batcher = StepBatcher(fake, max_batch_size=4, queue_size=4)
    batcher.start()
    try:
        job = batcher.submit(k, item)
        while not fake.calls:  # noqa: ASYNC110 - the fake records its call on the worker thread
            await asyncio.sleep(0.01)
        assert batcher.depth == 0 and batcher.inflight == 1 and not batcher.idle
        assert metrics.INFLIGHT._value.get() == 1
        assert await batcher.drain(10)
        assert job.future.done() and len(job.future.result().images) == 1
        assert batcher.inflight == 0
    finally:
        await batcher.stop()


async def test_a_drain_out_of_time_drops_the_running_requests_that_would_not_end_in_the_time_left():
    """Out of time, the drain keeps a running request a few steps from its end (it ends in the
    seconds the server has left) and drops, at the next step, one that would not."""
    fake, k = FakePipeline(seconds_per_call=4.0), key(40)  # 0.1 s a step
    batcher = StepBatcher(fake, max_batch_size=4, queue_size=4)
    batcher.start()
    try:
        near = batcher.submit(k, Item("near", None, 1, 1))
        while near.item.progress < 34:  # noqa: ASYNC110 - the fake steps on the worker thread
            await asyncio.sleep(0.01)
        far = batcher.submit(k, Item("far", None, 1, 2))
        while far.started is None:  # noqa: ASYNC110 - as above
            await asyncio.sleep(0.01)
        assert not await batcher.drain(0, finish_within=1.0)
        assert far.future.cancelled() and far.item.dropped == "drain_timeout"
        done = await asyncio.wait_for(near.future, 5)
        assert len(done.images) == 1 and near.item.dropped is None
        assert fake.step_prompts[-1] == ["near"]  # the last steps were its alone
    finally:
        await batcher.stop()


async def test_the_in_flight_gauge_falls_to_zero_when_the_only_running_request_leaves():
    """The autoscaler reads sdserve_inflight: a request dropped at a step boundary (its client
    left) leaves it, even when no step follows."""
    fake = FakePipeline(seconds_per_call=2.0)
    batcher = StepBatcher(fake, max_batch_size=2, queue_size=4)
    batcher.start()
    try:
        job = batcher.submit(key(40), Item("long", None, 1, 1))
        while len(fake.steps) < 2:  # noqa: ASYNC110 - the fake counts steps on the worker thread
            await asyncio.sleep(0.01)
        assert metrics.INFLIGHT._value.get() == 1
        cancel(job, "client_disconnected")
        while not batcher.idle:  # noqa: ASYNC110 - the scheduler drops it at the next step boundary
            await asyncio.sleep(0.01)
        await until(lambda: metrics.INFLIGHT._value.get() == 0, what="the gauge falls to 0 with no step to follow")
    finally:
        await batcher.stop()


async def test_cancelling_a_running_request_frees_its_slot_at_the_next_step():
    fake = FakePipeline(seconds_per_call=2.0)  # 40 steps of 50 ms
    batcher = StepBatcher(fake, max_batch_size=1, queue_size=4)
    batcher.start()
    try:
        long = batcher.submit(key(40), Item("long", None, 1, 1))
        short = batcher.submit(key(2), Item("short", None, 1, 2))
        while len(fake.steps) < 3:  # noqa: ASYNC110 - the fake counts steps on the worker thread
            await asyncio.sleep(0.01)
        assert long.started is not None and short.started is None
        cancel(long, "client_disconnected")
        await asyncio.wait_for(short.future, 5)  # long would have held the slot for ~2 s more
        assert len(fake.steps) < 10, fake.steps
        assert long.future.cancelled()
    finally:
        await batcher.stop()


async def test_a_paused_request_whose_client_leaves_is_dropped_without_another_step():
    fake = FakePipeline(seconds_per_call=0.4)  # 8 steps of 50 ms
    batcher = StepBatcher(fake, max_batch_size=8, queue_size=8, budget=2 * 64)
    batcher.start()
    try:
        first = batcher.submit(key(4), Item("a", None, 1, 1))
        big = batcher.submit(key(8, side=128), Item("big", None, 1, 2))
        late = batcher.submit(key(8), Item("late", None, 1, 3))  # joins "a", pauses for "big"
        while ["big"] not in fake.step_prompts:  # noqa: ASYNC110 - the fake records steps on the worker thread
            await asyncio.sleep(0.01)
        assert late.started is not None and not late.future.done()  # admitted, paused
        cancel(late, "client_disconnected")
        await asyncio.wait_for(asyncio.gather(first.future, big.future), 10)
        while not batcher.idle:  # noqa: ASYNC110 - idle changes on the worker and decode threads
            await asyncio.sleep(0.01)
        assert late.future.cancelled()
        assert fake.step_prompts == [["a", "late"]] * 4 + [["big"]] * 8  # "late" never stepped again
    finally:
        await batcher.stop()


async def test_a_request_that_does_not_fit_fails_alone_and_the_budget_shrinks():
    fake = FakePipeline(oom_prompt="huge")
    batcher = StepBatcher(fake, max_batch_size=4, queue_size=8)
    batcher.start()
    try:
        jobs = [batcher.submit(key(3), Item(p, None, 1, i)) for i, p in enumerate(["a", "huge", "b"])]
        results = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
    finally:
        await batcher.stop()
    assert isinstance(results[1], OutOfMemory)
    assert [len(r.images) for r in (results[0], results[2])] == [1, 1]
    assert batcher.budget < 4 * LATENT_512


async def test_a_budget_shrunk_by_a_passing_out_of_memory_grows_back(monkeypatch):
    """An out-of-memory can be transient (a large decode at the same moment): after enough
    steps without one the budget grows back, one 512x512 image at a time, to the configured
    one, and no further."""
    monkeypatch.setattr(stepper, "REGROW_AFTER_STEPS", 3)
    fake = FakePipeline(oom_prompt="huge")
    batcher = StepBatcher(fake, max_batch_size=4, queue_size=8)
    batcher.start()
    try:
        jobs = [batcher.submit(key(3), Item(p, None, 1, i)) for i, p in enumerate(["a", "huge"])]
        await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        shrunk = batcher.budget
        assert shrunk < 4 * LATENT_512
        budgets = []
        for i in range(10):  # 10 requests of 3 steps alone: 30 steps without running out of memory
            await asyncio.wait_for(batcher.submit(key(3), Item("ok", None, 1, i)).future, 10)
            budgets.append(batcher.budget)
    finally:
        await batcher.stop()
    assert budgets == sorted(budgets) and budgets[0] == shrunk + LATENT_512
    assert budgets[-1] == 4 * LATENT_512  # back to the configured budget, not past it


async def test_a_request_that_finished_in_a_split_that_fitted_is_not_stepped_again():
    """A split step advances the halves that fit and then fails on the one that does not; the
    requests are then stepped one by one. One whose last step was in a half that fitted must
    not be stepped past its end (the real pipeline has no timestep left for it)."""

    class HalvesThenFail(FakePipeline):
        def step(self, states):
            fits = [s for s in states if s[1] != "huge"]
            if len(fits) < len(states):
                if fits:
                    super().step(fits)  # the halves that fitted ran before the one that did not
                raise OutOfMemory("out of memory for one 64x64 image")
            for s in states:
                assert s[3] < s[0].steps, f"{s[1]} stepped past its last step"
            super().step(states)

    fake = HalvesThenFail()
    batcher = StepBatcher(fake, max_batch_size=4, queue_size=8)
    batcher.start()
    try:
        short = batcher.submit(key(1), Item("short", None, 1, 1))  # one step: done in the first half
        huge = batcher.submit(key(3), Item("huge", None, 1, 2))
        results = await asyncio.wait_for(asyncio.gather(short.future, huge.future, return_exceptions=True), 10)
    finally:
        await batcher.stop()
    assert isinstance(results[1], OutOfMemory)
    assert len(results[0].images) == 1, results[0]


async def test_an_out_of_memory_unet_step_is_split_and_still_finishes(tiny, monkeypatch):
    real = tiny.pipe.unet.forward
    splits0 = metrics.OOM_SPLITS._value.get()

    def small_only(sample, *args, **kwargs):
        if sample.shape[0] > 4:  # CFG doubles: more than two images does not "fit"
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(sample, *args, **kwargs)

    monkeypatch.setattr(tiny.pipe.unet, "forward", small_only)
    monkeypatch.setattr(tiny.settings, "step_pad", "off")
    jobs = [(key(3), Item(p, None, 1, i)) for i, p in enumerate("abcd")]
    done = await run_all(StepBatcher(tiny, max_batch_size=6, queue_size=8), jobs)
    assert all(len(d.images) == 1 for d in done)
    assert metrics.OOM_SPLITS._value.get() > splits0


async def test_an_image_to_image_start_out_of_memory_fails_that_request_alone(tiny, monkeypatch):
    """The VAE encode of a stepped image-to-image request runs out of memory: that request gets
    OutOfMemory (the API's retryable 503), the generation beside it still finishes."""
    real = tiny.pipe.vae.encode

    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tiny.pipe.vae, "encode", no_room)
    batcher = StepBatcher(tiny, max_batch_size=6, queue_size=8)
    batcher.start()
    try:
        generation = batcher.submit(key(3), Item("a", None, 1, 1))
        edited = batcher.submit(*edit(4, "euler", 0.5))
        done = await asyncio.wait_for(generation.future, 60)
        with pytest.raises(OutOfMemory, match="64x64 img2img"):
            await asyncio.wait_for(edited.future, 60)
    finally:
        await batcher.stop()
    assert len(done.images) == 1
    monkeypatch.setattr(tiny.pipe.vae, "encode", real)
    (again,) = await run_all(StepBatcher(tiny, max_batch_size=6, queue_size=8), [edit(4, "euler", 0.5)])
    assert len(again.images) == 1  # nothing of the failure stays behind


def oom_above(rows: int, real, held: list, alive_at_call: list):
    """A model call that leaves an activation in its frame and runs out of memory above `rows`."""

    def call(sample, *args, **kwargs):
        alive_at_call.append(sum(r() is not None for r in held))
        activation = torch.empty(sample.shape[0], 4096)
        held.append(weakref.ref(activation))
        if sample.shape[0] > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(sample, *args, **kwargs)

    return call


async def test_out_of_memory_retries_only_after_the_failed_attempt_is_freed_and_decode_splits_too(tiny, monkeypatch):
    held: list = []
    alive_at_call: list[int] = []
    monkeypatch.setattr(tiny.pipe.unet, "forward", oom_above(2, tiny.pipe.unet.forward, held, alive_at_call))
    monkeypatch.setattr(tiny.pipe.vae, "decode", oom_above(1, tiny.pipe.vae.decode, held, alive_at_call))
    monkeypatch.setattr(tiny.settings, "step_pad", "off")
    (done,) = await run_all(StepBatcher(tiny, max_batch_size=6, queue_size=8), [(key(3), Item("two", None, 2, 5))])
    assert len(done.images) == 2  # the VAE decoded them one at a time
    # No retry ran while a failed attempt's activations were still held (by its traceback).
    assert len(alive_at_call) > 6 and max(alive_at_call) == 0
