"""How much disk a folder takes, for the log lines that report checkpoint sizes (docs/design.md,
"Checkpoint size"): a K-proxy full fine-tune writes several times upstream's checkpoint, and a
user should see that number when it is written, not when the disk fills."""

from __future__ import annotations

import os
from pathlib import Path


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the regular files under ``folder`` (symbolic links not followed; 0 if it is gone)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                total += path.stat().st_size
    return total


def human_bytes(n: int) -> str:
    """``n`` bytes in decimal units as disk tools print them: 512 B, 1.5 kB, 37.8 GB."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
