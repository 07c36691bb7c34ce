"""Stopping early: the non-finite watch, skip counts that ignore non-finite losses, disk-full
recognition and the signal handlers."""

from __future__ import annotations

import errno
import os
import signal

import pytest
import torch

from sd_memfree.method.agc import SkipStats
from sd_memfree.run.stopping import (NonFiniteWatch, RunInterrupted, StopSignals, all_finite, disk_full_message,
                                 is_disk_full)

NAN, INF = float("nan"), float("inf")


def test_watch_counts_consecutive_non_finite_steps():
    """Steps (each a list of micro-batches): ok | nan | (ok, inf) | ok | nan | nan | inf.
    A step is non-finite if any micro-batch has a non-finite sample: 0 1 1 0 1 1 1.
    Runs: 1, 2, reset, 1, 2, 3 -> longest 3, current 3, 5 non-finite steps."""
    watch = NonFiniteWatch()
    steps = [[[1.0, 2.0]], [[NAN, 1.0]], [[1.0, 1.0], [INF, 2.0]], [[0.5, 0.5]], [[NAN, NAN]], [[1.0, NAN]], [[-INF, 0.0]]]
    for micro_batches in steps:
        for losses in micro_batches:
            watch.observe(torch.tensor(losses))
        watch.end_step()
    assert watch.read() == (3, 3, 5)
    watch.observe(torch.tensor([1.0]))
    watch.end_step()
    assert watch.read() == (3, 0, 0), "after a read the longest run starts from the current run (3), which then ends"
    assert watch.read() == (0, 0, 0)


def test_watch_and_masked_skip_counts_do_not_sync(monkeypatch):
    def _raise(*args, **kwargs):
        raise AssertionError("host-device sync")

    watch = NonFiniteWatch()
    stats = SkipStats(num_timesteps=10, num_buckets=2)
    losses, t = torch.tensor([1.0, NAN]), torch.tensor([1, 7])
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, _raise)
    watch.observe(losses)
    watch.end_step()
    stats.update(torch.tensor([True, False]), t, 0, valid=torch.isfinite(losses))
    monkeypatch.undo()
    assert watch.read() == (1, 1, 1)


def test_skip_stats_do_not_count_non_finite_losses_as_skipped():
    """Batch: t=1 kept, t=2 skipped (finite), t=3 NaN, t=8 inf (AGC never keeps those two).
    Seen (finite) 2, skipped 1 -> 0.5; bucket t0-4: 1/2; bucket t5-9 saw no finite sample.
    An all-NaN batch adds nothing: no 'skip=1.00' for a diverged run."""
    stats = SkipStats(num_timesteps=10, num_buckets=2)
    losses = torch.tensor([1.0, 0.1, NAN, INF])
    stats.update(torch.tensor([True, False, False, False]), torch.tensor([1, 2, 3, 8]), 0, valid=torch.isfinite(losses))
    assert stats.summary() == pytest.approx({"agc/skip_rate": 0.5, "agc/skip_rate_proxy_0": 0.5, "agc/skip_rate_t0-4": 0.5})
    stats.update(torch.tensor([False, False]), torch.tensor([1, 8]), 0, valid=torch.tensor([False, False]))
    assert stats.summary() == {}


def test_all_finite():
    assert all_finite([torch.ones(3), torch.zeros(2, 2)]) and all_finite([])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, INF])])
    assert not all_finite([torch.tensor([NAN])])


def test_disk_full_is_recognised_however_it_is_reported(tmp_path):
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.bin"))
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
        message = disk_full_message(outer, tmp_path)
    assert message == (f"no space left on device while writing {tmp_path / 'x.bin'} (no checkpoint was written); free space there, "
                       "then rerun the same command (with no checkpoint it trains again from step 0; --checkpointing_steps keeps progress).")
    rust = Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
    assert is_disk_full(rust) and str(tmp_path) in disk_full_message(rust, tmp_path)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("bad"))


def test_signals_stop_at_once_before_defer_then_only_ask():
    # What was there before: a shell starts background jobs with SIGINT ignored, so not always
    # Python's default_int_handler.
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop = StopSignals().install()
    try:
        with pytest.raises(RunInterrupted) as exc:
            os.kill(os.getpid(), signal.SIGTERM)
        assert exc.value.signum == signal.SIGTERM
        stop.defer()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM / Kubernetes may repeat it: keep finishing the step
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C on top: the user will not wait
    finally:
        stop.restore()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_watch_does_not_sync_on_cuda():
    """CUDA's own sync detector stays silent while the watch and the masked skip counts run."""
    device = torch.device("cuda")
    watch = NonFiniteWatch(device)
    stats = SkipStats(num_timesteps=1000, device=device)
    losses = torch.tensor([1.0, NAN, 2.0, INF], device=device)
    t = torch.tensor([1, 2, 500, 999], device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            watch.observe(losses)
            watch.end_step()
            stats.update(torch.isfinite(losses), t, 0, valid=torch.isfinite(losses))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watch.read() == (3, 3, 3)
    assert stats.summary()["agc/skip_rate"] == 0.0
