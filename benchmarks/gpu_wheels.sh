#!/usr/bin/env bash
# Fetch into .whl/ the wheels benchmarks/gpu_check.sh installs on a bare CUDA machine (Python 3.12, x86-64):
# the packages the GPU check imports that a CUDA image with PyTorch usually lacks, at the versions
# requirements.lock pins (transformers and its hub stack too, so the check runs the versions CI runs). Not
# fetched: torch (the machine's CUDA build is used) and what the GPU check never imports (lm-eval, plotly,
# mergekit, optuna-dashboard and their dependencies; checked by running it with those imports blocked). About
# 29 MB of wheels; with the shipped demo zoo the working tree stays under 64 MB.
#
#   bash benchmarks/gpu_wheels.sh            # needs pip and the package index; .whl/ is git-ignored
#   PACKAGES="optuna pydantic" bash benchmarks/gpu_wheels.sh   # another set
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="${PACKAGES:-transformers huggingface_hub httpx2 httpcore2 truststore tokenizers safetensors kernels tomlkit
  optuna alembic SQLAlchemy Mako colorlog cmaes pydantic pydantic_core annotated-types typing-inspection}"
specs=()
for name in $PACKAGES; do  # the lock's line for the name, compared as pip normalises names
  pin=$(awk -F'==' -v n="$name" 'function norm(s) { s = tolower(s); gsub(/[-_.]+/, "-", s); return s }
                                 NF == 2 && norm($1) == norm(n) { print; exit }' requirements.lock)
  [ -n "$pin" ] || { echo "gpu_wheels: $name is not in requirements.lock" >&2; exit 2; }
  specs+=("$pin")
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}"
echo "gpu_wheels: ${#specs[@]} packages in .whl/ ($(du -sh .whl | cut -f1)): ${specs[*]}"
