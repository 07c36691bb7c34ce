"""Memorization statistics (method.md, section 5): pure functions of similarity vectors and pixels.

Invariants:
- ``similarity_stats`` names follow the papers: ``mean``, ``sim_75pc``, ``sim_90pc``,
  ``sim_95pc`` (the headline "similarity score"), ``frac_gt_<threshold>``; percentiles use linear
  interpolation (``torch.quantile``'s default, numpy's ``linear``).
- Pixel metrics compare against *distinct* training images (exact duplicates collapsed), so that
  a duplicated training image does not make ``d_1 == d_2`` and hide a copy.
"""

from __future__ import annotations

import numpy as np
import torch

from sd_memfree.scoring.search import topk_search


def threshold_key(threshold: float) -> str:
    """``0.5 -> 'frac_gt_0.5'`` (the papers' name), ``0.75 -> 'frac_gt_0.75'``."""
    return f"frac_gt_{threshold:g}"


def similarity_stats(similarity: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Mean, 75/90/95th percentiles and the fraction strictly above ``threshold``.

    Args:
        similarity: ``[N]`` per-generation (or per-training-image) max similarity.
    """
    s = similarity.double().flatten()
    if s.numel() == 0:
        raise ValueError("no similarities to summarise (zero images).")
    q = torch.quantile(s, torch.tensor([0.75, 0.90, 0.95], dtype=torch.float64))
    return {
        "mean": float(s.mean()),
        "sim_75pc": float(q[0]),
        "sim_90pc": float(q[1]),
        "sim_95pc": float(q[2]),
        threshold_key(threshold): float((s > threshold).double().mean()),
        "count": int(s.numel()),
    }


def top_matches(similarity: torch.Tensor, nearest: torch.Tensor, n: int) -> list[dict]:
    """The ``n`` most similar (generation, training image) pairs, most similar first.

    Args:
        similarity: ``[Q]`` best score per generation; nearest: ``[Q]`` its training index.
    """
    n = min(n, similarity.numel())
    order = torch.argsort(similarity, descending=True, stable=True)[:n]
    return [{"generated": int(i), "train": int(nearest[i]), "similarity": float(similarity[i])} for i in order]


def distinct_rows(x: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct row (exact equality), in order."""
    flat = np.ascontiguousarray(x.reshape(x.shape[0], -1))
    _, first = np.unique(flat.view(np.dtype((np.void, flat.dtype.itemsize * flat.shape[1]))).ravel(), return_index=True)
    return np.sort(first)


def pixel_copy_details(
    generated: np.ndarray, train: np.ndarray, n_nearest: int = 50, copy_ratio: float = 1 / 3, **search_kwargs
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Pixel-space memorization of from-scratch models (Carlini et al. 2023; CIFAR-style).

    For each generation, squared L2 ``d`` to every distinct training image (pixels in [0, 1]):
    ``ratio = d_1 / mean(d_1..d_m)`` with ``m = min(n_nearest, distinct)``; the copy test is
    ``d_1 / d_2 < copy_ratio``.

    Args:
        generated: ``[Q, ...]`` float arrays in [0, 1]; train: ``[N, ...]`` of the same shape.

    Returns:
        ``(summary, per_image)``. summary: ``pixel_ratio_mean``, ``pixel_ratio_min``,
        ``pixel_copy_frac`` (fraction passing the copy test), ``pixel_distinct_train`` and
        ``pixel_n_nearest`` (the ``m`` used). per_image: ``[Q]`` arrays ``copy`` (bool), ``d1``,
        ``d2``, ``ratio`` and ``nearest`` (row of ``train``: the first of identical rows).
    """
    keep = distinct_rows(train)
    train = train[keep]
    m = min(n_nearest, train.shape[0])
    if m < 2:
        raise ValueError("pixel metrics need at least 2 distinct training images.")
    q = torch.from_numpy(generated.reshape(generated.shape[0], -1).astype(np.float32))
    x = torch.from_numpy(train.reshape(train.shape[0], -1).astype(np.float32))
    top = topk_search(q, x, k=m, metric="neg_sq_l2", **search_kwargs)
    d = (-top.values).double().clamp_min(0)
    d1, d2 = d[:, 0], d[:, 1]
    mean_m = d.mean(1)
    # 0/0 (a generation that equals every near neighbour) counts as ratio 1, not a copy.
    ratio = torch.where(mean_m > 0, d1 / mean_m, torch.ones_like(d1))
    copy = d1 < copy_ratio * d2  # d_1 / d_2 < 1/3 without dividing by a zero d_2
    summary = {
        "pixel_ratio_mean": float(ratio.mean()),
        "pixel_ratio_min": float(ratio.min()),
        "pixel_copy_frac": float(copy.double().mean()),
        "pixel_distinct_train": int(train.shape[0]),
        "pixel_n_nearest": int(m),
    }
    per_image = {"copy": copy.numpy(), "d1": d1.numpy(), "d2": d2.numpy(), "ratio": ratio.numpy(), "nearest": keep[top.indices[:, 0].numpy()]}
    return summary, per_image


def pixel_copy_metrics(generated: np.ndarray, train: np.ndarray, n_nearest: int = 50, copy_ratio: float = 1 / 3, **search_kwargs) -> dict[str, float]:
    """The summary of ``pixel_copy_details``."""
    return pixel_copy_details(generated, train, n_nearest, copy_ratio, **search_kwargs)[0]


def noise_magnitude_stats(scores: np.ndarray, copies: np.ndarray | None, steps: int) -> dict:
    """Summary of the per-generation detection score (Wen et al., ICLR 2024) for ``metrics.json``.

    ``auc_vs_pixel_copy``: ROC AUC of the score for telling generations that pass the pixel copy
    test from the rest (1 = perfect, 0.5 = chance; None when all or none are copies).
    """
    from sd_memfree.scoring.risk import roc_auc

    s = np.asarray(scores, dtype=np.float64)
    q = np.quantile(s, [0.5, 0.9, 0.95])
    return {
        "mean": float(s.mean()), "median": float(q[0]), "p90": float(q[1]), "p95": float(q[2]), "max": float(s.max()),
        "count": int(s.size), "steps": steps,
        "auc_vs_pixel_copy": roc_auc(s, copies) if copies is not None else None,
        "num_pixel_copies": int(np.sum(copies)) if copies is not None else None,
    }
