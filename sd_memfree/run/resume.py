"""What a resume must keep equal: the settings that shape the training trajectory, and the data.

A checkpoint holds the state of one trajectory (optimizer moments, loss banks, the shard
assignment, the position in the round schedule and in the data stream). Resuming it under
other settings silently trains a different algorithm from a state that does not belong to it
(e.g. another ``--merge_every`` gives a proxy another proxy's half-trained weights). Each
checkpoint therefore holds ``trajectory.json``: the values of :data:`TRAJECTORY_FLAGS` and a
fingerprint of the training data; a resume compares them and stops with one line naming every
flag that differs, its saved value and its new value.

Not compared, on purpose: ``--max_train_steps`` / ``--num_train_epochs`` (a run may be extended;
but with shards, a budget that is not a whole number of rounds shortens its last round, so a
checkpoint inside such a round resumes only under the same budget: :func:`check_budget_change`),
``--checkpointing_steps``, logging, validation, output and hub flags, ``--dataloader_num_workers``
(batches are a pure function of the step), and paths (a dataset or model folder may move; the
data fingerprint catches other data).

Invariants:
- ``check_same_trajectory(saved, now)`` passes iff every key of ``saved`` has the same value in
  ``now`` (JSON values; floats round-trip exactly through JSON).
- ``data_fingerprint`` depends on the samples' order, captions, image file names (not folders)
  and image sizes in bytes; it reads no pixels, so it costs one ``stat`` per image file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..safeio import check_regular_file, read_json, replace_file

TRAJECTORY_FILE = "trajectory.json"

# Flags of the training script whose value changes what the steps after a resume compute.
TRAJECTORY_FLAGS = (
    # the method (every MemFreeConfig field)
    "num_shards", "merge_every", "proxy_optimizer_state", "agc_ratio", "agc_ema", "redistribute_fraction",
    "redistribute_at", "loss_aware_augmentation", "augment_max_magnitude", "augment_alpha",
    # what is trained, and how
    "use_lora", "rank", "use_ema", "seed", "train_batch_size", "gradient_accumulation_steps", "learning_rate",
    "scale_lr", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
    "use_8bit_adam", "max_grad_norm", "snr_gamma", "noise_offset", "input_perturbation", "prediction_type",
    "mixed_precision", "max_train_samples",
    # what the model sees
    "resolution", "center_crop", "random_flip", "image_interpolation_mode", "image_column", "caption_column",
)


def data_fingerprint(dataset: Any, image_column: str, caption_column: str) -> str:
    """A short hash of a ``datasets.Dataset`` of captioned images, in sample order.

    Per sample: the caption and, for the image, its file name and size in bytes (an image stored
    in the dataset itself: its byte length). Cheap on 100k images (no decoding, one stat each);
    it misses an image edited in place to the same byte size, which is acceptable for a guard
    against resuming on another dataset.
    """
    import datasets

    raw = dataset.select_columns([image_column, caption_column])
    if isinstance(raw.features.get(image_column), datasets.Image):
        raw = raw.cast_column(image_column, datasets.Image(decode=False))
    h = hashlib.sha256()
    h.update(str(len(raw)).encode())
    # Arrow batches (the dataset's row order, indices mapping included): embedded image bytes are
    # measured, never copied into Python objects.
    for batch in raw.with_format("arrow").iter(batch_size=1000):
        images = batch.column(image_column).combine_chunks()
        if hasattr(images.type, "get_field_index") and images.type.get_field_index("bytes") >= 0:
            import pyarrow.compute as pc

            lengths = pc.binary_length(images.field("bytes")).to_pylist()
            paths = images.field("path").to_pylist() if images.type.get_field_index("path") >= 0 else [None] * len(lengths)
            identities = [_image_identity({"bytes_len": n, "path": p}) for n, p in zip(lengths, paths)]
        else:
            identities = [_image_identity(image) for image in images.to_pylist()]
        for identity, caption in zip(identities, batch.column(caption_column).to_pylist()):
            h.update(json.dumps(caption, sort_keys=True, default=str).encode())
            h.update(identity.encode())
    return h.hexdigest()[:16]


def _image_identity(image: Any) -> str:
    if isinstance(image, dict):  # datasets.Image(decode=False): {"path": ..., "bytes": ...}
        if image.get("bytes_len") is not None:
            return f"|bytes:{image['bytes_len']}|"
        if image.get("bytes") is not None:
            return f"|bytes:{len(image['bytes'])}|"
        path = image.get("path") or ""
        size = os.path.getsize(path) if path and os.path.exists(path) else -1
        return f"|{os.path.basename(path)}:{size}|"
    if isinstance(image, str):
        return f"|{os.path.basename(image)}|"
    return f"|{type(image).__name__}|"


def trajectory_settings(args: Any, mixed_precision: str, num_samples: int, fingerprint: str) -> dict[str, Any]:
    """The values a resume must match: :data:`TRAJECTORY_FLAGS` read from ``args`` (the resolved
    ``--mixed_precision`` from accelerate, which may come from ``accelerate config``) plus the data."""
    settings = {name: getattr(args, name) for name in TRAJECTORY_FLAGS}
    settings["mixed_precision"] = mixed_precision
    settings["data"] = f"{num_samples} samples, fingerprint {fingerprint}"
    return settings


def write_trajectory(folder: str | os.PathLike, settings: dict[str, Any]) -> None:
    replace_file(Path(folder) / TRAJECTORY_FILE, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def check_same_trajectory(checkpoint: str | os.PathLike, now: dict[str, Any]) -> None:
    """Raise one line naming every setting in which this run differs from ``checkpoint``'s.

    Raises:
        ValueError: a setting or the data differ, or the checkpoint has no ``trajectory.json``.
    """
    path = Path(checkpoint) / TRAJECTORY_FILE
    if not path.exists():
        raise ValueError(f"checkpoint {checkpoint} has no {TRAJECTORY_FILE} (written by an older sd_memfree); "
                         "resume with the version that wrote it or start a new --output_dir")
    saved = read_json(path, "the checkpoint is damaged: resume from another checkpoint or start a new --output_dir.")
    flags = [n for n in saved if n != "data" and n in now and saved[n] != now[n]]
    parts = []
    if flags:
        was = ", ".join(f"--{n}={saved[n]}" for n in flags)
        new = ", ".join(f"--{n}={now[n]}" for n in flags)
        parts.append(f"was written with {was} but this run has {new}; resume with the checkpoint's value(s)")
    if saved.get("data") != now.get("data"):
        parts.append(f"was trained on other data ({saved.get('data')}) than this run's ({now.get('data')}); resume with the same "
                     "--train_data_dir / --dataset_name and --max_train_samples")
    if parts:
        raise ValueError(f"checkpoint {checkpoint} " + "; it ".join(parts) + " (or start a new --output_dir)")


def continue_from_upstream(folder: str | os.PathLike, unet: Any, is_lora: bool, optimizer: Any, ema: Any = None) -> int:
    """Load the weights (and, when they load safely, the AdamW moments) of a checkpoint written by
    diffusers' ``train_text_to_image.py`` / ``train_text_to_image_lora.py`` (accelerate's
    ``save_state`` layout), so a run can switch scripts mid-way.

    Read: ``unet/*.safetensors`` (full), ``pytorch_lora_weights.safetensors`` (LoRA),
    ``unet_ema/*.safetensors`` (with EMA), ``optimizer.bin`` with ``torch.load(weights_only=True)``
    only (tensors and plain containers; anything else is refused by torch and the moments start
    from zero, with a warning). Never read: ``random_states_*.pkl``, ``scheduler.bin`` (pickles our
    streams do not use; the caller puts the LR schedule at the step) and any ``.bin`` weights.

    Returns:
        The optimizer step the checkpoint was written at (from its name ``checkpoint-N``).

    Raises:
        ValueError: one line: the folder's name has no step, its weights are missing or only in
            pickle form, or they do not fit this model (full vs LoRA, another --rank).
    """
    import logging

    import torch

    log = logging.getLogger("sd_memfree.train")
    folder = Path(folder)
    fix = "the checkpoint is damaged or not a diffusers checkpoint: continue from another one."

    def load_file(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file as _load

        check_regular_file(path, fix)
        try:
            return _load(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({(str(e).strip().splitlines() or [''])[0][:160]}); {fix}") from None

    name = folder.name
    if not (name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit()):
        raise ValueError(f"{folder} looks like another script's checkpoint but its name is not checkpoint-<step>; rename it so the step is known.")
    step = int(name[len("checkpoint-"):])
    if is_lora:
        lora_file = folder / "pytorch_lora_weights.safetensors"
        if not lora_file.is_file():
            what = "unet/ (full fine-tuning): drop --use_lora" if (folder / "unet").is_dir() else "no pytorch_lora_weights.safetensors"
            raise ValueError(f"checkpoint {folder} holds {what} to continue a LoRA run from.")
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict

        saved = load_file(str(lora_file))
        if any(k.startswith("text_encoder") for k in saved):  # SDXL's LoRA script with --train_text_encoder
            raise ValueError(f"the LoRA of {folder} also trains the text encoders (--train_text_encoder), which sd_memfree does not "
                             "train; continuing it would drop those adapters: start a new run from the base model instead.")
        state = {k[len("unet."):]: v for k, v in saved.items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
        expected = {n for n, p in unet.named_parameters() if p.requires_grad}
        loaded = {k for k in convert_unet_state_dict_to_peft(state)}
        if getattr(result, "unexpected_keys", None) or len(loaded) != len(expected):
            raise ValueError(f"the LoRA weights of {folder} do not fit this model ({len(loaded)} tensors for {len(expected)} adapters); "
                             "use the --rank (and base model) the other script used.")
    else:
        weights = sorted((folder / "unet").glob("*.safetensors"))
        if not weights:
            what = "pytorch_lora_weights.safetensors (LoRA): add --use_lora" if (folder / "pytorch_lora_weights.safetensors").is_file() \
                else "no unet/*.safetensors (pickled .bin weights are never loaded)"
            raise ValueError(f"checkpoint {folder} holds {what} to continue a full fine-tuning run from.")
        state = {}
        for f in weights:
            state.update(load_file(str(f)))
        try:
            unet.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"the UNet of {folder} does not fit this model ({str(e).splitlines()[0]}); use the same base model.") from None
        if ema is not None:
            ema_weights = sorted((folder / "unet_ema").glob("*.safetensors"))
            if not ema_weights:
                raise ValueError(f"checkpoint {folder} has no unet_ema/*.safetensors to continue --use_ema from; drop --use_ema.")
            ema_state = {}
            for f in ema_weights:
                ema_state.update(load_file(str(f)))
            names = [n for n, _ in unet.named_parameters()]
            with torch.no_grad():
                for shadow, n in zip(ema.shadow_params, names):
                    shadow.copy_(ema_state[n])
            config = folder / "unet_ema" / "config.json"
            saved_step = read_json(config, fix).get("optimization_step", step) if config.exists() else step
            if type(saved_step) is not int or not 0 <= saved_step <= step:
                raise ValueError(f"{config} gives optimization_step {saved_step!r}, not a count up to the checkpoint's step {step}; {fix}")
            ema.optimization_step = saved_step
    opt_file = folder / "optimizer.bin"
    if opt_file.exists():
        check_regular_file(opt_file, fix)
        try:
            optimizer.load_state_dict(torch.load(opt_file, map_location="cpu", weights_only=True))
            check_optimizer_shapes(optimizer)
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            optimizer.state.clear()  # a partly loaded or misfit state would crash the first step
            log.warning(f"{opt_file} not loaded ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); the optimizer moments start from zero.")
    else:
        log.warning(f"{folder} has no optimizer.bin; the optimizer moments start from zero.")
    return step


def check_optimizer_shapes(optimizer: Any) -> None:
    """Every tensor of each parameter's optimizer state (AdamW's moments) must have the
    parameter's shape, or a loaded ``optimizer.bin`` of another model crashes the first step.

    Raises:
        ValueError: naming the first parameter whose state does not fit.
    """
    import torch

    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                    raise ValueError(f"its {key} of parameter {i} has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}")


def check_budget_change(checkpoint: str | os.PathLike, step: int, saved_budget: int | None, budget: int,
                        num_shards: int, merge_every: int) -> None:
    """Raise one line if resuming ``checkpoint`` (taken at optimizer ``step``) under another
    ``--max_train_steps`` would change the rounds it was trained in.

    With K > 1 shards, rounds are K x H steps (summed over proxies) and a budget that is not a
    whole number of rounds ends with a shortened round (``RoundSchedule``). Two budgets schedule
    the same rounds up to the start of the earlier of their shortened rounds, so a checkpoint can
    move to another budget only if its step is not past that point.

    Args:
        checkpoint: the checkpoint folder (for the message).
        step: its optimizer step, summed over proxies and processes.
        saved_budget: the ``--max_train_steps`` it was written with (None: unknown, e.g. another
            script's checkpoint, which has no shards; nothing to check).
        budget: this run's ``--max_train_steps``.
        num_shards, merge_every: K and H (equal to the checkpoint's: the trajectory check).
    """
    if num_shards <= 1 or saved_budget is None or saved_budget == budget:
        return
    round_steps = num_shards * merge_every
    limit = min(saved_budget, budget) // round_steps * round_steps
    if step <= limit:
        return
    raise ValueError(
        f"checkpoint {checkpoint} (step {step}) was written with --max_train_steps={saved_budget} but this run has "
        f"--max_train_steps={budget}: rounds are {num_shards} proxies x --merge_every={merge_every} = {round_steps} steps and a "
        f"budget that is not a whole number of rounds shortens its last round, so the two budgets schedule different rounds "
        f"after step {limit}; resume with --max_train_steps={saved_budget}, or from a checkpoint at step <= {limit}"
    )
