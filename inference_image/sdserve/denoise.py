"""Step-level denoising on a loaded diffusers pipeline (the worker-thread half of step batching).

Each image is an ``ImageState``: its latents, its own scheduler instance (schedulers keep
per-run state), its own noise generator, its prompt embeddings and its guidance scale. One
UNet forward serves any mix of states with the same latent shape: classifier-free guidance
is applied per state (none at a scale of 1 or less, as in diffusers; a step without a guided
state skips the unconditional half), each state is stepped by its own scheduler. Text encoding happens once
per request (``begin``), VAE decoding once per finished request (``finish``, which the step
scheduler runs on a second thread, off the denoising loop).

The noise of an image depends on its seed alone and every per-image operation is done on
that image's slice. Matrix products are not batch-invariant, though: a row's result depends
on how many rows the GEMM has (a 1e-6 difference that can move a pixel by one). At a fixed
row count they are invariant to the other rows' content and order, so on the CPU every UNet
forward is padded to ``max_batch_size`` images (SDSERVE_STEP_PAD=auto): the same request
then gives the bit-identical image alone or in any company (tests/unit/test_stepper.py).
On a GPU the forward is not padded; images agree within a tolerance instead.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from .work import BatchKey, Item, OutOfMemory


@dataclass
class ImageState:
    key: BatchKey
    latents: Any
    scheduler: Any
    timesteps: list[Any]
    generator: Any
    #: (unconditional, conditional) prompt embeddings, each [1, tokens, dim].
    embeds: tuple[Any, Any]
    #: SDXL only: (unconditional, conditional) pooled embeddings and time ids.
    added: tuple[Any, Any, Any, Any] | None = None
    i: int = 0
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    #: The request's Item when it asked for previews (its first image's state only).
    preview_of: Item | None = None
    #: Inpainting on a 4-channel UNet: (mask at latent size, the input image's latents, the start
    #: noise). After each step the unmasked part goes back to the input image, noised to the next
    #: timestep.
    blend: tuple[Any, Any, Any] | None = None
    #: Inpainting on an inpainting model's 9-channel UNet: the mask at latent size and the masked
    #: input image's latents, [1, 5, h, w], which go into every forward beside the latents.
    concat: Any = None
    #: Classifier-free guidance: a scale above 1 on a UNet without a guidance embedding (diffusers'
    #: rule). At or below 1 (SDXL Turbo and SD Turbo run at 0) the prompt's prediction is used
    #: alone and the negative prompt has no effect.
    guided: bool = True
    #: A guidance-distilled UNet (LCM: ``time_cond_proj_dim``) takes the scale as an embedding
    #: instead, [1, dim], in every forward; it is never guided.
    timestep_cond: Any = None

    @property
    def done(self) -> bool:
        return self.i >= len(self.timesteps)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape)


def _fresh_scheduler(pipeline: Any, name: str) -> Any:
    """A new scheduler instance of the kind a request asked for: its state is its own."""
    template = pipeline.scheduler(name)
    return type(template).from_config(template.config)


def begin(pipeline: Any, key: BatchKey, item: Item) -> list[ImageState]:
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    pipe = pipeline.pipe
    device = pipeline.device
    gen_device = device if device.startswith("cuda") else "cpu"
    pipeline.activate_loras(key.loras)  # the text encoder may carry the adapter too
    with torch.inference_mode():
        if pipeline.settings.pipeline == "sdxl":
            pe, npe, pooled, npooled = pipeline.encode(pipe, item, 1)
            size = (key.height, key.width)
            time_ids = pipe._get_add_time_ids(
                size,
                (0, 0),
                size,
                dtype=pe.dtype,
                text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
            ).to(device)
            added = (npooled, pooled, time_ids, time_ids)
        else:
            pe, npe = pipeline.encode(pipe, item, 1)
            added = None
    shape = (
        1,
        pipe.vae.config.latent_channels,
        key.height // pipe.vae_scale_factor,
        key.width // pipe.vae_scale_factor,
    )
    image, mask = _edit_inputs(pipeline, key, item) if key.task != "generate" else (None, None)
    cond_dim = pipe.unet.config.time_cond_proj_dim
    timestep_cond = None
    if cond_dim is not None:  # as diffusers' pipelines: the embedding of the scale - 1
        w = torch.tensor([key.guidance_scale - 1.0])
        timestep_cond = pipe.get_guidance_scale_embedding(w, embedding_dim=cond_dim).to(device=device, dtype=pe.dtype)
    states = []
    for i in range(item.n):
        generator = torch.Generator(gen_device).manual_seed(item.seed + i)
        scheduler = _fresh_scheduler(pipeline, key.scheduler)
        scheduler.set_timesteps(key.steps, device=device)
        blend = concat = None
        if image is None:
            timesteps = scheduler.timesteps
            latents = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=pipe.unet.dtype)
            latents = latents * scheduler.init_noise_sigma
        elif mask is None:
            timesteps = _edit_timesteps(scheduler, key)
            latents = _image_to_image_start(pipeline, image, scheduler, timesteps[:1], generator, pe.dtype)
        else:
            timesteps = _edit_timesteps(scheduler, key)
            latents, blend, concat = _inpaint_start(
                pipeline, key, image, mask, shape, scheduler, timesteps[:1], generator, pe.dtype
            )
        accepted = set(inspect.signature(scheduler.step).parameters)
        states.append(
            ImageState(
                key=key,
                latents=latents,
                scheduler=scheduler,
                timesteps=list(timesteps),
                generator=generator,
                embeds=(npe, pe),
                added=added,
                step_kwargs={"generator": generator} if "generator" in accepted else {},
                preview_of=item if item.preview and i == 0 else None,
                blend=blend,
                concat=concat,
                guided=key.guidance_scale > 1 and cond_dim is None,
                timestep_cond=timestep_cond,
            )
        )
    return states


def _edit_timesteps(scheduler: Any, key: BatchKey) -> Any:
    """An edit runs the last ``strength`` of the schedule, as diffusers' ``get_timesteps``."""
    start = (key.steps - key.denoising_steps) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def _edit_inputs(pipeline: Any, key: BatchKey, item: Item) -> tuple[Any, Any]:
    """An edit's input image in [-1, 1] and, inpainting, its mask in [0, 1] (1: repaint), as the
    diffusers edit pipelines preprocess them (the images are at the key's size already)."""
    import torch

    edit = pipeline.task_pipe(key.task)
    image = edit.image_processor.preprocess(item.init_image, height=key.height, width=key.width).to(torch.float32)
    if key.task != "inpaint":
        return image, None
    return image, edit.mask_processor.preprocess(item.mask_image, height=key.height, width=key.width)


def _image_to_image_start(pipeline: Any, image: Any, scheduler: Any, t0: Any, generator: Any, dtype: Any) -> Any:
    """An image-to-image request's first latents: its input image's latents noised to the first
    timestep, drawing from the image's generator in the order diffusers' img2img
    ``prepare_latents`` does, so the image is the one the pipeline call gives."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    vae = pipeline.pipe.vae
    device = torch.device(pipeline.device)
    latents = _vae_encode(pipeline, image.to(device=device, dtype=dtype), generator, dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if pipeline.settings.pipeline == "sdxl" and mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, 4, 1, 1).to(device, dtype)
        std = torch.tensor(std).view(1, 4, 1, 1).to(device, dtype)
        latents = (latents - mean) * vae.config.scaling_factor / std
    else:
        latents = vae.config.scaling_factor * latents
    noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=dtype)
    return scheduler.add_noise(latents, noise, t0)


def _inpaint_start(
    pipeline: Any,
    key: BatchKey,
    image: Any,
    mask: Any,
    shape: tuple[int, ...],
    scheduler: Any,
    t0: Any,
    generator: Any,
    dtype: Any,
) -> tuple[Any, tuple[Any, Any, Any] | None, Any]:
    """An inpainting request's first latents and what its steps need: ``blend`` on a 4-channel
    UNet, ``concat`` on an inpainting model's 9-channel one. At strength 1 the start is pure
    noise, else the noised input image. The image's generator is drawn from in the order of
    diffusers' inpaint ``prepare_latents`` and ``prepare_mask_latents``: the input image's
    encode (skipped by a 9-channel UNet at strength 1, which needs no image latents), the
    noise, then the masked image's encode (done whatever the UNet, as diffusers does, or a
    stochastic scheduler's noise would differ)."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    vae = pipeline.pipe.vae
    device = torch.device(pipeline.device)
    nine = pipeline.tasks == ("inpaint",)
    scale = vae.config.scaling_factor
    image_latents = None
    if not nine or key.strength < 1.0:
        image_latents = scale * _vae_encode(pipeline, image.to(device=device, dtype=dtype), generator, dtype)
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if key.strength == 1.0:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, t0)
    masked = scale * _vae_encode(pipeline, (image * (mask < 0.5)).to(device=device, dtype=dtype), generator, dtype)
    small = torch.nn.functional.interpolate(mask, size=tuple(shape[-2:])).to(device=device, dtype=dtype)
    if nine:
        return latents, None, torch.cat([small, masked], dim=1)
    return latents, (small, image_latents, noise), None


def _vae_encode(pipeline: Any, pixels: Any, generator: Any, dtype: Any) -> Any:
    """One image's latents, sampled with its generator. SDXL's VAE encodes in float32 (it
    overflows in float16), as diffusers does: that moves the VAE's dtype, hence the VAE lock."""
    import torch
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    vae = pipeline.pipe.vae
    upcast = pipeline.settings.pipeline == "sdxl" and vae.config.force_upcast
    with pipeline._vae_held(), torch.inference_mode():
        if upcast:
            pixels = pixels.float()
            vae.to(dtype=torch.float32)
        latents = retrieve_latents(vae.encode(pixels), generator=generator)
        if upcast:
            vae.to(dtype)
    return latents.to(dtype)


def step(pipeline: Any, states: list[ImageState], pad: int = 0) -> None:
    """One UNet forward for all states (padded to ``pad`` images); an out-of-memory splits
    them in halves (unpadded) and retries."""
    first = True

    def forward(part: list[ImageState]) -> list[Any]:
        nonlocal first
        _step(pipeline, part, pad if first else 0)
        first = False
        return []

    _in_halves(pipeline, states, forward, "for")


def _in_halves(pipeline: Any, states: list[ImageState], call: Any, what: str) -> list[Any]:
    """``call(states)``; when that runs out of memory, each half the same way (after the failed
    attempt's memory is freed). A single state that does not fit fails with OutOfMemory."""
    from .pipeline import out_of_memory

    out: list[Any] = []
    if not out_of_memory(lambda: out.extend(call(states))):
        return out
    pipeline._free()
    if len(states) == 1:
        raise OutOfMemory(f"out of memory {what} one {states[0].key.width}x{states[0].key.height} image")
    from .metrics import OOM_SPLITS

    OOM_SPLITS.inc()
    mid = len(states) // 2
    return _in_halves(pipeline, states[:mid], call, what) + _in_halves(pipeline, states[mid:], call, what)


def _step(pipeline: Any, states: list[ImageState], pad: int) -> None:
    import torch

    pipe = pipeline.pipe
    pipeline.activate_loras(states[0].key.loras)  # one adapter set per batch (sdserve.stepper)
    with torch.inference_mode():
        ts = [s.timesteps[s.i] for s in states]
        scaled = [s.scheduler.scale_model_input(s.latents, t) for s, t in zip(states, ts, strict=True)]
        times = [torch.as_tensor(v, device=scaled[0].device).float() for v in ts]
        # Without a guided state in the step, the unconditional half is not computed at all.
        # Padded, the forward has 2 x pad rows either way: a row's result is the same in any company.
        halves = 2 if any(s.guided for s in states) else 1
        lanes = list(states)
        extra = max(0, pad * 2 // halves - len(states))
        # Padding rows copy the first image's inputs; their outputs are dropped.
        scaled += scaled[:1] * extra
        times += times[:1] * extra
        lanes += lanes[:1] * extra
        x = torch.cat(scaled * halves)  # the unconditional half (when guided), then the conditional one
        if lanes[0].concat is not None:  # an inpainting model: latents, mask, masked image latents
            x = torch.cat([x, torch.cat([s.concat for s in lanes] * halves)], dim=1)
        t = torch.stack(times * halves)
        uncond_rows = lanes if halves == 2 else []
        emb = torch.cat([s.embeds[0] for s in uncond_rows] + [s.embeds[1] for s in lanes])
        kwargs: dict[str, Any] = {}
        added = [s.added for s in lanes if s.added is not None]
        if added:  # SDXL: pooled text embeddings and size/crop ids, per image
            uncond_added = added if halves == 2 else []
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.cat([a[0] for a in uncond_added] + [a[1] for a in added]),
                "time_ids": torch.cat([a[2] for a in uncond_added] + [a[3] for a in added]),
            }
        if lanes[0].timestep_cond is not None:  # a guidance-distilled UNet (LCM)
            kwargs["timestep_cond"] = torch.cat([s.timestep_cond for s in uncond_rows + lanes])
        noise = pipe.unet(x, t, encoder_hidden_states=emb, return_dict=False, **kwargs)[0]
        cond_at = len(lanes) if halves == 2 else 0
        for k, s in enumerate(states):
            pred = cond = noise[cond_at + k : cond_at + k + 1]
            if s.guided:  # classifier-free guidance, per request
                uncond = noise[k : k + 1]
                pred = uncond + s.key.guidance_scale * (cond - uncond)
            s.latents = s.scheduler.step(pred, ts[k], s.latents, **s.step_kwargs, return_dict=False)[0]
            if s.blend is not None:
                _blend(s, *s.blend)
            s.i += 1
            if s.preview_of is not None:  # rendered when read (Item.preview_png)
                s.preview_of.latest = (s.latents.detach().clone(), pipeline.settings.pipeline)


def _blend(s: ImageState, mask: Any, image_latents: Any, noise: Any) -> None:
    """Inpainting with a 4-channel UNet, after the state's step: outside the mask the latents go
    back to the input image's, noised to the next timestep (none after the last), as diffusers'
    inpaint loop does."""
    import torch

    proper = image_latents
    if s.i < len(s.timesteps) - 1:
        proper = s.scheduler.add_noise(image_latents, noise, torch.tensor([s.timesteps[s.i + 1]]))
    s.latents = (1 - mask) * proper + mask * s.latents


def finish(pipeline: Any, states: list[ImageState]) -> list[Any]:
    """Decode one request's images; an out-of-memory decodes them in halves (the VAE at
    1024x1024 needs more memory than a UNet step of the same images)."""
    return _in_halves(pipeline, states, lambda part: _decode(pipeline, part), "decoding")


def _decode(pipeline: Any, states: list[ImageState]) -> list[Any]:
    import torch

    pipe = pipeline.pipe
    vae = pipe.vae
    with torch.inference_mode():
        latents = torch.cat([s.latents for s in states]).to(vae.dtype)
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        images = pipe.image_processor.postprocess(image, output_type="pil")
    if pipeline._safety is not None:
        images = pipeline._check_nsfw(images)
    return list(images)
