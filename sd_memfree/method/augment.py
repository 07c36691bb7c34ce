"""IET-AGC+ loss-aware augmentation (method.md, section 4).

A kept sample whose loss lies just above the AGC skip threshold is the next one its proxy will
memorize, so it is augmented more strongly the next time the data loader yields it:

    d_i = |r * l_i - M[t_i]| / M[t_i],   s_i = exp(-alpha * d_i),   magnitude = round(s_i * m_max)

Unlike the reference (an extra augmented batch built from a queue of kept samples, with extra
forward/backward passes and dropped samples), each sample's latest strength is stored and read
by the dataset transform: no extra passes, no dropped samples.

Invariants:
- Strengths are in [0, 1]; 0 where the threshold is undefined (bank entry 0) or the loss is
  non-finite, so such samples are not augmented.
- Only kept samples update their strength; a skipped sample keeps its previous value.
- ``AugmentationStrengths.values`` lives in shared memory and is only ever written in place, so
  DataLoader workers (fork or spawn, persistent or not) read the values the main process wrote.
- Nothing here synchronises host and device during a training step.
"""

import torch
from PIL import Image
from torchvision.transforms import RandAugment

# RandAugment operations per image, as in the reference code.
NUM_OPS = 2


def augmentation_strength(
    losses: torch.Tensor, timesteps: torch.Tensor, bank: torch.Tensor, ratio: float, alpha: float
) -> torch.Tensor:
    """Strength ``exp(-alpha * |ratio * l - M[t]| / M[t])`` of each sample, 1 at the threshold.

    Call it with the same bank values as ``LossBank.keep_mask``, i.e. before ``LossBank.update``.

    Args:
        losses: Tensor [B] of per-sample losses (detached here).
        timesteps: LongTensor [B], on the bank's device.
        bank: the proxy's loss bank ``LossBank.bank`` (Tensor [num_timesteps]).
        ratio: the AGC ratio r.
        alpha: the decay of strength with relative distance (``--augment_alpha``, reference 5).

    Returns:
        float32 Tensor [B] in [0, 1].
    """
    losses = losses.detach().float()
    threshold = bank[timesteps]
    defined = (threshold > 0) & torch.isfinite(losses)
    # where() keeps the division by a 0 threshold (inf/NaN) out of the result.
    safe = torch.where(threshold > 0, threshold, torch.ones_like(threshold))
    distance = (ratio * losses - threshold).abs() / safe
    return torch.where(defined, torch.exp(-alpha * distance), torch.zeros_like(losses))


class AugmentationStrengths:
    """The latest augmentation strength of every training sample, shared with loader workers.

    Args:
        num_samples: N; ``values`` is a float32 CPU tensor [N] in shared memory, initially 0.
    """

    def __init__(self, num_samples: int) -> None:
        self.values = torch.zeros(num_samples, dtype=torch.float32).share_memory_()
        # (ids, strengths, keep, event) copied from the device but not yet written into values
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.cuda.Event] | None = None

    def __len__(self) -> int:
        return len(self.values)

    def update(self, sample_ids: torch.Tensor, strengths: torch.Tensor, keep: torch.Tensor) -> None:
        """Store the strengths of the kept samples; skipped samples keep their previous value.

        CPU tensors are written at once. Device tensors are copied to pinned CPU memory without
        blocking and written at the next ``update`` or ``flush``, when the copy has long finished,
        so the training step never waits for the device. If an id appears twice in one batch,
        one of its kept strengths is stored.

        Args:
            sample_ids: LongTensor [B] of sample ids.
            strengths: Tensor [B] from ``augmentation_strength``.
            keep: BoolTensor [B] from ``LossBank.keep_mask``.
        """
        self.flush()
        if strengths.device.type == "cpu" and keep.device.type == "cpu":
            self._write(sample_ids.cpu(), strengths, keep)
            return
        pending = tuple(x.detach().to("cpu", non_blocking=True) for x in (sample_ids, strengths, keep))
        event = torch.cuda.Event()
        event.record()
        self._pending = (*pending, event)

    def flush(self) -> None:
        """Write the pending device update, if any, into ``values``."""
        if self._pending is None:
            return
        ids, strengths, keep, event = self._pending
        event.synchronize()  # the copy was queued a step ago; this normally returns at once
        self._pending = None
        self._write(ids, strengths, keep)

    def _write(self, ids: torch.Tensor, strengths: torch.Tensor, keep: torch.Tensor) -> None:
        ids, keep = ids.long(), keep.bool()
        self.values.index_put_((ids[keep],), strengths.float()[keep])

    def mean(self) -> float:
        """Mean strength over all samples (for logging)."""
        self.flush()
        return self.values.mean().item()

    def state_dict(self) -> dict:
        self.flush()
        return {"values": self.values.clone()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the strengths in place, so loader workers keep sharing the same memory."""
        values = state_dict["values"]
        if values.shape != self.values.shape:
            raise ValueError(
                f"checkpoint has augmentation strengths for {values.shape[0]} samples but the training "
                f"set has {len(self)}; resume with the same data or start a new --output_dir"
            )
        self._pending = None
        self.values.copy_(values)


class LossAwareAugment:
    """Dataset transform ``(image, sample_id) -> image`` that applies RandAugment at the sample's
    stored strength with NUM_OPS = 2 operations, on top of the usual resize/crop/flip: as in the
    reference, it runs first, on the image as loaded (``IndexedCaptionDataset`` does so).

    The magnitude is ``round(s * max_magnitude)`` out of RandAugment's default 31 magnitude bins
    (so the reference m_max = 5 is mild); at magnitude 0 the image is returned unchanged (the
    same object). RandAugment draws its ops from the global torch RNG, which the DataLoader seeds
    per worker from the main process's seeded RNG, so a seeded run augments reproducibly.

    Picklable (for spawned loader workers): it holds only the shared ``values`` tensor.

    Args:
        strengths: the run's ``AugmentationStrengths``.
        max_magnitude: magnitude at strength 1 (``--augment_max_magnitude``, reference 5).
    """

    def __init__(self, strengths: AugmentationStrengths, max_magnitude: int = 5) -> None:
        self.values = strengths.values
        self.max_magnitude = max_magnitude

    def magnitude(self, sample_id: int) -> int:
        """The RandAugment magnitude this sample gets now."""
        return round(float(self.values[sample_id]) * self.max_magnitude)

    def __call__(self, image: Image.Image, sample_id: int) -> Image.Image:
        magnitude = self.magnitude(sample_id)
        if magnitude == 0:
            return image
        return RandAugment(num_ops=NUM_OPS, magnitude=magnitude)(image)
