"""Per-sample diffusion losses, Min-SNR weights and the AGC masked mean (method.md, section 2).

Pure functions, no state. AGC needs the loss of every sample before any reduction, so the loss
is computed with ``reduction="none"`` and reduced here, after the keep mask is known.

Invariants:
- ``per_sample_loss`` is float32 whatever the prediction's dtype (mixed precision), because the
  loss bank compares and accumulates these values.
- ``masked_mean`` never synchronises host and device, and with every sample kept and no weights
  it equals ``losses.mean()`` (a plain diffusers fine-tune).
"""

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, over every non-batch dimension, in float32.

    Args:
        pred: the model output, shape [B, ...].
        target: the regression target (noise, velocity or latents), same shape.

    Returns:
        Tensor [B] (float32), the loss of each sample before any SNR weighting.
    """
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    return loss.mean(dim=list(range(1, loss.ndim)))


def min_snr_weights(
    noise_scheduler, timesteps: torch.Tensor, snr_gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, arXiv 2303.09556), exactly as diffusers'
    ``examples/text_to_image/train_text_to_image.py`` computes them.

    Args:
        noise_scheduler: a diffusers scheduler with ``alphas_cumprod`` (e.g. DDPMScheduler).
        timesteps: LongTensor [B] of training timesteps.
        snr_gamma: the gamma of Min-SNR (diffusers' ``--snr_gamma``, 5.0 recommended).
        prediction_type: the scheduler's ``prediction_type``: "epsilon", "v_prediction" or
            "sample" (x0 prediction, where min(SNR, gamma) is already the weight).

    Returns:
        Tensor [B]: ``min(SNR, gamma) / SNR`` for epsilon, ``min(SNR, gamma) / (SNR + 1)`` for v.
    """
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        return weights / snr
    if prediction_type == "v_prediction":
        return weights / (snr + 1)
    if prediction_type == "sample":
        return weights
    raise ValueError(
        f"prediction_type={prediction_type!r} has no Min-SNR weighting; use epsilon, v_prediction or sample."
    )


def masked_mean(
    losses: torch.Tensor,
    keep: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """The AGC training loss: ``sum_i keep_i * w_i * l_i / max(1, sum_i keep_i)``.

    Skipped samples contribute neither to the numerator nor to the denominator, so the kept
    samples of a partly skipped batch keep their usual per-sample weight. A fully skipped batch
    gives 0 with zero gradients; ``torch.where`` (not a product with the mask) keeps a non-finite
    skipped loss from turning the result into NaN (NaN * 0 is NaN). No host-device sync.

    Args:
        losses: Tensor [B] of per-sample losses (differentiable).
        keep: BoolTensor [B], True where the sample trains; None keeps every sample.
        weights: Tensor [B] of per-sample weights (Min-SNR), None for 1.
        denominator: replaces ``max(1, sum_i keep_i)`` (a 0-d tensor): when this batch is one
            of D slices of a micro-batch whose gradients DDP averages, the whole micro-batch's
            kept count divided by D, so the average is the micro-batch's masked mean.

    Returns:
        A scalar tensor.
    """
    weighted = losses if weights is None else losses * weights
    if keep is None:
        return weighted.mean()
    kept = torch.where(keep, weighted, torch.zeros_like(weighted))
    if denominator is None:
        denominator = keep.sum().clamp(min=1).to(kept.dtype)
    return kept.sum() / denominator
