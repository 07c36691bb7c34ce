"""Training-time risk joined to what the model copies: AGC skip counts per training image.

Training writes ``memfree_skip_counts.json`` in its ``output_dir`` (format and writer:
``sd_memfree.run.skipcounts``; local only, never uploaded: it ranks the training images the model
found easiest to memorise). The scorer joins it to the training set it compares against and
reports, for the most copied training images, how often training flagged them, and the Spearman
rank correlation between skip count and copy similarity.

Invariants:
- ``sample_id`` is the row of the training dataset (the training script's sample id); a join
  is made only when the scorer's training set has the same number of rows and the same caption
  (and file name, when both sides know it) on every row, so counts never attach to the wrong image.
- Rank statistics use average ranks for ties; a constant input has no correlation (``None``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

# The file's writer and name live on the training side (training must not import the scorer).
from sd_memfree.run.skipcounts import SKIP_COUNTS_FILE, sample_file_names, write_skip_counts  # noqa: F401  (re-exported)


class SkipCountsError(ValueError):
    """A skip-counts file that cannot be read or does not belong to the scored training set."""


def read_skip_counts(path: str | os.PathLike, captions: Sequence[str], file_names: Sequence[str | None]) -> np.ndarray:
    """Skip count of every row of the scored training set, from a file written by training; -1
    for a row the held-out monitor kept out of training (``"heldout": true``).

    Raises:
        SkipCountsError: unreadable file, or rows that do not match the training set.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data["samples"]
        counts = np.array([int(r["skip_count"]) for r in rows], dtype=np.int64)
        heldout = np.array([bool(r.get("heldout", False)) for r in rows], dtype=bool)
        ids = [int(r["sample_id"]) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SkipCountsError(f"--skip_counts {path} is not a skip-counts file written by training ({type(e).__name__}: {e}).") from None
    if ids != list(range(len(rows))) or len(rows) != len(captions):
        raise SkipCountsError(f"--skip_counts {path} covers {len(rows)} samples but the training set has {len(captions)} rows; pass the data the model was trained on.")
    for i, (r, cap, name) in enumerate(zip(rows, captions, file_names)):
        if r.get("text") != cap or (r.get("file_name") and name and r["file_name"] != name):
            raise SkipCountsError(f"--skip_counts {path} row {i} is {r.get('file_name')!r} / {r.get('text')!r} but the training set's row {i} is {name!r} / {cap!r}; pass the data the model was trained on.")
    if heldout.any():  # never trained on: no skip count to join (risk_table leaves them out)
        counts = np.where(heldout, -1, counts)
    return counts


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their positions: ``[10, 20, 20, 5] -> [2, 3.5, 3.5, 1]``."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson correlation of average ranks); None if either side is constant."""
    ra, rb = average_ranks(np.asarray(a)), average_ranks(np.asarray(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else None


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for ``labels`` (Mann-Whitney U / (n_pos n_neg), ties
    count one half); None when one class is empty."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def risk_table(skip_counts: np.ndarray, copy_similarity: np.ndarray, captions: Sequence[str], n: int = 16,
               pixel_distance: np.ndarray | None = None) -> dict:
    """The join of training-time risk and copies, for ``metrics.json`` and the report.

    Args:
        skip_counts: ``[N]`` whole-run AGC skips per training row; -1 for a held-out row (never
            trained on), which the join leaves out.
        copy_similarity: ``[N]`` per training row, the best SSCD similarity of any generation to it.
        pixel_distance: ``[N]`` per training row, the smallest squared pixel distance of any
            generation to it (optional; smaller is a closer copy).

    Returns:
        ``spearman_skip_vs_similarity``, ``spearman_skip_vs_pixel_closeness`` (closeness = minus the
        distance), totals, and ``most_copied``: the ``n`` training rows with the highest copy
        similarity, each with its skip count and skip-count rank (1 = most skipped).
    """
    skip_counts = np.asarray(skip_counts)
    trained = np.flatnonzero(skip_counts >= 0)  # held-out rows (-1) were never trained on
    counts, similarity = skip_counts[trained], np.asarray(copy_similarity)[trained]
    closeness = -np.asarray(pixel_distance)[trained] if pixel_distance is not None else None
    order = np.argsort(-similarity, kind="stable")[:n]
    skip_rank = len(counts) + 1 - average_ranks(counts)
    rows = [{"train": int(trained[j]), "similarity": float(similarity[j]), "skip_count": int(counts[j]),
             "skip_rank": float(skip_rank[j]), "text": captions[trained[j]],
             **({"pixel_distance": float(pixel_distance[trained[j]])} if pixel_distance is not None else {})} for j in order]
    return {
        "num_train": int(len(counts)),
        "num_heldout": int(len(skip_counts) - len(counts)),
        "total_skips": int(counts.sum()),
        "samples_ever_skipped": int((counts > 0).sum()),
        "spearman_skip_vs_similarity": spearman(counts, similarity),
        "spearman_skip_vs_pixel_closeness": spearman(counts, closeness) if closeness is not None else None,
        "most_copied": rows,
    }
