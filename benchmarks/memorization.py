"""Memorization benchmark: plain fine-tuning's whole early-stopping frontier vs the methods.

    python benchmarks/memorization.py --quick --out bench_out/mem-quick        # CI smoke run (~1-2 min, CPU)
    python benchmarks/memorization.py --device cuda --jobs 15 --score_workers 4 \\
        --base bench_cache/tiny-base-v1-<hash> --out /tmp/mem --max_seconds 270 --tar mem.tar.gz
    python benchmarks/memorization.py --analyse /tmp/mem --plot docs/img/memorization_frontier.png --grids docs/img

Regime (the one the papers claim, scaled down; see docs/memorization_benchmark.md):
1. A tiny SD-architecture base at 16 px (``sd_memfree.testing.tiny.tiny_base_model`` with ``BASE``, built
   once and cached, or ``--base DIR``): VAE trained on shapes and landscapes, UNet on shapes only.
2. Fine-tuning data from the domain the UNet never saw: ``num_images`` distinct procedural
   landscapes, ``num_duplicated`` of them repeated ``duplicate_times`` times with their captions
   (a duplicated minority, as in LAION). Held-out: ``heldout_images`` other landscapes.
3. One training run per (method, seed) with the real script (a subprocess), constant LR, no
   warm-up, to ``longest x budget`` steps, checkpointing on the way. A checkpoint of a
   constant-LR run is the prefix of the longer run, so plain's checkpoints (every
   ``plain_every x budget`` steps) are its early-stopping frontier, and a method's checkpoints
   (every ``method_every x budget``: 0.5x, 1x, 1.5x, 2x the budget) are the method at the same
   budget and longer. A checkpoint becomes a pipeline through the script itself
   (``--resume_from_checkpoint`` with ``--max_train_steps`` = its step: the script's own final
   merge and save), so method checkpoints are scored as the merged model.
4. Every point is scored on ``--device`` by a pool of scoring workers while training goes on:
   seeded generations (``gens_per_duplicated`` per duplicated caption, one per sampled unique
   caption, one per sampled held-out caption), the pixel copy test ``d1/d2 < 1/3`` against the
   VAE's reconstructions of the distinct training images (and against the raw images), copies
   split duplicated / unique with the distinct images copied, the held-out denoising loss, the
   fit loss, and a Frechet distance of the held-out-caption generations to the held-out images.
   The copy test's ceiling (the VAE's own reconstructions of sampled training latents scored as
   generations: a perfect memoriser) is measured once.
5. Every result is a JSON file under ``--out`` written as soon as it exists, so a run cut short
   (``--max_seconds``) still yields data. ``--analyse DIR`` (CPU) pools the seeds (Wilson
   intervals), computes the verdict per method point and the moonshot table, and draws the
   frontier plot and the sample grids.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Fine-tuning domains the tiny base's UNet never saw (it was pretrained on shapes; its VAE saw shapes
# and landscapes, not tartans).
DOMAINS = ("landscapes", "tartans")
# Methods, in the order their runs start when time is short: the main comparison first.
MAIN_METHODS = ("plain", "ietagc+")
COMPONENTS = ("ietagc", "agc", "iet")
DEFAULT_METHODS = MAIN_METHODS + COMPONENTS
# Settings studied against the papers' (issue 23), run only when named: method -> (the method it
# varies, the Setting fields it overrides as a function of the Setting, flags it adds).
VARIANTS = {
    # One AdamW state for all proxies: checkpoints at merges the size of upstream's (docs/design.md).
    "ietagc+shared": ("ietagc+", lambda s: {}, ["--proxy_optimizer_state=shared"]),
    # Half the shards, each twice as long between merges (the same round length): the merge
    # averages 2 proxies' progress instead of 4.
    "ietagc+k2": ("ietagc+", lambda s: {"num_shards": max(1, s.num_shards // 2), "merge_every": 2 * s.merge_every}, []),
}
ALL_METHODS = DEFAULT_METHODS + tuple(VARIANTS)
LABELS = {"plain": "plain", "ietagc+": "IET-AGC+", "ietagc": "IET-AGC", "agc": "AGC alone", "iet": "IET alone",
          "ietagc+shared": "IET-AGC+ shared optimizer", "ietagc+k2": "IET-AGC+ K=2"}


@dataclass(frozen=True)
class Setting:
    """Everything a benchmark run depends on (written to ``setting.json``)."""

    budget: int = 3000  # the optimizer-step budget B every comparison is made at
    longest: float = 2.0  # every run trains to longest x B
    plain_every: float = 0.1  # plain is scored every plain_every x B (its frontier)
    method_every: float = 0.5  # the methods are scored every method_every x B
    score_from: float = 0.0  # points before score_from x B are not scored (an extension of an earlier grid)
    domain: str = "landscapes"  # the fine-tuning images' kind (sd_memfree.testing.tiny.IMAGE_KINDS, never "shapes")
    batch_size: int = 8
    learning_rate: float = 1e-3
    num_images: int = 256  # distinct fine-tuning images
    num_duplicated: int = 8  # of which this many are repeated ...
    duplicate_times: int = 32  # ... this many times in total, with their captions
    heldout_images: int = 256
    gens_per_duplicated: int = 8  # generations per duplicated caption
    unique_prompts: int = 64  # sampled unique training captions, one generation each
    heldout_prompts: int = 64  # sampled held-out captions, one generation each (Frechet, grids)
    num_inference_steps: int = 20
    guidance_scale: float = 1.0  # the base never saw dropped captions: no unconditional model to guide with
    generation_seed: int = 42
    # The methods' flags, one setting for all seeds (the issue's measurement).
    num_shards: int = 4
    merge_every: int = 25
    agc_ratio: float = 1.25
    redistribute_fraction: float = 0.25

    @property
    def max_steps(self) -> int:
        return round(self.longest * self.budget)

    def every(self, method: str) -> int:
        """Checkpoint interval of a method's run (its scored points are the multiples of it)."""
        return max(1, round((self.plain_every if method == "plain" else self.method_every) * self.budget))


# The cached base (16 px, UNet pretrained 1000 steps, ~70 s to build on one core) is the demo's:
# `sd-memfree demo` is this benchmark's regime on one seed.
from train_scripts.demo import BASE, QUICK_BASE  # noqa: E402  (after REPO is on sys.path)
QUICK = dict(budget=8, plain_every=0.5, method_every=0.5, num_images=16, num_duplicated=2, duplicate_times=4, heldout_images=16,
             gens_per_duplicated=2, unique_prompts=4, heldout_prompts=4, num_inference_steps=5, num_shards=2, merge_every=2)


def resolve_variant(method: str, s: Setting) -> tuple[str, Setting, list[str]]:
    """(the method it varies, the Setting it runs with, the flags it adds); a method that is no
    variant is itself, with ``s`` and no flags."""
    if method not in VARIANTS:
        return method, s, []
    base, overrides, extra = VARIANTS[method]
    return base, replace(s, **overrides(s)), extra


def method_flags(method: str, s: Setting) -> list[str]:
    """The training script's flags of each method (IET: shards + merges; AGC: the loss gate)."""
    if method in VARIANTS:
        base, v, extra = resolve_variant(method, s)
        return method_flags(base, v) + extra
    iet = [f"--num_shards={s.num_shards}", f"--merge_every={s.merge_every}"]
    agc = [f"--agc_ratio={s.agc_ratio}"]
    return {
        "plain": [],
        "iet": iet,
        "agc": ["--num_shards=1", *agc],
        "ietagc": iet + agc,
        "ietagc+": iet + agc + [f"--redistribute_fraction={s.redistribute_fraction}", "--loss_aware_augmentation"],
    }[method]


def check_setting(s: Setting, methods) -> None:
    """Bad settings fail here, before anything trains."""
    if s.domain not in DOMAINS:
        raise SystemExit(f"error: --domain must be one of {', '.join(DOMAINS)} (got {s.domain!r}); the base's UNet was pretrained on shapes.")
    if not 0 <= s.score_from <= s.longest:
        raise SystemExit(f"error: --score_from must be in [0, --longest] (got {s.score_from}).")
    if s.budget < 1 or s.longest < 1:
        raise SystemExit(f"error: --budget must be >= 1 and --longest >= 1 (got {s.budget}, {s.longest}).")
    if not 0 < s.num_duplicated <= s.num_images or s.duplicate_times < 2:
        raise SystemExit("error: need 0 < --num_duplicated <= --num_images and --duplicate_times >= 2.")
    for m in methods:
        base, v, _ = resolve_variant(m, s)
        round_len = v.num_shards * v.merge_every
        if m in VARIANTS and v.num_shards < 2:
            raise SystemExit(f"error: the {m} variant of this setting has {v.num_shards} shard; it needs --num_shards >= 4 here.")
        if base in ("iet", "ietagc", "ietagc+") and s.every(m) % round_len:
            # Off a round boundary a checkpoint's model is mid-round: not what a run of that length gives.
            raise SystemExit(f"error: the {m} checkpoint interval {s.every(m)} is not a multiple of a round "
                             f"(num_shards x merge_every = {round_len}); change --method_every or --budget.")


def scored_steps(s: Setting, method: str) -> list[int]:
    """The steps at which a run of ``method`` is scored: its checkpoints and its final step."""
    every = s.every(method)
    first = math.ceil(s.score_from * s.budget - 1e-9)
    return sorted({k for k in range(every, s.max_steps, every) if k >= first} | {s.max_steps})


def plan_tasks(methods, seeds, s: Setting) -> list[tuple[str, int, int]]:
    """(method, seed, target step) in priority order: what a run cut short by --max_seconds must
    already have. The main comparison at the budget over all seeds; the components at the budget
    on the first seed; the main comparison longer (1.5x, 2x); the components on the other seeds;
    the components longer. A run is paused (SIGSTOP) at a target until every earlier task is done."""
    main = [m for m in MAIN_METHODS if m in methods]
    comps = [m for m in ALL_METHODS if m in methods and m not in MAIN_METHODS]
    longer = sorted({t for t in (round(1.5 * s.budget), s.max_steps) if s.budget < t <= s.max_steps})
    tasks = [(m, sd, s.budget) for sd in seeds for m in main] + [(m, sd, s.budget) for sd in seeds[:1] for m in comps]
    tasks += [(m, sd, t) for t in longer for sd in seeds for m in main]
    tasks += [(m, sd, s.budget) for sd in seeds[1:] for m in comps]
    tasks += [(m, sd, t) for t in longer for sd in seeds for m in comps]
    return tasks


def allowed_targets(tasks, reached: dict, ended: set, jobs: int) -> dict:
    """Which runs may train now, and up to which step: the first undone task of each run, for the
    first ``jobs`` runs (in task order) that have an undone task. ``reached[run]``: highest step
    it has checkpointed; ``ended``: runs that cannot go further (finished, failed, cut short)."""
    allowed: dict = {}
    blocked: set = set()  # runs whose first undone task is outside the window
    for m, sd, t in tasks:
        run = (m, sd)
        if run in ended or reached.get(run, 0) >= t or run in allowed or run in blocked:
            continue
        if len(allowed) < jobs:
            allowed[run] = t
        else:
            blocked.add(run)
    return allowed


def run_name(method: str, seed: int) -> str:
    return f"{method.replace('+', 'plus')}-s{seed}"


def point_name(method: str, seed: int | None, steps: int) -> str:
    return "base-0" if method == "base" else f"{run_name(method, seed)}-{steps}"


def write_json(path: Path, obj) -> None:
    """Write atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def train_flags(job: dict, steps: int, output_dir: Path) -> list[str]:
    s = Setting(**job["setting"])
    return [
        f"--pretrained_model_name_or_path={job['base']}", f"--train_data_dir={job['data']}", f"--output_dir={output_dir}",
        f"--resolution={job['size']}", f"--train_batch_size={s.batch_size}", f"--max_train_steps={steps}",
        f"--learning_rate={s.learning_rate}", "--lr_scheduler=constant", "--lr_warmup_steps=0", f"--seed={job['seed']}",
        "--report_to=none", "--dataloader_num_workers=0", f"--cache_dir={job['hf_cache']}", *method_flags(job["method"], s),
    ]


# ---- scoring (runs in the worker processes) ------------------------------------------------------

_REFS: dict = {}
# Everything is local (base, data): no training or scoring process should wait on a network.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _worker_init(device: str) -> None:
    import torch

    torch.set_num_threads(1)  # many small processes beat a few multi-threaded ones on tiny tensors
    os.environ.update(OFFLINE_ENV)  # before the Hugging Face libraries read it
    os.environ.setdefault("TQDM_DISABLE", "1")
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    _REFS["device"] = device


def _refs(ctx: dict) -> dict:
    """Per-worker reference data, loaded once: images, captions, pixels, the VAE's reconstructions."""
    if _REFS.get("key") == ctx["data"]:
        return _REFS
    from train_scripts import memorization_eval as ev

    s = Setting(**ctx["setting"])
    size = ctx["size"]
    imgs, caps, names = ev.read_imagefolder(ctx["data"])
    first = {}
    for i, c in enumerate(caps):  # duplicates share the caption: one distinct image per caption
        first.setdefault(c, i)
    distinct = sorted(first.values())
    counts = {c: caps.count(c) for c in first}
    dup = [i for i in distinct if counts[caps[i]] > 1]
    uniq = [i for i in distinct if counts[caps[i]] == 1]
    held_imgs, held_caps, _ = ev.read_imagefolder(ctx["heldout"])
    rng = random.Random(0)
    uniq_sample = sorted(rng.sample(uniq, min(s.unique_prompts, len(uniq))))
    held_sample = list(range(min(s.heldout_prompts, len(held_caps))))
    prompts = ([caps[i] for i in dup for _ in range(s.gens_per_duplicated)] + [caps[i] for i in uniq_sample]
               + [held_caps[i] for i in held_sample])
    source = [i for i in dup for _ in range(s.gens_per_duplicated)] + uniq_sample  # training image behind each copy-test prompt
    d_imgs = [imgs[i] for i in distinct]
    _REFS.update(
        key=ctx["data"], setting=s, size=size, imgs=imgs, caps=caps, distinct=distinct, dup=dup, uniq=uniq, uniq_sample=uniq_sample,
        held_imgs=held_imgs, held_caps=held_caps, held_sample=held_sample, prompts=prompts, source=np.array(source),
        n_dup=len(dup) * s.gens_per_duplicated, n_uniq=len(uniq_sample), raw_px=ev.to_pixels(d_imgs, size),
        held_px=ev.to_pixels(held_imgs, size), d_imgs=d_imgs,
    )
    return _REFS


def _copy_stats(ev, gen_px: np.ndarray, ref_px: np.ndarray, refs: dict) -> dict:
    """Copy test of the copy-test generations (duplicated, then unique captions) against ``ref_px``
    (one row per distinct training image, in ``refs['distinct']`` order)."""
    near = ev.pixel_nearest(gen_px, ref_px)
    nearest = np.asarray(refs["distinct"])[near["nearest"]]  # row index of the distinct image in the training set
    copy = near["copy"]
    out = {}
    for part, sl in (("dup", slice(0, refs["n_dup"])), ("uniq", slice(refs["n_dup"], None))):
        c, nn, src = copy[sl], nearest[sl], refs["source"][sl]
        out[part] = {"n": int(len(c)), "copies": int(c.sum()), "copies_of_own_image": int((c & (nn == src)).sum()),
                     "distinct_copied": int(len(set(nn[c].tolist())))}
    out["ratio"] = [round(float(a / b), 4) if b > 0 else 0.0 for a, b in zip(near["d1"], near["d2"])]
    return out


def score_point(task: dict) -> dict:
    """Export (checkpoints) and score one point; writes ``points/<name>.json`` and a samples file."""
    import torch

    from train_scripts import memorization_eval as ev

    t0 = time.time()
    refs = _refs(task)
    s, device = refs["setting"], _REFS["device"]
    model, export = Path(task["model"]), None
    if task["kind"] == "checkpoint":  # the script's own resume + final merge/save turns the checkpoint into a pipeline
        from train_scripts import train_sd_ietagc as train

        export = Path(task["export"])
        shutil.rmtree(export, ignore_errors=True)
        train.main(train.parse_args(train_flags(task, task["steps"], export)
                                    + [f"--resume_from_checkpoint={model}", f"--checkpointing_steps={10**9}"]))
        model = export
    t_export = time.time() - t0
    pipe = ev.load_pipeline(model, device)
    gen = ev.generate_pixels(pipe, refs["prompts"], seed=s.generation_seed, num_inference_steps=s.num_inference_steps,
                             guidance_scale=s.guidance_scale, resolution=refs["size"])
    n_copy = refs["n_dup"] + refs["n_uniq"]
    copy_px, held_gen = gen[:n_copy], gen[n_copy:]
    if "recon_px" not in _REFS:  # the VAE is frozen in fine-tuning: the same references for every model
        _REFS["recon_px"] = ev.vae_reconstructions(pipe, refs["d_imgs"])
    result = {
        "method": task["method"], "seed": task["seed"], "steps": task["steps"], "budget": s.budget,
        "fraction": task["steps"] / s.budget,
        "copies_recon": _copy_stats(ev, copy_px, _REFS["recon_px"], refs),
        "copies_raw": _copy_stats(ev, copy_px, refs["raw_px"], refs),
        "heldout_loss": ev.denoising_loss(pipe, refs["held_imgs"], refs["held_caps"]),
        "fit_loss_dup": ev.denoising_loss(pipe, [refs["imgs"][i] for i in refs["dup"]], [refs["caps"][i] for i in refs["dup"]]),
        "fit_loss_uniq": ev.denoising_loss(pipe, [refs["imgs"][i] for i in refs["uniq_sample"]], [refs["caps"][i] for i in refs["uniq_sample"]]),
        "frechet_heldout": ev.frechet_to(held_gen, refs["held_px"]),
        "frechet_copytest": ev.frechet_to(copy_px[refs["n_dup"]:], refs["held_px"]),
    }
    if task["method"] == "base":
        result["ceiling"] = ceiling(ev, pipe, refs)
        result["device_name"] = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    result["export_seconds"], result["score_seconds"] = t_export, time.time() - t0 - t_export
    out = Path(task["results"])
    to_u8 = lambda x: (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    if task["seed"] in (None, 0):  # the grids show seed 0; the other seeds' pixels would only swell the results
        np.savez_compressed(out / "samples" / f"{task['name']}.npz", dup=to_u8(copy_px[: refs["n_dup"]]), heldout=to_u8(held_gen[:16]))
    write_json(out / "points" / f"{task['name']}.json", result)
    del pipe
    if export is not None:
        shutil.rmtree(export, ignore_errors=True)
    if task["kind"] == "checkpoint" and not task.get("keep_checkpoints"):
        shutil.rmtree(task["model"], ignore_errors=True)  # GBs over a full run; the score is what we keep
    return result


def ceiling(ev, pipe, refs: dict) -> dict:
    """The copy test's score for a perfect memoriser: decoded posterior samples of the training
    images (what a model that reproduces its training latents generates), as many per image as
    the benchmark generates, scored exactly like generations."""
    s = refs["setting"]
    imgs = [refs["imgs"][i] for i in refs["dup"] for _ in range(s.gens_per_duplicated)] + [refs["imgs"][i] for i in refs["uniq_sample"]]
    perfect = ev.vae_reconstructions(pipe, imgs, sample_seed=7)
    return {"copies_recon": _copy_stats(ev, perfect, _REFS["recon_px"], refs), "copies_raw": _copy_stats(ev, perfect, refs["raw_px"], refs)}


# ---- orchestration --------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke run: a quickly built base, 16 images, 8-step budget, plain and IET-AGC+, 1 seed")
    p.add_argument("--analyse", default=None, nargs="+", metavar="DIR",
                   help="analyse results folders (or their .tar.gz) on the CPU: tables, verdicts, goal, plot, grids. Several: one grid "
                        "extended by another (same setting but --longest/--score_from); points measured twice are compared and the later kept")
    p.add_argument("--analyse_seeds", type=int, nargs="+", default=None, help="(--analyse) only these seeds, e.g. the untouched ones")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2; quick: 0)")
    p.add_argument("--methods", nargs="+", default=None, choices=ALL_METHODS, help="default: the five of the papers' ablation (quick: plain ietagc+); the variants run only when named")
    for f in ("budget", "longest", "plain_every", "method_every", "score_from", "domain", "num_images", "num_duplicated", "duplicate_times", "heldout_images",
              "gens_per_duplicated", "unique_prompts", "heldout_prompts", "num_inference_steps"):
        p.add_argument(f"--{f}", type=type(getattr(Setting, f)), default=None, help=f"default {getattr(Setting, f)}")
    p.add_argument("--device", default="cpu", help="where scoring runs (training goes where accelerate puts it: the GPU if one is visible)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at the same time (subprocesses)")
    p.add_argument("--score_workers", type=int, default=1, help="scoring processes (export + generate + losses) working beside training")
    p.add_argument("--max_seconds", type=float, default=None, help="wall-time budget: training stops at max_seconds - score_reserve, scoring at max_seconds")
    p.add_argument("--score_reserve", type=float, default=40.0, help="seconds kept at the end of --max_seconds to score the last checkpoints")
    p.add_argument("--out", default="bench_out/memorization", help="results folder (JSON per point and run); models go under --work")
    p.add_argument("--work", default=None, help="models, checkpoints, data (default <out>/work)")
    p.add_argument("--base", default=None, help="a built base model folder (default: build or reuse BASE under --cache)")
    p.add_argument("--cache", default=None, help="where the base is built and cached (default $SD_MEMFREE_CACHE or ~/.cache/sd_memfree)")
    p.add_argument("--keep_checkpoints", action="store_true", help="do not delete checkpoints once scored")
    p.add_argument("--tar", default=None, help="at the end, write the results folder (without --work) to this .tar.gz")
    p.add_argument("--plot", default=None, help="(--analyse, and at the end of a run) the frontier plot PNG")
    p.add_argument("--grids", default=None, help="(--analyse) folder for one sample grid PNG per model")
    p.add_argument("--report", default=None, help="(--analyse) also write the markdown tables here")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.score_workers < 1:
        p.error("--jobs and --score_workers must be >= 1.")
    return args


def setting_from_args(args) -> Setting:
    s = Setting(**QUICK) if args.quick else Setting()
    return replace(s, **{k: v for k, v in vars(args).items() if k in Setting.__dataclass_fields__ and v is not None})


class _Run:
    """One training subprocess and what has been seen of it."""

    def __init__(self, job: dict):
        self.job, self.proc, self.status, self.t_start, self.seen, self.reached = job, None, "not started", None, {}, 0
        self.paused_seconds, self._paused_at = 0.0, None
        self.log = Path(job["run_dir"]) / "train.log"

    def start(self, device: str) -> None:
        from train_scripts import train_sd_ietagc  # noqa: F401  (fail here, not in the subprocess, if the script is broken)

        env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        Path(self.job["run_dir"]).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(REPO / "train_scripts" / "train_sd_ietagc.py"),
               *train_flags(self.job, self.job["max_steps"], Path(self.job["run_dir"]) / "model"),
               f"--checkpointing_steps={self.job['every']}"]
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        self.t_start, self.status = time.time(), "training"

    def signal(self, sig: int, status: str) -> None:
        """Pause (SIGSTOP) or continue (SIGCONT) our own training subprocess's group."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            if sig == signal.SIGSTOP:
                self._paused_at = time.time()
            elif self._paused_at is not None:
                self.paused_seconds += time.time() - self._paused_at
                self._paused_at = None
            self.status = status

    def stop(self) -> None:
        """Out of time: end our own training subprocess's group (its checkpoints are already complete)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # works on a paused process too
            self.proc.wait()
        self.status = "cut short"

    def record(self) -> dict:
        log_tail = self.log.read_text(errors="replace")[-3000:] if self.status == "failed" and self.log.exists() else None
        seen = sorted((k, t) for k, t in self.seen.items())
        # Active seconds (pauses not counted) from the start to each scored step: steps/s while running.
        rate = (seen[-1][0] / (seen[-1][1] - self.t_start)) if seen and self.t_start else None
        return {"method": self.job["method"], "seed": self.job["seed"], "max_steps": self.job["max_steps"], "every": self.job["every"],
                "status": self.status, "reached": self.reached, "steps_seen": [k for k, _ in seen],
                "seconds_to_step": {str(k): t - self.t_start for k, t in seen}, "paused_seconds": self.paused_seconds,
                "steps_per_second": rate, "log_tail": log_tail}


def main(args: argparse.Namespace) -> dict:
    if args.analyse:
        return analyse(args)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from sd_memfree.run import checkpointing
    from sd_memfree.testing.tiny import TinyBaseConfig, make_tiny_dataset, tiny_base_model

    t0 = time.time()
    deadline = t0 + args.max_seconds if args.max_seconds else math.inf
    train_stop = deadline - args.score_reserve
    s = setting_from_args(args)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    methods = args.methods or (list(MAIN_METHODS) if args.quick else list(DEFAULT_METHODS))
    check_setting(s, methods)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    if (out / "points").exists() and any((out / "points").iterdir()):
        raise SystemExit(f"error: {out} already holds results; choose a new --out (results of two runs are never mixed).")
    for sub in ("points", "samples", "runs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    base_cfg = TinyBaseConfig(**(QUICK_BASE if args.quick else BASE))
    base = Path(args.base) if args.base else tiny_base_model(args.cache, base_cfg)
    if not (base / "model_index.json").exists():
        raise SystemExit(f"error: --base {base} is not a model folder (no model_index.json); build it with tiny_base_model or drop --base.")
    base_info = json.loads((base / "base_info.json").read_text()) if (base / "base_info.json").exists() else {}
    size = int(base_info.get("config", {}).get("size", base_cfg.size))
    tag = "" if s.domain == "landscapes" else f"{s.domain}-"  # the landscape folders keep their names
    data = work / f"data-{tag}{s.num_images}-{s.num_duplicated}x{s.duplicate_times}"
    heldout = work / f"heldout-{tag}{s.heldout_images}"
    if not (data / "metadata.jsonl").exists():
        make_tiny_dataset(data, s.num_images, size, s.num_duplicated / s.num_images, s.duplicate_times, seed=0, kind=s.domain)
    if not (heldout / "metadata.jsonl").exists():
        make_tiny_dataset(heldout, s.heldout_images, size, seed=0, kind=s.domain, first_index=10_000)
    rows = sum(1 for _ in open(data / "metadata.jsonl"))
    write_json(out / "setting.json", {
        "setting": asdict(s), "seeds": seeds, "methods": methods, "quick": args.quick, "device": args.device, "jobs": args.jobs,
        "score_workers": args.score_workers, "max_seconds": args.max_seconds, "base": str(base), "base_info": base_info,
        "size": size, "train_rows": rows, "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "method_flags": {m: method_flags(m, s) for m in methods}, "scored_steps": {m: scored_steps(s, m) for m in methods},
    })
    _write_refs(out, data, heldout, size, s)

    common = {"setting": asdict(s), "base": str(base), "data": str(data), "heldout": str(heldout), "size": size,
              "hf_cache": str(work / "hf_datasets"), "results": str(out), "keep_checkpoints": args.keep_checkpoints}
    tasks = plan_tasks(methods, seeds, s)
    runs: dict = {}
    for method, seed, _ in tasks:
        if (method, seed) in runs:
            continue
        rd = work / run_name(method, seed)
        if rd.exists():
            shutil.rmtree(rd)  # a stale run of an earlier benchmark in this work folder: never mixed with this one
        runs[(method, seed)] = _Run({**common, "method": method, "seed": seed, "run_dir": str(rd), "max_steps": s.max_steps, "every": s.every(method)})

    ctx = mp.get_context("spawn")  # CUDA in the workers; the main process never touches it
    pool = ProcessPoolExecutor(max_workers=args.score_workers, mp_context=ctx, initializer=_worker_init, initargs=(args.device,))
    futures: dict = {}
    submitted: set = set()
    errors: list[dict] = []

    def submit(task: dict) -> None:
        submitted.add(task["name"])
        futures[pool.submit(score_point, task)] = task

    def save_run(r: _Run) -> None:
        write_json(out / "runs" / f"{run_name(r.job['method'], r.job['seed'])}.json", r.record())

    submit({**common, "method": "base", "seed": None, "steps": 0, "kind": "base", "model": str(base), "name": point_name("base", None, 0)})
    from tqdm.auto import tqdm

    bar = tqdm(desc="points scored", unit="pt")
    wanted = {m: set(scored_steps(s, m)) for m in methods}

    def _terminate(signum, frame):  # e.g. `timeout` ran out: still stop the runs, keep what was scored
        raise SystemExit(f"stopped by signal {signum}")

    old_handler = signal.signal(signal.SIGTERM, _terminate)
    interrupted = None
    try:
        while True:
            now = time.time()
            for key, r in runs.items():  # what each run has written
                if r.proc is None:
                    continue
                rd = Path(r.job["run_dir"])
                for step, path in checkpointing.list_checkpoints(rd / "model"):
                    name = point_name(r.job["method"], r.job["seed"], step)
                    r.reached = max(r.reached, step)
                    if step in wanted[r.job["method"]] and name not in submitted:
                        r.seen[step] = now - r.paused_seconds  # active seconds: steps/s while running
                        submit({**r.job, "steps": step, "kind": "checkpoint", "model": str(path), "export": str(rd / f"export-{step}"), "name": name})
                    elif step not in wanted[r.job["method"]] and not args.keep_checkpoints:
                        shutil.rmtree(path, ignore_errors=True)  # before --score_from: a prefix an earlier grid scored
                if r.status in ("training", "paused") and r.proc.poll() is not None:
                    r.status = "finished" if r.proc.returncode == 0 else "failed"
                    if r.status == "finished":
                        r.reached = r.job["max_steps"]
                        r.seen[r.job["max_steps"]] = now - r.paused_seconds
                        submit({**r.job, "steps": r.job["max_steps"], "kind": "final", "model": str(rd / "model"),
                                "name": point_name(r.job["method"], r.job["seed"], r.job["max_steps"])})
                    save_run(r)
            if now < train_stop:  # start, pause and continue runs so the most important tasks finish first
                ended = {k for k, r in runs.items() if r.status in ("finished", "failed", "cut short")}
                allowed = allowed_targets(tasks, {k: r.reached for k, r in runs.items()}, ended, args.jobs)
                for key, r in runs.items():
                    if key in allowed:
                        if r.status == "not started":
                            r.start(args.device)
                        elif r.status == "paused":
                            r.signal(signal.SIGCONT, "training")
                            save_run(r)
                    elif r.status == "training" and r.reached < r.job["max_steps"]:
                        # A run at its last target is only finishing (final merge and save): paused
                        # there it would never end, and the grid would wait for --max_seconds.
                        r.signal(signal.SIGSTOP, "paused")
                        save_run(r)
            else:
                for r in runs.values():
                    if r.status in ("training", "paused"):
                        r.stop()
                        save_run(r)
                    elif r.status == "not started":
                        r.status = "not started (time)"
            for fut in [f for f in futures if f.done()]:
                task = futures.pop(fut)
                if fut.exception() is not None:
                    errors.append({"point": task["name"], "error": repr(fut.exception())})
                    write_json(out / "errors.json", errors)
                bar.update(1)
            idle = not any(r.status in ("training", "paused", "not started") for r in runs.values())
            if (idle and not futures) or time.time() >= deadline:
                break
            time.sleep(0.5)
    except (SystemExit, KeyboardInterrupt) as e:
        interrupted = str(e) or type(e).__name__
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        for r in runs.values():
            if r.status in ("training", "paused"):
                r.stop()
    bar.close()
    unscored = [t["name"] for t in futures.values()]
    for fut in futures:
        fut.cancel()
    for proc in list(getattr(pool, "_processes", {}).values()):  # our own workers, still scoring past the deadline
        if unscored and proc.is_alive():
            proc.kill()
    pool.shutdown(wait=True, cancel_futures=True)
    for r in runs.values():
        save_run(r)
    summary = {"wall_seconds": time.time() - t0, "unscored_at_deadline": unscored, "errors": errors, "interrupted": interrupted,
               "points": len(list((out / "points").glob("*.json")))}
    write_json(out / "summary.json", summary)
    print(json.dumps(summary))
    if args.tar:
        write_tar(out, Path(args.tar), exclude=work)
    if args.plot:
        analyse(argparse.Namespace(analyse=[str(out)], plot=args.plot, grids=args.grids))
    return summary


def _write_refs(out: Path, data: Path, heldout: Path, size: int, s: Setting) -> None:
    """The training images the grids compare against, beside the results (the analysis needs no data folder)."""
    from train_scripts import memorization_eval as ev

    imgs, caps, _ = ev.read_imagefolder(data)
    first: dict = {}
    for i, c in enumerate(caps):
        first.setdefault(c, i)
    dup = [i for i in sorted(first.values()) if caps.count(caps[i]) > 1]
    held, held_caps, _ = ev.read_imagefolder(heldout)
    np.savez_compressed(out / "refs.npz", dup=np.stack([np.asarray(imgs[i]) for i in dup]),
                        heldout=np.stack([np.asarray(im) for im in held[:16]]))
    write_json(out / "captions.json", {"dup": [caps[i] for i in dup], "heldout": held_caps[:16]})


def write_tar(folder: Path, tar_path: Path, exclude: Path) -> None:
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    ex = exclude.resolve()
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name, filter=lambda ti: None if (folder.parent / ti.name).resolve() == ex else ti)


# ---- analysis (CPU, from the saved JSON) ----------------------------------------------------------


def wilson(k: int, n: int) -> tuple[float, float]:
    from train_scripts.memorization_eval import wilson_interval

    return wilson_interval(k, n)


def load_results(folder: str | Path) -> tuple[dict, list[dict], list[dict]]:
    """(setting, points, runs) from a results folder or its .tar.gz."""
    folder = Path(folder)
    if folder.is_file():
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="mem-analyse-"))
        with tarfile.open(folder) as tar:
            tar.extractall(tmp, filter="data")
        folder = next(p for p in tmp.iterdir() if p.is_dir())
    setting = json.loads((folder / "setting.json").read_text())
    points = [json.loads(p.read_text()) for p in sorted((folder / "points").glob("*.json"))]
    runs = [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]
    setting["folder"] = str(folder)
    summary = folder / "summary.json"  # written at the end of a grid: its wall time
    setting["wall_seconds"] = json.loads(summary.read_text()).get("wall_seconds") if summary.exists() else None
    return setting, points, runs


# Settings that may differ between a grid and its extension (how far it ran, where scoring began).
EXTENSION_FIELDS = ("longest", "score_from")


def merge_results(loaded: list[tuple[dict, list[dict], list[dict]]]) -> tuple[dict, list[dict], list[dict], dict]:
    """One grid from several results folders of the same setting (an extension runs the same
    deterministic runs further and scores only the new points). Points measured in more than one
    folder are compared (``rerun``: how far the re-measurement moved) and the later one kept; a
    run's record is kept per folder. Folders of different settings are refused."""
    for st, _, _ in loaded:  # folders written before a field existed hold its default
        st["setting"] = asdict(Setting(**st["setting"]))
    setting = dict(loaded[0][0])
    ref = {k: v for k, v in setting["setting"].items() if k not in EXTENSION_FIELDS}
    by_key: dict = {}
    rerun = {"points": 0, "max_abs_heldout_loss": 0.0, "copies_differ": 0}
    runs: list[dict] = []
    for st, points, rs in loaded:
        other = {k: v for k, v in st["setting"].items() if k not in EXTENSION_FIELDS}
        if other != ref:
            diff = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k))
            raise SystemExit(f"error: {st['folder']} has another setting than {setting['folder']} ({', '.join(diff)}); "
                             "analyse them separately.")
        setting["setting"]["longest"] = max(setting["setting"]["longest"], st["setting"]["longest"])
        setting["seeds"] = sorted(set(setting["seeds"]) | set(st["seeds"]))
        setting["methods"] = [m for m in ALL_METHODS if m in set(setting["methods"]) | set(st["methods"])]
        for p in points:
            key = (p["method"], p["seed"], p["steps"])
            if key in by_key:
                old = by_key[key]
                rerun["points"] += 1
                rerun["max_abs_heldout_loss"] = max(rerun["max_abs_heldout_loss"], abs(old["heldout_loss"] - p["heldout_loss"]))
                rerun["copies_differ"] += int(old["copies_recon"]["dup"]["copies"] != p["copies_recon"]["dup"]["copies"])
            by_key[key] = p
        runs += [{**r, "folder": Path(st["folder"]).name} if len(loaded) > 1 else r for r in rs]
    setting["setting"]["score_from"] = 0.0
    setting["folders"] = [st["folder"] for st, _, _ in loaded]
    setting["wall_seconds_per_folder"] = {Path(st["folder"]).name: st.get("wall_seconds") for st, _, _ in loaded}
    setting["folder"] = loaded[-1][0]["folder"]
    return setting, list(by_key.values()), runs, rerun


# The goal for a method point: copies of duplicated captions at most this rate ...
GOAL_MAX_COPIES = 0.10
# ... at a held-out loss at or below plain's best, where plain's best is the minimum over its
# checkpoints of the mean of this many neighbouring checkpoints (seeds pooled): one checkpoint's
# held-out loss moves by ~0.002 from the next, and the minimum of many noisy points flatters plain.
PLAIN_BEST_WINDOW = 3


def plain_best(summary: dict, window: int = PLAIN_BEST_WINDOW) -> dict | None:
    """Plain's best held-out loss: min over its checkpoints (the base excluded) of the mean of
    ``window`` consecutive checkpoints' pooled held-out losses, among the checkpoints that every
    seed reached. None without such a window.
    Returns the loss, the centre checkpoint, the window's steps and its mean duplicated-caption copy rate."""
    pts = sorted((p for p in summary.values() if p["method"] == "plain" and p["steps"] > 0), key=lambda p: p["steps"])
    # Only checkpoints every seed reached (a grid cut short pools fewer seeds there), and only
    # windows of consecutive checkpoints (none missing between them).
    most = max((len(p["seeds"]) for p in pts), default=0)
    pts = [p for p in pts if len(p["seeds"]) == most]
    gap = min((b["steps"] - a["steps"] for a, b in zip(pts, pts[1:])), default=0)
    best = None
    for i in range(len(pts) - window + 1):
        win = pts[i:i + window]
        if win[-1]["steps"] - win[0]["steps"] != (window - 1) * gap:
            continue
        loss = float(np.mean([p["heldout_loss"] for p in win]))
        if best is None or loss < best["loss"]:
            best = {"loss": loss, "steps": win[window // 2]["steps"], "window": [p["steps"] for p in win],
                    "dup_rate": float(np.mean([p["dup"]["rate"] for p in win]))}
    return best


def goal(summary: dict, best: dict | None) -> dict:
    """Per method point: reached when its pooled held-out loss is at or below plain's best and its
    duplicated-caption copy rate at most GOAL_MAX_COPIES; ``loss_gap`` = its loss - plain's best."""
    out = {}
    for key, m in summary.items():
        if m["method"] == "plain" or best is None:
            continue
        gap = m["heldout_loss"] - best["loss"]
        out[key] = {"loss_gap": gap, "copies_ok": m["dup"]["rate"] <= GOAL_MAX_COPIES,
                    "reached": gap <= 0 and m["dup"]["rate"] <= GOAL_MAX_COPIES}
    return out


def summarize(points: list[dict], measure: str = "copies_recon") -> dict:
    """Per (method, steps): seeds pooled. Copy counts are summed over seeds (Wilson interval on the
    pooled rate); losses and Frechet are mean and population std over seeds. The base (0 steps)
    is plain's first point for every seed."""
    seeds = sorted({p["seed"] for p in points if p["seed"] is not None})
    groups: dict = {}
    for p in points:
        if p["method"] == "base":
            for sd in seeds or [0]:
                groups.setdefault(("plain", 0), []).append({**p, "seed": sd})
        else:
            groups.setdefault((p["method"], p["steps"]), []).append(p)
    out = {}
    for (method, steps), ps in sorted(groups.items(), key=lambda kv: (ALL_METHODS.index(kv[0][0]), kv[0][1])):
        row = {"method": method, "steps": steps, "fraction": ps[0]["fraction"], "seeds": sorted(p["seed"] for p in ps)}
        for part in ("dup", "uniq"):
            k, n = sum(p[measure][part]["copies"] for p in ps), sum(p[measure][part]["n"] for p in ps)
            lo, hi = wilson(k, n)
            per_seed = [p[measure][part]["copies"] / max(1, p[measure][part]["n"]) for p in ps]
            row[part] = {"copies": k, "n": n, "rate": k / max(1, n), "lo": lo, "hi": hi, "seed_std": float(np.std(per_seed)),
                         "distinct_copied": float(np.mean([p[measure][part]["distinct_copied"] for p in ps]))}
        for key in ("heldout_loss", "fit_loss_dup", "fit_loss_uniq", "frechet_heldout"):
            vals = [p[key] for p in ps]
            row[key], row[key + "_std"] = float(np.mean(vals)), float(np.std(vals))
        out[f"{method}@{steps}"] = row
    return out


def dominating_plain(summary: dict, key: str) -> dict:
    """Plain points with fewer copies (duplicated captions) than method point ``key`` and a
    held-out loss no worse within the seed spread (loss_P <= loss_M + std_P + std_M).

    ``on_means``: fewer copies on the pooled rates. ``beyond_noise``: fewer copies beyond the
    binomial noise (the plain point's Wilson upper bound below the method's lower bound).
    """
    m = summary[key]
    on_means, beyond = [], []
    for pk, p in summary.items():
        if p["method"] != "plain" or p["heldout_loss"] > m["heldout_loss"] + p["heldout_loss_std"] + m["heldout_loss_std"]:
            continue
        if p["dup"]["rate"] < m["dup"]["rate"]:
            on_means.append(pk)
            if p["dup"]["hi"] < m["dup"]["lo"]:
                beyond.append(pk)
    return {"on_means": on_means, "beyond_noise": beyond}


def verdict(summary: dict) -> dict:
    """Per method point: **met** (no plain point dominates it, and plain needs more copies than the
    method to reach its held-out loss, or never reaches it), **tie** (no plain point dominates it but
    one reaches its loss with as few copies, e.g. both copy nothing), **not met** (a plain point
    dominates it beyond the binomial noise) or **not met (within noise)** (on the pooled rates only)."""
    out = {}
    for key, m in summary.items():
        if m["method"] == "plain":
            continue
        d = dominating_plain(summary, key)
        # What plain pays for this quality: its fewest copies at a held-out loss no worse (within the spread).
        level = [p["dup"]["rate"] for p in summary.values() if p["method"] == "plain"
                 and p["heldout_loss"] <= m["heldout_loss"] + p["heldout_loss_std"] + m["heldout_loss_std"]]
        fewest = min(level) if level else None
        if d["on_means"]:
            status = "not met" if d["beyond_noise"] else "not met (within noise)"
        else:  # nothing dominates: beyond plain's frontier, or on it (plain gets there with as few copies)
            status = "tie (on plain's frontier)" if fewest is not None and fewest == m["dup"]["rate"] else "met"
        out[key] = {"verdict": status, **d, "plain_fewest_copies_at_this_loss": fewest}
    return out


def moonshot(summary: dict, method: str) -> list[dict]:
    """At every held-out loss plain reaches: the fewest copies plain needs to reach it (any plain
    point at that loss or better) vs the fewest the method needs (None: the method never gets there)."""
    plain = [p for p in summary.values() if p["method"] == "plain"]
    meth = [p for p in summary.values() if p["method"] == method]
    rows = []
    for p in sorted(plain, key=lambda p: p["steps"]):
        level = p["heldout_loss"]
        best_plain = min(q["dup"]["rate"] for q in plain if q["heldout_loss"] <= level)
        reach = [q["dup"]["rate"] for q in meth if q["heldout_loss"] <= level]
        rows.append({"plain_point": f"plain@{p['steps']}", "loss": level, "plain_copies": best_plain, "method_copies": min(reach) if reach else None})
    return rows


def analyse(args) -> dict:
    folders = [args.analyse] if isinstance(args.analyse, (str, Path)) else list(args.analyse)
    setting, points, runs, rerun = merge_results([load_results(f) for f in folders])
    seeds = getattr(args, "analyse_seeds", None)
    if seeds:
        missing = sorted(set(seeds) - set(setting["seeds"]))
        if missing:
            raise SystemExit(f"error: --analyse_seeds {missing} are not in the results (seeds {setting['seeds']}).")
        points = [p for p in points if p["seed"] is None or p["seed"] in seeds]
        runs = [r for r in runs if r["seed"] in seeds]
        setting["seeds"] = sorted(seeds)
    s = Setting(**setting["setting"])
    summ = {m: summarize(points, m) for m in ("copies_recon", "copies_raw")}
    summary = summ["copies_recon"]
    base = next((p for p in points if p["method"] == "base"), None)
    ceil = base["ceiling"] if base else None
    ver = verdict(summary)
    moon = {m: moonshot(summary, m) for m in setting["methods"] if m != "plain"}
    best = plain_best(summary)
    gl = goal(summary, best)
    report = markdown_report(setting, summ, ceil, ver, moon, runs, best=best, goal_rows=gl, rerun=rerun)
    print(report)
    Path(setting["folder"], "analysis.md").write_text(report)
    if getattr(args, "report", None):
        Path(args.report).write_text(report)
    result = {"setting": setting, "summary": summary, "summary_raw_rule": summ["copies_raw"], "ceiling": ceil, "verdict": ver,
              "moonshot": moon, "plain_best": best, "goal": gl, "rerun": rerun, "runs": runs}
    Path(setting["folder"], "analysis.json").write_text(json.dumps(result, indent=1))
    if getattr(args, "plot", None):
        plot(summary, s, ceil, Path(args.plot))
    if getattr(args, "grids", None):
        grids(Path(setting["folder"]), points, s, Path(args.grids))
    return result


def markdown_report(setting: dict, summ: dict, ceil: dict | None, ver: dict, moon: dict, runs: list[dict],
                    best: dict | None = None, goal_rows: dict | None = None, rerun: dict | None = None) -> str:
    """The analysis as markdown tables, ready for docs/memorization_benchmark.md."""
    summary = summ["copies_recon"]
    pct = lambda r: f"{100 * r['rate']:.1f} [{100 * r['lo']:.1f}, {100 * r['hi']:.1f}]"
    label = lambda key: f"{LABELS[summary[key]['method']]} @ {summary[key]['fraction']:g}x"
    out = [f"Setting: `{json.dumps(setting['setting'])}`; seeds {setting['seeds']}; device: {setting.get('device')}, jobs {setting.get('jobs')}.", ""]
    walls = setting.get("wall_seconds_per_folder", {})
    out += ["Wall time: " + "; ".join(f"{name} {w / 60:.0f} min" if w else f"{name} not recorded" for name, w in walls.items())
            + f" (device {setting.get('device')}, {setting.get('jobs')} training jobs).", ""]
    if len(setting.get("folders", [])) > 1:
        out += [f"Results of {len(setting['folders'])} folders ({', '.join(Path(f).name for f in setting['folders'])}); "
                f"{rerun['points']} points were measured in two of them: largest held-out loss difference "
                f"{rerun['max_abs_heldout_loss']:.2g}, copy counts differ at {rerun['copies_differ']}.", ""]
    if best is not None and goal_rows is not None:
        reached = [k for k, g in goal_rows.items() if g["reached"]]
        out += [f"**Goal** (a method point at or below plain's best held-out loss with at most {100 * GOAL_MAX_COPIES:g}% "
                f"duplicated-caption copies): plain's best, the lowest mean of {PLAIN_BEST_WINDOW} neighbouring checkpoints "
                f"(steps {', '.join(map(str, best['window']))}, seeds pooled), is **{best['loss']:.4f}**, where plain copies "
                f"{100 * best['dup_rate']:.1f}%. " + (f"**Reached** by {', '.join(label(k) for k in reached)}." if reached
                                                      else "**Not reached** by any method point."), "",
                "| method point | held-out loss | minus plain's best | dup copies % | goal |", "|---|---|---|---|---|"]
        for key, g in goal_rows.items():
            r = summary[key]
            out.append(f"| {label(key)} | {r['heldout_loss']:.4f} | {g['loss_gap']:+.4f} | {100 * r['dup']['rate']:.1f} | "
                       f"{'reached' if g['reached'] else 'copies over' if not g['copies_ok'] else 'loss above'} |")
        out.append("")
    if ceil:
        c, r = ceil["copies_recon"], ceil["copies_raw"]
        out += [f"Copy-test ceiling (a perfect memoriser): against the VAE reconstructions {c['dup']['copies']}/{c['dup']['n']} duplicated, "
                f"{c['uniq']['copies']}/{c['uniq']['n']} unique; against the raw images {r['dup']['copies']}/{r['dup']['n']} duplicated, "
                f"{r['uniq']['copies']}/{r['uniq']['n']} unique.", ""]
    out += ["| point | steps | seeds | duplicated-caption copies %, pooled [95% CI] | unique-caption copies % | distinct copied (dup / unique) "
            "| raw-rule dup copies % | held-out loss | Frechet (held-out) | fit loss dup / unique |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in summary.items():
        raw = summ["copies_raw"][key]["dup"]
        out.append(f"| {label(key)} | {r['steps']} | {len(r['seeds'])} | {pct(r['dup'])} | {pct(r['uniq'])} | {r['dup']['distinct_copied']:.2f} / "
                   f"{r['uniq']['distinct_copied']:.2f} | {100 * raw['rate']:.1f} | {r['heldout_loss']:.4f} ± {r['heldout_loss_std']:.4f} | "
                   f"{r['frechet_heldout']:.2f} ± {r['frechet_heldout_std']:.2f} | {r['fit_loss_dup']:.4f} / {r['fit_loss_uniq']:.4f} |")
    out += ["", "Verdict per method point (a plain point with fewer duplicated-caption copies and a held-out loss no worse within "
            "the seed spread dominates it):", "", "| method point | its dup copies % | plain's fewest dup copies % at this loss or better | verdict "
            "| dominated on the rates by | beyond the binomial noise by |", "|---|---|---|---|---|---|"]
    for key, v in ver.items():
        pf = v["plain_fewest_copies_at_this_loss"]
        out.append(f"| {label(key)} | {100 * summary[key]['dup']['rate']:.1f} | {'plain never gets there' if pf is None else f'{100 * pf:.1f}'} "
                   f"| **{v['verdict']}** | {', '.join(v['on_means']) or '-'} | {', '.join(v['beyond_noise']) or '-'} |")
    for m, rows in moon.items():
        out += ["", f"Moonshot, {LABELS[m]}: at each held-out loss plain reaches, the fewest duplicated-caption copies (%) needed to reach it:", "",
                f"| plain point | held-out loss | plain | {LABELS[m]} |", "|---|---|---|---|"]
        for row in rows:
            mc = "not reached" if row["method_copies"] is None else f"{100 * row['method_copies']:.1f}"
            out.append(f"| {row['plain_point']} | {row['loss']:.4f} | {100 * row['plain_copies']:.1f} | {mc} |")
    out += ["", "Runs: " + "; ".join(f"{LABELS[r['method']]} s{r['seed']}{' (' + r['folder'] + ')' if 'folder' in r else ''}: "
                                      f"{r['status']} at {r.get('reached', '?')} steps, "
                                      f"{r['steps_per_second'] or 0:.1f} steps/s" for r in runs) + "."]
    return "\n".join(out) + "\n"


def plot(summary: dict, s: Setting, ceil: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=100)
    colors = {"plain": "tab:gray", "ietagc+": "tab:red", "ietagc": "tab:blue", "agc": "tab:green", "iet": "tab:purple",
              "ietagc+shared": "tab:orange", "ietagc+k2": "tab:brown"}
    for method in ALL_METHODS:
        pts = sorted((p for p in summary.values() if p["method"] == method), key=lambda p: p["steps"])
        if not pts:
            continue
        x = [p["heldout_loss"] for p in pts]
        y = [100 * p["dup"]["rate"] for p in pts]
        yerr = [[100 * (p["dup"]["rate"] - p["dup"]["lo"]) for p in pts], [100 * (p["dup"]["hi"] - p["dup"]["rate"]) for p in pts]]
        style = "o-" if method == "plain" else "s--"
        ax.errorbar(x, y, xerr=[p["heldout_loss_std"] for p in pts], yerr=yerr, fmt=style, color=colors[method], ms=4, capsize=2,
                    label=LABELS[method] + (" (0..%gx budget)" % s.longest if method == "plain" else ""), alpha=0.9)
        for p in pts:
            if method != "plain" or p["fraction"] in (0, 0.5, 1.0, 1.5, 2.0):
                ax.annotate(f"{p['fraction']:g}x", (p["heldout_loss"], 100 * p["dup"]["rate"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points", color=colors[method])
        ax2.errorbar([p["fraction"] for p in pts], y, yerr=yerr, fmt=style, color=colors[method], ms=4, capsize=2, label=LABELS[method])
    if ceil:
        c = ceil["copies_recon"]["dup"]
        for a in (ax, ax2):
            a.axhline(100 * c["copies"] / max(1, c["n"]), color="k", ls=":", lw=1, label="ceiling (perfect memoriser)")
    trained = [p["heldout_loss"] + p["heldout_loss_std"] for p in summary.values() if p["steps"] > 0]
    if trained:  # the base's loss (far to the right) would squeeze every trained point into a sliver
        lo = min(p["heldout_loss"] - p["heldout_loss_std"] for p in summary.values() if p["steps"] > 0)
        ax.set_xlim(lo - 0.002, max(trained) + 0.002)
    ax.set_xlabel("held-out denoising loss (lower is better; the base, at 0 steps, is off to the right)")
    ax.set_ylabel("duplicated-caption generations that copy, % (95% CI)")
    ax.set_title("copies vs held-out loss: plain's frontier and the methods", fontsize=9)
    ax2.set_xlabel("optimizer steps / budget")
    ax2.set_title(f"copies vs training length (budget {s.budget} steps)", fontsize=9)
    ax.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def grids(folder: Path, points: list[dict], s: Setting, out_dir: Path, seed: int = 0, per_row: int = 4, scale: int = 4) -> list[Path]:
    """One PNG per model (seed ``seed``, at 1x and the longest budget, plain also at its best held-out
    loss): each duplicated training image then ``per_row`` of its caption's generations (red frame:
    a copy), and a row of held-out images over their captions' generations."""
    from PIL import Image, ImageDraw

    refs = np.load(folder / "refs.npz")
    chosen = {}
    for p in points:
        if p["seed"] == seed and p["steps"] in (s.budget, s.max_steps):
            chosen[(p["method"], p["steps"])] = p
    plain = [p for p in points if p["method"] == "plain" and p["seed"] == seed]
    if plain:
        best = min(plain, key=lambda p: p["heldout_loss"])
        chosen[("plain", best["steps"])] = best
    size = refs["dup"].shape[1] * scale
    paths = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for (method, steps), p in sorted(chosen.items()):
        sm = np.load(folder / "samples" / f"{point_name(method, seed, steps)}.npz")
        n_dup = len(refs["dup"])
        g = s.gens_per_duplicated
        copies = np.array(p["copies_recon"]["ratio"][: n_dup * g]) < 1 / 3
        cols = 1 + per_row
        rows = n_dup + 2
        canvas = Image.new("RGB", (cols * (size + 4) + 4, rows * (size + 4) + 4), "white")
        draw = ImageDraw.Draw(canvas)
        tile = lambda a: Image.fromarray(a).resize((size, size), Image.NEAREST)
        for i in range(n_dup):
            canvas.paste(tile(refs["dup"][i]), (4, 4 + i * (size + 4)))
            for j in range(min(per_row, g)):
                x, y = 4 + (j + 1) * (size + 4), 4 + i * (size + 4)
                canvas.paste(tile(sm["dup"][i * g + j]), (x, y))
                if copies[i * g + j]:
                    draw.rectangle((x - 2, y - 2, x + size + 1, y + size + 1), outline="red", width=2)
        for j in range(min(cols, len(sm["heldout"]))):
            y = 4 + n_dup * (size + 4)
            canvas.paste(tile(refs["heldout"][j]), (4 + j * (size + 4), y))
            canvas.paste(tile(sm["heldout"][j]), (4 + j * (size + 4), y + size + 4))
        path = out_dir / f"memorization_samples_{method.replace('+', 'plus')}_{steps}.png"
        canvas.save(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    main(parse_args())
