"""The command line both training recipes share beyond upstream's flags: our own flags, the checks
that do not depend on the model, and the flags as they may be written down (no secrets).

Each recipe keeps upstream's own argument list (so it reads like diffusers' script), adds these
with :func:`add_recipe_arguments`, makes its model's own checks, then calls :func:`check_recipe_args`.

Invariants:
- Every check fails through ``parser.error``: one line naming the flag and the fix, exit 2.
- ``args.memfree`` is the run's :class:`~sd_memfree.config.MemFreeConfig` once the checks pass.
- :func:`public_args` never holds a secret (``hub.SECRET_ARGS``): it is what reaches
  ``train_args.json``, the trackers' config and the model card.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .. import collectives
from ..config import MemFreeConfig


def add_recipe_arguments(parser: argparse.ArgumentParser, lora_script: str) -> None:
    """Add our flags (after upstream's): LoRA switch, Hub and data options, then the method's.

    Args:
        lora_script: the upstream LoRA script ``--use_lora`` stands in for (named in its help).
    """
    parser.add_argument("--use_lora", action="store_true", help=f"Train LoRA adapters (as {lora_script}) instead of the full UNet.")
    parser.add_argument("--hub_upload_memfree_state", action="store_true",
                        help="With --push_to_hub, also upload memfree_state.json. It lists the samples AGC skipped most, i.e. the training "
                             "images the model found easiest to memorise (a target list for extraction attacks): kept local by default.")
    parser.add_argument("--drop_bad_samples", action="store_true",
                        help="Drop samples whose image does not decode or whose caption is missing/empty (listed in the log and in "
                             "output_dir/dropped_samples.json) instead of stopping at start-up.")
    MemFreeConfig.add_arguments(parser)
    collectives.add_arguments(parser)  # --collective_timeout


def check_recipe_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The checks every recipe makes, after its own; sets ``args.local_rank`` from the launcher
    (as upstream) and ``args.memfree``.

    Returns:
        ``args``.
    """
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("no training data given: pass --dataset_name (Hub name or local folder) or --train_data_dir (imagefolder).")
    if args.hub_token is not None and args.report_to in ("wandb", "all"):
        parser.error("--hub_token with --report_to=wandb would expose the token (W&B records the command line); "
                     "log in with `hf auth login` (or `huggingface-cli login`) and drop --hub_token.")
    if args.hub_upload_memfree_state and not args.push_to_hub:
        parser.error("--hub_upload_memfree_state only applies with --push_to_hub; add --push_to_hub or drop the flag.")
    try:
        args.memfree = MemFreeConfig.from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.use_ema and args.use_lora:
        parser.error("--use_ema applies to full fine-tuning only; drop it or --use_lora.")
    if args.use_ema and args.memfree.sharding_enabled:
        parser.error("--use_ema with --num_shards > 1 is not supported: merging already averages the proxies; drop --use_ema.")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    return args


def public_args(args: argparse.Namespace) -> dict[str, Any]:
    """The run's plain-valued flags in argparse's order, without secrets (``--hub_token``)."""
    from ..hub import SECRET_ARGS

    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None))) and k not in SECRET_ARGS}
