"""Exact nearest-neighbour search, chunked so memory stays bounded with 100k+ keys.

Invariants:
- ``topk_search`` is exact: equal to a dense ``scores = q @ keys.T`` followed by ``topk`` (ties
  aside), for any chunk size, including ones that do not divide the number of keys.
- Peak extra memory is one ``[query_chunk, key_chunk]`` score block plus ``[Q, 2k]`` running
  results, never ``[Q, N]``.
- With ``exclude_self`` (queries are the keys), row ``i`` never matches key ``i``: the
  train-vs-train background is "each image against its nearest *other* image".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# 4096 x 16384 float32 = 256 MiB per score block: big enough that the matmul dominates the
# top-k bookkeeping (the benchmark checks the ratio), small enough for any GPU or laptop.
DEFAULT_QUERY_CHUNK = 4096
DEFAULT_KEY_CHUNK = 16384


@dataclass
class TopK:
    """Per-query best matches, best first. ``values``/``indices`` are ``[Q, k]``."""

    values: torch.Tensor
    indices: torch.Tensor

    @property
    def best(self) -> torch.Tensor:
        """``[Q]`` best score of each query."""
        return self.values[:, 0]


def _scores(q: torch.Tensor, keys: torch.Tensor, metric: str, key_sq: torch.Tensor | None) -> torch.Tensor:
    if metric == "dot":
        return q @ keys.T
    # Negated squared L2 so that "larger is closer" for both metrics:
    # -|q - x|^2 = 2 q.x - |q|^2 - |x|^2.
    s = q @ keys.T
    s.mul_(2).sub_((q * q).sum(1, keepdim=True)).sub_(key_sq)
    return s


@torch.no_grad()
def topk_search(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int = 1,
    metric: str = "dot",
    exclude_self: bool = False,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    key_chunk: int = DEFAULT_KEY_CHUNK,
    device: str | torch.device | None = None,
) -> TopK:
    """The ``k`` best keys of every query.

    Args:
        queries: ``[Q, D]``.
        keys: ``[N, D]``; for cosine similarity pass unit-norm rows and ``metric="dot"``.
        metric: ``"dot"`` (larger is more similar) or ``"neg_sq_l2"`` (values are ``-|q - x|^2``).
        exclude_self: queries *are* the keys (same rows, same order); query ``i`` skips key ``i``.
        device: where the blocks are computed (default: the queries' device); results are on CPU.

    Returns:
        ``TopK`` with ``[Q, k]`` values and key indices, best first.
    """
    if metric not in ("dot", "neg_sq_l2"):
        raise ValueError(f"metric must be 'dot' or 'neg_sq_l2', got {metric!r}")
    n = keys.shape[0]
    available = n - 1 if exclude_self else n
    if not 1 <= k <= available:
        raise ValueError(f"k={k} needs at least {k} candidate keys, have {available}.")
    if exclude_self and queries.shape[0] != n:
        raise ValueError("exclude_self needs queries and keys to be the same rows.")
    device = torch.device(device) if device is not None else queries.device
    out_v, out_i = [], []
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0 : q0 + query_chunk].to(device, torch.float32)
        best_v = torch.full((q.shape[0], k), float("-inf"), device=device)
        best_i = torch.full((q.shape[0], k), -1, dtype=torch.long, device=device)
        for k0 in range(0, n, key_chunk):
            x = keys[k0 : k0 + key_chunk].to(device, torch.float32)
            key_sq = (x * x).sum(1)[None] if metric == "neg_sq_l2" else None
            s = _scores(q, x, metric, key_sq)
            if exclude_self:
                # Rows q0.. meet columns k0..: the self pairs lie on one diagonal of this block.
                lo, hi = max(q0, k0), min(q0 + q.shape[0], k0 + x.shape[0])
                if lo < hi:
                    r = torch.arange(lo, hi, device=device)
                    s[r - q0, r - k0] = float("-inf")
            kk = min(k, x.shape[0])
            v, i = s.topk(kk, dim=1)
            # Merge this block's best with the running best: 2k candidates -> k.
            cand_v = torch.cat([best_v, v], 1)
            cand_i = torch.cat([best_i, i + k0], 1)
            best_v, sel = cand_v.topk(k, dim=1)
            best_i = cand_i.gather(1, sel)
        out_v.append(best_v.cpu())
        out_i.append(best_i.cpu())
    return TopK(torch.cat(out_v), torch.cat(out_i))


def max_similarity(queries: torch.Tensor, keys: torch.Tensor, k: int = 1, **kwargs) -> TopK:
    """Cosine similarity search over unit-norm rows: each generation against the training set."""
    return topk_search(queries, keys, k=k, metric="dot", **kwargs)


def background_similarity(keys: torch.Tensor, k: int = 1, **kwargs) -> TopK:
    """Train-vs-train: each training embedding against its nearest *other* training embedding."""
    return topk_search(keys, keys, k=k, metric="dot", exclude_self=True, **kwargs)
