"""Exact search and the memorization statistics, on hand-made embeddings and pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd_memfree.scoring import metrics, search


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.mark.parametrize("query_chunk,key_chunk", [(7, 13), (3, 1), (1000, 1000), (5, 50)])
def test_search_equals_brute_force(query_chunk, key_chunk):
    """Chunk sizes that do not divide Q=23 or N=50 give the same top-3 as one dense q @ x.T."""
    g = torch.Generator().manual_seed(0)
    q, x = _unit(torch.randn(23, 16, generator=g)), _unit(torch.randn(50, 16, generator=g))
    dense = q @ x.T
    want_v, want_i = dense.topk(3, dim=1)
    got = search.max_similarity(q, x, k=3, query_chunk=query_chunk, key_chunk=key_chunk)
    torch.testing.assert_close(got.values, want_v)
    assert torch.equal(got.indices, want_i)
    torch.testing.assert_close(got.best, dense.max(1).values)


def test_background_excludes_self_across_chunks():
    """Train-vs-train: row i never matches itself, even when the diagonal crosses chunk borders.

    Keys e0, e1, (e0+e1)/sqrt2, e2 (unit vectors in R^3):
    nearest other of e0 is key 2 (cos = 1/sqrt2 = 0.7071), of e1 key 2, of key 2 key 0 (tie with
    key 1 at 0.7071; either index is right), of e2 nothing similar: 0 (keys 0, 1 or 2).
    """
    x = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [2**-0.5, 2**-0.5, 0], [0, 0, 1.0]])
    for qc, kc in [(1, 1), (3, 2), (2, 3), (4, 4)]:
        got = search.background_similarity(x, k=1, query_chunk=qc, key_chunk=kc)
        torch.testing.assert_close(got.best, torch.tensor([2**-0.5, 2**-0.5, 2**-0.5, 0.0]))
        assert got.indices[0, 0] == 2 and got.indices[1, 0] == 2 and got.indices[2, 0] in (0, 1)
        assert all(int(got.indices[i, 0]) != i for i in range(4))


def test_background_with_duplicates_scores_one():
    """An exact duplicate in the training set is its copy's nearest other image: similarity 1."""
    x = _unit(torch.tensor([[1.0, 2.0], [1.0, 2.0], [2.0, -1.0]]))
    got = search.background_similarity(x, key_chunk=2)
    torch.testing.assert_close(got.best[:2], torch.ones(2))
    assert got.indices[0, 0] == 1 and got.indices[1, 0] == 0


def test_neg_sq_l2_search():
    """metric='neg_sq_l2' returns -|q - x|^2: q=(0,0), keys (3,4),(1,0),(0,2) -> 1, 4, 25."""
    got = search.topk_search(torch.zeros(1, 2), torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]), k=3, metric="neg_sq_l2", key_chunk=2)
    torch.testing.assert_close(got.values, torch.tensor([[-1.0, -4.0, -25.0]]))
    assert got.indices.tolist() == [[1, 2, 0]]


def test_search_rejects_too_large_k():
    with pytest.raises(ValueError, match="candidate keys"):
        search.background_similarity(torch.eye(2), k=2)


def test_similarity_stats_hand_computed():
    """s = 0.0, 0.1, ..., 1.0 (11 values): mean 0.5; linear percentiles at positions 0.75*10 = 7.5
    -> 0.75, 9.0 -> 0.9, 9.5 -> 0.95; strictly above 0.5: 0.6..1.0 = 5/11."""
    s = torch.linspace(0, 1, 11)
    got = metrics.similarity_stats(s, threshold=0.5)
    assert got["mean"] == pytest.approx(0.5)
    assert got["sim_75pc"] == pytest.approx(0.75)
    assert got["sim_90pc"] == pytest.approx(0.90)
    assert got["sim_95pc"] == pytest.approx(0.95)
    assert got["frac_gt_0.5"] == pytest.approx(5 / 11)
    assert got["count"] == 11
    assert metrics.threshold_key(0.75) == "frac_gt_0.75"


def test_top_matches_order():
    """Sorted by similarity, most similar first, with each generation's nearest training index."""
    got = metrics.top_matches(torch.tensor([0.2, 0.9, 0.5]), torch.tensor([7, 3, 1]), n=2)
    assert got == [{"generated": 1, "train": 3, "similarity": pytest.approx(0.9)}, {"generated": 2, "train": 1, "similarity": pytest.approx(0.5)}]


def test_pixel_copy_metrics_hand_made():
    """Training pixels (1-d 'images'): 0, 1, 3, 3 (a duplicate), 10. Distinct: 0, 1, 3, 10.

    Generation at 0.1: squared distances 0.01, 0.81, 8.41, 98.01.
      d1/d2 = 0.01/0.81 = 0.0123 < 1/3 -> a copy. With n_nearest=3: ratio = 0.01 / mean(0.01, 0.81, 8.41)
      = 0.01 / 3.0767 = 0.00325.
    Generation at 2: squared distances 1 (to 1 and 3), 4, 64: d1/d2 = 1 -> not a copy;
      ratio = 1 / mean(1, 1, 4) = 0.5.
    Without collapsing the duplicate, a generation at 3 would see d1 = d2 = 0 and pass as "not a
    copy"; with it, d1 = 0, d2 = 4 -> a copy.
    """
    train = np.array([[0.0], [1.0], [3.0], [3.0], [10.0]])
    gen = np.array([[0.1], [2.0], [3.0]])
    got = metrics.pixel_copy_metrics(gen, train, n_nearest=3, key_chunk=2)
    ratio0 = 0.01 / np.mean([0.01, 0.81, 8.41])
    ratio2 = 0.0 / np.mean([0.0, 4.0, 9.0])
    assert got["pixel_distinct_train"] == 4 and got["pixel_n_nearest"] == 3
    assert got["pixel_ratio_mean"] == pytest.approx((ratio0 + 0.5 + ratio2) / 3, rel=1e-5)
    assert got["pixel_ratio_min"] == pytest.approx(0.0, abs=1e-6)
    assert got["pixel_copy_frac"] == pytest.approx(2 / 3)


def test_distinct_rows_keeps_first_occurrence():
    x = np.array([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4]], dtype=np.float32)
    assert metrics.distinct_rows(x).tolist() == [0, 1, 3]


def test_neg_sq_l2_exact_copy_is_zero_on_any_cpu():
    """A key that equals the query is at distance exactly 0.0, whatever the vector size and the
    CPU's float32 kernels (2 q.x - |q|^2 - |x|^2 in float32 leaves about +-5e-4 against |q|^2 ~ 1000
    for 3072 pixels); other keys keep their exact float64 distance |q - x|^2 and their order."""
    g = torch.Generator().manual_seed(0)
    train = torch.rand(40, 3072, generator=g)
    queries = torch.cat([train[[3, 17]], train[[5]] + 0.01])  # two copies, one near copy
    got = search.topk_search(queries, train, k=3, metric="neg_sq_l2", query_chunk=2, key_chunk=7)
    assert got.values[0, 0].item() == 0.0 and got.values[1, 0].item() == 0.0
    assert got.indices[:, 0].tolist() == [3, 17, 5]
    want = -(queries.double()[:, None] - train.double()[None]).square().sum(-1)
    want_v, want_i = want.topk(3, dim=1)
    assert torch.equal(got.indices, want_i)
    # Exact up to float32 storage of the float64 result: relative 1e-7, not absolute 5e-4.
    torch.testing.assert_close(got.values.double(), want_v, rtol=1e-6, atol=0)
    assert got.values[2, 0].item() == pytest.approx(-0.01**2 * 3072, rel=1e-5)


def test_pixel_copy_ratio_of_copies_is_exactly_zero():
    """Generations equal to training images: d_1 = 0 exactly, so pixel_ratio_min is 0.0 (not 1e-6)."""
    rng = np.random.default_rng(0)
    train = rng.random((10, 32, 32, 3), dtype=np.float32)
    got = metrics.pixel_copy_metrics(train[[1, 4]], train)
    assert got["pixel_ratio_min"] == 0.0 and got["pixel_ratio_mean"] == 0.0 and got["pixel_copy_frac"] == 1.0
