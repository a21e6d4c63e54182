"""Image encoding, off the event loop."""

from __future__ import annotations

import base64
import io


def png_b64(images) -> list[str]:
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=1)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out
