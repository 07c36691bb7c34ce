"""What both training recipes do before their loop that does not depend on the model: logging,
the model folder and data checks, the output folder, the optimizer, the list of checkpointed objects.

Each recipe calls these in upstream's order and keeps its model's own parts (which models load,
their dtypes, the dataset class) in the script.

Invariants:
- Everything a user can get wrong fails before any model loads, with one line naming the fix.
- The checkpointed objects are listed in one order for both recipes: the state file numbers its
  tensors in that order, so one list keeps both recipes' checkpoints alike.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def configure_logging(accelerator: Any) -> None:
    """Upstream's logging set-up: INFO for the recipe, warnings only from the libraries on the
    local main process, errors only on the others (one copy of each message per machine)."""
    import datasets
    import diffusers
    import transformers

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO)
    for lib in (datasets, transformers, diffusers):
        (lib.utils.logging.set_verbosity_warning if accelerator.is_local_main_process else lib.utils.logging.set_verbosity_error)()


def check_model_folder(path: str, subfolders: tuple[str, ...] = SD_SUBFOLDERS) -> None:
    """A local model folder must exist and hold every pipeline part (Hub ids are checked by the Hub).

    Raises:
        FileNotFoundError: one line naming the missing folder or subfolders.
    """
    p = Path(path).expanduser()
    looks_local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1
    if not looks_local:
        return
    if not p.is_dir():
        raise FileNotFoundError(f"--pretrained_model_name_or_path {path} does not exist; pass a diffusers model folder or a Hub id like stabilityai/stable-diffusion-2-1-base.")
    missing = [s for s in subfolders if not (p / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"model folder {path} lacks the subfolder(s) {', '.join(missing)}; point to a full diffusers Stable Diffusion folder (save it with pipe.save_pretrained).")


def load_training_data(args: Any, accelerator: Any, log: Any) -> tuple[Any, str, str, list[dict]]:
    """The training set of ``--dataset_name`` / ``--train_data_dir``, every image decoded and every
    caption checked now, so no bad sample stops the run mid-way.

    Returns:
        ``(dataset, image_column, caption_column, dropped)``: ``dropped`` lists the samples
        ``--drop_bad_samples`` left out (empty without it: a bad sample raises instead).

    Raises:
        DataError: a bad sample without ``--drop_bad_samples``, or unusable data flags.
    """
    from ..collectives import Collectives
    from ..data import check_samples, dropped_warning, load_image_caption_dataset

    with Collectives().main_process_first():  # over the host group: the default one may be NCCL
        dataset, image_column, caption_column = load_image_caption_dataset(
            dataset_name=args.dataset_name, train_data_dir=args.train_data_dir, dataset_config_name=args.dataset_config_name,
            cache_dir=args.cache_dir, image_column=args.image_column, caption_column=args.caption_column,
            max_train_samples=args.max_train_samples, seed=args.seed, verify_images=False)
    dataset, dropped = check_samples(dataset, image_column, caption_column, drop_bad=args.drop_bad_samples,
                                     progress=accelerator.is_local_main_process)
    if dropped:
        log.warning(dropped_warning(dropped, args.output_dir))
    return dataset, image_column, caption_column, dropped


def prepare_output_dir(args: Any, accelerator: Any, dropped: list[dict]) -> None:
    """On the main process: create ``--output_dir``, list the dropped samples there (local only: it
    names training files) and, with ``--push_to_hub``, create the Hub repo now, as upstream, so a
    bad repo id or token fails before training; ``args.hub_model_id`` becomes the repo's full id."""
    from .. import hub
    from ..data import write_dropped_samples

    if not accelerator.is_main_process:
        return
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_dropped_samples(output_dir, dropped)
    if args.push_to_hub:
        args.hub_model_id = hub.create_repo(args.hub_model_id or output_dir.name, token=args.hub_token)


def create_optimizer(params: list[torch.nn.Parameter], args: Any, num_processes: int) -> torch.optim.Optimizer:
    """Upstream's AdamW (8-bit with ``--use_8bit_adam``) over ``params``. With ``--scale_lr``,
    ``args.learning_rate`` is scaled first, as upstream (so the flags written down hold the LR used).

    Raises:
        ImportError: ``--use_8bit_adam`` without bitsandbytes.
    """
    if args.scale_lr:
        args.learning_rate = args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * num_processes
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                         weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def checkpointed_objects(module: torch.nn.Module, optimizer: Any, lr_scheduler: Any, method_state: dict[str, Any], *,
                         ema: Any, scaler: Any, is_lora: bool, checkpoint: Callable[[], Path | None]) -> dict[str, Any]:
    """Every object a checkpoint holds for an exact resume, under its checkpoint name.

    Args:
        module: the unwrapped UNet (its trainable tensors).
        method_state: ``MemFree.stateful_objects()`` (counters, random streams, shards, proxies,
            augmentation strengths, loss banks); loading them finishes the method's bookkeeping.
        ema: the ``EMAModel`` or None; scaler: accelerate's fp16 loss scaler or None.
        is_lora: LoRA weights are small and stored in the state; full fine-tuning's are read back
            from the checkpoint's ``unet/`` and ``unet_ema/`` folders instead of stored twice.
        checkpoint: the checkpoint folder being loaded (called only when loading).

    Returns:
        ``{name: stateful}`` in the order of earlier versions (the state file numbers tensors in
        this order); None values are skipped on save and load.
    """
    from .state import TrainableWeights, weights_from_model_folders

    method_state = dict(method_state)
    stateful = {"trainable": TrainableWeights(module), "optimizer": optimizer, "lr_scheduler": lr_scheduler,
                **{name: method_state.pop(name) for name in ("counters", "rng", "assignment", "proxies")}, "ema": ema,
                "strengths": method_state.pop("strengths"), "scaler": scaler, **method_state}
    if not is_lora:
        weights_from_model_folders(stateful, module, checkpoint)
    return stateful
