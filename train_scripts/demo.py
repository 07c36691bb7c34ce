"""The embedded demo: plain fine-tuning copies training images, IET-AGC+ copies fewer. On a CPU.

    sd-memfree demo --out demo_out

1. Set-up (once, cached): the pretrained tiny base model (``sd_memfree.tiny.tiny_base_model``:
   a VAE trained on shapes and landscapes, a UNet pretrained on shapes) and a stand-in SSCD.
2. A small captioned set of landscapes (a domain the base never generated) in which some images
   and captions repeat many times, like LAION's duplicates.
3. The real training script fine-tunes the base twice with the same seed and step budget: plain,
   and with IET-AGC+ (shard proxies, merges, AGC, redistribution, loss-aware augmentation).
4. The real scorer generates one image per training caption for each model and scores it.
5. One ``report.html``: per caption, what each model generates next to its nearest training image
   with the scores; the similarity histograms; the metric table. The terminal prints the headline.

The similarity model is a stand-in (seeded random ResNet-18 with SSCD's interface) unless
``--sscd_model`` names a real SSCD file; the copy test ``d1/d2 < 1/3`` is in pixel space.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import time
from pathlib import Path

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
    p.add_argument("--sscd_model", default=None, help="an SSCD TorchScript file; default: a stand-in built offline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a quickly built base and tiny step counts (tests)")
    args = p.parse_args(argv)
    if args.max_train_steps < 1 or args.num_images < 2 or args.duplicate_times < 1:
        p.error("--max_train_steps >= 1, --num_images >= 2 and --duplicate_times >= 1 are required.")
    return args


def _fine_tune(base: Path, data: Path, out: Path, args, extra: list[str]) -> dict:
    from train_scripts import train_sd_ietagc as train

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


def write_report(path: Path, runs: dict[str, dict], train_imgs, train_caps, headline: dict, settings: dict, max_rows: int = 24) -> Path:
    """One self-contained HTML page comparing the runs (images embedded as data URIs).

    Args:
        runs: name -> {"metrics", "gen_images", "per_image" (scorer rows), "pixel" (pixel_nearest)}.
    """
    import torch

    from sd_memfree.scoring.report import histogram_png, png_data_uri

    names = list(runs)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    table = "".join(
        f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{headline[n][k]:.4g}</td>" if isinstance(headline[n][k], float) else f"<td>{headline[n][k]}</td>" for n in names) + "</tr>"
        for k in headline[names[0]]
    )
    hists = "".join(
        f'<figure><figcaption>{html.escape(n)}</figcaption><img class="hist" alt="histogram {html.escape(n)}" src="data:image/png;base64,'
        + base64.b64encode(histogram_png(torch.tensor([r["similarity"] for r in runs[n]["per_image"]]), None, runs[n]["metrics"]["threshold"])).decode()
        + '"></figure>'
        for n in names
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
            cells.append(
                f'<td class="{"copy" if copy else "ok"}"><img alt="{html.escape(n)} generated {g}" src="{png_data_uri(r["gen_images"][g], 96)}">'
                f'<img alt="nearest training image {near}" src="{png_data_uri(train_imgs[near], 96)}"><br>'
                f'SSCD sim {r["per_image"][g]["similarity"]:.3f} &middot; d1/d2 {ratio:.2f} {"<b>COPY</b>" if copy else ""}</td>'
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    grid_head = "<tr><th>training caption</th>" + "".join(f"<th>{html.escape(n)}: generated | nearest training image</th>" for n in names) + "</tr>"
    doc = (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>sd-memfree demo</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;margin-bottom:1em}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}td img{width:96px;height:96px;image-rendering:pixelated;margin-right:3px}"
        ".copy{background:#fde2e2}.ok{background:#e6f4ea}.cap{max-width:260px;font-size:12px}.hist{width:520px}figure{display:inline-block;margin:0 1em 0 0}"
        "</style></head><body><h1>sd-memfree demo: plain fine-tuning vs IET-AGC+</h1>"
        f"<p>Same base model, data, seed and optimizer-step budget. Settings: <code>{html.escape(json.dumps(settings))}</code></p>"
        f"<h2>Metrics</h2><table><tr><th></th>{head}</tr>{table}</table>"
        "<p>copy_frac: generations whose nearest distinct training image is 3x closer (squared L2, pixels) than the second nearest. "
        "SSCD similarity: max cosine similarity to the training set (a stand-in model unless stated in the settings).</p>"
        f"<h2>Similarity histograms (generated vs train)</h2>{hists}"
        f"<h2>Generations for training captions</h2><table>{grid_head}{''.join(rows)}</table>"
        "</body></html>"
    )
    path.write_text(doc, encoding="utf-8")
    return path


def main(args: argparse.Namespace) -> dict:
    from sd_memfree.scoring.standin import make_standin_sscd
    from sd_memfree.tiny import TinyBaseConfig, make_tiny_dataset, tiny_base_model
    from train_scripts import memorization_eval as ev

    t0 = time.time()
    out = Path(args.out)
    cache = out / "cache"
    base_cfg = TinyBaseConfig(vae_steps=20, unet_steps=20, vae_images=64, unet_images=64) if args.quick else TinyBaseConfig()
    print("set-up: the pretrained tiny base model (built once, a few minutes; then cached)")
    base = tiny_base_model(args.cache, base_cfg)
    data = cache / f"landscapes-{args.num_images}-x{args.duplicate_times}"
    if not (data / "metadata.jsonl").exists():
        make_tiny_dataset(data, args.num_images, base_cfg.size, duplicate_fraction=0.25, duplicate_times=args.duplicate_times, seed=0, kind="landscapes")
    sscd = Path(args.sscd_model) if args.sscd_model else cache / "standin_sscd.pt"
    if not sscd.exists():
        make_standin_sscd(sscd, trunk="resnet18", seed=0)
    train_imgs, train_caps, _ = ev.read_imagefolder(data)
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
        g = metrics["gen_vs_train"]
        headline[name] = {
            "copy_frac": pixel["copy_frac"], "distinct_copied": f"{pixel['distinct_copied']} / {pixel['distinct_train']}",
            "sscd_sim_95pc": g["sim_95pc"], "sscd_sim_mean": g["mean"], "sscd_frac_gt_0.5": g["frac_gt_0.5"],
            "generations": len(per_image),
        }
    settings = {"base": str(base), "steps": args.max_train_steps, "learning_rate": args.learning_rate, "seed": args.seed,
                "ietagc_plus_flags": IETAGC_PLUS_FLAGS, "sscd": str(args.sscd_model or "stand-in (random ResNet-18)"),
                "data": f"{args.num_images} landscapes, a quarter of them x{args.duplicate_times}"}
    report = write_report(out / "report.html", runs, train_imgs, train_caps, headline, settings)
    p, q = headline["plain"], headline["IET-AGC+"]
    print(f"\nplain:    {100 * p['copy_frac']:.1f}% of generations copy a training image ({p['distinct_copied']} distinct images), SSCD sim_95pc {p['sscd_sim_95pc']:.3f}")
    print(f"IET-AGC+: {100 * q['copy_frac']:.1f}% of generations copy a training image ({q['distinct_copied']} distinct images), SSCD sim_95pc {q['sscd_sim_95pc']:.3f}")
    print(f"report: {report.resolve()}  (set-up {t_setup:.0f} s, total {time.time() - t0:.0f} s)")
    return {"report": str(report), "headline": headline, "setup_seconds": t_setup, "seconds": time.time() - t0}


def cli(argv=None) -> None:
    main(parse_args(argv))


if __name__ == "__main__":
    cli()
