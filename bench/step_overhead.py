"""Step batching's own work per step, beside the UNet forward it wraps.

    python bench/step_overhead.py                               # tiny model on the CPU
    python bench/step_overhead.py --arch sd15 --device cuda     # SD 1.5 architecture, random fp16 weights

Step batching does per image, every step, what a request batch does once per batch: the
timestep, the scheduler's input scaling and step, classifier-free guidance, each on the
image's own slice with its own scheduler (sdserve.denoise._step). This times one step of
sdserve's Pipeline for a batch of images whose requests mix the schedulers, and the part of
it spent inside the UNet call, as the host sees it (no device sync inside the step: on a
launch-bound GPU the host's time is what a step costs). The rest, per image, is the price of
per-request parameters.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, write
from gpu_pipeline import sdserve_pipeline, sync

from sdserve.schedulers import SCHEDULERS
from sdserve.work import BatchKey, Item


def measure(p, side: int, batch: int, device: str, repeats: int) -> dict:
    names = sorted(SCHEDULERS)
    states = []
    for i in range(batch):  # each image its own request: schedulers, guidance and seeds mixed
        key = BatchKey(side, side, 50, 3.5 + i % 4 * 2, names[i % len(names)])
        states += p.begin(key, Item("a lighthouse at dusk", None, 1, i))
    unet = p.pipe.unet
    inside = [0.0]
    forward = unet.forward

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - t0

    p.step(states)  # warm-up: kernel selection for this shape
    sync(device)
    unet.forward = timed
    try:
        t0 = time.perf_counter()
        for _ in range(repeats):
            p.step(states)
        host = (time.perf_counter() - t0) / repeats
        sync(device)
        total = (time.perf_counter() - t0) / repeats
    finally:
        unet.forward = forward
    rest = host - inside[0] / repeats
    return {
        "batch": batch,
        "step ms": 1e3 * total,
        "UNet call ms (host)": 1e3 * inside[0] / repeats,
        "rest ms (host)": 1e3 * rest,
        "rest per image ms": 1e3 * rest / batch,
        "rest share": rest / total,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["tiny", "sd15", "sdxl"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    side = {"tiny": 64, "sd15": 512, "sdxl": 1024}[args.arch]
    # step_pad off: the forward holds the batch asked for, also on the CPU
    p = sdserve_pipeline(args.arch, args.device, max_batch_size=max(batches), step_pad="off")
    rows = [measure(p, side, b, args.device, args.repeats) for b in batches]
    columns = ["batch", "step ms", "UNet call ms (host)", "rest ms (host)", "rest per image ms", "rest share"]
    print(f"{args.arch} on {args.device}, {side}x{side}, schedulers mixed per image")
    print(table(rows, columns))
    name = f"step_overhead_{args.arch}_{args.device.split(':')[0]}"
    print(f"wrote {write(name, {'settings': vars(args), 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
