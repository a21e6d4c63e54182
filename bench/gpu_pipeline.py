"""GPU pipeline: plain diffusers against sdop's settings, for the SD 1.5 and SDXL architectures.

The models are built from the configs in bench/configs (the real architectures, random
weights, fp16): no download, same FLOPs and memory traffic as the released checkpoints.

    python bench/gpu_pipeline.py --arch sd15 --size 512 --steps 30 --batches 1,4,8,16
    python bench/gpu_pipeline.py --arch sdxl --size 1024 --steps 30 --batches 1,2,4,8
    python bench/gpu_pipeline.py --smoke        # the built-in tiny model on the CPU: checks the script

plain: the seed's settings, StableDiffusionPipeline in fp16 as it comes.
sdop:  what sdserve does (channels_last, fused QKV, SDPA, torch.compile with CUDA graphs),
       plus batching. Same steps, size, guidance and scheduler: equal quality settings.
Reports images/s per batch size, batch-1 latency, model FLOPs per image and the fraction
of the GPU's measured bf16 matmul rate reached. Target: sdop >= 2x plain images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, write

CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"


def build(arch: str, device: str, dtype):
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdserve.tiny import _tokenizer, build_tiny_pipeline

    if arch == "tiny":
        return build_tiny_pipeline().to(device, dtype)

    def cfg(name):
        return json.loads((CONFIGS / arch / f"{name}.json").read_text())

    torch.manual_seed(0)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel.from_config(cfg("unet")).to(dtype)
        vae = diffusers.AutoencoderKL.from_config(cfg("vae")).to(dtype)
        te_cfg = {k: v for k, v in cfg("text_encoder").items() if k != "architectures"}
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg)).to(dtype)
        with torch.device("cpu"):  # schedulers keep their tables on the CPU
            sched_cfg = cfg("scheduler")
            scheduler = getattr(diffusers, sched_cfg.pop("_class_name")).from_config(sched_cfg)
        tokenizer = _tokenizer()
        if arch == "sdxl":
            te2_cfg = {k: v for k, v in cfg("text_encoder_2").items() if k != "architectures"}
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg)).to(dtype)
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2,
                tokenizer=tokenizer,
                tokenizer_2=tokenizer,
                unet=unet,
                scheduler=scheduler,
            )
        else:
            pipe = diffusers.StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdserve_pipeline(arch: str, device: str, **settings):
    """sdserve's own Pipeline (its optimisations, batching entry points) on the tiny model or an
    architecture from configs/ with random weights."""
    import torch

    from sdserve.pipeline import Pipeline
    from sdserve.settings import Settings

    p = Pipeline(
        Settings(
            model="tiny" if arch == "tiny" else f"random-weights:{arch}",
            pipeline="sdxl" if arch == "sdxl" else "sd",
            device=device,
            **settings,
        )
    )
    if arch == "tiny":
        p.load()  # build_tiny_pipeline seeds its weights
    else:
        p.use(build(arch, device, torch.float16 if device.startswith("cuda") else torch.float32))
    return p


def sdop_settings(pipe, compile_mode: str | None, only_compile: bool = False):
    """What sdserve's Pipeline._optimise does, plus fused QKV projections."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    if only_compile:
        return compile_parts(pipe, compile_mode)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    try:
        pipe.fuse_qkv_projections()
    except Exception as e:  # noqa: BLE001 - older diffusers
        print(f"fuse_qkv_projections unavailable: {e}")
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return compile_parts(pipe, compile_mode)


def compile_parts(pipe, compile_mode: str | None):
    import torch

    if compile_mode:
        import torch._inductor.config as ic

        ic.conv_1x1_as_mm = True
        ic.coordinate_descent_tuning = True
        ic.epilogue_fusion = False
        pipe.unet = torch.compile(pipe.unet, mode=compile_mode, fullgraph=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=compile_mode, fullgraph=True)
    return pipe


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def call(pipe, batch: int, args) -> None:
    pipe(
        prompt=["a photograph of an astronaut riding a horse"] * batch,
        num_inference_steps=args.steps,
        guidance_scale=7.5,
        width=args.size,
        height=args.size,
        output_type="pil",
    )


def measure(pipe, batch: int, args) -> dict:
    for _ in range(args.warmup):
        call(pipe, batch, args)
    sync(args.device)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        call(pipe, batch, args)
        sync(args.device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {
        "batch": batch,
        "seconds_per_call": best,
        "images_per_s": batch / best,
        "latency_s": best if batch == 1 else None,
    }


def latency(pipe, args) -> float:
    """Batch-1 latency at --latency-steps steps (best of --repeats after one warm-up)."""
    steps, args.steps = args.steps, args.latency_steps
    try:
        return measure(pipe, 1, args)["seconds_per_call"]
    finally:
        args.steps = steps


def flops_per_image(pipe, args) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        call(pipe, 1, args)
    return float(counter.get_total_flops())


def bf16_peak(device: str) -> float | None:
    """Measured dense bf16 matmul rate (FLOP/s) of this device: the roofline we compare to."""
    import torch

    if not device.startswith("cuda"):
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["sd15", "sdxl", "tiny"], default="sd15")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode for sdop; 'none' to skip")
    ap.add_argument("--compile-batches", help="batch sizes measured compiled (default: --batches)")
    ap.add_argument("--latency-steps", type=int, default=50, help="also batch-1 latency at this many steps; 0: skip")
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU, 2 steps: checks that the script works")
    args = ap.parse_args()
    if args.smoke:
        args.arch, args.device, args.size, args.steps, args.batches = "tiny", "cpu", 64, 2, "1,2"
        args.warmup, args.repeats, args.compile_mode, args.latency_steps = 1, 1, "none", 3
    import torch

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    compile_mode = None if args.compile_mode == "none" else args.compile_mode

    name = f"gpu_pipeline_{args.arch}" + ("_smoke_cpu" if args.smoke else "")
    results: dict = {"settings": vars(args), "plain": [], "sdop_eager": [], "sdop": [], "latency": {}}
    pipe = build(args.arch, args.device, dtype)
    results["flops_per_image"] = flops_per_image(pipe, args)

    def phase(label: str, which: list[int]) -> None:
        for b in which:
            results[label].append(measure(pipe, b, args))
            print(label, results[label][-1], flush=True)
            write(name, results)  # a run cut short still leaves what it measured
        if args.latency_steps:
            results["latency"][label] = latency(pipe, args)
            print(label, f"batch-1 latency at {args.latency_steps} steps: {results['latency'][label]:.3f}s")
            write(name, results)

    phase("plain", batches)
    pipe = sdop_settings(pipe, None)
    if compile_mode:
        phase("sdop_eager", batches)
        pipe = sdop_settings(pipe, compile_mode, only_compile=True)
    compiled = [int(b) for b in args.compile_batches.split(",")] if args.compile_batches else batches
    try:
        phase("sdop", compiled if compile_mode else batches)
    except Exception as e:  # noqa: BLE001 - a compile failure is a result too; the eager figures stand
        results["sdop_error"] = f"{type(e).__name__}: {e}"[:2000]
        print(f"sdop (compiled) failed: {results['sdop_error']}", flush=True)
    if args.device.startswith("cuda"):
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    peak = bf16_peak(args.device)
    results["bf16_matmul_flops_per_s"] = peak

    plain_b1 = results["plain"][0]["images_per_s"]
    best = max(results["sdop"] + results["sdop_eager"] or results["plain"], key=lambda r: r["images_per_s"])
    results["speedup_best_sdop_over_plain_batch1"] = best["images_per_s"] / plain_b1
    plain_best = max(results["plain"], key=lambda r: r["images_per_s"])
    results["speedup_best_sdop_over_best_plain"] = best["images_per_s"] / plain_best["images_per_s"]
    by_batch = {label: {r["batch"]: r["images_per_s"] for r in results[label]} for label in ("sdop_eager", "sdop")}
    rows = []
    for p in results["plain"]:
        row = {"batch": p["batch"], "plain img/s": p["images_per_s"]}
        for label, column in (("sdop_eager", "sdop eager img/s"), ("sdop", "sdop img/s")):
            if p["batch"] in by_batch[label]:
                row[column] = by_batch[label][p["batch"]]
        top = max(row.get("sdop eager img/s", 0), row.get("sdop img/s", 0))
        row["sdop/plain"] = top / p["images_per_s"]
        if peak:
            row["sdop % of bf16 peak"] = 100 * results["flops_per_image"] * top / peak
        rows.append(row)
    columns = ["batch", "plain img/s", "sdop eager img/s", "sdop img/s", "sdop/plain", "sdop % of bf16 peak"]
    print(table(rows, columns))
    print(f"\nFLOPs per image: {results['flops_per_image'] / 1e12:.2f} TFLOP")
    for label, seconds in results["latency"].items():
        print(f"batch-1 latency at {args.latency_steps} steps, {label}: {seconds:.3f}s")
    print(
        f"best sdop (batch {best['batch']}) / plain batch 1 = {results['speedup_best_sdop_over_plain_batch1']:.2f}x"
        f" (target >= 2x); / best plain = {results['speedup_best_sdop_over_best_plain']:.2f}x"
    )
    print(f"wrote {write(name, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
