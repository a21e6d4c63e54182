#!/usr/bin/env bash
# Every GPU check and benchmark in one go, for a machine with one CUDA GPU and no network:
#
#     bash bench/gpu.sh [part ...]      parts: tests quant sd15 sd15c costc overhead sched sat sdxl (default: all, in this order)
#
# A 15-minute lease holds one call of about 9 minutes once the machine has started: make it
# `SDOP_BENCH_RESULTS=$OUT bash bench/gpu.sh costc sched` (caps 300 + 240 s; `run` timeout_s 590,
# carry [".whl"]). costc writes its curve after every point, so a compile that tunes past its cap
# still leaves the points it reached. With more time, `sd15 tests` next: sched places the served-vs-direct gap
# (cuDNN's per-thread tuning, bench/README.md), sd15 says which of sdserve's eager settings pay
# (one at a time on plain diffusers) and measures the server's own Pipeline, tests re-checks
# the out-of-memory fixes and the compiled paths. sd15c is the compiled figure (CUDA graphs);
# sat is the two policies at saturation (8 clients, every request its own parameters). costc is
# the UNet step's cost curve compiled with CUDA graphs, which decides whether step batching's p99
# gain survives compile: `python bench/policy_model.py --cost <its JSON> --name policy_model_compiled_sd15`
# (bench/README.md, "On an assumed compiled curve").
#
# Results go to $SDOP_BENCH_RESULTS (default bench/results/), logs next to them. Python wheels
# in .whl/ (a machine without the inference extra's packages) are installed to /tmp/site first;
# `bash bench/gpu_wheels.sh` fills .whl/ for the `device` tool's machine (carry [".whl"]).
# Each part has a time cap so that one slow part cannot eat the others' time.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${SDOP_BENCH_RESULTS:-bench/results}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_log.txt
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=inference_image:operator:testing:bench${PYTHONPATH:+:$PYTHONPATH}
# The lent machine's image turns inductor's coordinate-descent tuning on: on 2026-11-30 the
# compiled SD 1.5 UNet was still tuning kernels when its 230-s cap ended it. torch.compile's own
# default (off) is what sdserve's users get, and what fits a lease.
export TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=0
nvidia-smi -L | tee -a "$LOG"
env | grep -E '^(TORCH|CUDA|PYTORCH)' | sort | tee -a "$LOG"

part() {  # name, seconds, command...
  local name=$1 cap=$2
  shift 2
  echo "=== $name (cap ${cap}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$cap" "$@" 2>&1 | grep -v "should be kept in float32" | tee -a "$LOG"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$LOG"
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests quant sd15 sd15c costc overhead sched sat sdxl)
for p in "${parts[@]}"; do
  case $p in
    tests) part tests 300 $PY -m pytest -q -s -p no:cacheprovider --run-gpu --timeout 240 tests/gpu ;;
    quant) part quant 80 $PY bench/quantization.py --arch sd15 --device cuda ;;
    sd15) part sd15 170 $PY bench/gpu_pipeline.py --arch sd15 --batches 1,4,8,16 --warmup 1 --repeats 2 \
      --parts plain,ablate,eager ;;
    sd15c) part sd15c 300 $PY bench/gpu_pipeline.py --arch sd15 --batches 1,8 --warmup 1 --repeats 2 \
      --parts compiled --compile-mode reduce-overhead --name gpu_pipeline_sd15_compiled ;;
    costc) part costc 300 $PY bench/scheduling.py --arch sd15 --device cuda --cost-only --compile-mode reduce-overhead ;;
    overhead) part overhead 60 $PY bench/step_overhead.py --arch sd15 --device cuda ;;
    sched) part sched 240 $PY bench/scheduling.py --arch sd15 --device cuda --loads 0.8,1.2,1.6 --duration 20 ;;
    sat) part sat 150 $PY bench/scheduling.py --arch sd15 --device cuda --clients 8 --duration 20 --defaults-share 0 ;;
    sdxl) part sdxl 120 $PY bench/gpu_pipeline.py --arch sdxl --size 1024 --batches 1,4 --warmup 1 --repeats 2 \
      --parts plain,eager ;;
    *) echo "unknown part $p" ;;
  esac
done
