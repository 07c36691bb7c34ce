"""Exact nearest-neighbour search, chunked so memory stays bounded with 100k+ keys.

Invariants:
- ``topk_search`` is exact: equal to a dense ``scores = q @ keys.T`` followed by ``topk`` (ties
  aside), for any chunk size, including ones that do not divide the number of keys.
- Peak extra memory is one ``[query_chunk, key_chunk]`` score block plus ``[Q, 2k]`` running
  results, never ``[Q, N]``.
- With ``exclude_self`` (queries are the keys), row ``i`` never matches key ``i``: the
  train-vs-train background is "each image against its nearest *other* image".
- ``neg_sq_l2`` values are exact: blocks rank candidates with the fast ``2 q.x - |q|^2 - |x|^2``
  (float32 round-off of about 1e-6 of ``|q|^2``: +-5e-4 for 3072 pixels), then the kept
  candidates' distances are recomputed as ``sum((q - x)^2)`` in float64, so an exact copy is at
  distance 0.0 on every CPU, and a ranking error can only come from keys within round-off of the
  k-th best (a margin of extra candidates is kept for them).
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


def _exact_l2(q: torch.Tensor, keys: torch.Tensor, cand: torch.Tensor, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute ``-|q - x|^2`` of each query's candidate keys directly, in float64; keep the best ``k``.

    One candidate column at a time, so the extra memory is one ``[Q, D]`` block.
    """
    q = q.to(device, torch.float64)
    exact = torch.empty(cand.shape, dtype=torch.float64, device=device)
    for j in range(cand.shape[1]):
        x = keys[cand[:, j].to(keys.device)].to(device, torch.float64)
        exact[:, j] = -(q - x).square().sum(1)
    # -inf candidates (excluded self pairs that were never replaced) cannot occur: m <= available.
    v, sel = exact.topk(k, dim=1)
    return v.float(), cand.gather(1, sel)


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
    # L2 keeps extra candidates whose exact distances are recomputed at the end (see invariants).
    m = min(available, 2 * k + 8) if metric == "neg_sq_l2" else k
    out_v, out_i = [], []
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0 : q0 + query_chunk].to(device, torch.float32)
        best_v = torch.full((q.shape[0], m), float("-inf"), device=device)
        best_i = torch.full((q.shape[0], m), -1, dtype=torch.long, device=device)
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
            kk = min(m, x.shape[0])
            v, i = s.topk(kk, dim=1)
            # Merge this block's best with the running best: 2m candidates -> m.
            cand_v = torch.cat([best_v, v], 1)
            cand_i = torch.cat([best_i, i + k0], 1)
            best_v, sel = cand_v.topk(m, dim=1)
            best_i = cand_i.gather(1, sel)
        if metric == "neg_sq_l2":
            best_v, best_i = _exact_l2(queries[q0 : q0 + query_chunk], keys, best_i, k, device)
        out_v.append(best_v.cpu())
        out_i.append(best_i.cpu())
    return TopK(torch.cat(out_v), torch.cat(out_i))


def max_similarity(queries: torch.Tensor, keys: torch.Tensor, k: int = 1, **kwargs) -> TopK:
    """Cosine similarity search over unit-norm rows: each generation against the training set."""
    return topk_search(queries, keys, k=k, metric="dot", **kwargs)


def background_similarity(keys: torch.Tensor, k: int = 1, **kwargs) -> TopK:
    """Train-vs-train: each training embedding against its nearest *other* training embedding."""
    return topk_search(keys, keys, k=k, metric="dot", exclude_self=True, **kwargs)
