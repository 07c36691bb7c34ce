"""Training speed with the frozen encoders cached (issue 20): our script against an upstream-style
loop, side by side.

Runs in this process, same model, data, batch and steps, interleaved (upstream, plain,
plain_cached, iet_agc_plus_cached, upstream, ...) so that machine noise hits every configuration
alike:
- ``upstream``: ``benchmarks/overhead.py``'s ``upstream_style_run``, the loop written as
  diffusers' ``train_text_to_image.py`` writes it (VAE and text encoder every step);
- ``plain``: our script, method off, encoders live;
- ``plain_cached``: ``--cache_latents --cache_text_embeddings``;
- ``iet_agc_plus_cached``: IET-AGC+ (4 proxies, AGC, redistribution, loss-aware augmentation:
  augmented samples are encoded live) with both caches.
Our runs use ``--center_crop`` (the latent cache needs it); upstream's loop random-crops, which
costs the same. The caches are built once before the timed runs (that one-time cost is printed
on its own) and reused by every timed run, as by a user's later runs. With ``--upstream_script
PATH`` diffusers' own ``train_text_to_image.py`` also runs (a subprocess, same flags; its rate is
read from its progress bar, so it has no CPU-time figure). Prints steps/s (wall) and steps per
CPU-second (process CPU time: meaningful on a shared machine), medians over repeats, and ratios
to upstream with the per-repeat min-max. The last line is one JSON object.

    python benchmarks/speed.py [--steps 100] [--repeats 3] [--model PATH --data PATH --resolution 512 \\
        --batch_size 4 --mixed_precision fp16] [--upstream_script PATH]

Goal (issue 20): iet_agc_plus_cached / upstream >= 1.3 at SD-1.5 shapes on a GPU; > 1 on the tiny CPU model.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHOD = ["--num_shards=4", "--merge_every=25", "--agc_ratio=1.25", "--redistribute_fraction=0.25", "--loss_aware_augmentation"]
CACHES = ["--cache_latents", "--cache_text_embeddings"]
CONFIGS = {"upstream": None, "plain": [], "plain_cached": CACHES, "iet_agc_plus_cached": METHOD + CACHES}


def ours_argv(args, out: Path, steps: int, extra: list[str]) -> list[str]:
    return [f"--pretrained_model_name_or_path={args.model}", f"--train_data_dir={args.data}", f"--output_dir={out}",
            f"--resolution={args.resolution}", f"--train_batch_size={args.batch_size}", f"--max_train_steps={steps}",
            "--learning_rate=1e-4", "--lr_warmup_steps=0", "--seed=0", "--report_to=none", f"--checkpointing_steps={10**9}",
            "--center_crop", f"--latent_cache_dir={args.cache_root}", *(["--mixed_precision", args.mixed_precision] if args.mixed_precision else []),
            *extra]


def run_once(args, name: str, steps: int) -> dict:
    from benchmarks.overhead import upstream_style_run
    from train_scripts import train_sd_ietagc as train

    if name == "upstream":
        return upstream_style_run(args.model, args.data, steps, False, resolution=args.resolution, batch_size=args.batch_size,
                                  mixed_precision=args.mixed_precision)
    with tempfile.TemporaryDirectory() as tmp:
        s = train.main(train.parse_args(ours_argv(args, Path(tmp) / name, steps, CONFIGS[name])))
    return {"steps_per_s": s["steps_this_run"] / s["train_loop_seconds"], "steps_per_cpu_s": s["steps_this_run"] / s["train_loop_cpu_seconds"]}


def run_upstream_script(args, steps: int) -> dict:
    """diffusers' own script in a subprocess; its loop rate from the progress bar's last it/s."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, args.upstream_script, f"--pretrained_model_name_or_path={args.model}", f"--train_data_dir={args.data}",
               f"--output_dir={tmp}", f"--resolution={args.resolution}", f"--train_batch_size={args.batch_size}",
               f"--max_train_steps={steps}", "--learning_rate=1e-4", "--lr_warmup_steps=0", "--seed=0", "--report_to=tensorboard",
               f"--checkpointing_steps={10**9}", "--center_crop", *(["--mixed_precision", args.mixed_precision] if args.mixed_precision else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args.upstream_script} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    rates = re.findall(r"Steps: 100%.*?([\d.]+)(it/s|s/it)", proc.stderr)
    value, unit = rates[-1]
    return {"steps_per_s": float(value) if unit == "it/s" else 1 / float(value), "steps_per_cpu_s": None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", type=Path, default=None, help="a diffusers SD folder (default: the tiny offline model)")
    p.add_argument("--data", type=Path, default=None, help="an imagefolder (default: 64 tiny generated images)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    p.add_argument("--upstream_script", type=str, default=None, help="diffusers' examples/text_to_image/train_text_to_image.py, if you have it")
    p.add_argument("--work", type=Path, default=REPO / "bench_out" / "speed")
    args = p.parse_args()
    if args.steps < 4:
        p.error(f"--steps={args.steps}: IET-AGC+ runs 4 proxies, each must take a step; pass at least 4.")

    import logging
    import os

    import torch

    from sd_memfree.testing.tiny import make_tiny_dataset, make_tiny_model

    logging.disable(logging.WARNING)
    if args.model is None:
        args.model = args.work / "model"
        if not (args.model / "model_index.json").exists():
            make_tiny_model(args.model)
    if args.data is None:
        args.data = args.work / "data"
        if not (args.data / "metadata.jsonl").exists():
            make_tiny_dataset(args.data, num_images=64, size=32, duplicate_fraction=0.25, duplicate_times=4)
    args.cache_root = args.work / "encoder-cache"

    # The one-time cost: a 1-step cached run on an empty cache against one on the built cache
    # (after a first run has paid for the imports).
    import shutil

    run_once(args, "plain", 1)
    shutil.rmtree(args.cache_root, ignore_errors=True)
    t0 = time.perf_counter()
    run_once(args, "plain_cached", 1)
    building = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_once(args, "plain_cached", 1)
    build_seconds = building - (time.perf_counter() - t0)
    print(f"cache build (once): {build_seconds:.1f} s", flush=True)
    for name in ("upstream", "plain", "iet_agc_plus_cached"):  # warm-up: imports, allocator
        run_once(args, name, 5)

    names = list(CONFIGS) + (["upstream_script"] if args.upstream_script else [])
    speeds: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    load = []
    for r in range(args.repeats):
        load.append(os.getloadavg()[0])
        for name in names:
            res = run_upstream_script(args, args.steps) if name == "upstream_script" else run_once(args, name, args.steps)
            speeds[name].append(res["steps_per_s"])
            if res["steps_per_cpu_s"] is not None:
                cpu[name].append(res["steps_per_cpu_s"])
            cpu_text = f"{res['steps_per_cpu_s']:.2f} steps/CPU-s" if res["steps_per_cpu_s"] else ""
            print(f"repeat {r}  {name:<20} {res['steps_per_s']:.2f} steps/s  {cpu_text}", flush=True)
    load.append(os.getloadavg()[0])

    def ratios(per_run: dict[str, list[float]]) -> dict:
        out = {}
        for name, values in per_run.items():
            if name == "upstream" or not values or not per_run["upstream"]:
                continue
            each = [a / b for a, b in zip(values, per_run["upstream"])]
            out[f"{name}/upstream"] = {"median": round(statistics.median(values) / statistics.median(per_run["upstream"]), 4),
                                       "min": round(min(each), 4), "max": round(max(each), 4)}
        return out

    figures = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": str(args.model), "resolution": args.resolution, "batch_size": args.batch_size, "mixed_precision": args.mixed_precision,
        "steps": args.steps, "repeats": args.repeats, "cache_build_seconds": round(build_seconds, 2),
        "load_average_1min": [round(x, 2) for x in load],
        "steps_per_s": {k: round(statistics.median(v), 3) for k, v in speeds.items() if v},
        "time_ratio": ratios(speeds),
        "steps_per_cpu_s": {k: round(statistics.median(v), 3) for k, v in cpu.items() if v},
        "cpu_time_ratio": ratios(cpu),
    }
    for key in figures["time_ratio"]:
        w = figures["time_ratio"][key]
        c = figures["cpu_time_ratio"].get(key)
        cpu_text = f"   CPU {c['median']:.3f} ({c['min']:.3f}-{c['max']:.3f})" if c else ""
        print(f"{key:<32} wall {w['median']:.3f} ({w['min']:.3f}-{w['max']:.3f}){cpu_text}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
