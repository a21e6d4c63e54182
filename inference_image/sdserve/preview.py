"""Low-resolution previews of an image being denoised: its latents mapped to RGB by a fixed
linear map (no VAE decode), one pixel per latent pixel (64x64 for a 512x512 image).

The maps are the least-squares fits of latent channels to RGB that the community uses for
live previews of SD 1.x and SDXL; they show composition and colour, not detail. Computed in
the worker thread, only for jobs that asked for previews.
"""

from __future__ import annotations

import base64
import io
from typing import Any

#: latent channel (4) -> RGB (3), per model family.
LATENT_RGB = {
    "sd": [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ],
    "sdxl": [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ],
}


def latent_preview(latents: Any, family: str) -> str:
    """A base64 PNG of one image's latents ([4, h, w] or [1, 4, h, w])."""
    import torch
    from PIL import Image

    x = latents.detach().float()
    if x.dim() == 4:
        x = x[0]
    m = torch.tensor(LATENT_RGB.get(family, LATENT_RGB["sd"]), device=x.device)
    rgb = torch.einsum("chw,cr->hwr", x[:4], m)
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
