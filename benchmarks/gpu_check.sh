#!/usr/bin/env bash
# One command for the GPU check (issues 13, 18): offline, from any directory. Arguments pass through
# to benchmarks/gpu_check.py, e.g.
#   bash benchmarks/gpu_check.sh --out "$OUT/gpu_check.json" --modes full --max_seconds 330
# Python: $PYTHON, else the first of python3/python that imports torch.
# Missing dependencies, two ways (torch itself is never installed here):
# - the project's device machines (Python 3.12, torch 2.11 in /opt/torch/.venv; accelerate,
#   transformers, peft, safetensors, pytest there, diffusers not; no network): stage the pure-Python
#   packages they lack from this machine's install with
#     bash benchmarks/gpu_check.sh --stage_deps        # -> bench_out/gpu_deps (about 30 MB, ignored by git)
#   and carry bench_out/gpu_deps along; when that folder exists it is put on PYTHONPATH (it shadows
#   the machine's own copies of what it holds);
# - GPU_CHECK_WHEELS: a folder of wheels (pip download them where there is a network); what is
#   missing is installed offline into that python (or, if it is read-only, into a --target folder
#   put on PYTHONPATH).
# The last line printed is the JSON of every figure; the exit status is the script's (0 ok, 1 a
# configuration failed, 2 missing dependency / no GPU, 3 stopped by the budget).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
EXTRA_PATH=""
DEPS_DIR="${GPU_CHECK_DEPS:-$REPO/bench_out/gpu_deps}"
STAGED="diffusers importlib_metadata"  # pure Python; what the device machines' image lacks

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for p in python3 python; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch" 2>/dev/null; then PY="$p"; break; fi
  done
fi
PY="${PY:-python3}"

if [ "${1:-}" = "--stage_deps" ]; then
  # Copy the staged packages from this python's install (no network needed), without bytecode.
  rm -rf "$DEPS_DIR" && mkdir -p "$DEPS_DIR" || exit 2
  for pkg in $STAGED; do
    src="$("$PY" -c "import os, $pkg; print(os.path.dirname($pkg.__file__))")" || { echo "gpu_check.sh: $pkg does not import in $PY" >&2; exit 2; }
    (cd "$(dirname "$src")" && tar --exclude=__pycache__ -cf - "$(basename "$src")" "$(basename "$src")"-*.dist-info 2>/dev/null) \
      | tar -xf - -C "$DEPS_DIR" || exit 2
  done
  echo "gpu_check.sh: staged $STAGED into $DEPS_DIR ($(du -sh "$DEPS_DIR" | cut -f1)); carry it to the GPU machine"
  exit 0
fi
[ -d "$DEPS_DIR" ] && EXTRA_PATH="$DEPS_DIR"

NEEDED="import diffusers, transformers, accelerate, peft, safetensors, PIL, pytest, torchvision"
if [ -n "${GPU_CHECK_WHEELS:-}" ] && ! PYTHONPATH="$EXTRA_PATH${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "$NEEDED" 2>/dev/null; then
  WHEELS="$(cd "$GPU_CHECK_WHEELS" && pwd)"
  echo "gpu_check.sh: installing missing dependencies from $WHEELS (offline)" >&2
  # pip sees the installed torch/numpy/Pillow and installs only what is missing.
  if ! "$PY" -m pip install -q --no-index --find-links "$WHEELS" \
       diffusers transformers accelerate peft safetensors pytest pytest-timeout >&2; then
    DEPS="${TMPDIR:-/tmp}/gpu_check_deps"
    "$PY" -m pip install -q --no-deps --target "$DEPS" "$WHEELS"/*.whl >&2
    EXTRA_PATH="${EXTRA_PATH:+$EXTRA_PATH:}$DEPS"  # on PYTHONPATH, so it shadows system copies of the same packages: fallback only
  fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}${EXTRA_PATH:+:$EXTRA_PATH}"

case " $* " in
  *" --out "*|*" --out="*) exec "$PY" "$REPO/benchmarks/gpu_check.py" "$@" ;;
  *) exec "$PY" "$REPO/benchmarks/gpu_check.py" --out "${OUT:-$REPO/bench_out}/gpu_check.json" "$@" ;;
esac
