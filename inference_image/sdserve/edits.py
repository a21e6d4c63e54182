"""POST /v1/images/edits: the uploaded image and mask, checked and turned into the inputs of
an image-to-image or inpainting generation.

As in the OpenAI Images API, a mask's fully transparent pixels mark what to repaint; a mask
without an alpha channel is read as diffusers reads it (white: repaint). Every problem is a
4xx naming its field: not an image, over the upload limit, a mask of another size.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

from .errors import ApiError


@dataclass
class Upload:
    field: str
    data: bytes


@dataclass
class EditInputs:
    image: Any  # PIL RGB at the generation size
    mask: Any | None  # PIL L at the generation size (white: repaint), or None for image-to-image
    width: int
    height: int
    digest: str  # of the uploaded bytes: part of the result-cache key


#: The most pixels an upload may have: a 4096x4096 image, the largest the CR allows. Checked
#: from the header, before decoding: a small file can claim a huge image (a decompression bomb).
MAX_UPLOAD_PIXELS = 4096 * 4096
#: What an upload may be (PIL's names), as in the OpenAI Images API.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


def open_image(upload: Upload, max_bytes: int) -> Any:
    from PIL import Image, UnidentifiedImageError

    if len(upload.data) > max_bytes:
        raise ApiError(
            413,
            "file_too_large",
            f"{upload.field} is {len(upload.data)} bytes; the limit is {max_bytes}",
            param=upload.field,
        )

    def too_many(what: str) -> ApiError:
        message = f"{upload.field} {what}; the most pixels accepted are {MAX_UPLOAD_PIXELS}"
        return ApiError(422, "invalid_value", message, param=upload.field)

    try:
        # The header only, and only by the three decoders the API takes: PIL would otherwise
        # try each of its dozens (TIFF, BMP, ICO, PSD, EPS through Ghostscript...) on what a
        # client sends, each one more parser exposed to untrusted bytes.
        im = Image.open(io.BytesIO(upload.data), formats=ACCEPTED_FORMATS)
        if im.size[0] * im.size[1] > MAX_UPLOAD_PIXELS:
            raise too_many(f"is {im.size[0]}x{im.size[1]}")
        im.load()
    except Image.DecompressionBombError:  # PIL's own bound, past ours: refused at the header
        raise too_many("is larger than PIL will decode") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        # PIL's "cannot identify image file <_io.BytesIO object at 0x...>" says nothing more
        why = "" if isinstance(e, UnidentifiedImageError) else f" ({e})"
        raise ApiError(
            422, "invalid_image", f"{upload.field} is not a PNG, JPEG or WebP image{why}", param=upload.field
        ) from None
    return im


def repaint_mask(mask: Any) -> Any:
    """A diffusers mask (L, white: repaint) from an uploaded one."""
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a == 0 else 0)  # OpenAI: transparent = edit here
    return mask.convert("L")


def edit_inputs(image: Upload, mask: Upload | None, size: tuple[int, int] | None, max_bytes: int) -> EditInputs:
    """The image (and mask) at the generation size: ``size`` when given, else the image's own
    size rounded down to a multiple of 8."""
    from PIL import Image

    im = open_image(image, max_bytes)
    m = open_image(mask, max_bytes) if mask is not None else None
    if m is not None and m.size != im.size:
        raise ApiError(
            422,
            "invalid_value",
            f"mask is {m.size[0]}x{m.size[1]}; it must have the image's size {im.size[0]}x{im.size[1]}",
            param="mask",
        )
    width, height = size or (im.size[0] // 8 * 8, im.size[1] // 8 * 8)
    if not (width and height):  # under 8 pixels a side: nothing to round down to (the limits say more)
        raise ApiError(
            422,
            "invalid_value",
            f"image is {im.size[0]}x{im.size[1]}; without size, an edit is made at the image's size rounded "
            "down to a multiple of 8, so each side needs 8 pixels or more (the server's limits may ask more)",
            param="image",
        )
    digest = hashlib.sha256(image.data + b"\0" + (mask.data if mask else b"")).hexdigest()
    rgb = im.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    out_mask = None
    if m is not None:
        out_mask = repaint_mask(m)
        if out_mask.size != (width, height):
            out_mask = out_mask.resize((width, height), Image.Resampling.NEAREST)
    return EditInputs(rgb, out_mask, width, height, digest)
