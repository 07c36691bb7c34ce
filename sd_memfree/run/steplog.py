"""The training loss of every optimizer step, logged without a host-device sync per step.

diffusers' scripts call ``.item()`` on the loss every micro-step to log ``train_loss`` every
optimizer step; that sync stalls the accelerator queue each step. ``StepLossLog`` keeps the
per-step sums in a small device buffer and reads them all at once when the training loop
flushes (every ``LOG_EVERY`` steps, before a checkpoint, a merge or validation, and at the end);
each value is then logged with the step number it belongs to, so trackers see the same curve
as upstream's.

Invariants:
- ``add`` and ``end_step`` never synchronise host and device; ``flush`` does, once.
- ``flush`` returns one ``(step, train_loss, lr)`` per optimizer step ended since the last flush,
  in order, where ``train_loss`` is the mean of that step's micro-batch losses (their sum divided
  by the gradient accumulation steps, as upstream) averaged over processes when ``gather`` is
  given (upstream: ``accelerator.gather(loss.repeat(batch_size)).mean()``, equal batch sizes).
- At most ``capacity`` steps are held; the loop must flush when ``full``.
"""

from __future__ import annotations

from typing import Callable

import torch


class StepLossLog:
    """Per-optimizer-step loss sums on the device, plus each step's number and learning rate."""

    def __init__(self, capacity: int, accumulation_steps: int, device: torch.device | str = "cpu"):
        if capacity < 1 or accumulation_steps < 1:
            raise ValueError(f"capacity and accumulation_steps must be >= 1, got {capacity} and {accumulation_steps}.")
        self.accumulation_steps = accumulation_steps
        self.sums = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.steps: list[int] = []
        self.lrs: list[float] = []

    @property
    def full(self) -> bool:
        return len(self.steps) == self.sums.numel()

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, loss: torch.Tensor) -> None:
        """Add one micro-batch's loss (a scalar tensor) to the step in progress."""
        self.sums[len(self.steps)].add_(loss.detach().float())

    def end_step(self, step: int, lr: float) -> None:
        """Close the step in progress: its number for the trackers and the LR after it."""
        self.steps.append(step)
        self.lrs.append(lr)

    def flush(self, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[tuple[int, float, float]]:
        """Read the closed steps (one sync) and start empty.

        Args:
            gather: ``accelerator.gather`` with several processes (every process must call flush
                at the same steps), None with one.

        Returns:
            ``[(step, train_loss, lr), ...]`` in step order; empty if no step closed.
        """
        n = len(self.steps)
        if n == 0:
            return []
        means = self.sums[:n] / self.accumulation_steps
        if gather is not None:
            means = gather(means).view(-1, n).mean(dim=0)
        values = means.tolist()
        self.sums.zero_()
        out = list(zip(self.steps, values, self.lrs))
        self.steps, self.lrs = [], []
        return out
