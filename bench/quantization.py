"""UNet quantization (SDSERVE_QUANTIZATION, torchao) against none: speed, memory and images.

    python bench/quantization.py                                 # tiny model on the CPU
    python bench/quantization.py --arch sd15 --device cuda       # SD 1.5 architecture, random fp16 weights

Each kind gets a fresh pipeline with the same weights (built from one seed), through sdserve's
own ``Pipeline`` (the quantization happens where the server does it). Per kind: seconds per
UNet step at batch 1 and --batch (eager, no torch.compile), a batch-1 request's latency, peak
GPU memory, and how far its images are from the unquantized ones for the same prompts and
seeds (mean absolute pixel difference out of 255, and PSNR). With random weights the images
are not pictures: the difference says how much the quantization moves the computation, not
how good a picture looks.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, write
from gpu_pipeline import sdserve_pipeline, sync

from sdserve.work import BatchKey, Item


def pipeline(arch: str, device: str, kind: str, batch: int):
    # step_pad off: measure the batch asked for, also on the CPU
    return sdserve_pipeline(arch, device, quantization=kind, max_batch_size=batch, step_pad="off")


def step_seconds(p, key: BatchKey, batch: int, device: str) -> float:
    key = BatchKey(key.width, key.height, 8, key.guidance_scale, key.scheduler)  # 5 of its steps are timed
    states = [s for i in range(batch) for s in p.begin(key, Item("a lighthouse at dusk", None, 1, i))]
    p.step(states)  # warm-up (kernel selection per shape)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(4):
        p.step(states)
    sync(device)
    return (time.perf_counter() - t0) / 4


def images(p, key: BatchKey) -> list:
    import numpy as np

    item = Item("a lighthouse at dusk, oil painting", None, 2, 1234)
    p.run(key, [item])
    return [np.asarray(im, dtype=np.float64) for im in item.images]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["tiny", "sd15", "sdxl"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kinds", default="", help="default: none,int8_weight_only (+int8_dynamic,fp8 on CUDA)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    import torch

    cuda = args.device.startswith("cuda")
    kinds = args.kinds.split(",") if args.kinds else ["none", "int8_weight_only"]
    if cuda and not args.kinds:
        kinds += ["int8_dynamic", "fp8"]
    side = 64 if args.arch == "tiny" else (1024 if args.arch == "sdxl" else 512)
    key = BatchKey(side, side, args.steps, 7.5, "default")
    rows, reference = [], None
    for kind in kinds:
        row: dict = {"kind": kind}
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            p = pipeline(args.arch, args.device, kind, args.batch)
            row["step s (batch 1)"] = step_seconds(p, key, 1, args.device)
            row[f"step s (batch {args.batch})"] = step_seconds(p, key, args.batch, args.device)
            t0 = time.perf_counter()
            imgs = images(p, key)
            sync(args.device)
            row["2 images s"] = time.perf_counter() - t0
            if cuda:
                row["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
            if reference is None:
                reference = imgs
            diff = sum(float(abs(a - b).mean()) for a, b in zip(imgs, reference, strict=True)) / len(imgs)
            mse = sum(float(((a - b) ** 2).mean()) for a, b in zip(imgs, reference, strict=True)) / len(imgs)
            row["mean |diff| /255"] = diff
            row["PSNR dB"] = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
            del p
        except Exception as e:  # noqa: BLE001 - a kind this machine cannot run is a result too
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
        print(row, flush=True)
    base = rows[0].get(f"step s (batch {args.batch})")
    for r in rows:
        if base and r.get(f"step s (batch {args.batch})"):
            r["speed vs none"] = base / r[f"step s (batch {args.batch})"]
    columns = ["kind", "step s (batch 1)", f"step s (batch {args.batch})", "speed vs none", "2 images s"]
    columns += ["peak GiB", "mean |diff| /255", "PSNR dB", "error"]
    print(table(rows, columns))
    name = f"quantization_{args.arch}_{args.device.split(':')[0]}"
    import torchao

    print(f"wrote {write(name, {'settings': vars(args), 'torchao': torchao.__version__, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
