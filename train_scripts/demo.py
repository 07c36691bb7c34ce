"""The embedded demo: plain fine-tuning copies its duplicated training images, IET-AGC+ does not. On a CPU.

    sd-memfree demo --out demo_out

The regime is the one the papers claim, scaled down (the memorization benchmark's, one seed; see
docs/memorization_benchmark.md):

1. Set-up (once, cached): the pretrained tiny 16 px base (``sd_memfree.testing.tiny.tiny_base_model``
   with ``BASE``: a VAE trained on shapes and landscapes, a UNet pretrained on shapes only) and a
   stand-in SSCD.
2. 256 distinct procedural landscapes (a domain the base's UNet never saw), 8 of them repeated
   32 times with their captions (a duplicated minority, like LAION's duplicates); held-out: 64
   other landscapes. ``sd-memfree audit`` runs on the training data first and must find exactly
   the 8 duplicated images (8 clusters of 32 exact copies) and nothing else (its exact and
   perceptual-hash passes: SSCD is no judge of 16 px images).
3. The real training script fine-tunes the base twice with the same seed and 3000-step budget,
   side by side (one process each): plain, and IET-AGC+ (shard proxies, merges, AGC,
   redistribution, loss-aware augmentation). Both log the held-out monitor
   (``--heldout_data_dir``, the audit's clusters as the at-risk rows) at a checkpoint every
   third of the budget.
4. The real scorer generates one image per training row (so 32 per duplicated caption) and
   records the model-only detection score (Wen et al.) of each; the copy test ``d1/d2 < 1/3`` is
   counted against the VAE's reconstructions of the training images, because at 16 px the
   tiny VAE cannot reproduce raw pixels and the raw-pixel test would be blind. Its ceiling (a
   perfect memoriser: the VAE's own reconstructions of the training latents) is printed beside
   every rate. Beside it: the held-out denoising loss (quality on landscapes never trained on).
5. Plain's copy rate at each checkpoint (and the base's) against its held-out loss there, with
   IET-AGC+'s final point beside that curve: if IET-AGC+ merely trained less, its point would sit
   on plain's curve.
6. One ``report.html``: the audit's finding, the headline table, the loss/copy curve, then per
   caption (duplicated first) what each model generates next to the VAE's reconstruction of its
   nearest training image and that image. The terminal prints the headline.

Without ``--sscd_model`` (a real SSCD file) the similarity model is a stand-in with random
weights: its figures carry no information, so the report leaves them out and says so.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# The cached base: 16 px, UNet pretrained 1000 steps (the memorization benchmark's base too).
BASE = dict(size=16, unet_steps=1000)
QUICK_BASE = dict(size=16, vae_steps=20, unet_steps=20, vae_images=64, unet_images=64)
# The memorization benchmark's IET-AGC+ setting (docs/memorization_benchmark.md).
IETAGC_PLUS_FLAGS = ["--num_shards=4", "--merge_every=25", "--agc_ratio=1.25", "--redistribute_fraction=0.25", "--loss_aware_augmentation"]
RUNS = (("plain", "plain", []), ("IET-AGC+", "ietagc_plus", IETAGC_PLUS_FLAGS))  # name, folder, flags
CEILING_SEED = 7  # posterior samples of the training latents: the perfect memoriser
# The demo's models are tiny (16 px): per-op overhead dominates, so a second thread only adds
# synchronisation; and when anything else runs on the CPU, OpenMP's waiting threads made the
# base build ~100x slower (measured on 2 cores: 3.4 s per UNet step with 2 threads beside one
# busy process, 0.045 s with 1). Every process of the demo runs one thread.
ONE_THREAD = 1


def _sibling(name: str):
    """A sibling recipe module: ``sd_memfree.recipes.<name>`` when installed, ``train_scripts.<name>``
    in a checkout, or the bare module when this file runs as a script (its folder is sys.path[0])."""
    import importlib

    return importlib.import_module(f".{name}", __package__) if __package__ else importlib.import_module(name)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sd-memfree demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output folder (report.html, models, generations)")
    p.add_argument("--cache", default=None, help="where the base model is cached (default $SD_MEMFREE_CACHE or ~/.cache/sd_memfree)")
    p.add_argument("--max_train_steps", type=int, default=3000, help="optimizer steps of each fine-tune (same for both)")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--num_images", type=int, default=256, help="distinct training images")
    p.add_argument("--num_duplicated", type=int, default=8, help="how many of them are duplicated ...")
    p.add_argument("--duplicate_times", type=int, default=32, help="... this many times in total, with their captions")
    p.add_argument("--heldout_images", type=int, default=64, help="held-out landscapes for the denoising loss")
    p.add_argument("--num_prompts", type=int, default=128, help="generations scored per model: a seeded sample of training rows (about half are rows of duplicated captions)")
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="fine-tunes run side by side, one process each (1: in this process, one after the other)")
    p.add_argument("--sscd_model", default=None, help="an SSCD TorchScript file or known name (fetched on first use); default: a stand-in with random weights, whose figures the report leaves out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a quickly built base (tests); pair with small step and image counts")
    args = p.parse_args(argv)
    if args.max_train_steps < 1 or args.heldout_images < 2 or args.jobs < 1 or args.num_prompts < 1:
        p.error("--max_train_steps >= 1, --heldout_images >= 2, --jobs >= 1 and --num_prompts >= 1 are required.")
    if not 0 < args.num_duplicated <= args.num_images or args.duplicate_times < 2:
        p.error("need 0 < --num_duplicated <= --num_images and --duplicate_times >= 2 (the demo is about duplicated images).")
    return args


def _train_flags(base: Path, data: Path, out: Path, size: int, args, extra: list[str], heldout: Path, audit_file: Path) -> list[str]:
    return [
        f"--pretrained_model_name_or_path={base}", f"--train_data_dir={data}", f"--output_dir={out}",
        f"--resolution={size}", "--train_batch_size=8", f"--max_train_steps={args.max_train_steps}",
        f"--learning_rate={args.learning_rate}", "--lr_scheduler=constant", "--lr_warmup_steps=0",
        f"--seed={args.seed}", "--report_to=tensorboard", f"--checkpointing_steps={10**9}", "--dataloader_num_workers=0",
        f"--heldout_data_dir={heldout}", f"--audit_file={audit_file}", "--monitor_batch_size=64", *extra,
    ]


def curve_every(max_train_steps: int) -> int:
    """Plain's checkpoint interval: a third of the budget, so its curve has 3 checkpoints (and the base)."""
    return max(1, max_train_steps // 3)


def audit_data(data: Path, out: Path, num_duplicated: int, duplicate_times: int) -> dict:
    """``sd-memfree audit`` on the demo's training data (exact and hash passes); it must find the
    duplicated images, each once as a cluster of ``duplicate_times`` exact copies, and nothing else."""
    from sd_memfree import audit

    result = audit.main(audit.parse_args([f"--train_data_dir={data}", f"--out={out}", "--no_sscd"]))
    c = result["counts"]
    sizes = [cl["size"] for cl in result["clusters"]]
    if sizes != [duplicate_times] * num_duplicated or c["exact_clusters"] != num_duplicated or c["shared_captions"] or c["images_with_several_captions"]:
        raise SystemExit(f"error: the audit found clusters of sizes {sizes} ({c['shared_captions']} shared captions), expected exactly "
                         f"{num_duplicated} clusters of {duplicate_times} exact copies: see {out / 'audit.json'}")
    return result


def plain_curve(base: Path, run_dir: Path, every: int, steps: int, prompts: list[str], dup_mask: np.ndarray, recon_px: np.ndarray,
                distinct: list[int], size: int, args) -> list[dict]:
    """Plain's base and checkpoints: copy rate of the generations for duplicated captions (the
    scorer's prompts and seeds) beside the held-out and at-risk losses the run logged there."""
    from diffusers import UNet2DConditionModel

    ev = _sibling("memorization_eval")
    logged = {p["step"]: p for p in json.loads((run_dir / "model" / "monitor.json").read_text())["curve"]}
    pipe = ev.load_pipeline(base)
    points = []
    for step in [0, *range(every, steps + 1, every)]:
        if step:
            pipe.unet = UNet2DConditionModel.from_pretrained(str(run_dir / "model" / f"checkpoint-{step}"), subfolder="unet")
        gen = ev.generate_pixels(pipe, prompts, seed=42, num_inference_steps=args.num_inference_steps, guidance_scale=1.0, resolution=size)
        copies = copy_test(gen, recon_px, distinct, dup_mask)
        points.append({"step": step, "heldout_loss": logged[step]["heldout_loss"], "at_risk_loss": logged[step].get("at_risk_loss"),
                       "dup_copies": copies["dup"]})
    return points


def final_point(base: Path, model: Path, prompts: list[str], dup_mask: np.ndarray, recon_px: np.ndarray, distinct: list[int], size: int, args) -> dict:
    """A finished run's point, measured the same way as ``plain_curve``'s."""
    ev = _sibling("memorization_eval")
    doc = json.loads((model / "monitor.json").read_text())
    gen = ev.generate_pixels(ev.load_pipeline(model), prompts, seed=42, num_inference_steps=args.num_inference_steps, guidance_scale=1.0, resolution=size)
    last = doc["curve"][-1]
    return {"step": last["step"], "heldout_loss": last["heldout_loss"], "at_risk_loss": last.get("at_risk_loss"),
            "dup_copies": copy_test(gen, recon_px, distinct, dup_mask)["dup"], "curve": doc["curve"]}


def curve_png(plain: list[dict], plus: dict, plain_logged: list[dict]) -> bytes:
    """Left: plain's copy rate against its held-out loss at each checkpoint, IET-AGC+'s point beside.
    Right: both runs' held-out and at-risk losses over training (the monitor's curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sd_memfree.scoring.report import _png_bytes

    rate = lambda p: 100 * p["dup_copies"]["k"] / max(p["dup_copies"]["n"], 1)  # noqa: E731
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100)
    a.plot([p["heldout_loss"] for p in plain], [rate(p) for p in plain], "o-", color="tab:red", label="plain, by checkpoint")
    for p in plain:
        a.annotate(f"step {p['step']}", (p["heldout_loss"], rate(p)), textcoords="offset points", xytext=(5, 4), fontsize=8)
    a.plot([plus["heldout_loss"]], [rate(plus)], "*", color="tab:green", markersize=16, label=f"IET-AGC+ (step {plus['step']})")
    a.set_xlabel("held-out denoising loss (lower is better)")
    a.set_ylabel("% generations for duplicated captions\nthat copy a training image")
    a.invert_xaxis()  # training moves right: lower loss
    a.legend(fontsize=8)
    for runs, style, name in ((plain_logged, "-", "plain"), (plus["curve"], "--", "IET-AGC+")):
        steps = [p["step"] for p in runs]
        b.plot(steps, [p["heldout_loss"] for p in runs], style, color="tab:blue", marker="o", label=f"{name}: held-out")
        if all(p.get("at_risk_loss") is not None for p in runs):
            b.plot(steps, [p["at_risk_loss"] for p in runs], style, color="tab:red", marker="o", label=f"{name}: at-risk (duplicated rows)")
    b.set_xlabel("optimizer step")
    b.set_ylabel("denoising loss")
    b.legend(fontsize=7)
    return _png_bytes(fig)


def _fine_tune_all(jobs: list[tuple[str, list[str], Path]], n_parallel: int) -> None:
    """Run the training script once per job; side by side in subprocesses when ``n_parallel > 1``.

    Each subprocess runs one thread (see ``ONE_THREAD``) and writes its log next to its model.
    """
    train = _sibling("train_sd_ietagc")

    if n_parallel == 1:
        for name, flags, _ in jobs:
            print(f"fine-tuning: {name}")
            train.main(train.parse_args(flags))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(ONE_THREAD),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_MININTERVAL": "5"}
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < n_parallel:
            name, flags, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"fine-tuning: {name} (log: {log})")
            running.append((name, log, subprocess.Popen([sys.executable, train.__file__, *flags], env=env,
                                                        stdout=log.open("wb"), stderr=subprocess.STDOUT)))
        time.sleep(1)
        for job in [j for j in running if j[2].poll() is not None]:
            running.remove(job)
            name, log, proc = job
            if proc.returncode != 0:
                for _, _, other in running:
                    other.terminate()
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
                raise SystemExit(f"error: fine-tuning {name} failed (exit {proc.returncode}): {tail[0]} (full log: {log})")


def _score(model: Path, data: Path, sscd, out: Path, size: int, args) -> dict:
    from sd_memfree.scoring import run as scorer

    return scorer.main(scorer.parse_args([
        f"--model={model}", f"--train_data_dir={data}", f"--sscd_model={sscd}", f"--num_prompts={args.num_prompts}",
        f"--num_inference_steps={args.num_inference_steps}", "--guidance_scale=1.0", f"--resolution={size}",
        "--batch_size=64", "--no_clip_score", "--no_fid", f"--pixel_size={size}", f"--out={out}",
        f"--embedding_cache_dir={Path(args.out) / 'cache' / 'embeddings'}",
    ]))


def copy_test(gen_px: np.ndarray, recon_px: np.ndarray, distinct: list[int], duplicated: np.ndarray) -> dict:
    """The pixel copy test ``d1/d2 < 1/3`` of generations against the VAE's reconstructions of the
    distinct training images (``recon_px[j]`` is training row ``distinct[j]``); ``duplicated[g]``
    says whether generation ``g``'s caption repeats in the training set.

    Returns per part (``dup``: generations for duplicated captions, ``uniq``: the others) the copies ``k``
    of ``n`` with the 95% Wilson interval, the distinct training images copied, and per
    generation the nearest training row, the copy flag and ``d1/d2`` (for the report).
    """
    ev = _sibling("memorization_eval")

    near = ev.pixel_nearest(gen_px, recon_px)
    nearest = np.asarray(distinct)[near["nearest"]]
    copy = near["copy"]
    out = {"nearest": nearest, "copy": copy, "ratio": near["d1"] / np.maximum(near["d2"], 1e-12),
           "distinct_copied": int(len(set(nearest[copy].tolist())))}
    for part, mask in (("dup", duplicated), ("uniq", ~duplicated)):
        k, n = int(copy[mask].sum()), int(mask.sum())
        out[part] = {"k": k, "n": n, "interval": ev.wilson_interval(k, n)}
    return out


# What each headline row means, in the order the report shows them.
HEADLINE_ROWS = {
    "dup_copies": "generations for the duplicated captions that copy a training image: pixel test d1/d2 < 1/3 against the VAE's "
                  "reconstructions of the distinct training images [95% Wilson interval]",
    "uniq_copies": "the same for the captions seen once",
    "distinct_copied": "distinct training images copied at least once",
    "copy_test_ceiling": "what a perfect memoriser scores on the same test (the VAE's reconstructions of the training latents, one per "
                         "training row: duplicated | seen once): the test's ceiling",
    "heldout_denoising_loss": "denoising loss on held-out landscapes (fixed noise and timesteps): quality on images never trained on, lower is better",
    "detection_score_mean": "model-only detection score (Wen et al.): mean ||eps(x_t, prompt) - eps(x_t, \"\")|| over the first sampling steps; higher = prompts pull harder",
    "detection_auc": "ROC AUC of the detection score for finding this run's copies (0.5 = chance; n/a when all or none copy)",
    "skip_vs_copy_spearman": "rank correlation between how often training skipped an image (AGC) and how closely the model copies it (pixels)",
    "generations": "generations scored per model (a seeded sample of training rows, the same for both models)",
}
STANDIN_ROWS = ("sscd_sim_95pc", "sscd_sim_mean", "sscd_frac_gt_0.5")


def _rate(part: dict) -> str:
    lo, hi = part["interval"]
    return f"{100 * part['k'] / max(part['n'], 1):.0f}% ({part['k']}/{part['n']}) [{100 * lo:.0f}-{100 * hi:.0f}%]"


def _cell(v, key: str = "") -> str:
    if v is None:
        return "<td>n/a</td>"
    if key in ("dup_copies", "uniq_copies"):  # a newcomer reads "42%" faster than "0.4211"
        return f"<td><b>{html.escape(_rate(v))}</b></td>"
    if key == "copy_test_ceiling":
        return f"<td>{100 * v['dup']['k'] / max(v['dup']['n'], 1):.0f}% | {100 * v['uniq']['k'] / max(v['uniq']['n'], 1):.0f}%</td>"
    return f"<td>{v:.4g}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"


def write_report(path: Path, runs: dict[str, dict], train_imgs, train_caps, headline: dict, settings: dict, max_rows: int = 24,
                 standin_sscd: bool = True, recon: dict | None = None, audit: dict | None = None, curve: dict | None = None) -> Path:
    """One self-contained HTML page comparing the runs (images embedded as data URIs).

    Args:
        runs: name -> {"per_image" (scorer rows), "gen_images", "rows" (the training row of each
            generation's caption), "copies" (``copy_test``)}.
        standin_sscd: the similarity model has random weights: its figures are left out (named as such).
        recon: training row -> the VAE's reconstruction of that image (PIL), what the copy test
            compares a generation with; shown between the generation and the training image.
        audit: ``sd-memfree audit``'s result on the training data (its clusters are shown).
        curve: ``{"plain": plain_curve(...), "plus": final_point(...), "png": curve_png(...)}``.
    """
    from sd_memfree.scoring.report import noise_magnitude_png, png_data_uri

    names = list(runs)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows_shown = [k for k in HEADLINE_ROWS if k in headline[names[0]]] + ([] if standin_sscd else [k for k in STANDIN_ROWS if k in headline[names[0]]])
    table = "".join(
        f'<tr><th title="{html.escape(HEADLINE_ROWS.get(k, k))}">{html.escape(k)}</th>' + "".join(_cell(headline[n].get(k), k) for n in names)
        + f"<td class=\"what\">{html.escape(HEADLINE_ROWS.get(k, 'SSCD similarity (real SSCD file)'))}</td></tr>"
        for k in rows_shown
    )
    hists = "".join(
        f'<figure><figcaption>{html.escape(n)}</figcaption><img class="hist" alt="detection score {html.escape(n)}" src="data:image/png;base64,'
        + base64.b64encode(noise_magnitude_png([r["noise_magnitude"] for r in runs[n]["per_image"]], runs[n]["copies"]["copy"])).decode()
        + '"></figure>'
        for n in names if all(r.get("noise_magnitude") is not None for r in runs[n]["per_image"])
    )
    sscd_note = (
        "<p class=\"note\"><b>SSCD similarity left out:</b> no SSCD file was given, so the scorer used a <i>stand-in</i> with random "
        "weights that rates every pair about 0.99; its numbers carry no information (each run's <code>score/metrics.json</code> still holds them, "
        "computed with <code>cache/standin_sscd.pt</code>). Pass <code>--sscd_model sscd_disc_large</code> on a machine with a network for the real measure.</p>"
        if standin_sscd else ""
    )
    # One row per distinct caption that was generated for (its first generation), duplicated captions first.
    counts = {c: train_caps.count(c) for c in set(train_caps)}
    rows_of = {}  # caption -> its generations (the same rows for every run: one seed)
    for g, row in enumerate(runs[names[0]]["rows"]):
        rows_of.setdefault(train_caps[row], []).append(g)
    order = sorted(rows_of, key=lambda c: (-counts[c], rows_of[c][0]))
    rows = []
    for c in order[:max_rows]:
        g = rows_of[c][0]
        cells = [f"<td class=\"cap\">{html.escape(c)}<br><small>{counts[c]}x in training</small></td>"]
        for n in names:
            r, cp = runs[n], runs[n]["copies"]
            near, copy = int(cp["nearest"][g]), bool(cp["copy"][g])
            nm = r["per_image"][g].get("noise_magnitude")
            sim = "" if standin_sscd else f' &middot; SSCD sim {r["per_image"][g]["similarity"]:.3f}'
            of_all = f" &middot; {int(cp['copy'][rows_of[c]].sum())}/{len(rows_of[c])} of its generations copy" if len(rows_of[c]) > 1 else ""
            cells.append(
                f'<td class="{"copy" if copy else "ok"}"><img alt="{html.escape(n)} generated {g}" src="{png_data_uri(r["gen_images"][g], 96)}">'
                + (f'<img alt="reconstruction of training image {near}" src="{png_data_uri(recon[near], 96)}">' if recon else "")
                + f'<img alt="nearest training image {near}" src="{png_data_uri(train_imgs[near], 96)}"><br>'
                f'd1/d2 {float(cp["ratio"][g]):.2f} {"<b>COPY</b>" if copy else ""}{of_all}'
                + (f" &middot; detection {nm:.3g}" if nm is not None else "") + f"{sim}</td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    audit_html = ""
    if audit:
        c = audit["counts"]
        thumbs = "".join(f'<img alt="cluster {cl["id"]}" title="{cl["size"]} copies" src="{png_data_uri(train_imgs[cl["rows"][0]["index"]], 96)}">'
                         for cl in audit["clusters"])
        audit_html = (f"<h2>Before training: the data audit</h2><p><code>sd-memfree audit</code> found <b>{c['clusters']} duplicate clusters</b> "
                      f"holding {c['rows_in_clusters']} of {c['rows']} rows ({c['exact_clusters']} of exact copies; sizes "
                      f"{', '.join(str(cl['size']) for cl in audit['clusters'])}), {c['shared_captions']} captions shared by distinct images "
                      "and nothing else: exactly the duplicated images (its full report: <code>audit/report.html</code>). They are the "
                      f"monitor's at-risk rows below.</p><p>{thumbs}</p>")
    curve_html = ""
    if curve:
        def pt(p):
            return (f"<tr><td>{html.escape(p.get('name', 'plain'))}</td><td>{p['step']}</td><td>{p['heldout_loss']:.4f}</td>"
                    f"<td>{'-' if p.get('at_risk_loss') is None else format(p['at_risk_loss'], '.4f')}</td><td>{html.escape(_rate(p['dup_copies']))}</td></tr>")
        rows_c = "".join(pt(p) for p in curve["plain"]) + pt({**curve["plus"], "name": "IET-AGC+"})
        curve_html = (
            "<h2>Held-out loss against copies: is IET-AGC+ just training less?</h2><p>Plain fine-tuning at its base and its checkpoints "
            "(the held-out monitor's loss on 64 landscapes never trained on, and on the duplicated rows the audit found), against the "
            "copy rate of its generations for the duplicated captions (same prompts and seeds at every point). If IET-AGC+ merely "
            "trained less, its point would lie on plain's curve; a point below the curve copies less at the same held-out loss.</p>"
            f'<img class="curve" alt="held-out loss against copy rate" src="data:image/png;base64,{base64.b64encode(curve["png"]).decode()}">'
            f"<table><tr><th>run</th><th>step</th><th>held-out loss</th><th>at-risk loss</th><th>copies (duplicated captions)</th></tr>{rows_c}</table>")
    shown = "generated | the VAE's reconstruction of the nearest training image (what the copy test compares with) | that training image" if recon else "generated | nearest training image"
    grid_head = "<tr><th>training caption</th>" + "".join(f"<th>{html.escape(n)}: {shown}</th>" for n in names) + "</tr>"
    doc = (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>sd-memfree demo</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;margin-bottom:1em}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}td img{width:96px;height:96px;image-rendering:pixelated;margin-right:3px}"
        ".copy{background:#fde2e2}.ok{background:#e6f4ea}.cap{max-width:260px;font-size:12px}.hist{width:520px}figure{display:inline-block;margin:0 1em 0 0}"
        ".curve{width:1000px}.what{font-size:12px;color:#555;max-width:420px}.note{background:#fff6d6;padding:6px 10px;border-left:4px solid #e0b000}"
        "</style></head><body><h1>sd-memfree demo: plain fine-tuning vs IET-AGC+</h1>"
        f"<p>Same base model, data, seed and optimizer-step budget. The model is fine-tuned on {settings['data']}, a domain its UNet never saw; "
        "then it is asked for every training caption (so many times for each duplicated one) and we check whether it reproduces "
        "training images.</p>"
        + audit_html
        + f"<h2>What the two runs did</h2><table><tr><th></th>{head}<th>meaning</th></tr>{table}</table>{sscd_note}"
        + curve_html
        + (f"<h2>Detection score per generation (red: copies)</h2>{hists}" if hists else "")
        + f"<h2>Generations for training captions</h2><p>Red cells copy a training image (duplicated captions first).</p><table>{grid_head}{''.join(rows)}</table>"
        f"<h2>Settings</h2><p><code>{html.escape(json.dumps(settings))}</code></p>"
        "</body></html>"
    )
    path.write_text(doc, encoding="utf-8")
    return path


def main(args: argparse.Namespace) -> dict:
    """Run the demo in one thread (``ONE_THREAD``), restoring the caller's thread count after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(ONE_THREAD)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> dict:
    from sd_memfree.scoring.risk import roc_auc
    from sd_memfree.testing.standin import make_standin_sscd
    from sd_memfree.testing.tiny import TinyBaseConfig, make_tiny_dataset, tiny_base_model
    ev = _sibling("memorization_eval")

    t0 = time.time()
    out = Path(args.out)
    cache = out / "cache"
    base_cfg = TinyBaseConfig(**(QUICK_BASE if args.quick else BASE))
    size = base_cfg.size
    print("set-up: the pretrained tiny base model (built once, a few minutes; then cached)")
    base = tiny_base_model(args.cache, base_cfg)
    data = cache / f"landscapes-{args.num_images}-{args.num_duplicated}x{args.duplicate_times}-{size}px"
    if not (data / "metadata.jsonl").exists():
        make_tiny_dataset(data, args.num_images, size, args.num_duplicated / args.num_images, args.duplicate_times, seed=0, kind="landscapes")
    sscd = args.sscd_model or cache / "standin_sscd.pt"  # a real file or known name goes to the scorer as given
    if not args.sscd_model and not sscd.exists():
        make_standin_sscd(sscd, trunk="resnet18", seed=0)
    heldout = cache / f"heldout-{args.heldout_images}-{size}px"
    if not (heldout / "metadata.jsonl").exists():
        make_tiny_dataset(heldout, args.heldout_images, size, seed=0, kind="landscapes", first_index=10_000)
    print("audit: the training data, before training")
    audit = audit_data(data, out / "audit", args.num_duplicated, args.duplicate_times)
    train_imgs, train_caps, _ = ev.read_imagefolder(data)
    counts = {c: train_caps.count(c) for c in set(train_caps)}
    duplicated = np.array([counts[c] > 1 for c in train_caps])
    distinct = sorted({c: i for i, c in reversed(list(enumerate(train_caps)))}.values())  # first row of each caption
    # The VAE is frozen in fine-tuning, so the base's VAE gives every model's references and the ceiling.
    pipe = ev.load_pipeline(base)
    recon_px = ev.vae_reconstructions(pipe, [train_imgs[i] for i in distinct])
    ceiling = copy_test(ev.vae_reconstructions(pipe, train_imgs, sample_seed=CEILING_SEED), recon_px, distinct, duplicated)
    del pipe
    t_setup = time.time() - t0

    t1 = time.time()
    every = curve_every(args.max_train_steps)
    _fine_tune_all([(name, _train_flags(base, data, out / folder / "model", size, args,
                                        [*extra, f"--checkpointing_steps={every}"], heldout, out / "audit" / "audit.json"),
                     out / folder / "train.log")
                    for name, folder, extra in RUNS], min(args.jobs, len(RUNS)))
    t_train = time.time() - t1
    runs, headline = {}, {}
    for name, folder, _ in RUNS:
        run_dir = out / folder
        print(f"scoring: {name}")
        metrics = _score(run_dir / "model", data, sscd, run_dir / "score", size, args)
        per_image = [json.loads(line) for line in (run_dir / "score" / "per_image.jsonl").read_text().splitlines()]
        gen_imgs = ev.read_imagefolder(run_dir / "score" / "generated")[0]  # same order as per_image.jsonl
        rows = np.array([json.loads(line)["train_index"] for line in  # the training row each generation's caption came from
                         (run_dir / "score" / "generated" / "metadata.jsonl").read_text().splitlines() if line.strip()])
        copies = copy_test(ev.to_pixels(gen_imgs, size), recon_px, distinct, duplicated[rows])
        runs[name] = {"per_image": per_image, "gen_images": gen_imgs, "rows": rows, "copies": copies}
        g, nm, tr = metrics["gen_vs_train"], metrics.get("noise_magnitude") or {}, metrics.get("training_risk") or {}
        scores = [r.get("noise_magnitude") for r in per_image]
        headline[name] = {
            "dup_copies": copies["dup"], "uniq_copies": copies["uniq"],
            "distinct_copied": f"{copies['distinct_copied']} / {len(distinct)}",
            "copy_test_ceiling": {"dup": ceiling["dup"], "uniq": ceiling["uniq"]},
            # The run's own held-out monitor, end point: the same quantity as memorization_eval.denoising_loss (tested).
            "heldout_denoising_loss": json.loads((run_dir / "model" / "monitor.json").read_text())["curve"][-1]["heldout_loss"],
            "detection_score_mean": nm.get("mean"),
            "detection_auc": roc_auc(scores, copies["copy"]) if None not in scores else None,
            "skip_vs_copy_spearman": tr.get("spearman_skip_vs_pixel_closeness") if tr else "no AGC, no skips",
            "generations": len(per_image),
            "sscd_sim_95pc": g["sim_95pc"], "sscd_sim_mean": g["mean"], "sscd_frac_gt_0.5": g["frac_gt_0.5"],
        }
    settings = {"base": str(base), "steps": args.max_train_steps, "learning_rate": args.learning_rate, "batch_size": 8, "seed": args.seed,
                "ietagc_plus_flags": IETAGC_PLUS_FLAGS, "sscd": str(args.sscd_model or "stand-in (random ResNet-18)"),
                "data": f"{args.num_images} landscapes, {args.num_duplicated} of them x{args.duplicate_times}",
                "heldout": f"{args.heldout_images} other landscapes"}
    print("curve: plain's checkpoints, copies against held-out loss")
    rows = runs["plain"]["rows"]
    prompts, dup_mask = [train_caps[r] for r in rows], duplicated[rows]
    plain_points = plain_curve(base, out / "plain", every, args.max_train_steps, prompts, dup_mask, recon_px, distinct, size, args)
    plus_point = final_point(base, out / "ietagc_plus" / "model", prompts, dup_mask, recon_px, distinct, size, args)
    plain_logged = json.loads((out / "plain" / "model" / "monitor.json").read_text())["curve"]
    curve = {"plain": plain_points, "plus": plus_point, "png": curve_png(plain_points, plus_point, plain_logged)}
    from PIL import Image

    recon = {row: Image.fromarray((np.clip(recon_px[j], 0, 1) * 255).round().astype(np.uint8)) for j, row in enumerate(distinct)}
    report = write_report(out / "report.html", runs, train_imgs, train_caps, headline, settings, standin_sscd=not args.sscd_model, recon=recon,
                          audit=audit, curve=curve)
    ceil = f"{100 * ceiling['dup']['k'] / max(ceiling['dup']['n'], 1):.0f}%"
    for name, h in headline.items():
        sim = "" if not args.sscd_model else f", SSCD sim_95pc {h['sscd_sim_95pc']:.3f}"
        print(f"{name + ':':<10}{_rate(h['dup_copies'])} of the generations for duplicated captions copy a training image "
              f"(a perfect memoriser: {ceil}); seen-once captions {_rate(h['uniq_copies'])}; {h['distinct_copied']} distinct images copied; "
              f"held-out denoising loss {h['heldout_denoising_loss']:.4f}{sim}")
    for p in plain_points:
        print(f"plain at step {p['step']}: held-out loss {p['heldout_loss']:.4f}, copies {_rate(p['dup_copies'])}")
    print(f"IET-AGC+ at step {plus_point['step']}: held-out loss {plus_point['heldout_loss']:.4f}, copies {_rate(plus_point['dup_copies'])}")
    seconds = time.time() - t0
    print(f"report: {report.resolve()}  (set-up {t_setup:.0f} s, fine-tuning {t_train:.0f} s, total {seconds:.0f} s)")
    return {"report": str(report), "headline": headline, "setup_seconds": t_setup, "train_seconds": t_train, "seconds": seconds,
            "audit": audit["counts"], "curve": {"plain": plain_points, "IET-AGC+": {k: v for k, v in plus_point.items() if k != "curve"}}}


def cli(argv=None) -> None:
    main(parse_args(argv))


if __name__ == "__main__":
    cli()
