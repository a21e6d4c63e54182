"""Image encoding, off the event loop: PNG, or JPEG / WebP at a quality (the Images API's
``output_format`` and ``output_compression``)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Literal

OutputFormat = Literal["png", "jpeg", "webp"]


@dataclass(frozen=True)
class ImageFormat:
    kind: OutputFormat = "png"
    #: JPEG and WebP: 0-100, higher is better and larger (PIL's quality); PNG is lossless.
    quality: int = 90

    @property
    def mime(self) -> str:
        return f"image/{self.kind}"

    def cache_part(self) -> list[str | int] | None:
        """What a cache key adds for this format: nothing for PNG (keys made before formats
        existed stay valid)."""
        return None if self.kind == "png" else [self.kind, self.quality]


PNG = ImageFormat()


def encode_b64(images, fmt: ImageFormat = PNG) -> list[str]:
    out = []
    for im in images:
        buf = io.BytesIO()
        if fmt.kind == "png":
            im.save(buf, format="PNG", compress_level=1)
        elif fmt.kind == "jpeg":
            im.convert("RGB").save(buf, format="JPEG", quality=fmt.quality)
        else:
            im.save(buf, format="WEBP", quality=fmt.quality)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out
