"""Finding duplicated training images: fingerprints, an exact chunked threshold search, clusters.

The data audit (``sd_memfree.audit``) links two rows when any of three tests says they show the
same picture, and reports the connected components ("clusters"):

1. *exact*: the decoded pixels are identical (SHA-256 of size + RGB bytes), whatever the file format;
2. *near* (the cheap pass): an 8x8 colour thumbnail within ``thumb_rms`` (root-mean-square
   difference, pixels in [0, 1]) **and** the 64-bit perceptual hash of ``imagehash.phash``
   within ``hash_distance`` bits. The thumbnail sees colour and layout and survives JPEG
   re-encoding, resizing and a crop of a few pixels; the phash sees structure inside the
   thumbnail's cells (measured on generated images: a 2-pixel crop of a 128 px image moves the
   phash up to 22 bits, two distinct images can share it exactly, so neither test alone works);
3. *sscd* (the semantic pass): SSCD descriptors' cosine similarity >= a threshold.

Invariants:
- ``threshold_pairs`` is exact: it yields every pair ``i < j`` whose score passes the threshold,
  once, for any chunk size; its peak extra memory is one ``[chunk, chunk]`` score block (plus the
  pairs of that block), never ``[N, N]``.
- ``Clusters`` is a union-find: the clusters are the connected components of all links added,
  independent of the order in which links arrive; singletons are not clusters.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

THUMB_SIDE = 8  # 8x8 RGB = 192 values: colour and layout, blind to re-encoding noise
HASH_BITS = 64  # imagehash.phash(hash_size=8)
# Calibrated on generated 128 px images (benchmarks/audit_quality.py): JPEG q75, a 0.6x resize and
# a 2-pixel crop stay at or under 0.025 RMS and 14 bits; distinct lookalikes start at 0.10 RMS,
# distinct originals at 0.13 (but may be only 10 bits apart, hence the thumbnail decides).
DEFAULT_THUMB_RMS = 0.04
DEFAULT_HASH_DISTANCE = 24  # a structure check on top of the thumbnail, loose enough for crops
DEFAULT_CHUNK = 4096  # 4096 x 4096 float32 = 64 MiB per score block


@dataclass
class Fingerprint:
    """What the cheap passes know about one image."""

    pixel_sha: str  # exact: size and RGB bytes
    phash: np.ndarray  # [64] bool
    thumb: np.ndarray  # [192] float32 in [0, 1]


def fingerprint(image) -> Fingerprint:
    """Exact-pixel digest, perceptual hash and colour thumbnail of a PIL image."""
    import imagehash
    from PIL import Image

    rgb = image.convert("RGB")
    sha = hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
    bits = imagehash.phash(rgb, hash_size=8).hash.reshape(-1).astype(bool)
    thumb = np.asarray(rgb.resize((THUMB_SIDE, THUMB_SIDE), Image.BOX), dtype=np.float32).reshape(-1) / 255.0
    return Fingerprint(sha, bits, thumb)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise distance of matching rows of two ``[P, 64]`` bool arrays."""
    return (a != b).sum(axis=1)


def threshold_pairs(x: torch.Tensor, threshold: float, metric: str = "dot", chunk: int = DEFAULT_CHUNK,
                    device: str | torch.device | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every pair ``i < j`` of rows of ``x`` whose score passes ``threshold``, block by block.

    Args:
        x: ``[N, D]``; unit-norm rows for cosine similarity.
        threshold: ``metric="dot"``: keep ``x_i . x_j >= threshold``; ``metric="sq_l2"``: keep
            ``|x_i - x_j|^2 <= threshold``.
        chunk: rows per block side.

    Yields:
        ``(i, j, score)`` int64 / int64 / float32 arrays of one block's pairs (``i < j``).
    """
    if metric not in ("dot", "sq_l2"):
        raise ValueError(f"metric must be 'dot' or 'sq_l2', got {metric!r}")
    device = torch.device(device) if device is not None else x.device
    n = x.shape[0]
    sq = (x.float() * x.float()).sum(1) if metric == "sq_l2" else None
    for q0 in range(0, n, chunk):
        q = x[q0 : q0 + chunk].to(device, torch.float32)
        for k0 in range(q0, n, chunk):  # the upper triangle of blocks only: each pair once
            k = x[k0 : k0 + chunk].to(device, torch.float32)
            s = q @ k.T
            if metric == "sq_l2":
                # |q - k|^2 = |q|^2 + |k|^2 - 2 q.k; clamped: round-off can make a copy's slightly negative.
                s = (sq[q0 : q0 + len(q), None].to(device) + sq[None, k0 : k0 + len(k)].to(device) - 2 * s).clamp_min_(0)
                hit = s <= threshold
            else:
                hit = s >= threshold
            if k0 == q0:
                hit = torch.triu(hit, diagonal=1)
            qi, ki = hit.nonzero(as_tuple=True)
            if len(qi):
                yield (qi + q0).cpu().numpy(), (ki + k0).cpu().numpy(), s[qi, ki].float().cpu().numpy()


class Clusters:
    """Union-find over ``n`` rows; each link records its kind and score on both rows.

    Per row it keeps the best link of each kind seen (highest SSCD similarity, smallest thumbnail
    distance / hash distance), which is what the report shows next to a thumbnail.
    """

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)
        self.kinds: list[set[str]] = [set() for _ in range(n)]
        self.best_sscd = np.full(n, np.nan, dtype=np.float32)
        self.best_thumb = np.full(n, np.nan, dtype=np.float32)
        self.best_hash = np.full(n, -1, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression keeps later finds O(1)-ish
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def link(self, i: np.ndarray, j: np.ndarray, kind: str, sscd: np.ndarray | None = None,
             thumb: np.ndarray | None = None, hash_distance: np.ndarray | None = None) -> None:
        """Join rows ``i[p]`` and ``j[p]`` for every p (a link of ``kind``: exact, near or sscd)."""
        for p, (a, b) in enumerate(zip(i.tolist(), j.tolist())):
            ra, rb = self.find(a), self.find(b)
            if ra != rb:
                self.parent[max(ra, rb)] = min(ra, rb)  # the smallest row is the root: deterministic ids
            for r in (a, b):
                self.kinds[r].add(kind)
                if sscd is not None and not self.best_sscd[r] >= sscd[p]:
                    self.best_sscd[r] = sscd[p]
                if thumb is not None and not self.best_thumb[r] <= thumb[p]:
                    self.best_thumb[r] = thumb[p]
                if hash_distance is not None and (self.best_hash[r] < 0 or hash_distance[p] < self.best_hash[r]):
                    self.best_hash[r] = hash_distance[p]

    def groups(self) -> list[list[int]]:
        """Components with at least two rows, largest first (ties: by first row); rows ascending."""
        roots = np.array([self.find(i) for i in range(len(self.parent))])
        order = np.argsort(roots, kind="stable")
        bounds = np.flatnonzero(np.diff(roots[order])) + 1
        groups = [g.tolist() for g in np.split(order, bounds) if len(g) > 1]
        return sorted(groups, key=lambda g: (-len(g), g[0]))


def group_equal(keys: list) -> list[list[int]]:
    """Rows sharing a key, as lists of >= 2 rows, largest first (ties: by first row)."""
    by: dict = {}
    for i, k in enumerate(keys):
        by.setdefault(k, []).append(i)
    return sorted((g for g in by.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def caption_key(caption: str) -> str:
    """Captions compare equal after trimming and collapsing whitespace and ignoring case: a
    trailing space or a capital letter does not make a caption another one."""
    return " ".join(str(caption).split()).casefold()
