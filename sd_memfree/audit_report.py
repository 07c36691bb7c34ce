"""The audit's ``report.html``: each duplicate cluster as a row of thumbnails, largest first.

Invariants:
- Self-contained like the scorer's report (``scoring.report``): every thumbnail is a base64
  ``data:`` URI, so the file can be moved or mailed alone. It shows training images: keep it
  local, as the scorer's report.
- At most ``MAX_CLUSTERS`` clusters and ``MAX_THUMBS`` thumbnails per cluster are drawn (the
  counts say how many more there are); ``audit.json`` lists every row.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Callable

MAX_CLUSTERS = 200
MAX_THUMBS = 16
THUMB = 96


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


def _figure(r: dict, image, extra: str = "") -> str:
    from sd_memfree.scoring.report import png_data_uri

    facts = [f"#{r['index']}"] + [f"{k} {_num(r[k])}" for k in ("similarity", "thumb_rms", "hash_distance") if k in r]
    return (f'<figure><img alt="row {r["index"]}" src="{png_data_uri(image, THUMB)}"><figcaption>{html.escape(r["file_name"])}<br>'
            f'{html.escape(" · ".join(facts))}{extra}<br><i>{html.escape(r["caption"][:80])}</i></figcaption></figure>')


def write_html(path: str | Path, result: dict, image_of: Callable[[int], object]) -> Path:
    """Write the report for ``result`` (``audit.json``'s content); ``image_of(row)`` gives a PIL image."""
    c = result["counts"]
    passes = result["passes"]
    sscd = passes.get("sscd")
    rows = [("rows", c["rows"]), ("duplicate clusters", c["clusters"]), ("rows in clusters", c["rows_in_clusters"]),
            ("rows beyond the first of each cluster", c["rows_beyond_first"]), ("exact-copy clusters", c["exact_clusters"]),
            ("captions shared by several distinct images", c["shared_captions"]),
            ("images under several captions", c["images_with_several_captions"])]
    summary = "".join(f"<tr><th>{html.escape(k)}</th><td>{_num(v)}</td></tr>" for k, v in rows)
    near = passes["near"]
    how = (f"<p>Linked when the pixels are identical (<b>exact</b>), when the 8x8 colour thumbnails differ by at most "
           f"{near['thumb_rms']:g} RMS <i>and</i> the 64-bit perceptual hashes by at most {near['hash_distance']} bits (<b>near</b>)"
           + (f", or when the SSCD similarity is at least {sscd['threshold']:g} (<b>sscd</b>, model <code>{html.escape(Path(sscd['model']).name)}</code>)." if sscd else ".")
           + "</p>")
    note = (f'<p class="note"><b>{html.escape(passes["sscd_skipped"])}</b>: semantic near-duplicates (heavier edits, other crops) are not searched; '
            "run again without <code>--no_sscd</code> for them.</p>") if passes.get("sscd_skipped") else ""
    search = result.get("search", {})
    if search.get("method") == "faiss-ivf":
        r = search.get("recall_vs_exact")
        note += (f'<p class="note">SSCD search by FAISS (approximate): recall against the exact search '
                 f'{"n/a" if r is None else f"{r:.4f}"} on {search["recall_sample_rows"]} sampled rows.</p>')
    sections = []
    for cl in result["clusters"][:MAX_CLUSTERS]:
        figs = "".join(_figure(r, image_of(r["index"])) for r in cl["rows"][:MAX_THUMBS])
        more = f'<p class="more">... and {cl["size"] - MAX_THUMBS} more rows (audit.json lists them)</p>' if cl["size"] > MAX_THUMBS else ""
        sections.append(f'<div class="cluster"><h3>cluster {cl["id"]}: {cl["size"]} rows, {cl["kind"]} '
                        f'(links: {html.escape(", ".join(cl["links"]))}; {cl["num_captions"]} caption(s))</h3><div class="row">{figs}</div>{more}</div>')
    if len(result["clusters"]) > MAX_CLUSTERS:
        sections.append(f"<p>... and {len(result['clusters']) - MAX_CLUSTERS} smaller clusters (audit.json lists them).</p>")
    caps = []
    for s in result["shared_captions"][:MAX_CLUSTERS]:
        figs = "".join(_figure({"index": r["index"], "file_name": r["file_name"], "caption": ""}, image_of(r["index"]))
                       for r in s["rows"][:MAX_THUMBS])
        caps.append(f'<div class="cluster"><h3>{html.escape(s["caption"][:120])}: {s["size"]} rows, {s["num_images"]} distinct images</h3><div class="row">{figs}</div></div>')
    doc = (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>sd-memfree data audit</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;margin-bottom:1em}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}.row{display:flex;flex-wrap:wrap;gap:8px}"
        f"figure{{margin:0;width:{THUMB + 24}px}}figure img{{width:{THUMB}px;height:{THUMB}px;object-fit:contain;background:#eee;image-rendering:pixelated}}"
        "figcaption{font-size:11px;word-break:break-all}.cluster{border-top:1px solid #ddd;padding:4px 0}.note{background:#fff6d6;padding:6px 10px;border-left:4px solid #e0b000}"
        ".more{font-size:12px;color:#555}</style></head><body><h1>Data audit</h1>"
        f"<p>Data: <code>{html.escape(str(result.get('data', {}).get('dataset', '')))}</code>. Duplicated training images are what "
        "diffusion models copy: keep few copies of each (<code>--write_deduplicated OUT --max_copies 1</code>), or train with IET-AGC+.</p>"
        f"<table>{summary}</table>{how}{note}"
        f"<h2>Duplicate clusters, largest first</h2>{''.join(sections) or '<p>None found.</p>'}"
        f"<h2>Captions shared by several distinct images</h2>{''.join(caps) or '<p>None found.</p>'}"
        "</body></html>"
    )
    path = Path(path)
    path.write_text(doc, encoding="utf-8")
    return path
