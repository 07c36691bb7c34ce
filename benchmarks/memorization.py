"""Memorization benchmark: plain fine-tuning vs IET-AGC vs IET-AGC+ at the same budget, on CPU.

    python benchmarks/memorization.py            # full: 3 seeds (see docs/memorization_benchmark.md)
    python benchmarks/memorization.py --quick    # a smoke run: 1 seed, few steps

Regime (realistic fine-tuning, scaled down):
1. A tiny SD-architecture base at 16 px (``sd_memfree.tiny.tiny_base_model`` with ``BASE``,
   built once and cached): its VAE trained on shapes and landscapes, its UNet pretrained on
   shapes only. 16 px rather than 32 px: a step costs ~4x less, so plain can be trained long
   enough on one CPU core to memorise.
2. Fine-tuning data from another domain: a few landscapes, half of them repeated many times
   with their captions (LAION-style duplicates). Held-out landscapes of the same distribution.
3. The real training script (subprocess) trains plain, IET-AGC and IET-AGC+ with the same seed
   and the same total optimizer-step budget; plain is also scored at 0% (the untrained base) and
   trained to 2.5..50% of the budget (with a constant LR and no warm-up a shorter run is exactly
   a prefix of the longer one).
4. The real scorer generates two images per training row (seeded) and scores them; beside it we
   measure the number of distinct images copied, the held-out denoising loss (fixed timesteps and
   noise), the fit (same loss on the training images) and a Frechet distance to held-out images.

Prints a table of mean +- std over seeds; the last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PLAIN_FRACTIONS = (0.0, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
QUICK_FRACTIONS = (0.0, 0.25, 1.0)


@dataclass(frozen=True)
class Setting:
    """Everything one benchmark run depends on (recorded in the JSON)."""

    steps: int = 800
    batch_size: int = 8
    learning_rate: float = 1e-3
    num_images: int = 4
    duplicate_fraction: float = 0.5
    duplicate_times: int = 8
    heldout_images: int = 128
    images_per_prompt: int = 2
    num_inference_steps: int = 20
    guidance_scale: float = 1.0
    # IET-AGC / IET-AGC+ flags, one setting for all seeds.
    num_shards: int = 4
    merge_every: int = 10
    agc_ratio: float = 1.25
    redistribute_fraction: float = 0.25
    quick_base: bool = False


# The cached base: 16 px, UNet pretrained 1000 steps (~2.5 min to build on one core).
BASE = dict(size=16, unet_steps=1000)
QUICK_BASE = dict(size=16, vae_steps=20, unet_steps=20, vae_images=64, unet_images=64)


def method_flags(method: str, s: Setting) -> list[str]:
    if method == "plain":
        return []
    flags = [f"--num_shards={s.num_shards}", f"--merge_every={s.merge_every}", f"--agc_ratio={s.agc_ratio}"]
    if method == "ietagc+":
        flags += [f"--redistribute_fraction={s.redistribute_fraction}", "--loss_aware_augmentation"]
    return flags


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # two single-threaded jobs beat one two-threaded job on small tensors


def run_job(job: dict) -> dict:
    """Train one model with the real script, score it with the real scorer, measure quality."""
    from sd_memfree.scoring import run as scorer
    from train_scripts import memorization_eval as ev

    s = Setting(**job["setting"])
    out = Path(job["out"])
    t0 = time.time()
    model = Path(job["base"]) if job["steps"] == 0 else out / "model"  # 0 steps: score the base itself
    train_cmd = [
        sys.executable, str(REPO / "train_scripts" / "train_sd_ietagc.py"),
        f"--pretrained_model_name_or_path={job['base']}", f"--train_data_dir={job['data']}", f"--output_dir={out / 'model'}",
        f"--resolution={job['size']}", f"--train_batch_size={s.batch_size}", f"--max_train_steps={job['steps']}",
        f"--learning_rate={s.learning_rate}", "--lr_scheduler=constant", "--lr_warmup_steps=0", f"--seed={job['seed']}",
        "--report_to=tensorboard", f"--checkpointing_steps={10**9}", *method_flags(job["method"], s),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    log = out / "train.log"
    out.mkdir(parents=True, exist_ok=True)
    if job["steps"] > 0:
        with open(log, "w") as f:
            if subprocess.run(train_cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode != 0:
                raise RuntimeError(f"training failed, see {log}")
    t_train = time.time() - t0
    metrics = scorer.main(scorer.parse_args([
        f"--model={model}", f"--train_data_dir={job['data']}", f"--sscd_model={job['sscd']}", "--preprocess=dcr",
        f"--num_prompts={job['num_rows']}", f"--images_per_prompt={s.images_per_prompt}", f"--num_inference_steps={s.num_inference_steps}",
        f"--guidance_scale={s.guidance_scale}", f"--resolution={job['size']}", "--batch_size=128", "--seed=42",
        "--no_clip_score", "--no_fid", f"--pixel_size={job['size']}", f"--out={out / 'score'}",
        f"--embedding_cache_dir={job['embedding_cache']}", "--device=cpu",
    ]))
    gen_imgs, _, _ = ev.read_imagefolder(out / "score" / "generated")
    train_imgs, train_caps, _ = ev.read_imagefolder(job["data"])
    held_imgs, held_caps, _ = ev.read_imagefolder(job["heldout"])
    gen_px, train_px, held_px = (ev.to_pixels(x, job["size"]) for x in (gen_imgs, train_imgs, held_imgs))
    near = ev.pixel_nearest(gen_px, train_px)
    # The scorer's copy rate and ours come from the same rule and pixels: they must agree.
    assert abs(near["copy_frac"] - metrics["pixel"]["pixel_copy_frac"]) < 1e-9, (near["copy_frac"], metrics["pixel"])
    distinct = sorted(set(ev.pixel_nearest(train_px, train_px)["nearest"].tolist()))
    result = {
        "method": job["method"], "seed": job["seed"], "steps": job["steps"], "fraction": job["fraction"],
        "copy_frac": near["copy_frac"], "distinct_copied": near["distinct_copied"],
        "sim_95pc": metrics["gen_vs_train"]["sim_95pc"], "sim_mean": metrics["gen_vs_train"]["mean"],
        "frac_gt_0.5": metrics["gen_vs_train"]["frac_gt_0.5"],
        "heldout_loss": ev.denoising_loss(model, held_imgs, held_caps),
        "fit_loss": ev.denoising_loss(model, [train_imgs[i] for i in distinct], [train_caps[i] for i in distinct]),
        "frechet_heldout": ev.frechet_to(gen_px, held_px),
        "train_seconds": t_train, "job_seconds": time.time() - t0,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def summarize(rows: list[dict]) -> dict:
    """Mean and std over seeds per (method, fraction)."""
    keys = ("copy_frac", "distinct_copied", "sim_95pc", "frac_gt_0.5", "heldout_loss", "fit_loss", "frechet_heldout")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["fraction"]), []).append(r)
    out = {}
    for (method, frac), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "plain", kv[0][0], kv[0][1])):
        out[f"{method}@{frac:g}"] = {
            "method": method, "fraction": frac, "steps": rs[0]["steps"], "seeds": len(rs),
            **{k: float(np.mean([r[k] for r in rs])) for k in keys},
            **{k + "_std": float(np.std([r[k] for r in rs])) for k in keys},
        }
    return out


def dominators(summary: dict, method: str) -> dict:
    """Plain checkpoints better than ``method`` on both held-out loss and copy rate.

    ``on_means``: better means on both axes. ``beyond_spread``: better on both axes by more than
    the two std's added (seed spread).
    """
    m = summary.get(f"{method}@1")
    if m is None:
        return {}
    on_means, beyond = [], []
    for key, p in summary.items():
        if p["method"] != "plain":
            continue
        if p["heldout_loss"] < m["heldout_loss"] and p["copy_frac"] < m["copy_frac"]:
            on_means.append(key)
            if (m["heldout_loss"] - p["heldout_loss"] > p["heldout_loss_std"] + m["heldout_loss_std"]
                    and m["copy_frac"] - p["copy_frac"] > p["copy_frac_std"] + m["copy_frac_std"]):
                beyond.append(key)
    return {"on_means": on_means, "beyond_spread": beyond}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    plain = [v for v in summary.values() if v["method"] == "plain"]
    ax.errorbar([p["heldout_loss"] for p in plain], [100 * p["copy_frac"] for p in plain],
                xerr=[p["heldout_loss_std"] for p in plain], yerr=[100 * p["copy_frac_std"] for p in plain],
                fmt="o-", color="tab:gray", label="plain at 0 (base)..100% of the budget")
    for p in plain:
        label, offset = ("0% (base)", (3, -10)) if p["fraction"] == 0 else (f"{100 * p['fraction']:g}%", (3, 3))
        ax.annotate(label, (p["heldout_loss"], 100 * p["copy_frac"]), fontsize=7, xytext=offset, textcoords="offset points")
    for method, color in (("ietagc", "tab:blue"), ("ietagc+", "tab:red")):
        m = summary.get(f"{method}@1")
        if m:
            ax.errorbar([m["heldout_loss"]], [100 * m["copy_frac"]], xerr=[m["heldout_loss_std"]], yerr=[100 * m["copy_frac_std"]],
                        fmt="s", color=color, label=f"{'IET-AGC+' if method.endswith('+') else 'IET-AGC'} (100%)")
    ax.set_xlabel("held-out denoising loss (lower is better)")
    ax.set_ylabel("generations that copy (d1/d2 < 1/3), %")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 40 steps, a quickly built base: a smoke run")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2; quick: 0)")
    p.add_argument("--steps", type=int, default=None, help=f"total optimizer-step budget (default {Setting.steps}; quick: 40)")
    p.add_argument("--methods", nargs="+", default=["plain", "ietagc", "ietagc+"], choices=["plain", "ietagc", "ietagc+"],
                   help="which runs (plain: at every budget fraction; the methods at the full budget)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one CPU thread each")
    p.add_argument("--work", default="bench_out/memorization", help="working folder (models, generations)")
    p.add_argument("--cache", default=None, help="where the base model is cached (default $SD_MEMFREE_CACHE or ~/.cache/sd_memfree)")
    p.add_argument("--plot", default=None, help="write the copies-vs-quality plot here (PNG)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    from sd_memfree.scoring.standin import make_standin_sscd
    from sd_memfree.tiny import TinyBaseConfig, make_tiny_dataset, tiny_base_model

    _worker_init()
    t0 = time.time()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    base_cfg = Setting(steps=args.steps or (40 if args.quick else Setting.steps), quick_base=args.quick)
    if args.quick:
        base_cfg = Setting(**{**base_cfg.__dict__, "num_images": 12, "duplicate_times": 4, "heldout_images": 32, "num_inference_steps": 5})
    s = base_cfg
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base_config = TinyBaseConfig(**(QUICK_BASE if s.quick_base else BASE))
    tb = time.time()
    base = tiny_base_model(args.cache, base_config)
    base_seconds = time.time() - tb
    base_info = json.loads((base / "base_info.json").read_text())
    size = base_config.size
    data = work / f"data-{s.num_images}-{s.duplicate_fraction}-{s.duplicate_times}"
    heldout = work / f"heldout-{s.heldout_images}"
    if not (data / "metadata.jsonl").exists():
        make_tiny_dataset(data, s.num_images, size, s.duplicate_fraction, s.duplicate_times, seed=0, kind="landscapes")
    if not (heldout / "metadata.jsonl").exists():
        make_tiny_dataset(heldout, s.heldout_images, size, seed=0, kind="landscapes", first_index=10_000)
    num_rows = sum(1 for _ in open(data / "metadata.jsonl"))
    sscd = work / "standin_sscd.pt"
    if not sscd.exists():
        make_standin_sscd(sscd, trunk="resnet18", seed=0)

    fractions = QUICK_FRACTIONS if args.quick else PLAIN_FRACTIONS
    jobs = []
    for seed in seeds:
        for method, fracs in (("plain", fractions), ("ietagc", (1.0,)), ("ietagc+", (1.0,))):
            if method not in args.methods:
                continue
            for f in fracs:
                steps = 0 if f == 0 else max(1, round(f * s.steps))
                jobs.append({"method": method, "seed": seed, "fraction": f, "steps": steps, "setting": s.__dict__,
                             "base": str(base), "data": str(data), "heldout": str(heldout), "size": size, "num_rows": num_rows,
                             "sscd": str(sscd), "embedding_cache": str(work / "embeddings"),
                             "out": str(work / f"seed{seed}" / f"{method}-{steps}")})
    # Long jobs first so the two workers finish together.
    jobs.sort(key=lambda j: -j["steps"])
    rows = []
    from tqdm.auto import tqdm

    with ProcessPoolExecutor(max_workers=max(1, args.jobs), initializer=_worker_init) as pool:
        for r in tqdm(pool.map(run_job, jobs), total=len(jobs), desc="benchmark jobs"):
            rows.append(r)
    summary = summarize(rows)

    # ---- report ------------------------------------------------------------------------------
    cols = ("copy_frac", "distinct_copied", "sim_95pc", "heldout_loss", "fit_loss", "frechet_heldout")
    print(f"\nbase: VAE recon MSE {base_info['vae_recon_mse']:.5f} ({base_info['vae_recon_psnr_db']:.1f} dB PSNR) on held-out landscapes; "
          f"data: {s.num_images} distinct landscapes, {int(s.num_images * s.duplicate_fraction)} of them x{s.duplicate_times} = {num_rows} rows")
    print(f"{'run':<16}{'steps':>6}  " + "  ".join(f"{c:>22}" for c in cols))
    for key, v in summary.items():
        print(f"{key:<16}{v['steps']:>6}  " + "  ".join(f"{v[c]:>12.4f} +- {v[c + '_std']:<7.4f}" for c in cols))
    plain, plus = summary.get("plain@1"), summary.get("ietagc+@1")
    reduction = {m: (1 - summary[f"{m}@1"]["copy_frac"] / plain["copy_frac"]) if plain and plain["copy_frac"] > 0 and f"{m}@1" in summary else None
                 for m in ("ietagc", "ietagc+")}
    dom = dominators(summary, "ietagc+")
    floors = {
        "plain_copies_ge_30pc": bool(plain and plain["copy_frac"] >= 0.30),
        "ietagc_plus_reduction_ge_50pc": bool(reduction["ietagc+"] is not None and reduction["ietagc+"] >= 0.5),
        "no_plain_checkpoint_dominates_beyond_spread": not dom.get("beyond_spread"),
        "no_plain_checkpoint_dominates_on_means": not dom.get("on_means"),
    }
    print(f"copy reduction vs plain at the full budget: IET-AGC {reduction['ietagc']}, IET-AGC+ {reduction['ietagc+']}")
    print(f"plain checkpoints dominating IET-AGC+: {dom}; floors: {floors}")
    if args.plot:
        plot(summary, Path(args.plot))
    result = {
        "benchmark": "memorization", "quick": args.quick, "seeds": seeds, "setting": s.__dict__,
        "base": {k: base_info[k] for k in ("vae_recon_mse", "vae_recon_psnr_db", "unet_pretrain_loss_last50", "build_seconds")},
        "base_seconds_this_run": base_seconds, "summary": summary, "copy_reduction": reduction, "dominating_plain": dom,
        "floors": floors, "sscd": "stand-in: seeded random ResNet-18 + GeM + 512-d (sd_memfree.scoring.standin), not real SSCD",
        "frechet_space": "8x8 avg-pooled pixels -> seeded Gaussian projection to 32-d; generations (images_per_prompt per training row) vs held-out images",
        "wall_seconds": time.time() - t0, "rows": rows,
    }
    (work / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return result


if __name__ == "__main__":
    main(parse_args())
