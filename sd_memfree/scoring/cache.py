"""On-disk cache of training-set embeddings, so scoring the same data again does not re-embed it.

Invariants:
- The key is a hash of (SSCD model file SHA-256, preprocessing name, dataset fingerprint, image
  column, number of rows): any change to the model bytes, the preprocessing or the data gives a
  new key, never a stale hit.
- Writes are atomic (temporary file + rename), so an interrupted run leaves no half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch


def dataset_fingerprint(dataset) -> str:
    """``datasets``' own fingerprint (it changes with the data files and every transform)."""
    fp = getattr(dataset, "_fingerprint", None)
    if fp is None:
        raise ValueError("the dataset has no fingerprint; pass a datasets.Dataset.")
    return str(fp)


def cache_key(model_sha256: str, preprocess: str, fingerprint: str, image_column: str, num_rows: int) -> str:
    """A short, filesystem-safe key of everything the embeddings depend on."""
    blob = json.dumps([model_sha256, preprocess, fingerprint, image_column, num_rows])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class EmbeddingCache:
    """A folder of ``<key>.pt`` files holding ``[N, D]`` float32 embeddings."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def get_or_compute(self, key: str, compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """Load the entry for ``key`` or compute and store it.

        Returns:
            ``(embeddings, hit)``: ``hit`` is True when nothing was computed.
        """
        path = self.path(key)
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True), True
        emb = compute()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(emb.contiguous(), tmp)
        os.replace(tmp, path)
        return emb, False
