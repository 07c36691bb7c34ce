"""What a training run writes into ``output_dir``, the same for both recipes: the run config, each
checkpoint, and the final outputs (model, ``memfree_state.json``, skip counts, card, Hub upload).

The recipe writes its model in its own format (``save_model``-like code stays in the script);
everything around it is here.

Invariants:
- No secret (``--hub_token``) is written: the flags come from ``recipe_args.public_args``.
- Nothing is ever half-written under its final name: a checkpoint is published by one rename
  (``checkpointing.atomic_checkpoint_dir``), the final model is staged in ``runguard.STAGING_DIR``
  and moved into place entry by entry, ``memfree_state.json`` and the skip counts file are
  written beside and renamed. What a failed run leaves staged, ``runguard.guarded_run`` removes.
- A non-finite model is never published: :func:`check_final_weights` runs before anything is staged.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .. import safeio

MEMFREE_CONFIG_FILE = "memfree_config.json"
TRAIN_ARGS_FILE = "train_args.json"
MEMFREE_STATE_FILE = "memfree_state.json"
# The flags the model card shows, in the card's order.
CARD_TRAINING_ARGS = ("learning_rate", "max_train_steps", "train_batch_size", "resolution", "mixed_precision",
                      "gradient_accumulation_steps", "seed")


def write_run_config(folder: str | os.PathLike, method_config: Any, public_args: Mapping[str, Any]) -> None:
    """The resolved settings: ``memfree_config.json`` and ``train_args.json`` (the flags without
    secrets), beside the model and in every checkpoint (a resume checks the budget against them)."""
    folder = Path(folder)
    method_config.save_json(folder / MEMFREE_CONFIG_FILE)
    safeio.replace_file(folder / TRAIN_ARGS_FILE, json.dumps(dict(public_args), indent=2))  # never through a link


def save_checkpoint(output_dir: str | os.PathLike, step: int, accelerator: Any, stateful: Mapping[str, Any], *,
                    method_config: Any, public_args: Mapping[str, Any], trajectory: Mapping[str, Any], unet: Any,
                    is_lora: bool, trainable: Sequence[Any] | None, barrier: Any, ema: Any = None,
                    total_limit: int | None = None) -> Path:
    """Write ``checkpoint-<step>`` on every process and prune old ones (``--checkpoints_total_limit``).

    A checkpoint holds every process's state for an exact resume (``stateful``, see
    ``recipe_setup.checkpointed_objects``), the run config, the trajectory settings a resume must
    match, and the model in the final output's form (``unet_ema/`` too with EMA, as upstream).

    Args:
        unet: the unwrapped UNet.
        trainable: the values to publish for its trainable tensors (``MemFree.merged_weights()``:
            with shards the live tensors hold a proxy's weights), or None for the live ones.
        barrier: waits for every process (``MemFree.collectives.barrier``: over the host group,
            as NCCL's default group may not run it on a CPU-side wait).

    Returns:
        The published checkpoint folder.
    """
    from .checkpointing import CHECKPOINT_PREFIX, atomic_checkpoint_dir, prune_checkpoints
    from .resume import write_trajectory
    from .state import save_process_state
    from ..trainable import save_checkpoint_model

    output_dir = Path(output_dir)
    with atomic_checkpoint_dir(output_dir, step, is_main_process=accelerator.is_main_process,
                               wait_for_everyone=barrier) as tmp:
        save_process_state(tmp, accelerator.process_index, accelerator.num_processes, dict(stateful))
        if accelerator.is_main_process:
            write_run_config(tmp, method_config, public_args)
            write_trajectory(tmp, dict(trajectory))
            save_checkpoint_model(unet, tmp, is_lora, trainable=trainable)
            if ema is not None:
                ema.save_pretrained(str(tmp / "unet_ema"))
    folder = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit, keep=folder)
    return folder


def check_final_weights(weights: Sequence[Any], step: int, newest_checkpoint: str, learning_rate: float) -> None:
    """Never publish a non-finite model, e.g. one that diverged in its last few steps, under the
    stop checks' limit.

    Raises:
        RunStopped: one line naming the step, the newest checkpoint and the fix (exit 1).
    """
    from .stopping import RunStopped, all_finite, divergence_advice

    if not all_finite(weights):
        raise RunStopped(f"the trained weights are NaN/inf after step {step}: the final model was not saved (newest checkpoint: "
                         f"{newest_checkpoint}); {divergence_advice(learning_rate)}")


@contextmanager
def staged_final_output(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder for the final model; on exit, move its entries into
    ``output_dir`` (``checkpointing.publish_entries``). On an exception nothing is published (the
    run guard removes the staging folder)."""
    from .checkpointing import publish_entries
    from .runguard import STAGING_DIR

    staging = Path(output_dir) / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)
    yield staging
    publish_entries(staging, output_dir)


def write_memfree_state(output_dir: str | os.PathLike, num_samples: int, global_step: int, method_summary: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``memfree_state.json``: the sample count, the step and the method's shard split, moves
    and merges (``method_summary`` without its ``agc/`` rates). Local unless
    ``--hub_upload_memfree_state``: it names the samples AGC skipped most.

    Returns:
        What was written.
    """
    output_dir = Path(output_dir)
    state = {"num_samples": num_samples, "global_step": global_step,
             **{k: v for k, v in method_summary.items() if not k.startswith("agc/")}}
    safeio.replace_file(output_dir / MEMFREE_STATE_FILE, json.dumps(state, indent=2))  # never through a link
    return state


def publish_model(output_dir: str | os.PathLike, args: Any, method_config: Any, images: Sequence[Any],
                  extra_sections: Sequence[str] = ()) -> dict[str, str]:
    """Write the model card (always) and, with ``--push_to_hub``, upload the allow-list of
    ``output_dir`` (``memfree_state.json`` only with ``--hub_upload_memfree_state``).

    Args:
        args: the recipe's flags; ``args.hub_model_id`` is the full repo id after
            ``recipe_setup.prepare_output_dir``.
        images: the final validation images, shown on the card.
        extra_sections: more Markdown sections for the card (the held-out monitor's curve).

    Returns:
        For the run's summary: ``{"hub_repo": repo id}`` with ``--push_to_hub``, else ``{}``.
    """
    from .. import hub

    output_dir = Path(output_dir)
    repo_id = args.hub_model_id or output_dir.name
    hub.write_model_card(output_dir, repo_id=repo_id, base_model=args.pretrained_model_name_or_path, method_config=method_config.to_dict(),
                         training_args={k: getattr(args, k) for k in CARD_TRAINING_ARGS}, is_lora=args.use_lora, images=images,
                         dataset=args.dataset_name or args.train_data_dir, extra_sections=list(extra_sections))
    if not args.push_to_hub:
        return {}
    return {"hub_repo": hub.push_to_hub(output_dir, repo_id, token=args.hub_token, include_memfree_state=args.hub_upload_memfree_state)}
