"""The embedded demo: plain fine-tuning copies training images, IET-AGC+ copies fewer. On a CPU.

    sd-memfree demo --out demo_out

1. Set-up (once, cached): the pretrained tiny base model (``sd_memfree.testing.tiny.tiny_base_model``:
   a VAE trained on shapes and landscapes, a UNet pretrained on shapes) and a stand-in SSCD.
2. A small captioned set of landscapes (a domain the base never generated) in which some images
   and captions repeat many times, like LAION's duplicates.
3. The real training script fine-tunes the base twice with the same seed and step budget: plain,
   and with IET-AGC+ (shard proxies, merges, AGC, redistribution, loss-aware augmentation).
4. The real scorer generates one image per training caption for each model and scores it,
   recording the model-only detection score (Wen et al.) of every generation; beside it we
   measure the held-out denoising loss (quality on landscapes never trained on).
5. One ``report.html`` that leads with what carries information offline: pixel copies, the
   detection score, the held-out denoising loss, training's skip counts; then per caption, what
   each model generates next to its nearest training image. The terminal prints the headline.

The copy test ``d1/d2 < 1/3`` is in pixel space. Without ``--sscd_model`` (a real SSCD file) the
similarity model is a stand-in with random weights: its figures carry no information, so the
report leaves them out and says so.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import time
from pathlib import Path

HELDOUT_IMAGES = 32  # held-out landscapes (indices 10000+) for the denoising loss
IETAGC_PLUS_FLAGS = ["--num_shards=4", "--merge_every=10", "--agc_ratio=1.25", "--redistribute_fraction=0.25", "--loss_aware_augmentation"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sd-memfree demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output folder (report.html, models, generations)")
    p.add_argument("--cache", default=None, help="where the base model is cached (default $SD_MEMFREE_CACHE or ~/.cache/sd_memfree)")
    p.add_argument("--max_train_steps", type=int, default=600, help="optimizer steps of each fine-tune (same for both)")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--num_images", type=int, default=4, help="distinct training images")
    p.add_argument("--duplicate_times", type=int, default=16, help="copies of each duplicated image (a quarter of them)")
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--sscd_model", default=None, help="an SSCD TorchScript file or known name (fetched on first use); default: a stand-in with random weights, whose figures the report leaves out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a quickly built base and tiny step counts (tests)")
    args = p.parse_args(argv)
    if args.max_train_steps < 1 or args.num_images < 2 or args.duplicate_times < 1:
        p.error("--max_train_steps >= 1, --num_images >= 2 and --duplicate_times >= 1 are required.")
    return args


def _fine_tune(base: Path, data: Path, out: Path, args, extra: list[str]) -> dict:
    if __package__:  # imported: sd_memfree.recipes.* when installed, train_scripts.* in a checkout
        from . import train_sd_ietagc as train
    else:  # run as a file (python train_scripts/demo.py): its folder is sys.path[0]
        import train_sd_ietagc as train

    return train.main(train.parse_args([
        f"--pretrained_model_name_or_path={base}", f"--train_data_dir={data}", f"--output_dir={out}",
        "--resolution=32", "--train_batch_size=8", f"--max_train_steps={args.max_train_steps}",
        f"--learning_rate={args.learning_rate}", "--lr_scheduler=constant", "--lr_warmup_steps=0",
        f"--seed={args.seed}", "--report_to=tensorboard", f"--checkpointing_steps={10**9}", *extra,
    ]))


def _score(model: Path, data: Path, sscd: Path, out: Path, num_rows: int, args) -> dict:
    from sd_memfree.scoring import run as scorer

    return scorer.main(scorer.parse_args([
        f"--model={model}", f"--train_data_dir={data}", f"--sscd_model={sscd}", f"--num_prompts={num_rows}",
        f"--num_inference_steps={args.num_inference_steps}", "--guidance_scale=1.0", "--resolution=32",
        "--batch_size=64", "--no_clip_score", "--no_fid", "--pixel_size=32", f"--out={out}",
        f"--embedding_cache_dir={Path(args.out) / 'cache' / 'embeddings'}",
    ]))


# What each headline row means, in the order the report shows them (informative offline first).
HEADLINE_ROWS = {
    "copy_frac": "fraction of generations that copy a training image (pixel test: nearest distinct training image 3x closer than the second)",
    "distinct_copied": "distinct training images copied at least once",
    "detection_score_mean": "model-only detection score (Wen et al.): mean ||eps(x_t, prompt) - eps(x_t, \"\")|| over the first sampling steps; higher = prompts pull harder",
    "detection_auc": "ROC AUC of the detection score for finding this run's pixel copies (0.5 = chance; n/a when all or none copy)",
    "heldout_denoising_loss": "denoising loss on held-out landscapes (fixed noise and timesteps): quality on images never trained on, lower is better",
    "skip_vs_copy_spearman": "rank correlation between how often training skipped an image (AGC) and how closely the model copies it (pixels)",
    "generations": "generations scored (one per training caption)",
}
STANDIN_ROWS = ("sscd_sim_95pc", "sscd_sim_mean", "sscd_frac_gt_0.5")


def _cell(v, key: str = "") -> str:
    if v is None:
        return "<td>n/a</td>"
    if key == "copy_frac":  # a newcomer reads "42%" faster than "0.4211"
        return f"<td><b>{100 * v:.0f}%</b></td>"
    return f"<td>{v:.4g}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"


def write_report(path: Path, runs: dict[str, dict], train_imgs, train_caps, headline: dict, settings: dict, max_rows: int = 24,
                 standin_sscd: bool = True) -> Path:
    """One self-contained HTML page comparing the runs (images embedded as data URIs).

    Args:
        runs: name -> {"metrics", "gen_images", "per_image" (scorer rows), "pixel" (pixel_nearest)}.
        standin_sscd: the similarity model has random weights: its figures are left out (named as such).
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
        + base64.b64encode(noise_magnitude_png([r["noise_magnitude"] for r in runs[n]["per_image"]], runs[n]["pixel"]["copy"])).decode()
        + '"></figure>'
        for n in names if all(r.get("noise_magnitude") is not None for r in runs[n]["per_image"])
    )
    sscd_note = (
        "<p class=\"note\"><b>SSCD similarity left out:</b> no SSCD file was given, so the scorer used a <i>stand-in</i> with random "
        "weights that rates every pair about 0.99; its numbers carry no information (each run's <code>score/metrics.json</code> still holds them, "
        "computed with <code>cache/standin_sscd.pt</code>). Pass <code>--sscd_model sscd_disc_large</code> on a machine with a network for the real measure.</p>"
        if standin_sscd else ""
    )
    # One row per distinct training caption (first generation of it), duplicated captions first.
    seen, order = set(), []
    counts = {c: train_caps.count(c) for c in set(train_caps)}
    first = runs[names[0]]["per_image"]
    for g, row in sorted(enumerate(first), key=lambda gr: -counts.get(gr[1]["text"], 1)):
        if row["text"] not in seen:
            seen.add(row["text"])
            order.append(g)
    rows = []
    for g in order[:max_rows]:
        cells = [f"<td class=\"cap\">{html.escape(first[g]['text'])}<br><small>{counts.get(first[g]['text'], 1)}x in training</small></td>"]
        for n in names:
            r = runs[n]
            near = int(r["pixel"]["nearest"][g])
            copy = bool(r["pixel"]["copy"][g])
            ratio = float(r["pixel"]["d1"][g] / max(r["pixel"]["d2"][g], 1e-12))
            nm = r["per_image"][g].get("noise_magnitude")
            sim = "" if standin_sscd else f' &middot; SSCD sim {r["per_image"][g]["similarity"]:.3f}'
            cells.append(
                f'<td class="{"copy" if copy else "ok"}"><img alt="{html.escape(n)} generated {g}" src="{png_data_uri(r["gen_images"][g], 96)}">'
                f'<img alt="nearest training image {near}" src="{png_data_uri(train_imgs[near], 96)}"><br>'
                f'd1/d2 {ratio:.2f} {"<b>COPY</b>" if copy else ""}'
                + (f" &middot; detection {nm:.3g}" if nm is not None else "") + f"{sim}</td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    grid_head = "<tr><th>training caption</th>" + "".join(f"<th>{html.escape(n)}: generated | nearest training image</th>" for n in names) + "</tr>"
    doc = (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>sd-memfree demo</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;margin-bottom:1em}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}td img{width:96px;height:96px;image-rendering:pixelated;margin-right:3px}"
        ".copy{background:#fde2e2}.ok{background:#e6f4ea}.cap{max-width:260px;font-size:12px}.hist{width:520px}figure{display:inline-block;margin:0 1em 0 0}"
        ".what{font-size:12px;color:#555;max-width:420px}.note{background:#fff6d6;padding:6px 10px;border-left:4px solid #e0b000}"
        "</style></head><body><h1>sd-memfree demo: plain fine-tuning vs IET-AGC+</h1>"
        "<p>Same base model, data, seed and optimizer-step budget. The model is trained on a few landscapes, one of them repeated many "
        "times with its caption (like LAION's duplicates); then it is asked for every training caption and we check whether it "
        "reproduces training images.</p>"
        f"<h2>What the two runs did</h2><table><tr><th></th>{head}<th>meaning</th></tr>{table}</table>{sscd_note}"
        + (f"<h2>Detection score per generation (red: pixel copies)</h2>{hists}" if hists else "")
        + f"<h2>Generations for training captions</h2><p>Red cells copy a training image.</p><table>{grid_head}{''.join(rows)}</table>"
        f"<h2>Settings</h2><p><code>{html.escape(json.dumps(settings))}</code></p>"
        "</body></html>"
    )
    path.write_text(doc, encoding="utf-8")
    return path


def main(args: argparse.Namespace) -> dict:
    from sd_memfree.testing.standin import make_standin_sscd
    from sd_memfree.testing.tiny import TinyBaseConfig, make_tiny_dataset, tiny_base_model
    if __package__:  # imported: sd_memfree.recipes.* when installed, train_scripts.* in a checkout
        from . import memorization_eval as ev
    else:  # run as a file (python train_scripts/demo.py): its folder is sys.path[0]
        import memorization_eval as ev

    t0 = time.time()
    out = Path(args.out)
    cache = out / "cache"
    base_cfg = TinyBaseConfig(vae_steps=20, unet_steps=20, vae_images=64, unet_images=64) if args.quick else TinyBaseConfig()
    print("set-up: the pretrained tiny base model (built once, a few minutes; then cached)")
    base = tiny_base_model(args.cache, base_cfg)
    data = cache / f"landscapes-{args.num_images}-x{args.duplicate_times}"
    if not (data / "metadata.jsonl").exists():
        make_tiny_dataset(data, args.num_images, base_cfg.size, duplicate_fraction=0.25, duplicate_times=args.duplicate_times, seed=0, kind="landscapes")
    sscd = args.sscd_model or cache / "standin_sscd.pt"  # a real file or known name goes to the scorer as given
    if not args.sscd_model and not sscd.exists():
        make_standin_sscd(sscd, trunk="resnet18", seed=0)
    heldout = cache / f"heldout-{HELDOUT_IMAGES}"
    if not (heldout / "metadata.jsonl").exists():
        make_tiny_dataset(heldout, HELDOUT_IMAGES, base_cfg.size, seed=0, kind="landscapes", first_index=10_000)
    train_imgs, train_caps, _ = ev.read_imagefolder(data)
    held_imgs, held_caps, _ = ev.read_imagefolder(heldout)
    train_px = ev.to_pixels(train_imgs, base_cfg.size)
    t_setup = time.time() - t0

    runs, headline = {}, {}
    for name, extra in (("plain", []), ("IET-AGC+", IETAGC_PLUS_FLAGS)):
        run_dir = out / ("plain" if name == "plain" else "ietagc_plus")
        print(f"fine-tuning: {name} ({args.max_train_steps} steps)")
        _fine_tune(base, data, run_dir / "model", args, extra)
        print(f"scoring: {name}")
        metrics = _score(run_dir / "model", data, sscd, run_dir / "score", len(train_caps), args)
        per_image = [json.loads(line) for line in (run_dir / "score" / "per_image.jsonl").read_text().splitlines()]
        gen_imgs = ev.read_imagefolder(run_dir / "score" / "generated")[0]  # same order as per_image.jsonl
        pixel = ev.pixel_nearest(ev.to_pixels(gen_imgs, base_cfg.size), train_px)
        runs[name] = {"metrics": metrics, "per_image": per_image, "gen_images": gen_imgs, "pixel": pixel}
        g, nm, tr = metrics["gen_vs_train"], metrics.get("noise_magnitude") or {}, metrics.get("training_risk") or {}
        headline[name] = {
            "copy_frac": pixel["copy_frac"], "distinct_copied": f"{pixel['distinct_copied']} / {pixel['distinct_train']}",
            "detection_score_mean": nm.get("mean"), "detection_auc": nm.get("auc_vs_pixel_copy"),
            "heldout_denoising_loss": ev.denoising_loss(run_dir / "model", held_imgs, held_caps),
            "skip_vs_copy_spearman": tr.get("spearman_skip_vs_pixel_closeness") if tr else "no AGC, no skips",
            "generations": len(per_image),
            "sscd_sim_95pc": g["sim_95pc"], "sscd_sim_mean": g["mean"], "sscd_frac_gt_0.5": g["frac_gt_0.5"],
        }
    settings = {"base": str(base), "steps": args.max_train_steps, "learning_rate": args.learning_rate, "seed": args.seed,
                "ietagc_plus_flags": IETAGC_PLUS_FLAGS, "sscd": str(args.sscd_model or "stand-in (random ResNet-18)"),
                "data": f"{args.num_images} landscapes, a quarter of them x{args.duplicate_times}"}
    report = write_report(out / "report.html", runs, train_imgs, train_caps, headline, settings, standin_sscd=not args.sscd_model)
    for name, h in headline.items():
        sim = "" if not args.sscd_model else f", SSCD sim_95pc {h['sscd_sim_95pc']:.3f}"
        print(f"{name + ':':<10}{100 * h['copy_frac']:.1f}% of generations copy a training image ({h['distinct_copied']} distinct images), "
              f"held-out denoising loss {h['heldout_denoising_loss']:.4f}, detection score {h['detection_score_mean'] or float('nan'):.3g}{sim}")
    print(f"report: {report.resolve()}  (set-up {t_setup:.0f} s, total {time.time() - t0:.0f} s)")
    return {"report": str(report), "headline": headline, "setup_seconds": t_setup, "seconds": time.time() - t0}


def cli(argv=None) -> None:
    main(parse_args(argv))


if __name__ == "__main__":
    cli()
