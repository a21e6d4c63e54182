"""Decode API images for assertions."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)
