"""`make bench`: every benchmark this machine can run, each printing its table and writing bench/results/."""

from __future__ import annotations

import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def run(*args: str) -> int:
    print(f"\n=== {' '.join(args)}", flush=True)
    return subprocess.call([sys.executable, *args])


def main() -> int:
    codes = [run(str(HERE / "server_overhead.py"))]
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if gpu:
        codes.append(run(str(HERE / "gpu_pipeline.py"), "--arch", "sd15"))
        codes.append(run(str(HERE / "gpu_pipeline.py"), "--arch", "sdxl", "--size", "1024", "--batches", "1,2,4,8"))
        codes.append(run(str(HERE / "scheduling.py"), "--arch", "sd15", "--device", "cuda"))
        codes.append(run(str(HERE / "quantization.py"), "--arch", "sd15", "--device", "cuda"))
        codes.append(run(str(HERE / "step_overhead.py"), "--arch", "sd15", "--device", "cuda"))
    else:
        print("\nno CUDA GPU here: gpu_pipeline.py runs its CPU smoke check only", flush=True)
        codes.append(run(str(HERE / "gpu_pipeline.py"), "--smoke"))
        codes.append(run(str(HERE / "scheduling.py"), "--max-batch", "4", "--loads", "0.2,0.35,0.5,0.7"))
        codes.append(run(str(HERE / "quantization.py")))
        codes.append(run(str(HERE / "step_overhead.py")))
    measured = HERE / "results" / "scheduling_sd15_cuda.json"
    if measured.exists():  # the policies on the GPU's measured cost curve (a simulation, labelled so)
        codes.append(run(str(HERE / "scheduling.py"), "--pipeline", "sim", "--cost", str(measured)))
        codes.append(run(str(HERE / "policy_model.py"), "--cost", str(measured)))
    codes.append(run(str(HERE / "operator_scale.py"), "--count", "1000"))
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
