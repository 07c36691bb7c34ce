"""Where a training run starts: afresh, from one of our checkpoints, or from another script's.

``--resume_from_checkpoint`` may name one of our checkpoints (complete: exact resume, after the
checks of ``resume.py``), or a ``checkpoint-N`` written by diffusers' own example scripts
(``train_text_to_image*.py``, ``train_text_to_image*_sdxl.py``, through accelerate's
``save_state``): that one is continued from its weights and, when they load safely, its AdamW
moments (``resume.continue_from_upstream``), without shards.

Invariants:
- Nothing another script wrote is ever overwritten, pruned or resumed as ours: a run stops with
  one line when ``output_dir`` holds another script's checkpoint past the step it starts from.
- A fresh run never starts in an ``output_dir`` holding our checkpoints (it would prune them and
  mix two runs under "latest").
- Nothing is unpickled: another script's ``optimizer.bin`` is read with ``weights_only=True``
  only; its ``scheduler.bin`` and ``random_states_*.pkl`` are never read.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpointing
from .resume import check_budget_change, check_same_trajectory, continue_from_upstream
from ..safeio import read_json

logger = logging.getLogger("sd_memfree.train")


@dataclass
class StartPoint:
    """Where the run starts.

    Attributes:
        resume_dir: the checkpoint folder to start from; None for a fresh run.
        upstream: ``resume_dir`` is another script's checkpoint (continued from its weights).
    """

    resume_dir: Path | None
    upstream: bool = False


def plan_start(resume_from_checkpoint: str | None, output_dir: str | Path, trajectory: dict[str, Any], *,
               max_train_steps: int, num_shards: int, merge_every: int, log: Any = None) -> StartPoint:
    """Decide where the run starts and check that it may, before any model loads.

    Args:
        resume_from_checkpoint: the flag's value (a folder, "latest", or None).
        output_dir: where this run writes.
        trajectory: this run's ``resume.trajectory_settings`` (what a resume must match).
        max_train_steps, num_shards, merge_every: the budget and K, H (``resume.check_budget_change``).
        log: the recipe's logger (a note when "latest" finds nothing to resume).

    Returns:
        The ``StartPoint``.

    Raises:
        ValueError: one line: another script's checkpoint with shards, other trajectory settings or
            data, a budget change across a shortened round, another script's later checkpoint in
            ``output_dir``, or a fresh run in an ``output_dir`` holding our checkpoints.
    """
    log = log if log is not None else logger
    output_dir = Path(output_dir)
    resume_dir = checkpointing.resolve_resume_checkpoint(resume_from_checkpoint, output_dir)
    upstream = resume_dir is not None and not checkpointing.is_complete(resume_dir)
    if upstream and num_shards > 1:
        raise ValueError(f"{resume_dir} is {checkpointing.describe_foreign(resume_dir)}; continuing it works without shards only: "
                         "drop --num_shards, or start a new --output_dir from a pipeline holding its UNet.")
    if resume_dir is not None:
        check_step_in_budget(resume_dir, checkpoint_start_step(resume_dir, upstream), max_train_steps)
    if resume_dir is not None and not upstream:
        check_same_trajectory(resume_dir, trajectory)
        saved_args = resume_dir / "train_args.json"
        fix = "the checkpoint is damaged: resume from another checkpoint or start a new --output_dir."
        saved_budget = read_json(saved_args, fix).get("max_train_steps") if saved_args.exists() else None
        if saved_budget is not None and (type(saved_budget) is not int or saved_budget < 1):
            raise ValueError(f"{saved_args} gives max_train_steps {saved_budget!r}, not a step count; {fix}")
        check_budget_change(resume_dir, checkpointing.checkpoint_step(resume_dir), saved_budget, max_train_steps,
                            num_shards, merge_every)
    elif resume_from_checkpoint and resume_dir is None:
        log.info(f"--resume_from_checkpoint={resume_from_checkpoint}: no complete checkpoint yet, starting a new run.")
    start = checkpoint_start_step(resume_dir, upstream) if resume_dir is not None else -1
    later = [f for f in checkpointing.foreign_checkpoints(output_dir) if int(f.name.split("-")[-1]) > start]
    if later:
        # Another script's checkpoints ahead of where this run starts: we would write over them (or
        # make 'latest' ambiguous). They are never resumed as ours, pruned or overwritten.
        raise ValueError(f"--output_dir {output_dir} holds {later[-1].name}, {checkpointing.describe_foreign(later[-1])}; "
                         "sd_memfree never overwrites it: resume from it (--resume_from_checkpoint=latest) or choose a new --output_dir.")
    existing = checkpointing.list_checkpoints(output_dir) if resume_dir is None else []
    if existing:
        # A fresh run here would prune the earlier run's checkpoints and mix two runs under 'latest'.
        newest = existing[-1][1].name
        raise ValueError(f"--output_dir {output_dir} already holds checkpoints of a run ({newest}); "
                         "pass --resume_from_checkpoint=latest to continue it, or choose a new --output_dir.")
    return StartPoint(resume_dir, upstream)


def checkpoint_start_step(folder: Path, upstream: bool) -> int:
    """The optimizer step a checkpoint resumes at: our marker's, or another script's folder name's."""
    if not upstream:
        return checkpointing.checkpoint_step(folder)
    tail = folder.name[len(checkpointing.CHECKPOINT_PREFIX):]
    if not (folder.name.startswith(checkpointing.CHECKPOINT_PREFIX) and tail.isdigit() and tail.isascii()):
        raise ValueError(f"{folder} looks like another script's checkpoint but its name is not checkpoint-<step>; rename it so the step is known.")
    return int(tail)


def check_step_in_budget(folder: Path, step: int, max_train_steps: int) -> None:
    """A checkpoint past the run's budget is refused: resuming it would train nothing and publish
    its weights as the final model (and a forged step, e.g. 10**30, would do just that).

    Raises:
        ValueError: one line naming the step, the budget and the two fixes.
    """
    if step > max_train_steps:
        raise ValueError(f"{folder} is at step {step}, past this run's --max_train_steps={max_train_steps}: nothing would be trained; "
                         f"pass --max_train_steps={step} or more to continue it, or resume from an earlier checkpoint.")


def check_resumed_counters(folder: Path, loaded_step: int) -> None:
    """After loading our checkpoint's state: the step its counters give (summed over processes)
    must be the step its ``.complete`` marker names, which ``plan_start`` held against the budget.

    Raises:
        ValueError: one line; the state or the marker was edited or damaged.
    """
    marker_step = checkpointing.checkpoint_step(folder)
    if loaded_step != marker_step:
        raise ValueError(f"checkpoint {folder}: its state is at step {loaded_step} but its {checkpointing.COMPLETE_MARKER} marker says "
                         f"step {marker_step}; it is damaged or edited: resume from another checkpoint.")


def continue_upstream(folder: Path, unet: Any, is_lora: bool, optimizer: Any, lr_scheduler: Any, counters: Any,
                      gradient_accumulation_steps: int, ema: Any = None, log: Any = None) -> int:
    """Continue another script's ``checkpoint-N``: its weights and AdamW moments
    (``resume.continue_from_upstream``), the LR schedule and the run's counters put at step N.

    Args:
        counters: the run's position (``MemFree.counters``): its optimizer and micro-step are set.

    Returns:
        N, the step the run goes on from.
    """
    log = log if log is not None else logger
    counters.global_step = continue_from_upstream(folder, unet, is_lora, optimizer, ema)
    counters.micro_step = counters.global_step * gradient_accumulation_steps
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": only moving it to the step
        warnings.simplefilter("ignore")
        for _ in range(counters.global_step):
            lr_scheduler.step()
    log.warning(f"Continuing {folder} (another script's checkpoint) at step {counters.global_step}: its weights and AdamW "
                "moments only; the data order and random streams are this script's, so this is not that run's exact continuation.")
    return counters.global_step
