"""Per-sample loss, Min-SNR weights and the AGC masked mean, on hand-computed tensors."""

import pytest
import torch
from diffusers import DDPMScheduler

from sd_memfree.method.losses import masked_mean, min_snr_weights, per_sample_loss


def test_per_sample_loss_means_over_non_batch_dims_in_float32():
    """Sample 0: squared errors (1, 1, 1, 1) -> 4 / 4 = 1; sample 1: (0, 9, 0, 9) -> 18 / 4 = 4.5."""
    target = torch.zeros(2, 1, 2, 2, dtype=torch.bfloat16)
    pred = torch.tensor([[[[1.0, -1.0], [1.0, -1.0]]], [[[0.0, 3.0], [0.0, -3.0]]]], dtype=torch.bfloat16)
    loss = per_sample_loss(pred, target)
    assert loss.dtype == torch.float32
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, torch.tensor([1.0, 4.5]))


def test_per_sample_loss_mean_equals_diffusers_reduction():
    """Equal-sized samples: the mean of per-sample means is the global mean of diffusers' loss."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    torch.testing.assert_close(
        per_sample_loss(pred, target).mean(), torch.nn.functional.mse_loss(pred, target, reduction="mean")
    )


def _two_step_scheduler(prediction_type: str) -> DDPMScheduler:
    """betas linspace(0.1, 0.5, 2) = (0.1, 0.5); alphas (0.9, 0.5); alphas_cumprod (0.9, 0.45)."""
    return DDPMScheduler(
        num_train_timesteps=2, beta_start=0.1, beta_end=0.5, beta_schedule="linear", prediction_type=prediction_type
    )


def test_min_snr_weights_epsilon():
    """SNR = a / (1 - a): t=0: 0.9 / 0.1 = 9; t=1: 0.45 / 0.55 = 9/11.
    gamma 5: min(SNR, 5) = (5, 9/11); epsilon: / SNR -> (5/9, 1)."""
    t = torch.tensor([0, 1, 0])
    w = min_snr_weights(_two_step_scheduler("epsilon"), t, snr_gamma=5.0, prediction_type="epsilon")
    torch.testing.assert_close(w, torch.tensor([5 / 9, 1.0, 5 / 9]))


def test_min_snr_weights_v_prediction_and_sample():
    """v: min(SNR, 5) / (SNR + 1) -> (5 / 10, (9/11) / (20/11)) = (0.5, 0.45); sample: (5, 9/11)."""
    sched = _two_step_scheduler("v_prediction")
    t = torch.tensor([0, 1])
    torch.testing.assert_close(min_snr_weights(sched, t, 5.0, "v_prediction"), torch.tensor([0.5, 0.45]))
    torch.testing.assert_close(min_snr_weights(sched, t, 5.0, "sample"), torch.tensor([5.0, 9 / 11]))
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        min_snr_weights(sched, t, 5.0, "flow")


def test_masked_mean_hand_computed():
    """losses (1, 2, 3, 4), keep (T, F, T, F), weights (1, 1, 0.5, 1): (1*1 + 0.5*3) / 2 = 1.25."""
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    keep = torch.tensor([True, False, True, False])
    weights = torch.tensor([1.0, 1.0, 0.5, 1.0])
    torch.testing.assert_close(masked_mean(losses, keep, weights), torch.tensor(1.25))
    # without weights: (1 + 3) / 2 = 2
    torch.testing.assert_close(masked_mean(losses, keep), torch.tensor(2.0))


def test_masked_mean_all_kept_is_plain_mean():
    """(1 + 2 + 3 + 4) / 4 = 2.5 with keep all True, keep None, and via losses.mean()."""
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(masked_mean(losses, torch.ones(4, dtype=torch.bool)), torch.tensor(2.5))
    torch.testing.assert_close(masked_mean(losses), losses.mean())
    torch.testing.assert_close(masked_mean(losses, weights=torch.full((4,), 2.0)), torch.tensor(5.0))


def test_masked_mean_gradients_only_reach_kept_samples():
    """d/dl_i of (w_0 l_0 + w_2 l_2) / 2 is w_i / 2 for kept i, 0 for skipped i: (0.5, 0, 0.25, 0)."""
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    keep = torch.tensor([True, False, True, False])
    masked_mean(losses, keep, torch.tensor([1.0, 1.0, 0.5, 1.0])).backward()
    torch.testing.assert_close(losses.grad, torch.tensor([0.5, 0.0, 0.25, 0.0]))


def test_masked_mean_all_skipped_is_zero_with_zero_gradients_even_with_nan():
    """Nothing kept: 0 / max(1, 0) = 0; the NaN and inf losses must not leak (NaN * 0 = NaN)."""
    losses = torch.tensor([float("nan"), float("inf"), 3.0], requires_grad=True)
    keep = torch.zeros(3, dtype=torch.bool)
    out = masked_mean(losses, keep, torch.ones(3))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(losses.grad, torch.zeros(3))


def test_masked_mean_skipped_nan_does_not_leak_into_kept_mean():
    """keep only sample 1: 2 / 1 = 2 although sample 0 is NaN."""
    losses = torch.tensor([float("nan"), 2.0])
    torch.testing.assert_close(masked_mean(losses, torch.tensor([False, True])), torch.tensor(2.0))


def test_masked_mean_does_not_sync(monkeypatch):
    """The masked mean must not read tensor values on the host (no .item(), no bool())."""
    losses = torch.tensor([1.0, 2.0])
    keep = torch.tensor([True, False])

    def _raise(*args, **kwargs):
        raise AssertionError("host-device sync")

    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, _raise)
    out = masked_mean(losses, keep, torch.ones(2))
    monkeypatch.undo()
    assert out.item() == 1.0
