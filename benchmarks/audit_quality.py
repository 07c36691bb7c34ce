"""The data audit's precision and recall per kind of duplicate, and FAISS's recall against the exact search.

    python benchmarks/audit_quality.py [--size 128 --num_originals 80 --per_kind 8] [--faiss_rows 20000]

1. ``sd_memfree.testing.duplicated``: distinct originals (shapes and landscapes) plus exact,
   JPEG q75, 0.6x-resized and 2-pixel-cropped copies, and pairs of distinct lookalikes (another
   object on the same background; the same object moved). The audit runs on it twice: the cheap
   pass alone (``--no_sscd``), and the semantic pass alone with the thumbnail copy-detector SSCD stand-in
   (the real SSCD cannot be downloaded here). Per kind: recall of duplicates, false links of
   lookalikes, overall pair precision; and the margins: the largest thumbnail RMS / phash
   distance of a duplicate against the smallest of a lookalike or any two distinct originals.
2. FAISS (when installed): unit vectors with planted near-copies, pairs at cosine >= 0.5 by
   FAISS's IVF range search against the exact chunked search; recall and both timings.

The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def margins(folder: Path, truth: dict) -> dict:
    from PIL import Image

    from sd_memfree import duplicates

    fps = [duplicates.fingerprint(Image.open(folder / r["file_name"])) for r in truth["rows"]]
    rows = truth["rows"]
    first = {}
    for i, r in enumerate(rows):
        first.setdefault(r["source"], i)

    def dist(a, b):
        return float(np.sqrt(np.mean((fps[a].thumb - fps[b].thumb) ** 2))), int((fps[a].phash != fps[b].phash).sum())

    out = {}
    for kind in ("jpeg", "resized", "crop"):
        d = [dist(first[r["source"]], i) for i, r in enumerate(rows) if r["kind"] == kind]
        out[kind] = {"max_thumb_rms": max(x[0] for x in d), "max_hash_distance": max(x[1] for x in d)}
    for kind in ("other_object", "moved"):
        idx = [i for i, r in enumerate(rows) if r["kind"] == kind]
        d = [dist(a, b) for a, b in zip(idx[0::2], idx[1::2])]
        out[kind] = {"min_thumb_rms": min(x[0] for x in d), "min_hash_distance": min(x[1] for x in d)}
    orig = [i for i, r in enumerate(rows) if r["kind"] == "original"]
    d = [dist(a, b) for x, a in enumerate(orig) for b in orig[x + 1:]]
    out["distinct_originals"] = {"min_thumb_rms": min(x[0] for x in d), "min_hash_distance": min(x[1] for x in d)}
    return out


def faiss_vs_exact(n: int, dim: int = 256, planted: int = 500, seed: int = 0) -> dict:
    from sd_memfree import audit, duplicates

    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    src = torch.randint(0, n, (planted,), generator=g)
    x[n - planted:] = torch.nn.functional.normalize(x[src] + 0.5 * torch.randn(planted, dim, generator=g) / dim ** 0.5, dim=1)
    t0 = time.perf_counter()
    exact = {(int(a), int(b)) for i, j, _ in duplicates.threshold_pairs(x, 0.5) for a, b in zip(i, j)}
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    approx = {(min(int(a), int(b)), max(int(a), int(b))) for i, j, _ in audit._faiss_pairs(x, 0.5) for a, b in zip(i, j)}
    t_faiss = time.perf_counter() - t0
    linked: dict[int, set[int]] = {}
    for a, b in approx:
        linked.setdefault(a, set()).add(b)
        linked.setdefault(b, set()).add(a)
    sampled, rows = audit.faiss_recall(x, 0.5, linked)
    return {"rows": n, "dim": dim, "exact_pairs": len(exact), "faiss_pairs": len(approx & exact),
            "recall_all_pairs": len(approx & exact) / max(1, len(exact)), "recall_sampled_as_audit_reports": sampled,
            "sampled_rows": rows, "exact_seconds": round(t_exact, 2), "faiss_seconds": round(t_faiss, 2)}


def main() -> None:
    from sd_memfree import audit
    from sd_memfree.testing.duplicated import make_duplicated_dataset, pair_scores
    from sd_memfree.testing.standin import make_copy_detector_sscd

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--num_originals", type=int, default=80)
    p.add_argument("--per_kind", type=int, default=8)
    p.add_argument("--faiss_rows", type=int, default=20000, help="0 skips the FAISS comparison")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp())
    truth = make_duplicated_dataset(work / "data", a.num_originals, a.per_kind, a.size)
    sscd = make_copy_detector_sscd(work / "pooled.pt")
    result = {"size": a.size, "rows": len(truth["rows"]), "margins": margins(work / "data", truth)}
    for name, extra in (("hash_pass", ["--no_sscd"]),
                        ("sscd_pass_pooled_pixel_standin", [f"--sscd_model={sscd}", "--thumb_rms=0", "--hash_distance=0", "--threshold=0.95",
                                                            f"--embedding_cache_dir={work / 'cache'}"])):
        r = audit.main(audit.parse_args([f"--train_data_dir={work / 'data'}", f"--out={work / name}", *extra]))
        result[name] = pair_scores(truth, r["clusters"])
        print(name, json.dumps(result[name]))
    print("margins", json.dumps(result["margins"]))
    if a.faiss_rows:
        try:
            import faiss  # noqa: F401
            result["faiss"] = faiss_vs_exact(a.faiss_rows)
        except ImportError:
            result["faiss"] = "not installed (pip install 'sd-memfree[faiss]')"
        print("faiss", json.dumps(result["faiss"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
