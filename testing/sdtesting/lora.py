"""LoRA adapters for tests: small random ones for the tiny pipeline, saved as diffusers does."""

from __future__ import annotations

import torch


def make_adapter(folder, seed: int, xl: bool = False) -> str:
    """A LoRA of the tiny UNet's attention (the tiny SDXL UNet's with ``xl``) with random
    (non-zero) weights, saved as diffusers does."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sdserve.tiny import build_tiny_pipeline, build_tiny_xl_pipeline

    unet = (build_tiny_xl_pipeline if xl else build_tiny_pipeline)().unet
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    unet.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).save_lora_weights(folder, unet_lora_layers=layers)
    return str(folder / "pytorch_lora_weights.safetensors")
