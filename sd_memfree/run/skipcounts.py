"""The training run's per-sample AGC skip counts file, ``memfree_skip_counts.json`` in ``output_dir``.

Training writes it (``write_run_skip_counts``) and the scorer reads it (``scoring.risk``), so the
writer lives on the training side and the scorer imports the format from here, never the other way.

File format (version 1)::

    {"version": 1, "num_samples": N, "samples": [{"sample_id": i, "skip_count": c,
      "file_name": "00003.png" | null, "text": "caption"[, "heldout": true]}, ...]}

Invariants:
- Local only, never uploaded: it ranks the training images the model found easiest to memorise.
- ``sample_id`` is the row of the data as the user gave it (loaded and checked); each row carries
  its caption (as ``data.caption_text`` reads it) and file name, so a reader can check it joins
  the right images. Rows the held-out monitor kept out of training (``--heldout_fraction``) are
  listed too, with ``"heldout": true`` and a count of 0: they were never trained on, so a reader
  leaves them out of any skip statistic.
- The file is replaced in one rename: a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

SKIP_COUNTS_FILE = "memfree_skip_counts.json"


def sample_file_names(dataset, image_column: str) -> list[str | None]:
    """Base file names of a ``datasets`` image column without decoding images (None if unknown)."""
    try:
        from datasets import Image as ImageFeature

        paths = dataset.cast_column(image_column, ImageFeature(decode=False))[image_column]
        return [os.path.basename(p["path"]) if isinstance(p, dict) and p.get("path") else None for p in paths]
    except Exception:  # an in-memory or non-image column: no names to record
        return [None] * len(dataset)


def write_skip_counts(path: str | os.PathLike, counts: Sequence[int], captions: Sequence[str], file_names: Sequence[str | None],
                      heldout: Sequence[bool] | None = None) -> Path:
    """Write the whole-run per-sample skip counts (atomically: temp file + rename); ``heldout``
    marks rows kept out of training."""
    heldout = list(heldout) if heldout is not None else [False] * len(counts)
    if not len(counts) == len(captions) == len(file_names) == len(heldout):
        raise ValueError(f"{len(counts)} counts, {len(captions)} captions, {len(file_names)} file names and {len(heldout)} held-out "
                         "flags: one each per sample.")
    path = Path(path)
    rows = [{"sample_id": i, "skip_count": int(c), "file_name": f, "text": t, **({"heldout": True} if h else {})}
            for i, (c, t, f, h) in enumerate(zip(counts, captions, file_names, heldout))]
    from ..safeio import replace_file

    return replace_file(path, json.dumps({"version": 1, "num_samples": len(rows), "samples": rows}, indent=1))  # never through a link


def write_run_skip_counts(output_dir: str | os.PathLike, counts: Sequence[int], dataset, image_column: str, caption_column: str,
                          train_rows: Sequence[int] | None = None) -> Path:
    """Write ``output_dir/memfree_skip_counts.json`` with one row per row of ``dataset``.

    Args:
        counts: skips per training sample id.
        dataset: the data as loaded and checked (what the scorer will be given).
        train_rows: training sample id -> row of ``dataset`` when some rows were held out of
            training (the monitor's split); None when every row trained, in order.
    """
    from ..data import caption_text

    n = len(dataset)
    rows = list(range(n)) if train_rows is None else list(train_rows)
    if len(rows) != len(counts):
        raise ValueError(f"{len(counts)} skip counts for {len(rows)} training rows.")
    full, trained = [0] * n, [False] * n
    for sample_id, row in enumerate(rows):
        full[row], trained[row] = int(counts[sample_id]), True
    return write_skip_counts(Path(output_dir) / SKIP_COUNTS_FILE, full, [caption_text(c) for c in dataset[caption_column]],
                             sample_file_names(dataset, image_column), heldout=[not t for t in trained])
