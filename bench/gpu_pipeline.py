"""GPU pipeline: plain diffusers against sdop's settings, for the SD 1.5 and SDXL architectures.

The models are built from the configs in bench/configs (the real architectures, random
weights, fp16): no download, same FLOPs and memory traffic as the released checkpoints.

    python bench/gpu_pipeline.py --arch sd15 --size 512 --steps 30 --batches 1,4,8,16
    python bench/gpu_pipeline.py --arch sdxl --size 1024 --steps 30 --batches 1,2,4,8
    python bench/gpu_pipeline.py --smoke        # the built-in tiny model on the CPU: checks the script

plain:    the seed's settings, StableDiffusionPipeline in fp16 as it comes.
ablation: one setting at a time on plain (cudnn.benchmark, channels_last, fused QKV): which
          of them pays on this GPU.
sdop:     sdserve's own Pipeline serving the same model, through Pipeline.run (the request
          batcher's path): eager with the server's settings, then with SDSERVE_COMPILE and
          --compile-mode (reduce-overhead: CUDA graphs). Same steps, size, guidance and
          scheduler: equal quality settings.
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


def sdserve_pipeline(arch: str, device: str, pipe=None, **settings):
    """sdserve's own Pipeline (its optimisations, batching entry points) serving ``pipe`` when
    given (its optimisations are applied to it, in place), else the tiny model or an
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
    if pipe is not None:
        p.use(pipe)
    elif arch == "tiny":
        p.load()  # build_tiny_pipeline seeds its weights
    else:
        p.use(build(arch, device, torch.float16 if device.startswith("cuda") else torch.float32))
    return p


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


PROMPT = "a photograph of an astronaut riding a horse"


def plain_call(pipe):
    """Generation straight through the diffusers pipeline, as the seed's service called it."""

    def gen(batch: int, steps: int, size: int) -> None:
        pipe(
            prompt=[PROMPT] * batch,
            num_inference_steps=steps,
            guidance_scale=7.5,
            width=size,
            height=size,
            output_type="pil",
        )

    return gen


def served_call(p):
    """Generation through sdserve's ``Pipeline.run``: the path a request-batched server takes
    (one generator per image, the progress callback, the scheduler the request names)."""
    from sdserve.work import BatchKey, Item

    def gen(batch: int, steps: int, size: int) -> None:
        p.run(BatchKey(size, size, steps, 7.5, "default"), [Item(PROMPT, None, batch, 0)])

    return gen


def measure(gen, batch: int, args, steps: int | None = None) -> dict:
    steps = steps or args.steps
    for _ in range(args.warmup):
        gen(batch, steps, args.size)
    sync(args.device)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        gen(batch, steps, args.size)
        sync(args.device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"batch": batch, "seconds_per_call": best, "images_per_s": batch / best}


def ablations(pipe) -> dict:
    """One setting at a time on top of plain diffusers: (apply, undo). Says which of sdserve's
    settings (cudnn.benchmark, channels_last) and which candidate (fused QKV) pays on this GPU."""
    import torch

    def benchmark(on: bool):
        return lambda: setattr(torch.backends.cudnn, "benchmark", on)

    def memory_format(fmt):
        def apply():
            pipe.unet.to(memory_format=fmt)
            pipe.vae.to(memory_format=fmt)

        return apply

    return {
        "cudnn.benchmark": (benchmark(True), benchmark(False)),
        "channels_last": (memory_format(torch.channels_last), memory_format(torch.contiguous_format)),
        "fused QKV": (pipe.fuse_qkv_projections, pipe.unfuse_qkv_projections),
    }


def flops_per_image(gen, args) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        gen(1, args.steps, args.size)
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
    ap.add_argument(
        "--parts",
        default="plain,ablate,eager,compiled",
        help="plain: diffusers as it comes; ablate: one setting at a time on plain; eager: sdserve's Pipeline; "
        "compiled: sdserve's Pipeline with SDSERVE_COMPILE (plain is always measured)",
    )
    ap.add_argument("--ablate-batches", default="1,8", help="batch sizes of the ablation")
    ap.add_argument("--compile-mode", default="reduce-overhead", help="SDSERVE_COMPILE_MODE of the compiled part")
    ap.add_argument("--compile-batches", help="batch sizes measured compiled (default: --batches)")
    ap.add_argument("--latency-steps", type=int, default=50, help="also batch-1 latency at this many steps; 0: skip")
    ap.add_argument("--name", help="result file name (default gpu_pipeline_ARCH)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU, 2 steps: checks that the script works")
    args = ap.parse_args()
    if args.smoke:
        args.arch, args.device, args.size, args.steps, args.batches = "tiny", "cpu", 64, 2, "1,2"
        args.warmup, args.repeats, args.latency_steps, args.ablate_batches = 1, 1, 3, "1"
        args.parts = "plain,ablate,eager"
    import torch

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    parts = set(args.parts.split(",")) | {"plain"}
    compiled_batches = [int(b) for b in args.compile_batches.split(",")] if args.compile_batches else batches
    name = args.name or (f"gpu_pipeline_{args.arch}" + ("_smoke_cpu" if args.smoke else ""))
    results: dict = {"settings": vars(args), "plain": [], "ablation": {}, "sdop_eager": [], "sdop_compiled": []}
    results["latency"] = {}
    pipe = build(args.arch, args.device, dtype)
    results["flops_per_image"] = flops_per_image(plain_call(pipe), args)

    def phase(label: str, gen, which: list[int]) -> None:
        for b in which:
            results[label].append(measure(gen, b, args))
            print(label, results[label][-1], flush=True)
            write(name, results)  # a run cut short still leaves what it measured
        if args.latency_steps:
            results["latency"][label] = measure(gen, 1, args, args.latency_steps)["seconds_per_call"]
            print(label, f"batch-1 latency at {args.latency_steps} steps: {results['latency'][label]:.3f}s")
            write(name, results)

    phase("plain", plain_call(pipe), batches)
    if "ablate" in parts:
        for factor, (apply, undo) in ablations(pipe).items():
            apply()
            try:
                rows = results["ablation"][factor] = []
                for b in [int(x) for x in args.ablate_batches.split(",")]:
                    rows.append(measure(plain_call(pipe), b, args))
                    print("plain +", factor, rows[-1], flush=True)
                    write(name, results)
            finally:
                undo()
    max_batch = max(batches + compiled_batches)
    if "eager" in parts:
        served = sdserve_pipeline(args.arch, args.device, pipe, max_batch_size=max_batch, warmup=False)
        phase("sdop_eager", served_call(served), batches)
    if "compiled" in parts and args.compile_mode != "none":
        served = sdserve_pipeline(
            args.arch,
            args.device,
            pipe,
            max_batch_size=max_batch,
            warmup=False,
            compile=True,
            compile_mode=args.compile_mode,
        )
        try:
            phase("sdop_compiled", served_call(served), compiled_batches)
        except Exception as e:  # noqa: BLE001 - a compile failure is a result too; the eager figures stand
            results["sdop_compiled_error"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"sdop (compiled) failed: {results['sdop_compiled_error']}", flush=True)
    if args.device.startswith("cuda"):
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    peak = bf16_peak(args.device)
    results["bf16_matmul_flops_per_s"] = peak
    report(results, peak, args)
    print(f"wrote {write(name, results)}")
    return 0


def report(results: dict, peak: float | None, args) -> None:
    plain = {r["batch"]: r["images_per_s"] for r in results["plain"]}
    served = results["sdop_eager"] + results["sdop_compiled"]
    if served:
        best = max(served, key=lambda r: r["images_per_s"])
        results["speedup_best_sdop_over_plain_batch1"] = best["images_per_s"] / plain[min(plain)]
        results["speedup_best_sdop_over_best_plain"] = best["images_per_s"] / max(plain.values())
    by_batch = {
        label: {r["batch"]: r["images_per_s"] for r in results[label]} for label in ("sdop_eager", "sdop_compiled")
    }
    rows = []
    for b, plain_rate in plain.items():
        row: dict = {"batch": b, "plain img/s": plain_rate}
        for label, column in (("sdop_eager", "sdop eager img/s"), ("sdop_compiled", "sdop compiled img/s")):
            if b in by_batch[label]:
                row[column] = by_batch[label][b]
        top = max(row.get("sdop eager img/s", 0), row.get("sdop compiled img/s", 0))
        if top:
            row["sdop/plain"] = top / plain_rate
            if peak:
                row["sdop % of bf16 peak"] = 100 * results["flops_per_image"] * top / peak
        rows.append(row)
    columns = ["batch", "plain img/s", "sdop eager img/s", "sdop compiled img/s", "sdop/plain", "sdop % of bf16 peak"]
    print(table(rows, columns))
    ablation = [
        {
            "setting": factor,
            "batch": r["batch"],
            "img/s": r["images_per_s"],
            "vs plain": r["images_per_s"] / plain[r["batch"]],
        }
        for factor, measured in results["ablation"].items()
        for r in measured
        if r["batch"] in plain
    ]
    if ablation:
        print("\none setting at a time on plain diffusers:")
        print(table(ablation, ["setting", "batch", "img/s", "vs plain"]))
    print(f"\nFLOPs per image: {results['flops_per_image'] / 1e12:.2f} TFLOP")
    for label, seconds in results["latency"].items():
        print(f"batch-1 latency at {args.latency_steps} steps, {label}: {seconds:.3f}s")
    if served:
        print(
            f"best sdop (batch {best['batch']}) / plain batch 1 = {results['speedup_best_sdop_over_plain_batch1']:.2f}x"
            f" (target >= 2x); / best plain = {results['speedup_best_sdop_over_best_plain']:.2f}x"
        )


if __name__ == "__main__":
    sys.exit(main())
