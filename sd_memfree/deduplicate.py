"""Write a deduplicated copy of a training set: an imagefolder the training scripts train on.

Invariants:
- The copy keeps every row outside the audit's clusters and the first ``max_copies`` rows (by
  row index) of each cluster, in the original row order; its ``metadata.jsonl`` has one row per
  kept image, ``{"file_name", "text"}`` (``text`` is the caption cell as it was, a string or a
  list), so ``--train_data_dir OUT`` trains with the scripts' default ``--caption_column``.
- Images are hard links to the originals where the file system allows (no extra space, bytes
  unchanged); otherwise copies; images held inside a dataset (no file) are written as PNG.
- Nothing is written into a folder that already holds files, nor into the training data's own folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence


def check_target(out: str | os.PathLike, source: str | None) -> None:
    """Refuse a target that would mix with or overwrite data, before any work (one line)."""
    from sd_memfree.audit import AuditError

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AuditError(f"--write_deduplicated {out} already exists and is not an empty folder; pass a new folder.")
    if source and Path(source).expanduser().exists() and out.resolve() == Path(source).expanduser().resolve():
        raise AuditError(f"--write_deduplicated {out} is the training data's own folder; pass a new folder.")


def kept_rows(num_rows: int, clusters: Sequence[dict], max_copies: int) -> list[int]:
    """Rows kept: all rows not in a cluster, and the ``max_copies`` lowest of each cluster."""
    dropped = set()
    for c in clusters:
        rows = sorted(r["index"] for r in c["rows"])
        dropped.update(rows[max_copies:])
    return [i for i in range(num_rows) if i not in dropped]


def _place(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "link"
    except OSError:  # another file system, or links not allowed: the bytes still must match
        shutil.copy2(src, dst)
        return "copy"


def write_deduplicated(dataset, image_column: str, caption_column: str, paths: Sequence[str | None], clusters: Sequence[dict],
                       out: str | os.PathLike, max_copies: int) -> dict:
    """Write the kept rows of ``dataset`` to ``out`` (see the module's invariants).

    Returns:
        ``{"path", "max_copies", "rows_kept", "rows_dropped", "hard_links", "copies", "written"}``.
    """
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    keep = kept_rows(len(dataset), clusters, max_copies)
    captions = dataset[caption_column]
    used: set[str] = set()
    how = {"link": 0, "copy": 0, "written": 0}
    with open(out / "metadata.jsonl.partial", "w", encoding="utf-8") as meta:
        for i in keep:
            src = Path(paths[i]) if paths[i] else None
            name = src.name if src else f"{i:08d}.png"
            if name in used:  # two source folders may hold the same file name
                name = f"{i:08d}_{name}"
            used.add(name)
            if src is not None and src.is_file():
                how[_place(src, out / name)] += 1
            else:
                dataset[i][image_column].convert("RGB").save(out / name)
                how["written"] += 1
            meta.write(json.dumps({"file_name": name, "text": captions[i]}) + "\n")
    os.replace(out / "metadata.jsonl.partial", out / "metadata.jsonl")  # last: a half-written copy has no metadata
    return {"path": str(out), "max_copies": max_copies, "rows_kept": len(keep), "rows_dropped": len(dataset) - len(keep),
            "hard_links": how["link"], "copies": how["copy"], "written": how["written"]}
