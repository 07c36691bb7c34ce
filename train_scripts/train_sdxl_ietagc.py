#!/usr/bin/env python
"""Fine-tune Stable Diffusion XL (full or LoRA) with IET-AGC / IET-AGC+ memorization mitigation.

A drop-in for diffusers' ``examples/text_to_image/train_text_to_image_sdxl.py`` and
``train_text_to_image_lora_sdxl.py``: every flag of both keeps its name, default and meaning;
``--use_lora`` switches to LoRA. The method is ``sd_memfree.MemFree`` (docs/plugin.md): this recipe
has no method code of its own; its loop is upstream's with the ``# [memfree]`` calls. Differences
from upstream: docs/plugin.md, "The SDXL recipe".

    accelerate launch train_scripts/train_sdxl_ietagc.py \
        --pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0 \
        --train_data_dir=./my_images --resolution=1024 --num_shards=4 --merge_every=2000 \
        --agc_ratio=1.25 --use_lora --output_dir=sdxl-private
"""

from __future__ import annotations

import argparse
import logging
import math
import random
from pathlib import Path

import torch

from sd_memfree import collectives, encoder_cache, monitor
from sd_memfree.config import MemFreeConfig
from sd_memfree.run.recipe_args import add_recipe_arguments, check_recipe_args

logger = logging.getLogger("sd_memfree.train_sdxl")

LOG_EVERY = 10  # optimizer steps between host syncs for logging (the step itself never syncs)
INTERPOLATION_MODES = ["nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # --- upstream flags (train_text_to_image_sdxl.py and train_text_to_image_lora_sdxl.py) --------
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=None, required=True,
                        help="Path to pretrained model or model identifier from huggingface.co/models.")
    parser.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                        help="Path to a pretrained VAE with better numerical stability (e.g. madebyollin/sdxl-vae-fp16-fix).")
    parser.add_argument("--revision", type=str, default=None, help="Revision of pretrained model identifier from huggingface.co/models.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the model files of the pretrained model identifier, e.g. fp16.")
    parser.add_argument("--dataset_name", type=str, default=None, help="Name of a Hub dataset, or a local folder of files that datasets can read.")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="The config of the Dataset, leave as None if there's only one config.")
    parser.add_argument("--train_data_dir", type=str, default=None,
                        help="A folder of training images in imagefolder layout with a metadata.jsonl of captions. Ignored if --dataset_name is given.")
    parser.add_argument("--image_column", type=str, default="image", help="The column of the dataset containing an image.")
    parser.add_argument("--caption_column", type=str, default="text", help="The column of the dataset containing a caption or a list of captions.")
    parser.add_argument("--validation_prompt", type=str, default=None, help="A prompt sampled --num_validation_images times every --validation_epochs.")
    parser.add_argument("--num_validation_images", type=int, default=4, help="Number of images generated for --validation_prompt.")
    parser.add_argument("--validation_epochs", type=int, default=1, help="Run validation every X epochs.")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Truncate the number of training examples to this value if set.")
    parser.add_argument("--proportion_empty_prompts", type=float, default=0,
                        help="Proportion of image prompts to be replaced with empty strings. Defaults to 0 (no prompt replacement).")
    parser.add_argument("--output_dir", type=str, default=None,
                        help="Where the model and checkpoints are written (upstream default: sdxl-model-finetuned, or sd-model-finetuned-lora with --use_lora).")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    parser.add_argument("--resolution", type=int, default=1024, help="Input images are resized to this resolution.")
    parser.add_argument("--center_crop", default=False, action="store_true", help="Center crop instead of random crop.")
    parser.add_argument("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    parser.add_argument("--train_text_encoder", action="store_true",
                        help="Train LoRA on the text encoders too (LoRA script's flag); not supported with sd_memfree (error if set).")
    parser.add_argument("--train_batch_size", type=int, default=16, help="Batch size (per device, per proxy) for the training dataloader.")
    parser.add_argument("--num_train_epochs", type=int, default=100)
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="Total number of optimizer steps, summed over proxies. If provided, overrides num_train_epochs.")
    parser.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every X optimizer steps.")
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="Max number of checkpoints to store.")
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help='A checkpoint folder of this script, or "latest" (newest complete one in output_dir).')
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Updates steps to accumulate before an optimizer step.")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet backward pass.")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Initial learning rate (after warmup).")
    parser.add_argument("--scale_lr", action="store_true", default=False,
                        help="Scale the learning rate by the number of GPUs, gradient accumulation steps, and batch size.")
    parser.add_argument("--lr_scheduler", type=str, default="constant",
                        help='One of "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup".')
    parser.add_argument("--lr_warmup_steps", type=int, default=500, help="Number of steps for the warmup in the lr scheduler.")
    parser.add_argument("--timestep_bias_strategy", type=str, default="none", choices=["earlier", "later", "range", "none"],
                        help="Bias the sampled timesteps towards earlier or later ones, or a range (full fine-tuning script's flag).")
    parser.add_argument("--timestep_bias_multiplier", type=float, default=1.0, help="Weight of the biased timesteps (2.0 doubles them).")
    parser.add_argument("--timestep_bias_begin", type=int, default=0, help="First timestep of the 'range' bias.")
    parser.add_argument("--timestep_bias_end", type=int, default=1000, help="End (exclusive) of the 'range' bias.")
    parser.add_argument("--timestep_bias_portion", type=float, default=0.25, help="Portion of timesteps biased by 'earlier' / 'later'.")
    parser.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (https://arxiv.org/abs/2303.09556); 5.0 recommended.")
    parser.add_argument("--use_ema", action="store_true", help="Keep an EMA of the UNet (full fine-tuning).")
    parser.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses; 0 loads in the main process.")
    parser.add_argument("--use_8bit_adam", action="store_true", help="Use 8-bit AdamW from bitsandbytes.")
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="The beta1 parameter for the Adam optimizer.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="The beta2 parameter for the Adam optimizer.")
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2, help="Weight decay to use.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-08, help="Epsilon value for the Adam optimizer.")
    parser.add_argument("--max_grad_norm", default=1.0, type=float, help="Max gradient norm.")
    parser.add_argument("--push_to_hub", action="store_true", help="Push the model (not the checkpoints) to the Hub.")
    parser.add_argument("--hub_token", type=str, default=None, help="The token to use to push to the Model Hub.")
    parser.add_argument("--prediction_type", type=str, default=None,
                        help="'epsilon', 'v_prediction' or 'sample'; None keeps the scheduler's prediction_type.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="The Hub repository to push to (default: output_dir's name).")
    parser.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard log directory, relative to output_dir.")
    parser.add_argument("--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb", "comet_ml", "all" or "none".')
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"], help="Mixed precision; defaults to the accelerate config.")
    parser.add_argument("--local_rank", type=int, default=-1, help="For distributed training: local_rank")
    parser.add_argument("--enable_npu_flash_attention", action="store_true", help="Flash attention on Ascend NPUs; not supported here (error if set).")
    parser.add_argument("--enable_xformers_memory_efficient_attention", action="store_true", help="Whether or not to use xformers.")
    parser.add_argument("--noise_offset", type=float, default=0, help="The scale of noise offset.")
    parser.add_argument("--rank", type=int, default=4, help="The dimension of the LoRA update matrices (with --use_lora).")
    parser.add_argument("--debug_loss", action="store_true",
                        help="Log the loss of each training file (LoRA script's flag); not supported with sd_memfree (error if set).")
    parser.add_argument("--image_interpolation_mode", type=str, default="lanczos", choices=INTERPOLATION_MODES,
                        help="The image interpolation method to use for resizing images.")
    # --- ours ---------------------------------------------------------------------------------
    add_recipe_arguments(parser, lora_script="train_text_to_image_lora_sdxl.py")
    parser.add_argument("--save_kohya_lora", action="store_true",
                        help="With --use_lora, also write pytorch_lora_weights_kohya.safetensors, the kohya format AUTOMATIC1111 and ComfyUI load.")
    monitor.add_arguments(parser)  # [monitor] --heldout_data_dir / --heldout_fraction, --monitor_samples, --audit_file
    encoder_cache.add_arguments(parser)  # --cache_latents, --cache_text_embeddings, --latent_cache_dir

    args = parser.parse_args(argv)
    if not 0 <= args.proportion_empty_prompts <= 1:
        parser.error(f"--proportion_empty_prompts={args.proportion_empty_prompts} must be in [0, 1].")
    for flag, why in (("train_text_encoder", "text-encoder LoRA is not sharded or merged by sd_memfree"),
                      ("debug_loss", "AGC reports per-sample skips instead (memfree_skip_counts.json)"),
                      ("enable_npu_flash_attention", "Ascend NPUs are not supported")):
        if getattr(args, flag):
            parser.error(f"--{flag} is not supported with sd_memfree ({why}); drop the flag.")
    if args.timestep_bias_strategy != "none" and args.timestep_bias_multiplier <= 0:
        parser.error(f"--timestep_bias_multiplier={args.timestep_bias_multiplier} must be > 0; to turn the bias off use --timestep_bias_strategy none.")
    encoder_cache.check_arguments(parser, args)
    if args.prediction_type not in (None, "epsilon", "v_prediction", "sample"):
        parser.error(f"--prediction_type={args.prediction_type} is unknown; use epsilon, v_prediction or sample (or leave it unset).")
    if args.save_kohya_lora and not args.use_lora:
        parser.error("--save_kohya_lora converts LoRA weights; add --use_lora or drop the flag.")
    if args.output_dir is None:  # each upstream script's own default
        args.output_dir = "sd-model-finetuned-lora" if args.use_lora else "sdxl-model-finetuned"
    return check_recipe_args(parser, args)


def timestep_weights(args, num_timesteps: int) -> torch.Tensor | None:
    """Upstream's ``generate_timestep_weights``: sampling weights of each timestep, None for uniform."""
    if args.timestep_bias_strategy == "none":
        return None
    weights = torch.ones(num_timesteps)
    portion = int(args.timestep_bias_portion * num_timesteps)
    if args.timestep_bias_strategy == "later":
        biased = slice(-portion, None)
    elif args.timestep_bias_strategy == "earlier":
        biased = slice(0, portion)
    else:
        if args.timestep_bias_begin < 0 or args.timestep_bias_end > num_timesteps:
            raise ValueError(f"--timestep_bias_begin/--timestep_bias_end must lie in [0, {num_timesteps}], "
                             f"got {args.timestep_bias_begin} and {args.timestep_bias_end}.")
        biased = slice(args.timestep_bias_begin, args.timestep_bias_end)
    weights[biased] *= args.timestep_bias_multiplier
    return weights / weights.sum()


class SDXLCaptionDataset:
    """Items ``{"pixel_values", "input_ids", "input_ids_2", "original_size", "crop_top_left", "sample_id"}``
    for keys ``(sample_id, aug_seed)`` (``MemFree``'s sampler), preprocessed as upstream's SDXL
    scripts do: resize, flip, crop, with the original size and crop corner for SDXL's
    micro-conditioning. All randomness of an item comes from ``aug_seed`` (the same item in any
    worker and after a resume); whether a sample's prompt is emptied
    (``--proportion_empty_prompts``) is drawn once per sample, as upstream's precomputed embeddings."""

    def __init__(self, hf_dataset, image_column, caption_column, tokenizers, args, seed: int, augment=None):
        from torchvision import transforms

        from sd_memfree.data import IndexedCaptionDataset

        self.base = IndexedCaptionDataset(hf_dataset, image_column, caption_column, tokenizers[0], None, None, augment=augment)
        self.tokenizers = tokenizers
        self.resolution, self.center_crop, self.random_flip = args.resolution, args.center_crop, args.random_flip
        mode = getattr(transforms.InterpolationMode, args.image_interpolation_mode.upper())
        self.resize = transforms.Resize(args.resolution, interpolation=mode)
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
        self.empty = [random.Random(seed * 1_000_003 + i).random() < args.proportion_empty_prompts for i in range(len(hf_dataset))]

    def __len__(self) -> int:
        return len(self.base)

    def _pixels(self, image, sample_id: int, aug_seed: int):
        from torchvision.transforms import RandomCrop
        from torchvision.transforms import functional as TF

        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(aug_seed)
            image = image.convert("RGB")
            if self.base.augment is not None:  # loss-aware RandAugment on the image as loaded
                image = self.base.augment(image, sample_id)
            original_size = (image.height, image.width)
            image = self.resize(image)
            if self.random_flip and torch.rand(()) < 0.5:
                image = TF.hflip(image)
            if self.center_crop:
                y1 = max(0, int(round((image.height - self.resolution) / 2.0)))
                x1 = max(0, int(round((image.width - self.resolution) / 2.0)))
                image = TF.center_crop(image, [self.resolution, self.resolution])
            else:
                y1, x1, h, w = RandomCrop.get_params(image, (self.resolution, self.resolution))
                image = TF.crop(image, y1, x1, h, w)
            return self.to_tensor(image), original_size, (y1, x1)

    def caption_for(self, sample_id: int, aug_seed: int) -> str:
        return "" if self.empty[sample_id] else self.base.caption_for(sample_id, aug_seed)

    def __getitem__(self, key) -> dict:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys) -> list[dict]:
        ids = [int(i) for i, _ in keys]
        images = self.base.ds[ids][self.base.image_column]
        captions = [self.caption_for(i, s) for i, s in keys]
        tokens = [t(captions, max_length=t.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids
                  for t in self.tokenizers]
        items = []
        for j, (image, i, (_, aug_seed)) in enumerate(zip(images, ids, keys)):
            pixels, original_size, crop_top_left = self._pixels(image, i, aug_seed)
            items.append({"pixel_values": pixels, "input_ids": tokens[0][j], "input_ids_2": tokens[1][j],
                          "original_size": original_size, "crop_top_left": crop_top_left, "sample_id": i})
        return items


def collate(examples) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(memory_format=torch.contiguous_format).float(),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "input_ids_2": torch.stack([e["input_ids_2"] for e in examples]),
        "original_sizes": torch.tensor([e["original_size"] for e in examples], dtype=torch.long),
        "crop_top_lefts": torch.tensor([e["crop_top_left"] for e in examples], dtype=torch.long),
        "sample_ids": torch.tensor([e["sample_id"] for e in examples], dtype=torch.long),
    }


def encode_prompt(text_encoders, input_ids: list[torch.Tensor]):
    """Upstream's ``encode_prompt``: both encoders' penultimate hidden states, concatenated, and the
    second encoder's pooled (projected) embedding."""
    hidden = []
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), out.text_embeds


def log_validation(pipe, args, accelerator, epoch: int, is_final: bool = False) -> list:
    """``--num_validation_images`` images of ``--validation_prompt``, logged to the trackers."""
    import numpy as np

    pipe = pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed if args.seed is not None else 0)
    with accelerator.autocast():
        images = [pipe(args.validation_prompt, num_inference_steps=25, generator=generator, height=args.resolution,
                       width=args.resolution).images[0] for _ in range(args.num_validation_images)]
    phase = "test" if is_final else "validation"
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(phase, np.stack([np.asarray(img) for img in images]), epoch, dataformats="NHWC")
    return images


# Settings of this script that change what the steps after a resume compute, beyond the SD
# script's (resume.TRAJECTORY_FLAGS).
SDXL_TRAJECTORY_FLAGS = ("pretrained_vae_model_name_or_path", "proportion_empty_prompts", "timestep_bias_strategy",
                         "timestep_bias_multiplier", "timestep_bias_begin", "timestep_bias_end", "timestep_bias_portion")


def trajectory(args, mixed_precision: str, dataset, image_column: str, caption_column: str) -> dict:
    """What a resume must match (sd_memfree/run/resume.py): the SD script's settings plus SDXL's."""
    from types import SimpleNamespace

    from sd_memfree.run.resume import data_fingerprint, trajectory_settings

    settings = trajectory_settings(SimpleNamespace(**{"input_perturbation": 0, **vars(args)}), mixed_precision, len(dataset),
                                   data_fingerprint(dataset, image_column, caption_column))
    settings.update({name: getattr(args, name) for name in SDXL_TRAJECTORY_FLAGS})
    return settings


def main(args) -> dict:
    """Train under ``output_dir``'s run lock, with SIGTERM / Ctrl-C handled, as the SD script; returns
    a summary (steps, merges, skip statistics, output paths). Raises what
    ``sd_memfree.run.runguard.guarded_run`` raises (``RunStopped``, ``OutputDirError``, ``RunLockHeld``)."""
    from sd_memfree.run.runguard import guarded_run

    return guarded_run(args.output_dir, lambda stop: train(args, stop), collective_timeout=args.collective_timeout)


def train(args, stop) -> dict:
    """The training run itself (see :func:`main`); ``stop`` is the run's :class:`~sd_memfree.run.stopping.StopSignals`."""
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from sd_memfree import MemFree
    from sd_memfree.collectives import ProcessLayout, refuse_sharded_engines, timeout
    from sd_memfree.run import outputs as run_outputs
    from sd_memfree.data import check_resolution
    from sd_memfree.method.losses import min_snr_weights, per_sample_loss
    from sd_memfree.run.recipe_args import public_args
    from sd_memfree.run.recipe_setup import (SDXL_SUBFOLDERS, check_model_folder, checkpointed_objects, configure_logging,
                                         create_optimizer, load_training_data, prepare_output_dir)
    from sd_memfree.run.skipcounts import write_run_skip_counts
    from sd_memfree.run.startpoint import check_resumed_counters, continue_upstream, plan_start
    from sd_memfree.run.state import load_process_state
    from sd_memfree.run.steplog import StepLossLog
    from sd_memfree.run.stopping import StepStops
    from sd_memfree.trainable import add_lora, lora_state_dict, save_kohya_lora, trainable_parameters, upcast_trainable_
    from sd_memfree.run.disk_size import folder_bytes, human_bytes

    mf: MemFreeConfig = args.memfree
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
                              log_with=None if args.report_to == "none" else args.report_to,
                              project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)))
    log = get_logger("sd_memfree.train_sdxl")
    configure_logging(accelerator)
    refuse_sharded_engines(accelerator)
    # Before the data is decoded: W must divide K or be a multiple of it (one line naming the
    # process counts that work); D processes share each proxy's micro-batch.
    layout = ProcessLayout(mf.num_shards, accelerator.num_processes, accelerator.process_index)
    if args.seed is not None:
        set_seed(args.seed)
    seed = args.seed if args.seed is not None else 0

    # ---- Validate what a user can get wrong, before any model loads ---------------------------
    check_model_folder(args.pretrained_model_name_or_path, SDXL_SUBFOLDERS)
    vae_path, vae_sub = (args.pretrained_vae_model_name_or_path, None) if args.pretrained_vae_model_name_or_path else (args.pretrained_model_name_or_path, "vae")
    vae_config = AutoencoderKL.load_config(vae_path, subfolder=vae_sub, revision=args.revision)
    check_resolution(args.resolution, 2 ** (len(vae_config["block_out_channels"]) - 1), generates_images=bool(args.validation_prompt))
    # Every image decoded and every caption checked now, so no bad sample stops the run mid-way.
    dataset, image_column, caption_column, dropped = load_training_data(args, accelerator, log)
    dataset, heldout_split = monitor.split_heldout(args, dataset, image_column, caption_column)  # [monitor] held-out rows never reach training
    num_samples = len(dataset)
    steps_per_epoch = max(1, math.ceil(num_samples / (args.train_batch_size * layout.group_size * args.gradient_accumulation_steps)))
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    settings = trajectory(args, accelerator.mixed_precision, dataset, image_column, caption_column)
    # Ours to resume exactly, or a checkpoint of diffusers' SDXL scripts to continue from its
    # weights only; never one that would overwrite or mix with what another run wrote.
    start = plan_start(args.resume_from_checkpoint, output_dir, settings, max_train_steps=args.max_train_steps,
                       num_shards=mf.num_shards, merge_every=mf.merge_every, log=log)
    resume_dir = start.resume_dir
    prepare_output_dir(args, accelerator, dropped)  # as upstream, a bad Hub repo id or token fails now, not after training

    # ---- Models ---------------------------------------------------------------------------------
    base = args.pretrained_model_name_or_path
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    tokenizers = [AutoTokenizer.from_pretrained(base, subfolder=s, revision=args.revision, use_fast=False) for s in ("tokenizer", "tokenizer_2")]
    text_encoders = [CLIPTextModel.from_pretrained(base, subfolder="text_encoder", revision=args.revision, variant=args.variant),
                     CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2", revision=args.revision, variant=args.variant)]
    vae = AutoencoderKL.from_pretrained(vae_path, subfolder=vae_sub, revision=args.revision, variant=args.variant)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", revision=args.revision, variant=args.variant)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.requires_grad_(False)
    # SDXL's own VAE overflows in fp16: it stays in float32 unless a fixed one is given (as upstream).
    vae.to(accelerator.device, dtype=torch.float32 if args.pretrained_vae_model_name_or_path is None else weight_dtype)
    for encoder in text_encoders:
        encoder.requires_grad_(False)
        encoder.to(accelerator.device, dtype=weight_dtype)
    if args.use_lora:
        unet.to(accelerator.device, dtype=weight_dtype)
        add_lora(unet, args.rank)
        if accelerator.mixed_precision in ("fp16", "bf16"):
            upcast_trainable_(unet)
    unet.train()
    ema_unet = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config) if args.use_ema else None
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise ValueError("xformers is not available: pip install xformers or drop --enable_xformers_memory_efficient_attention.")
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- The method, optimizer, schedule ([memfree]) --------------------------------------------
    memfree = MemFree(mf, num_samples=num_samples, num_train_timesteps=noise_scheduler.config.num_train_timesteps,  # [memfree]
                      max_train_steps=args.max_train_steps, seed=seed, accelerator=accelerator,
                      storage_device=accelerator.device if args.use_lora else "cpu", collective_timeout=timeout(args.collective_timeout))
    params = trainable_parameters(unet)
    optimizer = create_optimizer(params, args, accelerator.num_processes)  # AdamW (8-bit with --use_8bit_adam), LR scaled with --scale_lr
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=memfree.lr_schedule_steps)  # [memfree] each proxy's own schedule
    train_dataset = SDXLCaptionDataset(dataset, image_column, caption_column, tokenizers, args, seed, augment=memfree.augment)  # [memfree]
    # Frozen encoders computed once (--cache_latents, --cache_text_embeddings): the loader reads the cached rows
    # (with the size and crop conditioning they were encoded with), the loop encodes only the rest.
    train_dataset, collate_fn, encoders = encoder_cache.prepare(
        args, train_dataset, collate, hf_dataset=dataset, image_column=image_column, captions=train_dataset.base.captions,
        caption_of=train_dataset.caption_for, tokenizers=tokenizers, vae=vae, text_encoders=text_encoders,
        encode_text=lambda ids: encode_prompt(text_encoders, ids), pipeline="sdxl", augment=memfree.augment,
        rank=accelerator.process_index, world=accelerator.num_processes, barrier=memfree.collectives.barrier,
        device=accelerator.device, log=log, progress=accelerator.is_local_main_process, empty_captions=args.proportion_empty_prompts > 0)
    loader = DataLoader(train_dataset, batch_size=args.train_batch_size, collate_fn=collate_fn, num_workers=args.dataloader_num_workers)
    # Proxies swap optimizer state and LR position; DDP only without shards; batches from the live proxy's shard.
    unet, optimizer, lr_scheduler, loader = memfree.prepare(unet, optimizer, lr_scheduler, loader)  # [memfree]
    if ema_unet is not None:
        ema_unet.to(accelerator.device)
    bias = timestep_weights(args, noise_scheduler.config.num_train_timesteps)
    bias = bias.to(accelerator.device) if bias is not None else None

    stateful = checkpointed_objects(accelerator.unwrap_model(unet), optimizer, lr_scheduler,
                                    memfree.stateful_objects(),  # [memfree] loading finishes its bookkeeping
                                    ema=ema_unet, scaler=accelerator.scaler, is_lora=args.use_lora, checkpoint=lambda: resume_dir)
    if start.upstream:
        continue_upstream(resume_dir, accelerator.unwrap_model(unet), args.use_lora, optimizer, lr_scheduler, stateful["counters"],
                          args.gradient_accumulation_steps, ema=ema_unet, log=log)
    elif resume_dir is not None:
        load_process_state(resume_dir, accelerator.process_index, accelerator.num_processes, stateful)
    if resume_dir is not None and not start.upstream:
        check_resumed_counters(resume_dir, memfree.global_step)  # its counters agree with its marker
    plain_args = public_args(args)  # no secrets (--hub_token)
    if accelerator.is_main_process:
        accelerator.init_trackers("text2image-fine-tune", config={k: v for k, v in plain_args.items() if v is not None})
        run_outputs.write_run_config(output_dir, mf, plain_args)

    def save_checkpoint() -> None:
        # The live tensors may hold a proxy's weights: publish the last merge's.
        folder = run_outputs.save_checkpoint(output_dir, memfree.global_step, accelerator, stateful, method_config=mf,
                                    public_args=plain_args, trajectory=settings, unet=accelerator.unwrap_model(unet), is_lora=args.use_lora,
                                    trainable=memfree.merged_weights(),  # [memfree]
                                    barrier=memfree.collectives.barrier,
                                    ema=ema_unet, total_limit=args.checkpoints_total_limit)
        # Its size, so a user sees what K proxies' optimizer states cost (docs/design.md, "Checkpoint size").
        log.info(f"Saved checkpoint-{memfree.global_step} ({human_bytes(folder_bytes(folder))})")

    def validation_pipeline(unet_module):
        return StableDiffusionXLPipeline.from_pretrained(base, vae=vae, unet=unet_module, revision=args.revision,
                                                         variant=args.variant, torch_dtype=weight_dtype)

    step_log = StepLossLog(LOG_EVERY, args.gradient_accumulation_steps, device=accelerator.device)

    def flush_logs() -> None:
        rows = step_log.flush(memfree.collectives.all_gather if accelerator.num_processes > 1 else None)
        method_logs = memfree.logs() if rows else {}  # [memfree] merges, redistributions, skip rates, augmentation strength
        for step, value, lr in rows:
            accelerator.log({"train_loss": value, "lr": lr, **method_logs.get(step, {})}, step=step)
        if rows:
            progress.set_postfix(step_loss=rows[-1][1], lr=rows[-1][2])

    progress = tqdm(range(memfree.total_steps), initial=memfree.global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    start_step = memfree.global_step
    # Non-finite losses are counted on the device and read only where the loop syncs anyway; a stop
    # signal is acted on there too: the step finishes, is checkpointed, the run exits 143 / 130.
    stops = StepStops(stop, params, output_dir, args.learning_rate, device=accelerator.device, collectives=memfree.collectives,
                      progress=progress, end_training=accelerator.end_training, log=log,
                      stall_seconds=args.collective_timeout)
    heldout = monitor.HeldOutMonitor(heldout_split, args, unet=unet, vae=vae, text_encoder=text_encoders, tokenizer=tokenizers,  # [monitor] step 0's point
                                     scheduler=noise_scheduler, accelerator=accelerator, step=memfree.global_step, output_dir=output_dir)
    stop.defer()
    batches = iter(loader)
    target_size = torch.tensor([args.resolution, args.resolution], device=accelerator.device)
    while not memfree.done:
        batch = next(batches)
        # Randomness from the live proxy's stream: each process draws its slice of the proxy's
        # micro-batch (memfree.randn / randint / multinomial), whatever the process count.
        with accelerator.accumulate(unet):
            sample_ids = batch["sample_ids"].to(accelerator.device, non_blocking=True)
            with torch.no_grad():
                posterior = encoders.latent_dist(batch)  # vae.encode(...).latent_dist, or the cached mean and std: a sample is mean + std * N(0, 1)
                latents = (posterior.mean + posterior.std * memfree.randn(posterior.mean.shape, dtype=posterior.mean.dtype)) * vae.config.scaling_factor  # [memfree]
                latents = latents.to(weight_dtype)
                prompt_embeds, pooled = encoders.text(batch)  # encode_prompt(text_encoders, [input_ids, input_ids_2]), or the cached outputs
            noise = memfree.randn(latents.shape, dtype=latents.dtype)  # [memfree]
            if args.noise_offset:
                noise += args.noise_offset * memfree.randn((latents.shape[0], latents.shape[1], 1, 1), dtype=latents.dtype)  # [memfree]
            bsz = latents.shape[0]
            if bias is None:
                timesteps = memfree.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,))  # [memfree]
            else:
                timesteps = memfree.multinomial(bias, bsz)  # [memfree]
            timesteps = timesteps.long()
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            time_ids = torch.cat([batch["original_sizes"].to(accelerator.device), batch["crop_top_lefts"].to(accelerator.device),
                                  target_size.expand(bsz, 2)], dim=1).to(weight_dtype)
            with accelerator.autocast():
                model_pred = unet(noisy, timesteps, prompt_embeds, added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled},
                                  return_dict=False)[0]
            prediction_type = noise_scheduler.config.prediction_type
            if prediction_type == "epsilon":
                target = noise
            elif prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            elif prediction_type == "sample":  # as upstream: the model predicts noise, compared in sample space
                target, model_pred = latents, model_pred - noise
            else:
                raise ValueError(f"Unknown prediction type {prediction_type}")
            weights = min_snr_weights(noise_scheduler, timesteps, args.snr_gamma, prediction_type) if args.snr_gamma is not None else None
            losses = per_sample_loss(model_pred, target)
            stops.observe(losses)  # raw losses: AGC never keeps a non-finite one, so it must not hide it
            loss = memfree.reduce(losses, timesteps, sample_ids, weights)  # [memfree] AGC inside
            step_log.add(loss)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        stops.end_step()
        if not accelerator.optimizer_step_was_skipped:
            lr_scheduler.step()
        if ema_unet is not None:
            ema_unet.step(unet.parameters())
        step_log.end_step(memfree.global_step + memfree.step_unit, lr_scheduler.get_last_lr()[0])  # before a turn change swaps the LR
        memfree.step()  # [memfree] turns, merges, redistribution
        progress.update(memfree.step_unit)
        total = memfree.global_step
        checkpoint_due = total // args.checkpointing_steps > (total - memfree.step_unit) // args.checkpointing_steps
        sync_due = memfree.local_step % LOG_EVERY == 0 or memfree.done
        if step_log.full or sync_due or checkpoint_due:
            flush_logs()
        stops.after_step(total, checkpoint_due=checkpoint_due, sync_due=sync_due, last=memfree.done, save_checkpoint=save_checkpoint)
        if checkpoint_due:
            heldout.evaluate(total, unet, memfree.merged_weights())  # [monitor] main process only; the last merge's weights with shards
        if args.validation_prompt and accelerator.is_main_process and not memfree.done \
                and memfree.local_step % steps_per_epoch == 0 and (memfree.local_step // steps_per_epoch - 1) % args.validation_epochs == 0:
            log_validation(validation_pipeline(accelerator.unwrap_model(unet)), args, accelerator, memfree.local_step // steps_per_epoch)
    flush_logs()
    progress.close()
    stops.close()  # the loop is over: no more stall watch (the backends' timeouts still bound the rest)

    # ---- Final merge and save ---------------------------------------------------------------------
    report = memfree.end_training()  # [memfree] final merge; skip rates, shards, merges, skips per sample (all processes)
    memfree.collectives.barrier()
    summary = {"global_step": memfree.global_step, "num_shards": mf.num_shards, "output_dir": str(output_dir),
               "steps_this_run": memfree.global_step - start_step, **report.summary}
    if accelerator.is_main_process:
        final_unet = accelerator.unwrap_model(unet)
        run_outputs.check_final_weights(ema_unet.shadow_params if ema_unet is not None else params, summary["global_step"],
                                        stops.newest_checkpoint(), args.learning_rate)
        with run_outputs.staged_final_output(output_dir) as staging:  # written in full first, then moved into place
            if args.use_lora:
                StableDiffusionXLPipeline.save_lora_weights(save_directory=str(staging), unet_lora_layers=lora_state_dict(final_unet),
                                                            safe_serialization=True)
                if args.save_kohya_lora:
                    save_kohya_lora(final_unet, staging / "pytorch_lora_weights_kohya.safetensors")
            else:
                if ema_unet is not None:
                    ema_unet.copy_to(final_unet.parameters())
                parts = {"vae": vae} if args.pretrained_vae_model_name_or_path else {}  # the base model's own VAE otherwise, as it is
                pipe = StableDiffusionXLPipeline.from_pretrained(base, unet=final_unet, revision=args.revision, variant=args.variant, **parts)
                pipe.save_pretrained(str(staging), safe_serialization=True)
        run_outputs.write_memfree_state(output_dir, num_samples, summary["global_step"], report.summary)  # shard split and moves, merges
        if mf.agc_enabled:  # local only (a list of the easiest images to extract); the scorer joins it to copies
            write_run_skip_counts(output_dir, report.skip_counts.cpu().tolist(), heldout_split.loaded, image_column, caption_column,
                                  train_rows=heldout_split.train_rows)  # every row the user gave; held-out ones marked
        summary.update(heldout.finish(summary["global_step"], final_unet))  # [monitor] the end's point, monitor_curve.png
        images = []
        if args.validation_prompt:
            if args.use_lora:  # validate the LoRA just saved, loaded the way users load it
                pipe = StableDiffusionXLPipeline.from_pretrained(base, vae=vae, revision=args.revision, variant=args.variant, torch_dtype=weight_dtype)
                pipe.load_lora_weights(str(output_dir))
            else:
                pipe = validation_pipeline(final_unet)
            images = log_validation(pipe, args, accelerator, args.num_train_epochs, is_final=True)
        summary.update(run_outputs.publish_model(output_dir, args, mf, images, extra_sections=[heldout.card_section()]))  # [monitor] the curve on the card; the Hub upload with --push_to_hub
    accelerator.end_training()
    return summary


def cli(argv=None) -> None:
    """Command-line entry, as the SD script's: one-line errors instead of tracebacks; exit 2 bad
    input, 1 the run stopped on its own (diverged, disk full), 143 / 130 stopped by SIGTERM / Ctrl-C."""
    from sd_memfree.run.runguard import run_cli

    run_cli(main, parse_args(argv))


if __name__ == "__main__":
    cli()
