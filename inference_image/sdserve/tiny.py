"""The built-in model ``tiny``: a real diffusers Stable Diffusion pipeline, scaled down.

Same architecture classes as SD 1.5 (CLIP text encoder, UNet2DConditionModel with cross
attention, AutoencoderKL, a scheduler) with small configs and random weights from a fixed
seed, and a byte-level CLIP vocabulary written on the fly. No download, deterministic,
fast on a CPU: it serves the demo and the tests, and exercises the same code paths as
a real model. With ``SDSERVE_PIPELINE=sdxl`` it is an SDXL pipeline the same way (two text
encoders, the second with a projection; the UNet's added size and pooled-text conditioning).
"""

from __future__ import annotations

import json
import pathlib
import tempfile

TINY_SEED = 1234
TEXT_DIM = 32


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: one printable character per byte value."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _byte_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary with one token per byte (and its word-final form), no merges."""
    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for ch in chars:
        vocab[ch] = len(vocab)
    for ch in chars:
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def _tokenizer():
    from transformers import CLIPTokenizer

    vocab = _byte_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        try:  # transformers 5: the vocabulary itself
            return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
        except TypeError:  # transformers 4: file paths
            return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _text_encoder_config(vocab_size: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        **extra,
    )


def _unet(in_channels: int = 4, **extra):
    """The tiny UNet: two levels, cross attention on the lower one; ``extra`` says what differs.
    ``in_channels=9``: an inpainting model's (latents, mask, the masked image's latents)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=32,
        **extra,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_pipeline(pipeline_cls=None, in_channels: int = 4):
    """A StableDiffusionPipeline with random weights; identical on every call. ``in_channels=9``:
    an inpainting model (as ``runwayml/stable-diffusion-inpainting``), for the tests."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = _tokenizer()
    vocab_size = len(tokenizer)

    torch.manual_seed(TINY_SEED)
    unet = _unet(in_channels, cross_attention_dim=TEXT_DIM)
    vae = _vae()
    text_encoder = CLIPTextModel(_text_encoder_config(vocab_size))
    cls = pipeline_cls or StableDiffusionPipeline
    pipe = cls(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: SDXL's added conditioning: each of the six size/crop numbers is embedded in this many dimensions.
TIME_EMBED_DIM = 8


def build_tiny_xl_pipeline(in_channels: int = 4):
    """A StableDiffusionXLPipeline with random weights; identical on every call. The UNet's
    cross attention takes both encoders' hidden states side by side (2 x TEXT_DIM), and its
    added embedding the six size/crop numbers and the second encoder's pooled projection.
    ``in_channels=9``: an inpainting model (as ``diffusers/stable-diffusion-xl-1.0-inpainting-0.1``)."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tokenizer()
    vocab_size = len(tokenizer)

    torch.manual_seed(TINY_SEED)
    unet = _unet(
        in_channels,
        cross_attention_dim=2 * TEXT_DIM,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_DIM,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_encoder_config(vocab_size))
    text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(vocab_size, projection_dim=TEXT_DIM))
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=_tokenizer(),
        unet=unet.eval(),
        scheduler=_scheduler(),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
