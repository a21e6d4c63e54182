"""Model loading and batched generation. Everything here runs on the model's threads, except
``prompt_used`` (the request path's, with a tokenizer of its own).

Loading: the built-in ``tiny`` model, a Hugging Face id (revision, token, variant), a
local diffusers folder, or a single-file .safetensors checkpoint. Precision is fp16 on a
GPU and fp32 on a CPU unless set; attention uses PyTorch SDPA (diffusers' default
processor on torch 2); channels_last and torch.compile are optional; a warm-up batch runs
before the server reports ready.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import pathlib
import re
import threading
import time
from typing import Any

from .schedulers import SCHEDULERS
from .settings import Settings
from .work import TASKS, BatchKey, Interrupted, Item, ModelLoadError, OutOfMemory

log = logging.getLogger("sdserve.pipeline")


def resolve_device(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(setting: str, device: str):
    import torch

    if setting == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[setting]


def dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """``from_pretrained``'s dtype argument: ``dtype`` from diffusers 0.42 on, where
    ``torch_dtype`` warns at every load and is to go in 1.0; ``torch_dtype`` before, where a
    ``dtype`` would not be read and the weights would load in float32. (``from_single_file``
    still takes ``torch_dtype``.)"""
    import diffusers

    release = tuple(int(part) for part in re.findall(r"\d+", diffusers.__version__)[:2])
    return {"dtype" if release >= (0, 42) else "torch_dtype": dtype}


class Pipeline:
    """A loaded diffusers pipeline plus the schedulers it can switch between."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.pipe: Any = None
        self.revision = settings.model_revision
        self.load_seconds = 0.0
        self._schedulers: dict[str, Any] = {}
        self._edit_pipes: dict[str, Any] = {}
        self._active_loras: tuple[tuple[str, float], ...] = ()
        self._safety: tuple[Any, Any] | None = None
        #: Held while the VAE runs, where its dtype moves (``_vae_switches``). With step batching a
        #: request's decode (``finish``, on the decode thread) can overlap an edit's admission (its
        #: input image's encode in ``begin``, on the worker thread), and SDXL switches the VAE
        #: between float16 and float32 in place, as diffusers' SDXL pipelines do (``run`` holds it
        #: too): an unguarded decode then meets weights of the other dtype halfway and fails. SD 1.x
        #: pipelines leave the VAE alone, and are not held up by the lock.
        self._vae_lock = threading.Lock()
        #: The tokenizer ``prompt_used`` reads prompts with, off the model's threads (a copy of
        #: the text encoder's, made at ``use``), and the lock its callers take turns by.
        #: transformers' tokenizers (Rust-backed from transformers 5 on, CLIP's included) keep
        #: padding and truncation as state that each call sets before it encodes: the request
        #: path measuring a prompt with the model's own tokenizer while the model's thread
        #: encoded a batch made that batch's negative prompt 2 tokens long instead of 77 (a 500
        #: for the whole batch), or let a long prompt through untruncated.
        self._request_tokenizer: Any = None
        self._request_tokenizer_lock = threading.Lock()

    # ---- loading ---------------------------------------------------------------------
    def load(self) -> None:
        if self.pipe is not None:
            return  # already loaded: several apps (in-process tests) may share one pipeline
        t0 = time.perf_counter()
        try:
            pipe = self._load_pipe()
        except Exception as e:  # every load failure is reported the same way
            raise ModelLoadError(f"cannot load model {self.settings.model!r}: {type(e).__name__}: {e}") from e
        self.use(pipe)
        self.load_seconds = time.perf_counter() - t0
        log.info("model %s loaded on %s (%s) in %.1fs", self.settings.model, self.device, self.dtype, self.load_seconds)

    def use(self, pipe: Any) -> None:
        """Serve a diffusers pipeline already on the device: the settings' optimisations,
        schedulers and content check. ``load`` calls it; the benchmarks hand it architectures
        built from configs with random weights. The warm-up is the batcher's (``warmup_shapes``)."""
        self._check_model(pipe)
        self.pipe = pipe
        tokenizer = getattr(pipe, "tokenizer", None)
        self._request_tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self._load_loras()
        self._optimise()
        self._schedulers["default"] = pipe.scheduler
        if self.settings.nsfw_check:
            self._load_safety_checker()

    def _load_pipe(self):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        s = self.settings
        cls = StableDiffusionXLPipeline if s.pipeline == "sdxl" else StableDiffusionPipeline
        if s.model == "tiny":
            from .tiny import build_tiny_pipeline, build_tiny_xl_pipeline

            self.revision = "tiny-xl-v1" if s.pipeline == "sdxl" else "tiny-v1"
            pipe = build_tiny_xl_pipeline() if s.pipeline == "sdxl" else build_tiny_pipeline()
        elif s.model.endswith((".safetensors", ".ckpt")):
            if not pathlib.Path(s.model).is_file():
                raise FileNotFoundError(f"no checkpoint file at {s.model}")
            self.revision = f"file:{os.path.getsize(s.model)}:{int(os.path.getmtime(s.model))}"
            pipe = cls.from_single_file(s.model, torch_dtype=self.dtype)
        elif pathlib.Path(s.model).is_dir() or s.model.startswith("/"):
            if not (pathlib.Path(s.model) / "model_index.json").is_file():
                raise FileNotFoundError(f"{s.model} is not a diffusers folder (no model_index.json)")
            self.revision = f"dir:{int(os.path.getmtime(pathlib.Path(s.model) / 'model_index.json'))}"
            apart: dict[str, Any] = {"safety_checker": None} if s.pipeline == "sd" else {}  # see nsfw_check
            pipe = cls.from_pretrained(s.model, **dtype_kwarg(self.dtype), local_files_only=True, **apart)
        else:
            kwargs: dict[str, Any] = {**dtype_kwarg(self.dtype), "revision": s.model_revision}
            if s.variant:
                kwargs["variant"] = s.variant
            if s.hf_token:
                kwargs["token"] = s.hf_token
            if s.pipeline == "sd":
                kwargs["safety_checker"] = None  # loaded separately when nsfw_check is on
            pipe = cls.from_pretrained(s.model, **kwargs)
            self.revision = _resolved_revision(pipe, s.model_revision)
        pipe = pipe.to(self.device, self.dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _optimise(self) -> None:
        import torch
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe = self.pipe
        # PyTorch scaled-dot-product attention (flash / memory-efficient kernels on GPU).
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        if hasattr(pipe, "vae"):
            pipe.vae.set_attn_processor(AttnProcessor2_0())
        if self.settings.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if self.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        if self.settings.quantization != "none":
            self._quantize()
        if self.settings.compile:
            # In place: pipe.unet stays a UNet2DConditionModel. torch.compile(pipe.unet) would
            # put a wrapper there, in which diffusers' set_adapters finds no LoRA adapter.
            # Each adapter set compiles once more (dynamo guards on it): see warmup_shapes.
            pipe.unet.compile(mode=self.settings.compile_mode, fullgraph=False)

    def _load_loras(self) -> None:
        """Every SDSERVE_LORAS adapter into the pipeline, inactive until a request names it."""
        if not self.settings.loras:
            return
        for lora in self.settings.loras:
            source, weight_name = lora.source, lora.weight_name
            if source.endswith(".safetensors") and pathlib.Path(source).is_file():
                source, weight_name = str(pathlib.Path(source).parent), pathlib.Path(source).name
            kwargs: dict[str, Any] = {"adapter_name": lora.name}
            if weight_name:
                kwargs["weight_name"] = weight_name
            if self.settings.hf_token and not pathlib.Path(source).exists():
                kwargs["token"] = self.settings.hf_token
            try:
                self.pipe.load_lora_weights(source, **kwargs)
            except Exception as e:  # every adapter failure is a load failure that names the adapter
                raise ModelLoadError(f"cannot load LoRA adapter {lora.name!r} from {lora.source!r}: {e}") from e
        self.pipe.disable_lora()
        log.info("LoRA adapters loaded: %s", ", ".join(lora.name for lora in self.settings.loras))

    def activate_loras(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Make exactly these adapters (with their weights) active; the worker thread only."""
        if loras == self._active_loras:
            return
        if loras:
            self.pipe.enable_lora()
            self.pipe.set_adapters([n for n, _ in loras], adapter_weights=[w for _, w in loras])
        else:
            self.pipe.disable_lora()
        self._active_loras = loras

    def _quantize(self) -> None:
        """The UNet's linear layers through torchao: int8 weights (any device), int8 weights and
        activations (GPUs with int8 tensor cores), or fp8 (compute capability 8.9+: L4, H100)."""
        import torch
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )

        kind = self.settings.quantization
        if kind == "fp8":
            if not self.device.startswith("cuda") or torch.cuda.get_device_capability() < (8, 9):
                raise ModelLoadError("quantization fp8 needs a CUDA GPU of compute capability 8.9 or newer (L4, H100)")
            config: Any = Float8DynamicActivationFloat8WeightConfig()
        elif kind == "int8_dynamic":
            config = Int8DynamicActivationInt8WeightConfig()
        else:
            config = Int8WeightOnlyConfig()
        quantize_(self.pipe.unet, config)
        log.info("UNet quantized: %s", kind)

    def _load_safety_checker(self) -> None:
        """The content check: SDSERVE_SAFETY_CHECKER, else the model's own safety_checker and
        feature_extractor folders. A server asked to check images that has no checker fails
        its load (ModelLoadError names what to set): it never serves unchecked images."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        s = self.settings
        hint = "set SDSERVE_SAFETY_CHECKER (CR spec.safety.checker), e.g. CompVis/stable-diffusion-safety-checker"
        kwargs: dict[str, Any] = {}
        if s.safety_checker:
            source, folders = s.safety_checker, ("", "")
        elif s.model == "tiny" or s.pipeline == "sdxl" or s.model.endswith((".safetensors", ".ckpt")):
            what = "an SDXL model" if s.pipeline == "sdxl" else f"model {s.model!r}"
            raise ModelLoadError(f"nsfw_check: {what} ships no safety checker; {hint}")
        else:
            source, folders = s.model, ("safety_checker", "feature_extractor")
            if not pathlib.Path(source).is_dir():
                kwargs["revision"] = s.model_revision
                if s.variant:
                    kwargs["variant"] = s.variant
        if pathlib.Path(source).is_dir():
            kwargs["local_files_only"] = True
        elif s.hf_token:
            kwargs["token"] = s.hf_token
        where = f"{source}/{folders[0]}" if folders[0] else source
        try:
            checker = StableDiffusionSafetyChecker.from_pretrained(source, subfolder=folders[0], **kwargs)
            kwargs.pop("variant", None)  # weights only
            processor = CLIPImageProcessor.from_pretrained(source, subfolder=folders[1], **kwargs)
        except Exception as e:  # every checker failure is a load failure that says where it looked
            raise ModelLoadError(f"nsfw_check: no safety checker at {where}: {type(e).__name__}: {e}; {hint}") from e
        self._safety = (checker.to(self.device, self.dtype).eval(), processor)
        log.info("content check: safety checker from %s", where)

    def scheduler(self, name: str):
        """The scheduler a request asked for; "default" is the server's SDSERVE_SCHEDULER."""
        if name in ("", "default"):
            name = self.settings.scheduler
        if name not in self._schedulers:
            import diffusers

            cls_name, extra = SCHEDULERS[name]
            cls = getattr(diffusers, cls_name)
            self._schedulers[name] = cls.from_config(self._schedulers["default"].config, **extra)
        return self._schedulers[name]

    def warmup_shapes(self) -> list[tuple[BatchKey, int]]:
        """Two steps at the default request size (64x64 for the tiny model) and at every
        SDSERVE_WARMUP_SIZES size, for every batch size up to max_batch_size on a GPU, where
        cuDNN autotunes (and torch.compile compiles) per input shape, so an unwarmed batch size
        stalls the first request that makes it; one image on a CPU. On a GPU also one
        image-to-image edit at the default size, for the VAE encoder's kernels. With
        torch.compile, also each LoRA adapter alone at its default weight at the default size:
        every adapter set compiles the UNet once more, which would otherwise stall the first
        request naming it. On a GPU the UNet also meets every row count a request can give it
        (``_rows``): a guided image is two rows (unconditional and conditional), an unguided
        one (guidance <= 1, a turbo model's default) one row, so beside the default guidance's
        counts the warm-up runs the other kind's counts that the default's do not reach (a
        server defaulting to 7.5 with batches of 8 tunes 1, 3, 5 and 7 rows too; at 0, 10, 12, 14 and
        16). The batcher
        runs them on its own threads (``sdserve.queue.QueueBase.load``)."""
        s = self.settings
        if not s.warmup:
            return []
        default = s.default_width_height(self.native_size)
        sizes = list(dict.fromkeys([default, *s.warmup_list]))  # SDSERVE_WARMUP_SIZES, in order, once each
        # An inpainting model warms up inpainting (a grey image, all of it masked: QueueBase.load).
        task = "inpaint" if self.tasks == ("inpaint",) else "generate"
        keys = [BatchKey(w, h, 2, s.default_guidance_scale, "default", task=task) for w, h in sizes]
        if s.compile:  # keys[0] is the default size
            keys += [dataclasses.replace(keys[0], loras=((a.name, a.weight),)) for a in s.loras]
        gpu = self.device.startswith("cuda")
        counts = range(1, s.max_batch_size + 1) if gpu else [1]
        shapes = [(key, n) for key in keys for n in counts]
        if gpu:  # the row counts of the other guidance, those the default's leave out
            for key in keys:
                other = dataclasses.replace(key, guidance_scale=7.5 if key.guidance_scale <= 1 else 1.0)
                warmed = {self._rows(key, n) for n in counts}
                for n in counts:
                    if self._rows(other, n) not in warmed:
                        shapes.append((other, n))
                        warmed.add(self._rows(other, n))
        if gpu and task == "generate":  # the VAE encoder of an edit's input image (one, at the default size)
            shapes.append((dataclasses.replace(keys[0], loras=(), task="img2img", strength=1.0), 1))
        return shapes

    def _rows(self, key: BatchKey, n: int) -> int:
        """The UNet's batch for ``n`` images of ``key``: two rows an image under classifier-free
        guidance (a scale over 1, on a UNet that does not take the scale as an embedding, as
        diffusers decides), one otherwise. Step batching adds an unconditional row for every
        image of a step that has a guided one, so its counts are these too."""
        distilled = self.pipe is not None and self.pipe.unet.config.time_cond_proj_dim is not None
        return 2 * n if key.guidance_scale > 1 and not distilled else n

    # ---- generation ------------------------------------------------------------------
    def run(self, key: BatchKey, items: list[Item]) -> list[Item]:
        """Generate every item's images; a CUDA OOM splits the batch and retries the halves.
        Once every item is dropped, the call ends at the next step (Interrupted)."""
        return self._split(key, items, items)

    def _split(self, key: BatchKey, items: list[Item], batch: list[Item]) -> list[Item]:
        """``run`` for ``items``, a part of ``batch`` (all of it until an OOM split): the
        whole batch is what must be dropped for a part to stop."""
        if not out_of_memory(self._run, key, items, batch):
            return items
        self._free()
        total = sum(i.n for i in items)
        if total == 1:
            raise OutOfMemory(f"out of memory for one {key.width}x{key.height} image")
        from .metrics import OOM_SPLITS

        OOM_SPLITS.inc()
        log.warning("out of memory at batch %d; splitting", total)
        if len(items) == 1:
            item = items[0]
            half = item.n // 2
            a = Item(item.prompt, item.negative_prompt, half, item.seed)
            b = Item(item.prompt, item.negative_prompt, item.n - half, item.seed + half)
            self._split(key, [a], batch)
            self._split(key, [b], batch)
            item.images = a.images + b.images
        else:
            mid = len(items) // 2
            self._split(key, items[:mid], batch)
            self._split(key, items[mid:], batch)
        return items

    def _run(self, key: BatchKey, items: list[Item], batch: list[Item]) -> None:
        import torch

        gen_device = self.device if self.device.startswith("cuda") else "cpu"
        # One generator per image: its noise depends on its seed alone, not on the batch.
        generators = [torch.Generator(gen_device).manual_seed(item.seed + i) for item in items for i in range(item.n)]
        self.activate_loras(key.loras)
        pipe = self.task_pipe(key.task)
        pipe.scheduler = self.scheduler(key.scheduler)
        kwargs: dict[str, Any] = {}
        if key.task != "generate":  # edits: the input image (and mask) of each image's request
            kwargs["image"] = [item.init_image for item in items for _ in range(item.n)]
            kwargs["strength"] = key.strength
        if key.task == "inpaint":
            kwargs["mask_image"] = [item.mask_image for item in items for _ in range(item.n)]
        if key.task != "img2img":  # img2img takes its size from the image
            kwargs.update(width=key.width, height=key.height)

        def progress(_pipe: Any, i: int, _t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if all(item.dropped for item in batch):  # nobody wants these images any more
                raise Interrupted(f"every request of the batch was dropped after step {i + 1} of {key.denoising_steps}")
            first = 0  # the index of each item's first image in the batch
            for item in items:
                item.progress = i + 1
                if item.preview:  # rendered when read (Item.preview_png)
                    item.latest = (callback_kwargs["latents"][first].detach().clone(), self.settings.pipeline)
                first += item.n
            return callback_kwargs

        with self._vae_held(), torch.inference_mode():
            if self.settings.pipeline == "sdxl":
                kwargs.update(self._sdxl_prompts(pipe, items))
            else:  # SD encodes a missing negative prompt as the empty text, as "" here
                prompts = [item.prompt for item in items for _ in range(item.n)]
                negatives = [item.negative_prompt or "" for item in items for _ in range(item.n)]
                kwargs.update(prompt=prompts, negative_prompt=negatives if any(negatives) else None)
            out = pipe(
                callback_on_step_end=progress,
                num_inference_steps=key.steps,
                guidance_scale=key.guidance_scale,
                generator=generators,
                output_type="pil",
                **kwargs,
            )
        images = out.images
        if self._safety is not None:
            images = self._check_nsfw(images)
        pos = 0
        for item in items:
            item.images = images[pos : pos + item.n]
            pos += item.n

    def _sdxl_prompts(self, pipe: Any, items: list[Item]) -> dict[str, Any]:
        """A batch's SDXL prompt embeddings, each request's encoded on its own (``encode``). SDXL
        encodes a missing negative prompt as zeros, and a batch's prompts as one list, in which a
        missing one can only be "": a request's image would change with whether another request
        in its batch has a negative prompt."""
        import torch

        parts = [self.encode(pipe, item, item.n) for item in items]
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        return {name: torch.cat([p[i] for p in parts]) for i, name in enumerate(names)}

    def encode(self, pipe: Any, item: Item, n: int) -> tuple[Any, ...]:
        """One request's prompt embeddings, ``n`` copies each: SD gives (prompt, negative),
        SDXL (prompt, negative, pooled, negative pooled). Request batching (SDXL) and step
        batching (``denoise.begin``) both encode here, under inference mode."""
        if self.settings.pipeline == "sdxl":
            return tuple(
                pipe.encode_prompt(
                    prompt=item.prompt,
                    device=self.device,
                    num_images_per_prompt=n,
                    do_classifier_free_guidance=True,
                    negative_prompt=item.negative_prompt,
                )
            )
        return tuple(pipe.encode_prompt(item.prompt, self.device, n, True, item.negative_prompt or None))

    def task_pipe(self, task: str) -> Any:
        """The pipeline for a task: edits use image-to-image and inpainting pipelines made
        from the loaded one (``from_pipe``: the same weights, no second copy)."""
        if task == "generate":
            return self.pipe
        if task not in self._edit_pipes:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

            cls = AutoPipelineForImage2Image if task == "img2img" else AutoPipelineForInpainting
            edit = cls.from_pipe(self.pipe)
            edit.set_progress_bar_config(disable=True)
            self._edit_pipes[task] = edit
        return self._edit_pipes[task]

    @property
    def tasks(self) -> tuple[str, ...]:
        """What the loaded model serves. An inpainting model (``runwayml/stable-diffusion-inpainting``,
        ``diffusers/stable-diffusion-xl-1.0-inpainting-0.1``) has a UNet that takes the mask and the
        masked image's latents beside the latents (9 input channels): it inpaints, and nothing
        else. Every task until the model is loaded (no request is admitted before)."""
        if self.pipe is not None and self.pipe.unet.config.in_channels != self.pipe.vae.config.latent_channels:
            return ("inpaint",)
        return TASKS

    @property
    def native_size(self) -> tuple[int, int] | None:
        """The size the loaded model was trained at: its UNet's sample size in latent pixels
        times the VAE's scale (512x512 for SD 1.x and SD 2.x base, 768x768 for SD 2.x 768-v,
        1024x1024 for SDXL, 64x64 for the tiny model); None until loaded."""
        if self.pipe is None:
            return None
        sample = self.pipe.unet.config.sample_size
        h, w = (sample, sample) if isinstance(sample, int) else sample
        scale = self.pipe.vae_scale_factor
        return w * scale, h * scale

    def prompt_used(self, prompt: str) -> str | None:
        with self._request_tokenizer_lock:
            return self._prompt_used(prompt)

    def _prompt_used(self, prompt: str) -> str | None:
        tokenizer = self._request_tokenizer
        if tokenizer is None:
            return None
        limit = tokenizer.model_max_length - 2  # the start and end tokens

        def fits(text: str) -> bool:
            return len(tokenizer(text, truncation=False, add_special_tokens=False).input_ids) <= limit

        if fits(prompt):
            return None
        cuts = [m.start() for m in re.finditer(r"\s+", prompt)]  # between words
        lo, hi = 0, len(cuts)  # the longest fitting start ends at cuts[lo - 1] (none: lo == 0)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(prompt[: cuts[mid - 1]]):
                lo = mid
            else:
                hi = mid - 1
        if lo:
            return prompt[: cuts[lo - 1]].rstrip()
        ids = tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids  # one long word
        return str(tokenizer.decode(ids[:limit]))

    def _check_model(self, pipe: Any) -> None:
        """What sdserve cannot serve is a load error that says so, not a warm-up failing inside
        diffusers: a UNet whose input is neither the latents (4 channels) nor an inpainting
        model's (9), and the SDXL refiner (its UNet takes an aesthetic score among its five
        size ids instead of the base model's six size and crop ids)."""
        unet, latent = pipe.unet.config.in_channels, pipe.vae.config.latent_channels
        if unet not in (latent, 2 * latent + 1):
            raise ModelLoadError(
                f"model {self.settings.model!r} has a UNet with {unet} input channels: sdserve serves "
                f"text-to-image models ({latent}) and inpainting models ({2 * latent + 1})"
            )
        per_id = pipe.unet.config.addition_time_embed_dim
        if self.settings.pipeline == "sdxl" and per_id and getattr(pipe, "text_encoder_2", None) is not None:
            pooled = pipe.text_encoder_2.config.projection_dim
            ids = (pipe.unet.add_embedding.linear_1.in_features - pooled) // per_id
            if ids != 6:
                raise ModelLoadError(
                    f"model {self.settings.model!r} takes {ids} size ids, not SDXL base's 6: an SDXL refiner "
                    "(conditioned on an aesthetic score) is not served; serve SDXL base or an SDXL inpainting model"
                )

    # ---- step-level batching (sdserve.denoise) ------------------------------------------
    def begin(self, key: BatchKey, item: Item) -> list[Any]:
        """A request's states. Its text encoding, and an edit's VAE encode of its input image,
        run here: one that runs out of memory fails the request alone with OutOfMemory (a 503,
        as a request batch that does not fit), after the failed attempt's memory is freed."""
        from . import denoise

        states: list[Any] = []
        if out_of_memory(lambda: states.extend(denoise.begin(self, key, item))):
            self._free()
            raise OutOfMemory(f"out of memory starting a {key.width}x{key.height} {key.task} request")
        return states

    def step(self, states: list[Any]) -> None:
        from . import denoise

        pad = self.settings.step_pad
        if pad == "auto":
            pad = "on" if self.device == "cpu" else "off"
        denoise.step(self, states, self.settings.max_batch_size if pad == "on" else 0)

    def finished(self, state: Any) -> bool:
        return bool(state.done)

    def finish(self, states: list[Any]) -> list[Any]:
        from . import denoise

        with self._vae_held():
            if self._vae_switches():
                # The SDXL VAE overflows in fp16: decode in fp32, as diffusers does (an SDXL edit's
                # run switches it back to fp16: hence the lock).
                self.pipe.vae.to(dtype=_float32())
            return denoise.finish(self, states)

    def _vae_switches(self) -> bool:
        """Whether the VAE's dtype moves while serving: an fp16 SDXL pipeline's, upcast to decode."""
        return self.settings.pipeline == "sdxl" and self.dtype == _float16() and self.pipe.vae.config.force_upcast

    def _vae_held(self) -> Any:
        return self._vae_lock if self._vae_switches() else contextlib.nullcontext()

    def _check_nsfw(self, images):
        import numpy as np
        import torch

        assert self._safety is not None
        checker, processor = self._safety
        inputs = processor(images, return_tensors="pt").to(self.device)
        arrays = [np.asarray(im) for im in images]
        with torch.inference_mode():
            _, flagged = checker(images=arrays, clip_input=inputs.pixel_values.to(self.dtype))
        from .metrics import NSFW_FLAGGED

        out: list[Any] = []
        for im, bad in zip(images, flagged, strict=True):
            if bad:
                NSFW_FLAGGED.inc()
                out.append(None)
            else:
                out.append(im)
        return out

    def _free(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _float16():
    import torch

    return torch.float16


def _float32():
    import torch

    return torch.float32


def out_of_memory(fn: Any, *args: Any) -> bool:
    """Call fn; True when it ran out of device memory (any other error propagates).

    The caller retries smaller *after* this returns: retrying inside the ``except`` block
    would keep the failed attempt's activations alive through the exception's traceback
    (seen on an H200: a batch split down to one image still ran out of memory)."""
    try:
        fn(*args)
    except Exception as e:
        if not _is_oom(e):
            raise
        return True
    return False


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _resolved_revision(pipe, requested: str) -> str:
    """The commit the files came from, when the hub cache says it."""
    path = getattr(pipe, "config", {}).get("_name_or_path", "") if hasattr(pipe, "config") else ""
    parts = pathlib.Path(str(path)).parts
    if "snapshots" in parts:
        i = parts.index("snapshots")
        if i + 1 < len(parts):
            return parts[i + 1]
    return requested
