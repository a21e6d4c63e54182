"""A pipeline without a model: images whose pixels follow the seed, at a chosen cost per call.

It satisfies ``sdserve.work.ImagePipeline``, so the app and the batcher run unchanged on it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from PIL import Image

from sdserve.work import TASKS, BatchKey, Interrupted, Item, ModelLoadError, OutOfMemory


class FakePipeline:
    revision = "fake-v1"
    tasks = TASKS  # every task (an inpainting model's, in Pipeline, serves only "inpaint")
    native_size = None  # the family's default size
    device = "cpu"
    dtype = "float32"

    def __init__(
        self,
        seconds_per_call: float = 0.0,
        load_error: str | None = None,
        oom_prompt: str | None = None,
        warmup: list[tuple[BatchKey, int]] | None = None,
    ):
        self.seconds_per_call = seconds_per_call
        self.load_error = load_error
        self.oom_prompt = oom_prompt  # a batch holding this prompt runs out of memory, as one image alone would
        self.load_seconds = 0.0
        self.calls: list[tuple[BatchKey, int]] = []  # (key, images) per call, for assertions
        self.steps: list[int] = []  # step batching: images per step
        self.step_keys: list[list[BatchKey]] = []  # and their keys
        self.step_prompts: list[list[str]] = []  # and their prompts
        self.warmup = warmup or []
        #: (method, prompt, thread name) of every call: which thread did what.
        self.threads: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    def prompt_used(self, prompt: str) -> str | None:
        return None  # no text encoder: every prompt is read whole

    def _on(self, method: str, prompt: str) -> None:
        with self._lock:
            self.threads.append((method, prompt, threading.current_thread().name))

    def load(self) -> None:
        self._on("load", "")
        if self.load_error:
            raise ModelLoadError(self.load_error)

    def warmup_shapes(self) -> list[tuple[BatchKey, int]]:
        return list(self.warmup)

    @staticmethod
    def _check(key: BatchKey, item: Item) -> None:
        """An edit without its input image fails, as in the real pipeline."""
        if key.task != "generate" and item.init_image is None:
            raise ValueError(f"a {key.task} request without an input image")
        if key.task == "inpaint" and item.mask_image is None:
            raise ValueError("an inpaint request without a mask")

    def run(self, key: BatchKey, items: list[Item]) -> list[Item]:
        self._on("run", items[0].prompt)
        for item in items:
            self._check(key, item)
        with self._lock:
            self.calls.append((key, sum(i.n for i in items)))
        if self.oom_prompt is not None and any(i.prompt == self.oom_prompt for i in items):
            raise OutOfMemory(f"out of memory for one {key.width}x{key.height} image")
        steps = key.denoising_steps
        for step in range(1, max(1, steps) + 1):  # the call's cost spread over its steps, as in step batching
            if self.seconds_per_call:
                time.sleep(self.seconds_per_call / max(1, steps))
            for item in items:
                item.progress = min(step, steps)
            if all(item.dropped for item in items):  # as the real pipeline's step callback
                raise Interrupted(f"every request of the batch was dropped after step {step} of {steps}")
        for item in items:
            item.images = [self._image(key, item.prompt, item.seed + i) for i in range(item.n)]
        return items

    # ---- step batching: a state is [key, prompt, seed, steps taken] --------------------
    def begin(self, key: BatchKey, item: Item) -> list[Any]:
        self._on("begin", item.prompt)
        self._check(key, item)
        with self._lock:
            self.calls.append((key, item.n))  # a request's images start (its prompt is encoded)
        return [[key, item.prompt, item.seed + i, 0] for i in range(item.n)]

    def step(self, states: list[Any]) -> None:
        self._on("step", states[0][1])
        with self._lock:
            self.steps.append(len(states))
            self.step_keys.append([s[0] for s in states])
            self.step_prompts.append([s[1] for s in states])
        if self.oom_prompt is not None and any(s[1] == self.oom_prompt for s in states):
            raise OutOfMemory(f"out of memory for one {states[0][0].width}x{states[0][0].height} image")
        if self.seconds_per_call:
            # A call's cost spread over its steps: a request costs the same in either mode.
            time.sleep(self.seconds_per_call / max(1, states[0][0].steps))
        for s in states:
            s[3] += 1

    def finished(self, state: Any) -> bool:
        return bool(state[3] >= state[0].denoising_steps)

    def finish(self, states: list[Any]) -> list[Any]:
        self._on("finish", states[0][1])
        return [self._image(s[0], s[1], s[2]) for s in states]

    @staticmethod
    def _image(key: BatchKey, prompt: str, seed: int) -> Any:
        shade = (seed * 37 + len(prompt)) % 256
        return Image.new("RGB", (key.width, key.height), (shade, 255 - shade, (shade * 7) % 256))
