"""`make demo`'s server part (`python -m sdserve.demo`) runs as a new user runs it, and shows
what it says: images written, step batching serving requests with different parameters in
shared forwards, a streamed request's partial images before its image."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from PIL import Image

from sdtesting.examples import ROOT

pytestmark = pytest.mark.integration


def test_the_demo_generates_steps_a_mix_in_shared_forwards_and_streams(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "sdserve.demo", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,  # within the suite's per-test timeout (300 s)
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = ["tiny-0", "tiny-1", "tiny-step-0", "tiny-step-1", "tiny-step-2", "tiny-streamed"]
    for name in names:
        with Image.open(tmp_path / f"{name}.png") as im:
            assert im.size == (128, 128), name
    partials = sorted(tmp_path.glob("tiny-partial-*.png"))
    assert 1 <= len(partials) <= 2, r.stdout
    for path in partials:
        with Image.open(path) as im:
            assert im.size[0] < 128, path  # a latent preview: one pixel per latent pixel
    shared = re.search(r"in (\d+) UNet forwards: ([\d.]+) images per forward", r.stdout)
    assert shared is not None, r.stdout
    forwards, per_forward = int(shared[1]), float(shared[2])
    assert forwards < 8 + 12 + 16 and per_forward > 1, r.stdout  # the three requests shared steps
