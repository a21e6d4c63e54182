"""Pipeline settings that change what runs: the default scheduler and per-request schedulers."""

from __future__ import annotations

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
