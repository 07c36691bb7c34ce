"""Training overhead of IET-AGC / IET-AGC+ versus a plain diffusers-style fine-tune.

Runs the real training script in this process on the tiny offline pipeline, plain and with the
method, interleaved (plain, IET-AGC, IET-AGC+, plain, ...) so that machine noise hits every
configuration alike, and prints optimizer-steps-per-second ratios (median over repeats; wall
time, and process CPU time, which stays meaningful when other jobs share the machine) and the
peak-memory ratio (CUDA: max allocated per run; CPU: peak RSS of one run per configuration in a
fresh subprocess). The last line is one JSON object of the figures.

    python benchmarks/overhead.py [--steps 200] [--repeats 3] [--use_lora]

Floors (issues 3 and 4): time ratio >= 0.97 for IET-AGC (4 shards + AGC), >= 0.95 for IET-AGC+.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {
    "plain": [],
    "iet_agc": ["--num_shards=4", "--merge_every=25", "--agc_ratio=1.25"],
    "iet_agc_plus": ["--num_shards=4", "--merge_every=25", "--agc_ratio=1.25", "--redistribute_fraction=0.25",
                     "--loss_aware_augmentation"],
}


def train_argv(model: Path, data: Path, out: Path, steps: int, extra: list[str], use_lora: bool) -> list[str]:
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={out}",
            "--resolution=32", "--train_batch_size=8", f"--max_train_steps={steps}", "--learning_rate=1e-4",
            "--lr_warmup_steps=0", "--seed=0", "--report_to=none", f"--checkpointing_steps={10**9}",
            *(["--use_lora", "--rank=4"] if use_lora else []), *extra]


def run_once(model, data, steps, name, use_lora) -> dict:
    import torch

    from train_scripts import train_sd_ietagc as train

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        s = train.main(train.parse_args(train_argv(model, data, Path(tmp) / name, steps, CONFIGS[name], use_lora)))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"steps_per_s": s["steps_this_run"] / s["train_loop_seconds"],
            "steps_per_cpu_s": s["steps_this_run"] / s["train_loop_cpu_seconds"], "peak_cuda_bytes": peak}


def peak_rss(model, data, steps, name, use_lora) -> int:
    """Peak resident memory (bytes) of one run in a fresh process (CPU has no allocator peak)."""
    code = (
        "import resource,sys,tempfile; from pathlib import Path; sys.path.insert(0, %r);"
        "from benchmarks.overhead import run_once; run_once(Path(%r), Path(%r), %d, %r, %r);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)" % (str(REPO), str(model), str(data), steps, name, use_lora)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1]) * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--use_lora", action="store_true")
    p.add_argument("--cache", default=str(REPO / "bench_out" / "overhead"))
    p.add_argument("--no_memory", action="store_true", help="skip the CPU peak-RSS subprocess runs")
    args = p.parse_args()

    import logging

    import torch

    from sd_memfree.tiny import make_tiny_dataset, make_tiny_model

    logging.disable(logging.WARNING)
    cache = Path(args.cache)
    model, data = cache / "model", cache / "data"
    if not (model / "model_index.json").exists():
        make_tiny_model(model)
    if not (data / "metadata.jsonl").exists():
        make_tiny_dataset(data, num_images=64, size=32, duplicate_fraction=0.25, duplicate_times=4)

    run_once(model, data, 10, "plain", args.use_lora)  # warm-up: imports, allocator, caches
    speeds: dict[str, list[float]] = {name: [] for name in CONFIGS}
    cpu_speeds: dict[str, list[float]] = {name: [] for name in CONFIGS}
    peaks: dict[str, list[int]] = {name: [] for name in CONFIGS}
    for r in range(args.repeats):
        for name in CONFIGS:
            res = run_once(model, data, args.steps, name, args.use_lora)
            speeds[name].append(res["steps_per_s"])
            cpu_speeds[name].append(res["steps_per_cpu_s"])
            if res["peak_cuda_bytes"] is not None:
                peaks[name].append(res["peak_cuda_bytes"])
            print(f"repeat {r}  {name:<13} {res['steps_per_s']:.2f} steps/s  {res['steps_per_cpu_s']:.2f} steps/CPU-s", flush=True)
    if not torch.cuda.is_available() and not args.no_memory:
        for name in CONFIGS:
            peaks[name].append(peak_rss(model, data, max(20, args.steps // 4), name, args.use_lora))

    med = {name: statistics.median(v) for name, v in speeds.items()}
    cpu_med = {name: statistics.median(v) for name, v in cpu_speeds.items()}
    figures = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "mode": "lora" if args.use_lora else "full",
        "steps": args.steps, "repeats": args.repeats,
        "steps_per_s": {k: round(v, 3) for k, v in med.items()},
        "time_ratio_iet_agc": round(med["iet_agc"] / med["plain"], 4),
        "time_ratio_iet_agc_plus": round(med["iet_agc_plus"] / med["plain"], 4),
        # Process CPU time: robust when other jobs share the machine (wall time is not).
        "steps_per_cpu_s": {k: round(v, 3) for k, v in cpu_med.items()},
        "cpu_time_ratio_iet_agc": round(cpu_med["iet_agc"] / cpu_med["plain"], 4),
        "cpu_time_ratio_iet_agc_plus": round(cpu_med["iet_agc_plus"] / cpu_med["plain"], 4),
    }
    if all(peaks.values()):
        kind = "peak_cuda_allocated" if torch.cuda.is_available() else "peak_rss"
        figures[kind + "_bytes"] = {k: max(v) for k, v in peaks.items()}
        figures["memory_ratio_iet_agc"] = round(max(peaks["iet_agc"]) / max(peaks["plain"]), 4)
        figures["memory_ratio_iet_agc_plus"] = round(max(peaks["iet_agc_plus"]) / max(peaks["plain"]), 4)
    print(f"IET-AGC  / plain steps/s: wall {figures['time_ratio_iet_agc']:.3f}, CPU {figures['cpu_time_ratio_iet_agc']:.3f}   (floor 0.97)")
    print(f"IET-AGC+ / plain steps/s: wall {figures['time_ratio_iet_agc_plus']:.3f}, CPU {figures['cpu_time_ratio_iet_agc_plus']:.3f}   (floor 0.95)")
    if "memory_ratio_iet_agc" in figures:
        print(f"peak memory ratio IET-AGC {figures['memory_ratio_iet_agc']:.3f}, IET-AGC+ {figures['memory_ratio_iet_agc_plus']:.3f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
