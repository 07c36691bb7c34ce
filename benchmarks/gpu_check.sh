#!/usr/bin/env bash
# One command for the GPU check (issue 13): offline, from any directory. Arguments pass through to
# benchmarks/gpu_check.py, e.g.
#   bash benchmarks/gpu_check.sh --out "$OUT/gpu_check.json" --max_seconds 250
# Python: $PYTHON, else the first of python3/python that imports torch.
# A machine with torch but without our other dependencies (the project's H200 machine: Python
# 3.12, torch 2.11 in /opt/torch/.venv, no diffusers/transformers/accelerate/peft/pytest): set
# GPU_CHECK_WHEELS to a folder of wheels (pip download them where there is a network; torch is
# never installed here) and what is missing is installed offline into that python (or, if it is
# read-only, into a --target folder put on PYTHONPATH). The last line printed is the JSON of every
# figure; the exit status is the script's (0 ok, 1 a configuration failed, 2 missing dependency /
# no GPU, 3 stopped by the budget).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
EXTRA_PATH=""

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for p in python3 python; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch" 2>/dev/null; then PY="$p"; break; fi
  done
fi
PY="${PY:-python3}"

NEEDED="import diffusers, transformers, accelerate, peft, safetensors, PIL, pytest, torchvision"
if [ -n "${GPU_CHECK_WHEELS:-}" ] && ! "$PY" -c "$NEEDED" 2>/dev/null; then
  WHEELS="$(cd "$GPU_CHECK_WHEELS" && pwd)"
  echo "gpu_check.sh: installing missing dependencies from $WHEELS (offline)" >&2
  # pip sees the installed torch/numpy/Pillow and installs only what is missing.
  if ! "$PY" -m pip install -q --no-index --find-links "$WHEELS" \
       diffusers transformers accelerate peft safetensors pytest pytest-timeout >&2; then
    DEPS="${TMPDIR:-/tmp}/gpu_check_deps"
    "$PY" -m pip install -q --no-deps --target "$DEPS" "$WHEELS"/*.whl >&2
    EXTRA_PATH="$DEPS"  # on PYTHONPATH, so it shadows system copies of the same packages: fallback only
  fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}${EXTRA_PATH:+:$EXTRA_PATH}"

case " $* " in
  *" --out "*|*" --out="*) exec "$PY" "$REPO/benchmarks/gpu_check.py" "$@" ;;
  *) exec "$PY" "$REPO/benchmarks/gpu_check.py" --out "${OUT:-$REPO/bench_out}/gpu_check.json" "$@" ;;
esac
