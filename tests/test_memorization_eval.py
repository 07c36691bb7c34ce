"""The demo's and benchmark's measurements beside the scorer (train_scripts/memorization_eval.py)."""

from __future__ import annotations

import numpy as np
import pytest

from train_scripts import memorization_eval as ev


def test_pixel_nearest_copy_test_by_hand():
    """Train (1 pixel, 1 channel, so squared L2 = squared difference): values 0.0, 0.5, 1.0 and a
    duplicate of 0.5 (collapsed: distinct rows 0, 1, 2).
    gen 0.05: d = 0.0025, 0.2025 -> d1/d2 = 0.012 < 1/3 -> copy of image 0.
    gen 0.25: d = 0.0625, 0.0625 -> ratio 1 -> no copy (nearest is whichever top-k puts first).
    gen 0.98: d = 0.0004 (to 1.0), 0.2304 -> copy of image 2.
    gen 0.04: copy of image 0 again -> 3 copies of 4 generations, 2 distinct images copied."""
    train = np.array([0.0, 0.5, 1.0, 0.5], dtype=np.float32).reshape(4, 1, 1, 1)
    gen = np.array([0.05, 0.25, 0.98, 0.04], dtype=np.float32).reshape(4, 1, 1, 1)
    r = ev.pixel_nearest(gen, train)
    assert r["copy"].tolist() == [True, False, True, True]
    assert r["copy_frac"] == pytest.approx(0.75)
    assert r["distinct_copied"] == 2 and r["distinct_train"] == 3
    assert r["nearest"][[0, 2, 3]].tolist() == [0, 2, 0]
    assert r["d1"][0] == pytest.approx(0.0025) and r["d2"][0] == pytest.approx(0.2025)


def test_pixel_nearest_agrees_with_scorer():
    """Our copy rate uses the scorer's rule, so it equals metrics.pixel_copy_metrics on random data
    with planted copies (gen 0..3 = train 0..3 + 0.01 noise; gen 4..7 fresh noise)."""
    from sd_memfree.scoring.metrics import pixel_copy_metrics

    rng = np.random.default_rng(0)
    train = rng.random((10, 4, 4, 3), dtype=np.float32)
    gen = np.concatenate([train[:4] + 0.01 * rng.standard_normal((4, 4, 4, 3), dtype=np.float32), rng.random((4, 4, 4, 3), dtype=np.float32)])
    ours = ev.pixel_nearest(gen, train)
    assert ours["copy_frac"] == pytest.approx(pixel_copy_metrics(gen, train)["pixel_copy_frac"])
    assert ours["copy"][:4].all() and ours["distinct_copied"] >= 4


def test_frechet_in_seeded_space():
    """Identical sets -> 0 (up to the matrix square root's round-off); a set shifted by +0.2 in
    every pixel moves every pooled value by 0.2, so the mean term is |0.2 * 1^T P|^2 / 192 with
    the seeded projection P [192, 32] and the covariance terms cancel."""
    import torch

    rng = np.random.default_rng(1)
    a = rng.random((64, 32, 32, 3), dtype=np.float32) * 0.5
    assert ev.frechet_to(a, a) == pytest.approx(0.0, abs=1e-6)
    proj = torch.randn(192, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = float((0.2 * proj.sum(0) / 192 ** 0.5).square().sum())
    assert ev.frechet_to(a + 0.2, a) == pytest.approx(expected, rel=1e-4)


def test_denoising_loss_is_steady(tiny_model_dir):
    """Same model and images -> the same number twice (fixed timesteps and noise); a different
    noise seed gives a different number, so the seed is really used."""
    from sd_memfree.testing.tiny import make_tiny_landscape

    imgs, caps = zip(*(make_tiny_landscape(i, 32) for i in range(4)))
    a = ev.denoising_loss(tiny_model_dir, imgs, caps, timesteps=(100, 900))
    b = ev.denoising_loss(tiny_model_dir, imgs, caps, timesteps=(100, 900))
    c = ev.denoising_loss(tiny_model_dir, imgs, caps, timesteps=(100, 900), seed=7)
    assert a == b and a != c and a > 0
