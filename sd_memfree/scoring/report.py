"""Scorer outputs: ``metrics.json``, a self-contained ``report.html`` and a model-card snippet.

Invariants:
- ``report.html`` has no external references: the histogram and every thumbnail are base64
  ``data:`` URIs, so the folder (or the file alone) can be moved, mailed or opened offline.
- ``metrics.json`` is plain JSON (floats, ints, strings, lists, dicts), the same numbers as the
  HTML table and the snippet.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..safeio import replace_file

THUMB = 192


def png_data_uri(image: Image.Image, size: int = THUMB) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URI, fit into ``size`` x ``size``."""
    im = image.convert("RGB")
    im.thumbnail((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def histogram_png(gen_sim: torch.Tensor, train_sim: torch.Tensor | None, threshold: float) -> bytes:
    """Histogram of gen-vs-train against the train-vs-train background, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    bins = torch.linspace(-0.2, 1.0, 61).numpy()
    ax.hist(gen_sim.clamp(-0.2, 1.0).numpy(), bins=bins, alpha=0.6, density=True, label=f"generated vs train (n={gen_sim.numel()})")
    if train_sim is not None:
        ax.hist(train_sim.clamp(-0.2, 1.0).numpy(), bins=bins, alpha=0.6, density=True, label=f"train vs train (n={train_sim.numel()})")
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("max SSCD cosine similarity to the training set")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _png_bytes(fig)


def _png_bytes(fig) -> bytes:
    """Lay out ``fig``, render it as PNG bytes and close it (matplotlib keeps open figures alive)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def noise_magnitude_png(magnitudes, copies) -> bytes:
    """Histogram of the detection score, split into pixel copies and the rest when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(magnitudes, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    bins = np.linspace(m.min(), m.max() + 1e-9, 31)
    if copies is not None and 0 < int(np.sum(copies)) < len(m):
        c = np.asarray(copies, dtype=bool)
        ax.hist(m[~c], bins=bins, alpha=0.6, color="tab:green", label=f"not a pixel copy (n={int((~c).sum())})")
        ax.hist(m[c], bins=bins, alpha=0.6, color="tab:red", label=f"pixel copy (n={int(c.sum())})")
    else:  # one colour, named by what every generation is (the demo's caption says red = copies)
        all_copies = copies is not None and int(np.sum(copies)) == len(m)
        ax.hist(m, bins=bins, alpha=0.7, color="tab:red" if all_copies else "tab:green",
                label=f"generations (n={len(m)}{', all pixel copies' if all_copies else ', no pixel copy' if copies is not None else ''})")
    ax.set_xlabel("||eps(x_t, prompt) - eps(x_t, '')||, mean of the first sampling steps")
    ax.set_ylabel("generations")
    ax.legend(fontsize=8)
    return _png_bytes(fig)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def _table(rows: dict) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in rows.items())
    return f"<table>{body}</table>"


def write_html(
    path: str | Path,
    metrics: dict,
    gen_sim: torch.Tensor,
    train_sim: torch.Tensor | None,
    pairs: Sequence[dict],
    pair_images: Sequence[tuple[Image.Image, Image.Image]],
    magnitudes: Sequence[float] | None = None,
    copies=None,
    risk_images: Sequence[Image.Image] = (),
) -> Path:
    """Write ``report.html``: metric tables, the histograms, the most similar pairs with scores,
    the detection score and the training skip counts of the most copied images.

    Args:
        pairs: ``top_matches`` rows (plus ``prompt``), most similar first.
        pair_images: ``(generated, training)`` PIL images, one per row of ``pairs``.
        magnitudes: per-generation detection scores (``metrics["noise_magnitude"]`` summarises them).
        copies: per-generation pixel copy flags, to split the detection-score histogram.
        risk_images: the training images of ``metrics["training_risk"]["most_copied"]``, in order.
    """
    hist = base64.b64encode(histogram_png(gen_sim, train_sim, metrics["threshold"])).decode()
    sections = []
    nm = metrics.get("noise_magnitude")
    if nm:
        auc = nm.get("auc_vs_pixel_copy")
        sections += [
            "<h2>Detection score (model only, Wen et al. ICLR 2024)</h2>"
            "<p>Per generation, the size of the text-conditional noise prediction "
            "<code>||eps(x_t, prompt) - eps(x_t, \"\")||</code> averaged over the first sampling steps: memorized prompts "
            "pull much harder than the rest. It needs no similarity model. "
            + (f"ROC AUC for finding the pixel copies of this run: <b>{auc:.3f}</b> (0.5 = chance)." if auc is not None else "")
            + "</p>",
            _table({k: v for k, v in nm.items() if v is not None}),
        ]
        if magnitudes is not None:
            sections.append(f'<img class="hist" alt="detection score histogram" src="data:image/png;base64,{base64.b64encode(noise_magnitude_png(magnitudes, copies)).decode()}">')
    sections += [f"<h2>Generated vs training (SSCD, preprocess <code>{html.escape(metrics['preprocess'])}</code>)</h2>", _table(metrics["gen_vs_train"])]
    if metrics.get("train_vs_train"):
        sections += ["<h2>Background: train vs train (nearest other image)</h2>", _table(metrics["train_vs_train"])]
    quality = {k: metrics[k] for k in ("clip_score", "fid") if metrics.get(k) is not None}
    if quality:
        sections += ["<h2>Quality</h2>", _table(quality)]
    if metrics.get("pixel"):
        sections += ["<h2>Pixel space</h2>", _table(metrics["pixel"])]
    sections.append(f'<h2>Similarity histogram</h2><img class="hist" alt="similarity histogram" src="data:image/png;base64,{hist}">')
    cells = []
    for p, (g, t) in zip(pairs, pair_images):
        cells.append(
            '<figure class="pair">'
            f'<div><img alt="generated {p["generated"]}" src="{png_data_uri(g)}"><img alt="training {p["train"]}" src="{png_data_uri(t)}"></div>'
            f'<figcaption><b>{p["similarity"]:.3f}</b> generated #{p["generated"]} vs training #{p["train"]}<br>'
            f'{html.escape(p.get("prompt", ""))}</figcaption></figure>'
        )
    sections.append(f"<h2>Most similar pairs (generated | training)</h2><div class=\"grid\">{''.join(cells)}</div>")
    tr = metrics.get("training_risk")
    if tr:
        def rho(v):
            return "n/a (constant)" if v is None else f"{v:+.3f}"

        rows = "".join(
            f'<tr><td><img alt="training {r["train"]}" src="{png_data_uri(im, 96)}"></td><td>#{r["train"]}</td><td>{r["similarity"]:.3f}</td>'
            + (f'<td>{r["pixel_distance"]:.4g}</td>' if "pixel_distance" in r else "")
            + f'<td><b>{r["skip_count"]}</b></td><td>{r["skip_rank"]:g} / {tr["num_train"]}</td><td>{html.escape(r["text"])}</td></tr>'
            for r, im in zip(tr["most_copied"], risk_images)
        )
        has_px = bool(tr["most_copied"]) and "pixel_distance" in tr["most_copied"][0]
        sections.append(
            "<h2>Training-time risk: how often training flagged the most copied images</h2>"
            f"<p>AGC skip counts from <code>{html.escape(Path(tr['skip_counts_file']).name)}</code> (written by training, kept local): "
            f"{tr['samples_ever_skipped']} of {tr['num_train']} training images were skipped at least once, {tr['total_skips']} skips in all. "
            f"Spearman rank correlation of skip count with copy similarity (SSCD): <b>{rho(tr['spearman_skip_vs_similarity'])}</b>"
            + (f", with pixel closeness: <b>{rho(tr['spearman_skip_vs_pixel_closeness'])}</b>" if has_px else "")
            + ".</p><table><tr><th>training image</th><th>row</th><th>best SSCD sim of any generation</th>"
            + ("<th>nearest generation, squared pixel L2</th>" if has_px else "")
            + "<th>skip count</th><th>skip rank</th><th>caption</th></tr>" + rows + "</table>"
        )
    sections += ["<h2>Run</h2>", _table(metrics["run"])]
    doc = (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>sd-memfree memorization report</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin-bottom:1em}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}.grid{display:flex;flex-wrap:wrap;gap:12px}"
        f".pair{{margin:0;width:{2 * THUMB + 8}px}}.pair img{{width:{THUMB}px;height:{THUMB}px;object-fit:contain;background:#eee;margin-right:4px}}"
        "figcaption{font-size:12px}</style></head><body><h1>Memorization report</h1>"
        + "".join(sections)
        + "</body></html>"
    )
    return replace_file(path, doc)


def write_metrics_json(path: str | Path, metrics: dict) -> Path:
    return replace_file(path, json.dumps(metrics, indent=2, sort_keys=False) + "\n")


def model_card_snippet(metrics: dict) -> str:
    """Markdown the training script's model card can include verbatim."""
    g = metrics["gen_vs_train"]
    t = metrics.get("train_vs_train") or {}
    frac = next(k for k in g if k.startswith("frac_gt_"))
    lines = [
        "## Memorization",
        "",
        f"Measured with sd-memfree's scorer: {g['count']} generations from training captions (seed {metrics['run']['seed']}), "
        f"SSCD `{Path(metrics['run']['sscd_model']).name}` with `{metrics['preprocess']}` preprocessing; similarity is the max cosine "
        "similarity of a generation to any training image.",
        "",
        "| metric | generated vs train | train vs train |",
        "|---|---|---|",
    ]
    for key in ("mean", "sim_75pc", "sim_90pc", "sim_95pc", frac):
        other = f"{t[key]:.4f}" if key in t else "-"
        lines.append(f"| {key} | {g[key]:.4f} | {other} |")
    if metrics.get("clip_score") is not None:
        lines.append(f"| CLIP score ({metrics['run']['clip_model']}) | {metrics['clip_score']:.4f} | - |")
    if metrics.get("fid") is not None:
        lines.append(f"| FID vs training images | {metrics['fid']:.2f} | - |")
    lines += ["", "`sim_95pc` is the headline similarity score (lower is less memorization).", ""]
    return "\n".join(lines)
