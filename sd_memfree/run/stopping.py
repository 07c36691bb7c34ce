"""Why and when a training run stops early: signals, non-finite losses, a full disk.

- :class:`StopSignals` turns SIGTERM (what SLURM, Kubernetes and spot instances send before they
  kill) and SIGINT (Ctrl-C) into a flag. Before the training loop it stops at once (nothing to
  save yet); inside the loop it only records the request, and the loop finishes the current
  optimizer step, writes a checkpoint and stops. A second Ctrl-C stops at once.
- :class:`NonFiniteWatch` counts consecutive optimizer steps with a non-finite per-sample loss,
  on the device, so the step never waits for the host; the loop reads it where it already syncs.
- :func:`is_disk_full` recognises "no space left on device" however a writer reports it.
- :class:`RunStopped` carries the one-line message and the exit code to the command line.
- :class:`StepStops` is what a training loop does with all of these after each optimizer step
  (checks at its sync points, the checkpoint a signal asks for, the stop).

Invariants:
    - ``NonFiniteWatch.observe`` and ``end_step`` never synchronise host and device; only
      ``read`` does.
    - The non-finite test looks at the raw per-sample losses, before the AGC keep mask, so a loss
      that AGC masks (it never keeps a non-finite loss) is still counted.
"""

from __future__ import annotations

import contextlib
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
        last_step: the last optimizer step the loop finished (``StepStops.after_step`` sets it),
            None before the first; named when the run stops on a lost process.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.last_step: int | None = None
        self.on_stall = None  # set by the run guard: what to release before a stalled process exits
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


def divergence_advice(learning_rate: float | None = None) -> str:
    """What to do after a divergence, as the end of a one-line message.

    Why not "resume with a lower --learning_rate": the learning rate is part of a checkpoint's
    trajectory (``resume.TRAJECTORY_FLAGS``): the LR scheduler's base rate and every stashed
    proxy's schedule position are restored from the checkpoint, so a resume either refuses
    another rate or would silently keep the old one; and a resume with the same settings replays
    the same steps bit for bit, so it diverges again.
    """
    now = f" (now {learning_rate:g})" if learning_rate is not None else ""
    return (f"resuming replays the same steps and would diverge again: start a new run in a new --output_dir with a lower "
            f"--learning_rate{now}, or check the data.")


# Files a finished run writes into output_dir after the model itself is in place.
_AFTER_MODEL_FILES = ("memfree_state.json", "README.md")  # always written (skip counts only with AGC)
_MODEL_FILES = ("model_index.json", "pytorch_lora_weights.safetensors")


def output_dir_state(output_dir: str | os.PathLike) -> tuple[str, str]:
    """``(what the folder holds, what to do)`` after a failed write, for one-line messages.

    The advice depends on what is there: "resume from latest" only when a checkpoint exists
    (without one it would start from step 0, which the advice then says).
    """
    from pathlib import Path

    from .checkpointing import list_checkpoints

    out = Path(output_dir)
    checkpoints = list_checkpoints(out)
    model = [n for n in _MODEL_FILES if (out / n).exists()]
    missing = [n for n in _AFTER_MODEL_FILES if not (out / n).exists()]
    parts = []
    if model:
        parts.append(f"the final model ({model[0]}) is in {out}" + (f" but {', '.join(missing)} may be missing or from an earlier run"
                                                                    if missing else ""))
    parts.append(f"newest checkpoint: {checkpoints[-1][1].name}" if checkpoints else "no checkpoint was written")
    if checkpoints:
        advice = f"rerun the same command with --resume_from_checkpoint latest (it continues from {checkpoints[-1][1].name} and writes the final files again)"
    else:
        advice = "rerun the same command (with no checkpoint it trains again from step 0; --checkpointing_steps keeps progress)"
    return "; ".join(parts), advice


def disk_full_message(exc: BaseException, where: str | os.PathLike) -> str:
    """The one line for a full disk: the file that failed, what ``where`` (the output folder)
    now holds, and advice that works in that state."""
    path = where
    e = exc
    while e is not None:
        if isinstance(e, OSError) and e.filename:
            path = e.filename
            break
        e = e.__cause__ or e.__context__
    state, advice = output_dir_state(where)
    return f"no space left on device while writing {path} ({state}); free space there, then {advice}."


class StallWatch:
    """Stops a process whose training loop made no optimizer step for ``seconds``.

    Why: when another process or a whole node stops answering with its connections open (a
    machine gone from the network, a hung driver), this process waits inside a collective until
    the backend's timeout, and NCCL's watchdog then ends it without a word. The loop beats once
    per optimizer step (``beat``); a daemon thread checks the beats and, after ``seconds`` of
    silence, prints ``describe()`` as one line and ends the process (exit 1) after calling
    ``on_expire`` (the run lock's release). Long known waits (checkpoint writes) run under
    ``paused()``; the backends' own timeouts, set a little longer, stay as the backstop there.
    The watch arms at the first beat, so start-up (loading, data checks) is not watched.
    """

    def __init__(self, seconds: float, describe, on_expire=None, poll: float = 1.0) -> None:
        import threading

        self.seconds, self.describe, self.on_expire, self.poll = seconds, describe, on_expire, poll
        self._last: float | None = None
        self._paused = 0
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        import threading
        import time

        self._last = time.monotonic()
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="sd-memfree-stall-watch", daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def paused(self):
        """No stall is reported while the block runs (a checkpoint write); its end counts as a beat."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            if self._last is not None:
                self.beat()

    def close(self) -> None:
        self._closed.set()

    def _watch(self) -> None:
        import sys
        import time

        while not self._closed.wait(self.poll):
            if self._paused or self._last is None or time.monotonic() - self._last <= self.seconds:
                continue
            print(f"error: {self.describe()}", file=sys.stderr, flush=True)
            try:
                if self.on_expire is not None:
                    self.on_expire()
            finally:
                os._exit(EXIT_FAILED)


class StepStops:
    """What the loop does about stopping after each optimizer step, shared by the recipes.

    At the loop's sync points (a checkpoint is due, a logging step, the last step; with one
    process also as soon as a signal arrived, since its flag is free to read) one agreed reading
    over processes: a loss NaN/inf in :data:`MAX_NONFINITE_STEPS` consecutive steps, or non-finite
    weights before a checkpoint, stop the run (``RunStopped``, exit 1) with nothing non-finite
    saved; a stop signal (:class:`StopSignals`) makes the loop checkpoint this step and stop with
    exit 128 + signal, naming the checkpoint and the resume command. A step whose loss was
    NaN/inf gets no checkpoint (the newest earlier one is named instead).

    Per micro-batch call :meth:`observe` with the raw per-sample losses (before AGC, which never
    keeps a non-finite loss and so would hide it); per optimizer step :meth:`end_step`, then
    :meth:`after_step`.

    Args:
        stop: the run's signal flags.
        params: the trainable tensors (checked for NaN/inf before a checkpoint).
        output_dir: where checkpoints are written (to name the newest).
        learning_rate: for the divergence message.
        device: the training device.
        collectives: the run's ``Collectives`` (``MemFree.collectives``); None with one process.
        stall_seconds: with several processes, stop after this long without an optimizer step
            (``StallWatch``; ``--collective_timeout``); None: not watched.
        progress: the progress bar, closed before a message (so it starts a line of its own).
        end_training: called before a signal stop raises (e.g. ``accelerator.end_training``).
        log: where the "no checkpoint for a non-finite step" warning goes (the recipe's logger).
    """

    def __init__(self, stop: StopSignals, params, output_dir, learning_rate: float, device=None, collectives=None,
                 progress=None, end_training=None, log=None, stall_seconds: float | None = None) -> None:
        import logging
        from pathlib import Path

        self.stop, self.params, self.output_dir = stop, list(params), Path(output_dir)
        self.learning_rate, self.device, self.collectives = learning_rate, device, collectives
        self.world_size = collectives.size() if collectives is not None else 1
        self.progress, self.end_training = progress, end_training
        self.log = log if log is not None else logging.getLogger("sd_memfree.train")
        self.watch = NonFiniteWatch(device)
        self.stall = None
        if stall_seconds is not None and self.world_size > 1:
            self.stall = StallWatch(stall_seconds, self._stalled, on_expire=stop.on_stall)

    def _stalled(self) -> str:
        self._close_progress()  # the line starts a line of its own
        where = f"after step {self.stop.last_step}" if self.stop.last_step is not None else "at its first step"
        return (f"another process or node stopped answering: no optimizer step for {self.stall.seconds:g} s "
                f"(--collective_timeout), this process waited {where} in a collective (newest checkpoint: "
                f"{self.newest_checkpoint()}); restart every process with --resume_from_checkpoint latest once all nodes are back.")

    def close(self) -> None:
        """The loop is over: stop watching for stalls."""
        if self.stall is not None:
            self.stall.close()

    def observe(self, losses: torch.Tensor) -> None:
        self.watch.observe(losses)

    def end_step(self) -> None:
        self.watch.end_step()

    def newest_checkpoint(self) -> str:
        from .checkpointing import list_checkpoints

        found = list_checkpoints(self.output_dir)
        return str(found[-1][1]) if found else "none was written"

    def _agreed_max(self, values: list) -> list[int]:
        """``values`` (0-d device tensors or ints) maxed over processes, read in one sync."""
        flags = torch.stack([torch.as_tensor(v, device=self.device).long() for v in values])
        if self.world_size > 1:
            self.collectives.all_reduce(flags, op="max")
        return flags.tolist()

    def _close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def check(self, step: int, checkpoint_due: bool) -> tuple[int, bool]:
        """Raise if the run diverged; returns (the signal asking to stop or 0, whether the last
        step's loss was non-finite), agreed by every process. One sync (two when a signal asks for
        an unscheduled checkpoint: its weights are checked like a scheduled one's)."""
        def weights_bad():
            return ~torch.stack([torch.isfinite(p.detach()).all() for p in self.params]).all()

        watch = self.watch
        worst, current, weights_nonfinite, signum = self._agreed_max(
            [watch.worst, watch.run, weights_bad() if checkpoint_due else 0, self.stop.signum or 0])
        watch.reset()
        if signum and not checkpoint_due:
            weights_nonfinite, = self._agreed_max([weights_bad()])
        if worst >= MAX_NONFINITE_STEPS or weights_nonfinite:
            self._close_progress()
            what = (f"the loss was NaN/inf in {worst} consecutive optimizer steps (limit {MAX_NONFINITE_STEPS})" if worst >= MAX_NONFINITE_STEPS
                    else "the trained weights became NaN/inf")
            raise RunStopped(f"the run diverged at step {step}: {what}; "
                             f"nothing non-finite was saved (newest checkpoint: {self.newest_checkpoint()}); {divergence_advice(self.learning_rate)}")
        return signum, current > 0

    def _save(self, step: int, save_checkpoint) -> None:
        """``save_checkpoint()``, stopping the run (exit 1) when the state it would write holds
        NaN/inf anywhere (``state.NonFiniteState``: raised before any file is written, agreed by
        every process), e.g. an inactive proxy's stashed optimizer state that the weights check
        cannot see."""
        from .state import NonFiniteState

        try:
            with self.stall.paused() if self.stall is not None else contextlib.nullcontext():
                save_checkpoint()  # a long write: not a stall (the backends' timeouts still bound its barriers)
        except NonFiniteState as e:
            self._close_progress()
            raise RunStopped(f"the run diverged by step {step}: {e}, so checkpoint-{step} was not written and nothing non-finite was "
                             f"saved (newest checkpoint: {self.newest_checkpoint()}); {divergence_advice(self.learning_rate)}") from None

    def after_step(self, step: int, *, checkpoint_due: bool, sync_due: bool, last: bool, save_checkpoint) -> None:
        """After optimizer step ``step`` (summed over processes): the checks where due, the
        checkpoint (``save_checkpoint()``) when one is due or a signal asks, then the stop.

        Args:
            step: the optimizer step just taken, as the checkpoint names it.
            checkpoint_due: ``--checkpointing_steps`` asks for a checkpoint at this step.
            sync_due: the loop syncs here anyway (a logging step, the last step).
            last: the budget is done (a signal then just lets the run finish).
            save_checkpoint: writes ``checkpoint-<step>``.

        Raises:
            RunStopped: the run diverged (exit 1), or a signal stopped it after its checkpoint.
        """
        from .checkpointing import CHECKPOINT_PREFIX

        self.stop.last_step = step
        if self.stall is not None:
            self.stall.beat()
        signum, last_step_nonfinite = 0, False
        # Several processes only look at the sync points, so they all stop after the same step.
        if checkpoint_due or sync_due or (self.world_size == 1 and self.stop.signum is not None):
            signum, last_step_nonfinite = self.check(step, checkpoint_due)
        stopping = bool(signum) and not last  # on the last step the run just finishes
        if (checkpoint_due or stopping) and last_step_nonfinite:
            self.log.warning(f"step {step}: the loss was NaN/inf, so no checkpoint is written for this step.")
        elif checkpoint_due or stopping:
            self._save(step, save_checkpoint)
        if stopping:
            self._close_progress()
            if self.end_training is not None:
                self.end_training()
            saved = (f"saved {self.output_dir / f'{CHECKPOINT_PREFIX}{step}'}" if not last_step_nonfinite
                     else f"newest checkpoint: {self.newest_checkpoint()}")
            raise RunStopped(f"stopped by {signal.Signals(signum).name} after step {step} ({saved}); to continue, run the same command "
                             "with --resume_from_checkpoint latest.", SIGNAL_EXIT_CODES.get(signum, 128 + signum))
