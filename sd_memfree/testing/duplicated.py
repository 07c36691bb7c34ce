"""A captioned image set with known duplicates and known distinct lookalikes, to measure the audit.

``make_duplicated_dataset`` writes an imagefolder of distinct originals (procedural shapes and
landscapes, ``sd_memfree.testing.tiny``) plus, for disjoint groups of originals:

- ``exact``: the same file again; ``jpeg``: re-encoded as JPEG quality 75; ``resized``: scaled to
  0.6x; ``crop``: 2 pixels cut off the left and top edges: duplicates the audit must find;
- ``other_object``: a new pair of images on one shared background (the same colour and
  gradient), each with its own shape, colour and place; ``moved``: a new pair showing the same
  shape in the same colour on one background, at places a quarter of the image apart: distinct
  pictures that look alike, which the audit must keep apart.

Returns the truth: each row's ``source`` (rows of one source are duplicates of each other, and
only they) and ``kind``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DUPLICATE_KINDS = ("exact", "jpeg", "resized", "crop")
LOOKALIKE_KINDS = ("other_object", "moved")


def _background(seed: int, size: int) -> tuple[Image.Image, np.random.Generator]:
    from sd_memfree.testing.tiny import _COLORS

    rng = np.random.default_rng([seed, 99])
    base = np.array(list(_COLORS.values())[rng.integers(len(_COLORS))], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    grad = rng.uniform(-40, 40, size=(2, 3)).astype(np.float32)
    pixels = base + xx[..., None] * grad[0] + yy[..., None] * grad[1] + rng.normal(0, 6, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB"), rng


def _with_shape(bg: Image.Image, shape: str, color, box) -> Image.Image:
    from sd_memfree.testing.tiny import _draw_shape

    img = bg.copy()
    _draw_shape(ImageDraw.Draw(img), shape, box, color, img.size[0])
    return img


def lookalike_pair(kind: str, seed: int, size: int) -> list[Image.Image]:
    """Two distinct pictures that share a background (see the module docstring)."""
    from sd_memfree.testing.tiny import _COLORS, _SHAPES

    bg, rng = _background(seed, size)
    colors = list(_COLORS.values())
    extent = int(size * 0.4)
    if kind == "other_object":
        out = []
        for _ in range(2):
            x0, y0 = (int(v) for v in rng.integers(0, size - extent, size=2))
            out.append(_with_shape(bg, _SHAPES[rng.integers(len(_SHAPES))], colors[rng.integers(len(colors))], (x0, y0, x0 + extent, y0 + extent)))
        return out
    if kind == "moved":
        shape, color = _SHAPES[rng.integers(len(_SHAPES))], colors[rng.integers(len(colors))]
        y0 = int(rng.integers(0, size - extent))
        x0 = int(rng.integers(0, size - extent - size // 4))
        return [_with_shape(bg, shape, color, (x, y0, x + extent, y0 + extent)) for x in (x0, x0 + size // 4)]
    raise ValueError(f"unknown lookalike kind {kind!r}")


def duplicate_of(image: Image.Image, kind: str) -> tuple[Image.Image | bytes, str]:
    """``(image or encoded bytes, file suffix)`` of one duplicate kind."""
    w, h = image.size
    if kind == "exact":
        return image, ".png"
    if kind == "jpeg":
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=75)
        return buf.getvalue(), ".jpg"
    if kind == "resized":
        return image.resize((int(w * 0.6), int(h * 0.6)), Image.BICUBIC), ".png"
    if kind == "crop":
        return image.crop((2, 2, w, h)), ".png"
    raise ValueError(f"unknown duplicate kind {kind!r}")


def make_duplicated_dataset(out_dir: str | os.PathLike, num_originals: int = 80, per_kind: int = 8, size: int = 128, seed: int = 0) -> dict:
    """Write the set (imagefolder: images + ``metadata.jsonl``) and return its truth.

    Returns:
        ``{"rows": [{"file_name", "source", "kind"}], "num_originals"}`` in ``metadata.jsonl``
        order; ``kind`` is ``original``, a duplicate kind or a lookalike kind.
    """
    from sd_memfree.testing.tiny import make_tiny_image, make_tiny_landscape

    if num_originals < per_kind * len(DUPLICATE_KINDS):
        raise ValueError(f"num_originals={num_originals} must be >= per_kind x {len(DUPLICATE_KINDS)} duplicate kinds.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, meta = [], []

    def add(name: str, image, caption: str, source: int, kind: str) -> None:
        if isinstance(image, bytes):
            (out / name).write_bytes(image)
        else:
            image.save(out / name)
        rows.append({"file_name": name, "source": source, "kind": kind})
        meta.append({"file_name": name, "text": caption})

    originals = []
    for i in range(num_originals):
        make = make_tiny_image if i % 2 == 0 else make_tiny_landscape
        image, caption = make(i, size=size, seed=seed)
        originals.append((image, caption))
        add(f"orig_{i:04d}.png", image, caption, i, "original")
    for k, kind in enumerate(DUPLICATE_KINDS):
        for i in range(k * per_kind, (k + 1) * per_kind):
            image, suffix = duplicate_of(originals[i][0], kind)
            add(f"dup_{kind}_{i:04d}{suffix}", image, originals[i][1], i, kind)
    source = num_originals
    for kind in LOOKALIKE_KINDS:
        for p in range(per_kind):
            for j, image in enumerate(lookalike_pair(kind, seed * 1000 + p + (500 if kind == "moved" else 0), size)):
                add(f"look_{kind}_{p:03d}_{j}.png", image, f"a {kind.replace('_', ' ')} lookalike, pair {p}, picture {j}", source, kind)
                source += 1
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        for m in meta:
            f.write(json.dumps(m) + "\n")
    return {"rows": rows, "num_originals": num_originals}


def pair_scores(truth: dict, clusters: list[dict]) -> dict:
    """Per kind, how the audit's clusters match the truth.

    Duplicate kinds: ``recall`` = fraction of (original, duplicate) pairs in one cluster.
    Lookalike kinds: ``false_links`` = pairs put in one cluster (should be 0).
    ``precision``: of all row pairs that share a cluster, the fraction that share a source.
    """
    cluster_of = {}
    for c in clusters:
        for r in c["rows"]:
            cluster_of[r["index"]] = c["id"]
    rows = truth["rows"]
    first = {}
    for i, r in enumerate(rows):
        first.setdefault(r["source"], i)
    out: dict = {}
    for kind in DUPLICATE_KINDS:
        pairs = [(first[r["source"]], i) for i, r in enumerate(rows) if r["kind"] == kind]
        hit = sum(a in cluster_of and cluster_of.get(a) == cluster_of.get(b) for a, b in pairs)
        out[kind] = {"pairs": len(pairs), "found": hit, "recall": hit / len(pairs) if pairs else None}
    for kind in LOOKALIKE_KINDS:
        idx = [i for i, r in enumerate(rows) if r["kind"] == kind]
        pairs = list(zip(idx[0::2], idx[1::2]))
        bad = sum(a in cluster_of and cluster_of.get(a) == cluster_of.get(b) for a, b in pairs)
        out[kind] = {"pairs": len(pairs), "false_links": bad}
    linked = true = 0
    for c in clusters:
        ids = [r["index"] for r in c["rows"]]
        for x in range(len(ids)):
            for y in range(x + 1, len(ids)):
                linked += 1
                true += rows[ids[x]]["source"] == rows[ids[y]]["source"]
    out["precision"] = true / linked if linked else None
    out["linked_pairs"] = linked
    return out
