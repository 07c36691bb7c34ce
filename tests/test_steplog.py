"""StepLossLog: per-step train_loss from a device buffer, read once per flush."""

from __future__ import annotations

import pytest
import torch

from sd_memfree.run.steplog import StepLossLog


def test_one_mean_per_step_with_accumulation():
    """2 micro-batches per step: step 10 = (1 + 3) / 2 = 2, step 11 = (0.5 + 0.5) / 2 = 0.5."""
    log = StepLossLog(capacity=4, accumulation_steps=2)
    for loss in (1.0, 3.0):
        log.add(torch.tensor(loss))
    log.end_step(10, 1e-4)
    for loss in (0.5, 0.5):
        log.add(torch.tensor(loss))
    log.end_step(11, 2e-4)
    assert log.flush() == [(10, 2.0, 1e-4), (11, 0.5, 2e-4)]
    assert log.flush() == [] and len(log) == 0
    log.add(torch.tensor(4.0))
    log.add(torch.tensor(2.0))
    log.end_step(12, 3e-4)
    assert log.flush() == [(12, 3.0, 3e-4)], "a flush starts the next steps from zero"


def test_gathered_steps_are_averaged_over_processes():
    """Two processes, steps 1 and 2: this one has [1, 2], the other [3, 6]; gather concatenates
    process by process, so the means are [(1 + 3) / 2, (2 + 6) / 2] = [2, 4]."""
    log = StepLossLog(capacity=3, accumulation_steps=1)
    for step, loss in ((1, 1.0), (2, 2.0)):
        log.add(torch.tensor(loss))
        log.end_step(step, 0.1)
    gathered = []

    def gather(t):
        gathered.append(t.clone())
        return torch.cat([t, torch.tensor([3.0, 6.0])])

    assert log.flush(gather) == [(1, 2.0, 0.1), (2, 4.0, 0.1)]
    assert len(gathered) == 1, "one gather per flush, not per step"


def test_full_and_overflow():
    log = StepLossLog(capacity=1, accumulation_steps=1)
    log.add(torch.tensor(1.0))
    log.end_step(1, 0.0)
    assert log.full
    with pytest.raises(IndexError):
        log.add(torch.tensor(1.0))  # the loop flushes when full; past that is a bug, not a silent drop


def test_add_does_not_read_the_device(monkeypatch):
    """No host-device sync per micro-batch: add/end_step never call item()/tolist()."""
    log = StepLossLog(capacity=2, accumulation_steps=1)

    def forbidden(*a, **k):
        raise AssertionError("synchronised")

    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    log.add(torch.tensor(1.5, requires_grad=True) * 2)
    log.end_step(1, 0.1)
    monkeypatch.undo()
    assert log.flush() == [(1, 3.0, 0.1)]
