"""What the worker does, in types: a batch key, a request's share of a batch, the failures,
and the ``ImagePipeline`` protocol the batcher and the app depend on.

``sdserve.pipeline.Pipeline`` is the real implementation (diffusers, in the worker thread);
tests use a fake that draws images without a model (``sdtesting.fakes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class ModelLoadError(RuntimeError):
    pass


class OutOfMemory(RuntimeError):
    """The device ran out of memory for one request on its own."""


class Interrupted(RuntimeError):
    """A request batch (``ImagePipeline.run``) ended at a step boundary: every request in it was
    dropped (its client left, its time ran out, or a drain ran out of time)."""


#: What a request asks for: text to image, an edit without a mask, an edit with one.
TASKS = ("generate", "img2img", "inpaint")


@dataclass(frozen=True)
class BatchKey:
    """Requests with equal keys can run in one pipeline call."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    #: "generate" (text to image), "img2img" (an edit without a mask) or "inpaint" (with one).
    task: str = "generate"
    #: Edits: how far the input image is noised (1.0: entirely).
    strength: float = 1.0
    #: LoRA adapters and their weights, sorted by name (requests batch only with the same set).
    loras: tuple[tuple[str, float], ...] = ()

    @property
    def denoising_steps(self) -> int:
        """The UNet steps a request takes: an edit runs the last ``strength`` of ``steps``."""
        return self.steps if self.task == "generate" else min(int(self.steps * self.strength), self.steps)


@dataclass
class Item:
    """One request's share of a batch: n images from one prompt with consecutive seeds."""

    prompt: str
    negative_prompt: str | None
    n: int
    seed: int
    images: list[Any] = field(default_factory=list)
    #: Edits: the input image and, for inpainting, the mask (white: repaint), both at the key's size.
    init_image: Any = None
    mask_image: Any = None
    #: Denoising steps taken so far (async jobs show it as progress).
    progress: int = 0
    #: Async jobs and streams that asked for previews of the first image as it is denoised:
    #: its latents after the latest step (a copy) and the model family, kept by the model's
    #: thread at each step and rendered (``preview_png``) only when someone reads them. A
    #: render on the model's thread at each step would copy a GPU tensor to the host, a sync
    #: that stalls the next step's kernel launches for every request in the batch.
    preview: bool = False
    latest: tuple[Any, str] | None = None
    #: Why the request is no longer wanted, once it is not ("client_disconnected", "timeout",
    #: "drain_timeout"; set on the event loop by ``sdserve.queue.cancel``), read by the model's
    #: thread at each step: a request batch whose requests are all dropped ends at its next
    #: step (``Interrupted``) instead of running on for nobody.
    dropped: str | None = None

    def preview_png(self) -> str | None:
        """The latest preview, a low-resolution base64 PNG (sdserve.preview); None before the
        first step. It waits for the GPU: call it off the event loop and the model's thread."""
        if self.latest is None:
            return None
        from .preview import latent_preview

        return latent_preview(*self.latest)


class ImagePipeline(Protocol):
    """A loaded model that turns batches into images. Every method runs in the worker thread."""

    revision: str
    device: str
    dtype: Any
    load_seconds: float

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks (``TASKS``) the loaded model serves; a request for another is refused (422)."""
        ...

    @property
    def native_size(self) -> tuple[int, int] | None:
        """The loaded model's native (width, height), which a request naming no size gets; None
        when unknown (then the family's default: ``Settings.default_width_height``)."""
        ...

    def prompt_used(self, prompt: str) -> str | None:
        """When the text encoder cannot read the whole prompt (CLIP reads 75 tokens), the
        longest start of it, cut between words, that it reads; None when it reads all of it."""
        ...

    def load(self) -> None:
        """Load the weights; raise ModelLoadError when that cannot be done."""

    def warmup_shapes(self) -> list[tuple[BatchKey, int]]:
        """What to run (a key, a number of images) after loading and before the server reports
        ready: every input shape whose first run is slow (kernel autotuning, compilation)."""
        ...

    def run(self, key: BatchKey, items: list[Item]) -> list[Item]:
        """Fill every item's ``images`` (None for an image withheld by the content check);
        raise OutOfMemory when one image alone does not fit, and Interrupted at the first step
        boundary at which every item is ``dropped``."""
        ...

    # Step-level batching (sdserve.stepper): one image's denoising as a state advanced one
    # step at a time; states of one latent shape share each UNet forward.
    def begin(self, key: BatchKey, item: Item) -> list[Any]:
        """Encode the prompt once and make one state per image (its noise from its own seed)."""
        ...

    def step(self, states: list[Any]) -> None:
        """Advance every state by one denoising step (any mix of timesteps, step counts,
        guidance scales and schedulers); raise OutOfMemory when one state alone does not fit."""
        ...

    def finished(self, state: Any) -> bool:
        """Whether a state has taken all its steps."""
        ...

    def finish(self, states: list[Any]) -> list[Any]:
        """Decode finished states (one request's images) to images, None where withheld."""
        ...
