"""One training run of a recipe, guarded: the output folder's run lock, stop signals, one-line exits.

Both recipes (``train_sd_ietagc.py``, ``train_sdxl_ietagc.py``) run their ``train(args, stop)``
through :func:`guarded_run` and their command line through :func:`run_cli`, so they stop the same
way: SIGTERM / Ctrl-C finish the optimizer step, write a checkpoint and exit 143 / 130 naming it
(``stopping.StepStops`` inside the loop), bad input exits 2, a run that stopped on its own exits 1,
each with one line and no traceback.

Invariants:
- No two runs write into one ``output_dir`` at a time (``runlock.RunLock``, taken by the main
  process before any model loads; every process learns the outcome and stops if it failed).
- When ``guarded_run`` returns or raises, the run's signal handlers are removed, the lock is
  released, a failed final save leaves no staged model behind, and an ``output_dir`` that the run
  created and left empty (bad input) is removed.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger("sd_memfree.train")

STAGING_DIR = ".tmp-final"  # the final model is written here in full, then moved into place


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def close_progress_bars() -> None:
    """End open tqdm bars with their newline, so an error message starts a line of its own."""
    from tqdm.auto import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


class LaunchError(ValueError):
    """The processes were launched in a way this run cannot work with (one line, exit 2)."""


def check_launched_processes(num_processes: int, env=None) -> None:
    """Refuse a launch whose processes do not see each other.

    ``torchrun`` / ``accelerate launch`` set ``WORLD_SIZE`` in every worker. On a machine without
    a GPU, accelerate joins the workers into one process group only with ``ACCELERATE_USE_CPU=1``
    (``accelerate launch --cpu --num_processes N`` starts one process only); without it each worker believes it is alone, all train the same
    proxies and race for the same ``output_dir``.

    Raises:
        LaunchError: ``WORLD_SIZE`` > 1 but accelerate sees ``num_processes`` == 1.
    """
    env = os.environ if env is None else env
    try:
        launched = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        return  # not a launcher's value: nothing to compare
    if launched > 1 and num_processes == 1:
        cpu = env.get("ACCELERATE_USE_CPU", "")
        raise LaunchError(f"WORLD_SIZE={launched}: {launched} processes were launched but each sees only itself "
                          f"(ACCELERATE_USE_CPU={cpu or 'unset'}); on a machine without a GPU set ACCELERATE_USE_CPU=1 "
                          "(ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N, or torchrun), else launch one process.")


def check_learning_rate(learning_rate: float, adam_beta1: float = 0.9) -> None:
    """Refuse a learning rate AdamW cannot take a single float32 step with.

    AdamW's first step scales the update by ``lr / (1 - beta1)``, which torch converts to a
    float32 scalar: past float32's maximum that is a ``RuntimeError`` deep inside the optimizer.

    Raises:
        ValueError: one line with the largest rate that works.
    """
    import torch

    limit = torch.finfo(torch.float32).max * (1 - adam_beta1) if 0 <= adam_beta1 < 1 else math.inf
    if not math.isfinite(learning_rate) or learning_rate > limit:
        raise ValueError(f"--learning_rate={learning_rate:g} is too large: AdamW's first step is --learning_rate / (1 - --adam_beta1), "
                         f"beyond float32's range; use a learning rate below {limit:.3g} (1e-4 is usual for fine-tuning).")


def overflow_message(exc: BaseException) -> str | None:
    """The one line for an optimizer step whose scalars overflow float32 (a learning rate that
    --scale_lr made too large), or None for any other error."""
    if isinstance(exc, RuntimeError) and "cannot be converted to type float without overflow" in str(exc):
        return ("the optimizer step overflowed float32 (value cannot be converted to type float without overflow): the learning "
                "rate, after --scale_lr if given, is too large; lower --learning_rate (1e-4 is usual for fine-tuning).")
    return None


def take_run_lock(output_dir: str, collective_timeout: float | None = None):
    """Check ``output_dir`` and take its run lock on the main process; every process learns the outcome.

    This is where the process group is initialised (``Accelerator()`` later reuses it), with
    ``collective_timeout`` seconds as the backend timeout.

    Returns the held :class:`~sd_memfree.run.runlock.RunLock` on the main process, None on the others.
    Raises the main process's ``OutputDirError`` / ``RunLockHeld`` on every process, so no process
    starts on a folder the main process could not lock.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from ..collectives import Collectives, timeout
    from .runlock import OutputDirError, RunLock, RunLockHeld

    # The process group only, built as Accelerator() builds it (which then reuses it); without the
    # CPU flag, processes launched on a CPU-only machine would each think they are alone.
    limit = timeout(collective_timeout)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **({"timeout": limit} if limit is not None else {}))
    check_launched_processes(state.num_processes)  # before the lock: workers that see only themselves would race for it
    lock, error, note = None, None, None
    if state.is_main_process:
        lock = RunLock(output_dir)
        try:
            note = lock.acquire()
        except (OutputDirError, RunLockHeld) as e:
            lock, error = None, e
    if state.num_processes > 1:
        outcome = Collectives(timeout=limit).broadcast_object((type(error).__name__, str(error)) if error is not None else None)
        if outcome is not None and error is None:
            error = {"OutputDirError": OutputDirError}.get(outcome[0], RunLockHeld)(outcome[1])
        if error is not None:
            state.destroy_process_group()  # every process leaves cleanly (no abort in the backend's teardown)
    if error is not None:
        raise error
    if note:
        logger.warning(note)
    return lock


def remove_planted_links(output_dir: str) -> list[Path]:
    """Remove symbolic links under the names this run writes *into* (the final model's staging
    folder): ``rmtree`` refuses a link, so the model would be saved through it into the folder it
    points to, and publishing would then move that folder's files. Run under the lock, which makes
    these names ours. Returns the links removed."""
    staging = Path(output_dir) / STAGING_DIR
    if staging.is_symlink():
        staging.unlink()
        return [staging]
    return []


def guarded_run(output_dir: str, train: Callable[[Any], dict], collective_timeout: float | None = None) -> dict:
    """Run ``train(stop)`` under ``output_dir``'s run lock, with SIGTERM / Ctrl-C handled.

    With several processes, a collective that fails because another process died (its closed
    connections end ours within seconds) or stopped answering (``collective_timeout`` seconds)
    stops this one with a line naming the last step and the newest checkpoint.

    ``stop`` is the run's :class:`~sd_memfree.run.stopping.StopSignals`: a signal stops at once until
    the loop calls ``stop.defer()``; from then on the loop finishes the step and checkpoints.

    Returns:
        What ``train`` returns.

    Raises:
        RunStopped: the run stopped early with a one-line reason and an exit code: SIGTERM / SIGINT
            (before training started, or after writing a checkpoint of the step in progress),
            non-finite losses, a full disk, a lost process or node.
        OutputDirError, RunLockHeld: ``output_dir`` is unusable or in use, before any model loads.
    """
    from .stopping import SIGNAL_EXIT_CODES, RunInterrupted, RunStopped, StopSignals, disk_full_message, is_disk_full

    stop = StopSignals().install()  # stops at once until the loop starts, then asks it to stop after a step
    lock, finished = None, False
    try:
        lock = take_run_lock(output_dir, collective_timeout)
        stop.on_stall = lock.release if lock is not None else None  # a stalled process exits at once: free the folder
        remove_planted_links(output_dir)
        summary = train(stop)
        finished = True
        return summary
    except RunInterrupted as e:
        raise RunStopped(f"stopped by {signal_name(e.signum)} before training started (no step was taken); rerun the same command "
                         "to start again.", SIGNAL_EXIT_CODES.get(e.signum, 128 + e.signum)) from None
    except Exception as e:
        close_progress_bars()
        if is_disk_full(e):
            raise RunStopped(disk_full_message(e, output_dir)) from None
        if is_lost_peer(e):
            raise RunStopped(lost_peer_message(e, output_dir, stop.last_step, collective_timeout)) from None
        if overflow_message(e):
            raise RunStopped(overflow_message(e)) from None
        raise
    finally:
        stop.restore()
        if lock is not None:
            out = Path(output_dir)
            if not finished:  # a failed final save leaves no staged model behind (the lock says we own it)
                shutil.rmtree(out / STAGING_DIR, ignore_errors=True)
            lock.release()
            if lock.created_dir and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # a run stopped by bad input leaves no trace


# What gloo / NCCL / the c10d store say when a peer died or stopped answering.
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
              "Watchdog caught collective operation timeout", "NCCL communicator was aborted", "ProcessGroupNCCL",
              "Socket Timeout", "failed to recv", "failed to send")


def is_lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another process died or hung."""
    import torch.distributed as dist

    if isinstance(exc, (getattr(dist, "DistBackendError", ()), getattr(dist, "DistNetworkError", ()))):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _LOST_PEER)


def lost_peer_message(exc: BaseException, output_dir: str, step: int | None, collective_timeout: float | None) -> str:
    """The one line for a lost process or node: what happened, where the run is, what to do."""
    from .checkpointing import list_checkpoints

    found = list_checkpoints(Path(output_dir))
    newest = str(found[-1][1]) if found else "none was written"
    where = f"after step {step}" if step is not None else "before the first step"
    timed_out = "imed out" in str(exc) or "imeout" in str(exc)
    why = "stopped answering" if timed_out else "died or lost its connection"
    limit = f" (--collective_timeout {collective_timeout:g} s)" if collective_timeout and timed_out else ""
    return (f"another process or node {why}{limit}: this process stopped {where} in a collective (newest checkpoint: "
            f"{newest}); restart every process with --resume_from_checkpoint latest once all nodes are back.")


def run_cli(main: Callable[[Any], dict], args: Any) -> None:
    """Command-line entry: ``main(args)`` with one-line errors for bad input instead of tracebacks.

    Exit codes: 0 done; 2 bad input (incl. an unusable or locked --output_dir); 1 the run stopped on
    its own (non-finite loss, disk full); 143 / 130 stopped by SIGTERM / Ctrl-C (128 + signal).
    """
    from ..data import DataError
    from .runlock import RunLockHeld
    from .stopping import EXIT_FAILED, SIGNAL_EXIT_CODES, RunStopped

    try:
        if hasattr(args, "learning_rate"):
            check_learning_rate(args.learning_rate, getattr(args, "adam_beta1", 0.9))
        main(args)
    except (DataError, FileNotFoundError, ValueError, RunLockHeld) as e:  # hub.HubError and OutputDirError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunStopped as e:  # a signal (exit 128 + signal number), divergence or a full disk (exit 1)
        print(f"error: {e}" if e.exit_code == EXIT_FAILED else str(e), file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:  # a second Ctrl-C while the first one was waiting for the step to end
        print("interrupted without a checkpoint of the current step; run the same command with --resume_from_checkpoint latest "
              "to continue from the newest one.", file=sys.stderr)
        raise SystemExit(SIGNAL_EXIT_CODES[signal.SIGINT]) from None
