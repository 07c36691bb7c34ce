"""Why and when a training run stops early: signals, non-finite losses, a full disk.

- :class:`StopSignals` turns SIGTERM (what SLURM, Kubernetes and spot instances send before they
  kill) and SIGINT (Ctrl-C) into a flag. Before the training loop it stops at once (nothing to
  save yet); inside the loop it only records the request, and the loop finishes the current
  optimizer step, writes a checkpoint and stops. A second Ctrl-C stops at once.
- :class:`NonFiniteWatch` counts consecutive optimizer steps with a non-finite per-sample loss,
  on the device, so the step never waits for the host; the loop reads it where it already syncs.
- :func:`is_disk_full` recognises "no space left on device" however a writer reports it.
- :class:`RunStopped` carries the one-line message and the exit code to the command line.

Invariants:
    - ``NonFiniteWatch.observe`` and ``end_step`` never synchronise host and device; only
      ``read`` does.
    - The non-finite test looks at the raw per-sample losses, before the AGC keep mask, so a loss
      that AGC masks (it never keeps a non-finite loss) is still counted.
"""

from __future__ import annotations

import errno
import os
import signal

import torch

# Consecutive optimizer steps with a non-finite loss after which the run stops. With fp16 mixed
# precision an overflowing step can occur and be recovered from (the grad scaler skips the step and
# lowers the scale); a diverged run has non-finite losses on every step from then on.
MAX_NONFINITE_STEPS = 5

EXIT_FAILED = 1  # the run stopped on its own: non-finite loss, disk full
SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the shell's 128 + signal number


class RunStopped(Exception):
    """The run stopped early; ``str(self)`` is the one line to print, ``exit_code`` the status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RunInterrupted(BaseException):
    """A signal arrived before the training loop started (nothing to save).

    A ``BaseException``, like ``KeyboardInterrupt``, so a library's ``except Exception`` does not
    swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGTERM / SIGINT handlers for one run: stop at once until :meth:`defer`, then ask politely.

    Installed with :meth:`install` (main thread only; elsewhere, e.g. a notebook's worker thread,
    it does nothing) and removed with :meth:`restore`, which puts the previous handlers back.

    Attributes:
        signum: the first signal received since :meth:`defer`, None if none (a plain attribute set by
            the handler: reading it costs nothing, so the loop may check it every step).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def defer(self) -> None:
        """From now on a signal sets :attr:`signum` instead of stopping at once."""
        self.deferred = True

    def restore(self) -> None:
        for s, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the closest.
            signal.signal(s, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if not self.deferred:
            raise RunInterrupted(signum)
        if self.signum is None:
            self.signum = signum
            # os.write, not print: a handler may run in the middle of another print.
            os.write(2, (f"\n{signal.Signals(signum).name} received: finishing this optimizer step, then writing a "
                         f"checkpoint{' (Ctrl-C again to stop without one)' if signum == signal.SIGINT else ''}.\n").encode())
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait


class NonFiniteWatch:
    """Device-side count of consecutive optimizer steps whose per-sample losses were not all finite.

    Per micro-step call :meth:`observe` with the raw per-sample losses; per optimizer step call
    :meth:`end_step`; at a sync point call :meth:`read`.

    Args:
        device: the training device (the counters live there, so nothing is copied per step).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.pending = torch.zeros((), dtype=torch.bool, device=device)  # this optimizer step so far
        self.run = torch.zeros((), dtype=torch.long, device=device)  # consecutive non-finite steps now
        self.worst = torch.zeros((), dtype=torch.long, device=device)  # longest run since the last read
        self.steps = torch.zeros((), dtype=torch.long, device=device)  # non-finite steps since the last read

    def observe(self, losses: torch.Tensor) -> None:
        """Note one micro-batch: non-finite if any per-sample loss is NaN or inf. No sync."""
        self.pending.logical_or_(~torch.isfinite(losses.detach()).all())

    def end_step(self) -> None:
        """Close one optimizer step: extend or reset the run of non-finite steps. No sync."""
        self.run.add_(1).mul_(self.pending)
        torch.maximum(self.worst, self.run, out=self.worst)
        self.steps.add_(self.pending)
        self.pending.zero_()

    def stats(self) -> torch.Tensor:
        """``[worst, current, steps]`` as one LongTensor [3] on the device (to all-reduce with MAX)."""
        return torch.stack([self.worst, self.run, self.steps])

    def reset(self) -> None:
        """Start the per-read counts again (the current run carries on). No sync."""
        self.worst.copy_(self.run)
        self.steps.zero_()

    def read(self) -> tuple[int, int, int]:
        """``(longest run since the last read, current run, non-finite steps since the last read)``,
        then :meth:`reset`. This syncs: call it where the loop already does."""
        worst, current, steps = (int(v) for v in self.stats().tolist())
        self.reset()
        return worst, current, steps


def all_finite(tensors) -> bool:
    """Whether every element of every tensor is finite (one host sync)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) reports a full disk or exhausted quota.

    Python's writers raise ``OSError(ENOSPC)``; safetensors' Rust writer raises its own error whose
    text holds "No space left on device" / "StorageFull"; both count.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_message(exc: BaseException, where: str | os.PathLike) -> str:
    """The one line for a full disk: what failed and where, and what to do."""
    path = where
    e = exc
    while e is not None:
        if isinstance(e, OSError) and e.filename:
            path = e.filename
            break
        e = e.__cause__ or e.__context__
    return (f"no space left on device while writing {path}; free space there (completed checkpoints are intact) "
            "and rerun with --resume_from_checkpoint latest.")
