#!/usr/bin/env bash
# One command for the GPU check (issue 13): offline, from any directory, with whatever python is
# on PATH (or $PYTHON). Arguments pass through to benchmarks/gpu_check.py, e.g.
#   bash benchmarks/gpu_check.sh --out "$OUT/gpu_check.json" --max_seconds 280
# The last line printed is the JSON of every figure; the exit status is the script's
# (0 ok, 1 a configuration failed, 2 missing dependency / no GPU, 3 stopped by the budget).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case " $* " in
  *" --out "*|*" --out="*) exec "${PYTHON:-python}" "$REPO/benchmarks/gpu_check.py" "$@" ;;
  *) exec "${PYTHON:-python}" "$REPO/benchmarks/gpu_check.py" --out "${OUT:-$REPO/bench_out}/gpu_check.json" "$@" ;;
esac
