#!/usr/bin/env bash
# Wheels for the GPU machine lent by the `device` tool (Python 3.12, no network there), for the
# packages bench/gpu.sh and tests/gpu need that its image lacks (it has torch, transformers,
# peft, huggingface_hub, prometheus-client, pytest). Versions: those of this checkout's .venv.
#
#     bash bench/gpu_wheels.sh        # fills .whl/ (git-ignored); then run with carry [".whl"]
set -eu
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
NEED="diffusers torchao pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
typing-extensions fastapi starlette python-multipart confusable-homoglyphs"
pins=$($PY -m pip freeze 2>/dev/null)
specs=()
for name in $NEED; do
  pin=$(echo "$pins" | grep -i -E "^${name//-/[-_]}==" || true)
  [ -n "$pin" ] || { echo "gpu_wheels: $name is not in $PY's environment (make install first)" >&2; exit 1; }
  specs+=("$pin")
done
rm -rf .whl && mkdir .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${specs[@]}"
ls .whl
du -sh .whl
