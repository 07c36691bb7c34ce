#!/usr/bin/env python
"""Fine-tune Stable Diffusion (full or LoRA) with IET-AGC / IET-AGC+ memorization mitigation.

A drop-in for diffusers' ``examples/text_to_image/train_text_to_image.py`` and
``train_text_to_image_lora.py``: every flag of both keeps its name, default and meaning;
``--use_lora`` switches to LoRA. With ``--num_shards=1`` and AGC, redistribution and augmentation
off, the training math is upstream's; the random stream and data order are our own (for exact
resume). Every difference: docs/design.md, "Differences from diffusers' scripts".

Every place where the method enters the loop is tagged ``# [memfree]``. Method spec:
docs/method.md (shards, proxies, rounds, merges, AGC, loss bank, redistribution, loss-aware
augmentation).

    accelerate launch train_scripts/train_sd_ietagc.py --pretrained_model_name_or_path=... \
        --train_data_dir=./my_images --resolution=256 --num_shards=4 --merge_every=2000 \
        --agc_ratio=1.25 --output_dir=sd-private
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch

from sd_memfree import collectives, encoder_cache, monitor
from sd_memfree.config import MemFreeConfig
from sd_memfree.run.recipe_args import add_recipe_arguments, check_recipe_args

logger = logging.getLogger("sd_memfree.train")

LOG_EVERY = 10  # optimizer steps between host syncs for logging (the step itself never syncs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # --- upstream flags (train_text_to_image.py and train_text_to_image_lora.py) -------------
    parser.add_argument("--input_perturbation", type=float, default=0, help="The scale of input perturbation. Recommended 0.1.")
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=None, required=True,
                        help="Path to pretrained model or model identifier from huggingface.co/models.")
    parser.add_argument("--revision", type=str, default=None, help="Revision of pretrained model identifier from huggingface.co/models.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the model files of the pretrained model identifier, e.g. fp16.")
    parser.add_argument("--dataset_name", type=str, default=None,
                        help="Name of a Hub dataset, or a local folder of files that datasets can read.")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="The config of the Dataset, leave as None if there's only one config.")
    parser.add_argument("--train_data_dir", type=str, default=None,
                        help="A folder of training images in imagefolder layout with a metadata.jsonl of captions. Ignored if --dataset_name is given.")
    parser.add_argument("--image_column", type=str, default="image", help="The column of the dataset containing an image.")
    parser.add_argument("--caption_column", type=str, default="text", help="The column of the dataset containing a caption or a list of captions.")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Truncate the number of training examples to this value if set.")
    parser.add_argument("--validation_prompts", type=str, default=None, nargs="+",
                        help="Prompts evaluated every --validation_epochs and logged to --report_to (full fine-tuning script's flag).")
    parser.add_argument("--validation_prompt", type=str, default=None,
                        help="A prompt sampled --num_validation_images times every --validation_epochs (LoRA script's flag).")
    parser.add_argument("--num_validation_images", type=int, default=4, help="Number of images generated for --validation_prompt.")
    parser.add_argument("--validation_epochs", type=int, default=None,
                        help="Run validation every X epochs (upstream default: 5 for full fine-tuning, 1 for LoRA).")
    parser.add_argument("--output_dir", type=str, default=None,
                        help="Where the model and checkpoints are written (upstream default: sd-model-finetuned, or sd-model-finetuned-lora with --use_lora).")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    parser.add_argument("--resolution", type=int, default=512, help="Input images are resized to this resolution.")
    parser.add_argument("--center_crop", default=False, action="store_true", help="Center crop instead of random crop.")
    parser.add_argument("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    parser.add_argument("--image_interpolation_mode", type=str, default="lanczos",
                        choices=["nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos"],
                        help="The image interpolation method to use for resizing images.")
    parser.add_argument("--train_batch_size", type=int, default=16, help="Batch size (per device, per proxy) for the training dataloader.")
    parser.add_argument("--num_train_epochs", type=int, default=100)
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="Total number of optimizer steps, summed over proxies. If provided, overrides num_train_epochs.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Updates steps to accumulate before an optimizer step.")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet backward pass.")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Initial learning rate (after warmup).")
    parser.add_argument("--scale_lr", action="store_true", default=False,
                        help="Scale the learning rate by the number of GPUs, gradient accumulation steps, and batch size.")
    parser.add_argument("--lr_scheduler", type=str, default="constant",
                        help='One of "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup".')
    parser.add_argument("--lr_warmup_steps", type=int, default=500, help="Number of steps for the warmup in the lr scheduler.")
    parser.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (https://arxiv.org/abs/2303.09556); 5.0 recommended.")
    parser.add_argument("--dream_training", action="store_true",
                        help="DREAM (https://arxiv.org/abs/2312.00210); accepted for compatibility, not supported with sd_memfree (error if set).")
    parser.add_argument("--dream_detail_preservation", type=float, default=1.0, help="DREAM detail preservation factor (see --dream_training).")
    parser.add_argument("--use_8bit_adam", action="store_true", help="Use 8-bit AdamW from bitsandbytes.")
    parser.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    parser.add_argument("--use_ema", action="store_true", help="Keep an EMA of the UNet (full fine-tuning).")
    parser.add_argument("--offload_ema", action="store_true", help="Offload the EMA model to CPU between steps.")
    parser.add_argument("--foreach_ema", action="store_true", help="Use faster foreach EMA updates.")
    parser.add_argument("--non_ema_revision", type=str, default=None, help="Revision of the pretrained non-EMA UNet.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses; 0 loads in the main process.")
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="The beta1 parameter for the Adam optimizer.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="The beta2 parameter for the Adam optimizer.")
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2, help="Weight decay to use.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-08, help="Epsilon value for the Adam optimizer.")
    parser.add_argument("--max_grad_norm", default=1.0, type=float, help="Max gradient norm.")
    parser.add_argument("--push_to_hub", action="store_true", help="Push the model (not the checkpoints) to the Hub.")
    parser.add_argument("--hub_token", type=str, default=None, help="The token to use to push to the Model Hub.")
    parser.add_argument("--prediction_type", type=str, default=None,
                        help="'epsilon' or 'v_prediction'; None keeps the scheduler's prediction_type.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="The Hub repository to push to (default: output_dir's name).")
    parser.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard log directory, relative to output_dir.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                        help="Mixed precision; defaults to the accelerate config.")
    parser.add_argument("--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb", "comet_ml", "all" or "none".')
    parser.add_argument("--local_rank", type=int, default=-1, help="For distributed training: local_rank")
    parser.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every X optimizer steps.")
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="Max number of checkpoints to store.")
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help='A checkpoint folder (anywhere) or "latest" (newest complete one in output_dir).')
    parser.add_argument("--enable_xformers_memory_efficient_attention", action="store_true", help="Whether or not to use xformers.")
    parser.add_argument("--noise_offset", type=float, default=0, help="The scale of noise offset.")
    parser.add_argument("--tracker_project_name", type=str, default="text2image-fine-tune", help="project_name for Accelerator.init_trackers.")
    parser.add_argument("--rank", type=int, default=4, help="The dimension of the LoRA update matrices (with --use_lora).")
    # --- ours -----------------------------------------------------------------------------
    add_recipe_arguments(parser, lora_script="train_text_to_image_lora.py")
    monitor.add_arguments(parser)  # [monitor] --heldout_data_dir / --heldout_fraction, --monitor_samples, --audit_file
    encoder_cache.add_arguments(parser)  # --cache_latents, --cache_text_embeddings, --latent_cache_dir

    args = parser.parse_args(argv)
    if args.dream_training:
        parser.error("--dream_training is not supported with sd_memfree: DREAM's extra forward pass bypasses the per-sample AGC mask; drop the flag.")
    encoder_cache.check_arguments(parser, args)
    if args.prediction_type not in (None, "epsilon", "v_prediction"):
        parser.error(f"--prediction_type={args.prediction_type} is unknown; use epsilon or v_prediction (or leave it unset).")
    if args.validation_epochs is None:
        args.validation_epochs = 1 if args.use_lora else 5
    if args.output_dir is None:  # each upstream script's own default
        args.output_dir = "sd-model-finetuned-lora" if args.use_lora else "sd-model-finetuned"
    if args.non_ema_revision is None:
        args.non_ema_revision = args.revision
    return check_recipe_args(parser, args)


def log_validation(pipeline_parts, args, accelerator, weight_dtype, step, is_final=False):
    """Generate validation images and log them to the trackers; returns the images."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    prompts = list(args.validation_prompts or []) + [args.validation_prompt] * (args.num_validation_images if args.validation_prompt else 0)
    if not prompts:
        return []
    pipe = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, torch_dtype=weight_dtype,
        safety_checker=None, requires_safety_checker=False, **pipeline_parts)
    pipe = pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed if args.seed is not None else 0)
    images = []
    for prompt in prompts:
        with accelerator.autocast():
            images.append(pipe(prompt, num_inference_steps=30 if args.use_lora else 20, generator=generator, height=args.resolution, width=args.resolution).images[0])
    phase = "test" if is_final else "validation"
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(phase, np.stack([np.asarray(img) for img in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({phase: [wandb.Image(img, caption=f"{i}: {p}") for i, (img, p) in enumerate(zip(images, prompts))]})
    del pipe
    return images


def main(args) -> dict:
    """Train under ``output_dir``'s run lock, with SIGTERM / Ctrl-C handled (``sd_memfree.run.runguard``);
    returns a summary dict (steps, merges, skip statistics, output paths).

    Raises:
        RunStopped: the run stopped early with a one-line reason and an exit code: SIGTERM / SIGINT
            (after writing a checkpoint of the step in progress), non-finite losses, a full disk.
        OutputDirError, RunLockHeld: ``--output_dir`` is unusable or in use, before any model loads.
    """
    from sd_memfree.run.runguard import guarded_run

    return guarded_run(args.output_dir, lambda stop: train(args, stop), collective_timeout=args.collective_timeout)


def train(args, stop) -> dict:
    """The training run itself (see :func:`main`); ``stop`` is the run's :class:`~sd_memfree.run.stopping.StopSignals`."""
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import CLIPTextModel, CLIPTokenizer

    from sd_memfree import MemFree
    from sd_memfree.collectives import ProcessLayout, refuse_sharded_engines, timeout
    from sd_memfree.run import outputs as run_outputs
    from sd_memfree.data import IndexedCaptionDataset, build_image_transforms, check_resolution, collate
    from sd_memfree.method.losses import min_snr_weights, per_sample_loss
    from sd_memfree.run.recipe_args import public_args
    from sd_memfree.run.recipe_setup import (check_model_folder, checkpointed_objects, configure_logging, create_optimizer,
                                         load_training_data, prepare_output_dir)
    from sd_memfree.run.resume import data_fingerprint, trajectory_settings
    from sd_memfree.run.skipcounts import write_run_skip_counts
    from sd_memfree.run.startpoint import check_resumed_counters, continue_upstream, plan_start
    from sd_memfree.run.state import load_process_state
    from sd_memfree.run.steplog import StepLossLog
    from sd_memfree.run.stopping import StepStops
    from sd_memfree.trainable import add_lora, save_full_pipeline, save_lora, trainable_parameters, upcast_trainable_
    from sd_memfree.run.disk_size import folder_bytes, human_bytes

    mf: MemFreeConfig = args.memfree
    output_dir = Path(args.output_dir)
    logging_dir = output_dir / args.logging_dir
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
    )
    log = get_logger("sd_memfree.train")
    configure_logging(accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    K = mf.num_shards
    refuse_sharded_engines(accelerator)
    # Before the data is decoded: W must divide K or be a multiple of it (one line naming the
    # process counts that work); D processes share each proxy's micro-batch.
    layout = ProcessLayout(K, world, rank)
    if args.seed is not None:
        set_seed(args.seed)
    seed = args.seed if args.seed is not None else 0

    # ---- Validate everything a user can get wrong, before any model loads ----------------------
    check_model_folder(args.pretrained_model_name_or_path)
    vae_config = AutoencoderKL.load_config(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision)
    check_resolution(args.resolution, 2 ** (len(vae_config["block_out_channels"]) - 1),
                     generates_images=bool(args.validation_prompts or args.validation_prompt))
    # Every image decoded and every caption checked now, so no bad sample stops the run mid-way.
    dataset, image_column, caption_column, dropped = load_training_data(args, accelerator, log)
    dataset, heldout_split = monitor.split_heldout(args, dataset, image_column, caption_column)  # [monitor] held-out rows never reach training
    num_samples = len(dataset)
    noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    # The budget, in proxy steps: each takes D x --train_batch_size samples per micro-step.
    samples_per_step = args.train_batch_size * layout.group_size * args.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(num_samples / samples_per_step))
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    memfree = MemFree(mf, num_samples=num_samples, num_train_timesteps=noise_scheduler.config.num_train_timesteps,  # [memfree]
                      max_train_steps=args.max_train_steps, seed=seed, accelerator=accelerator,
                      storage_device=accelerator.device if args.use_lora else "cpu",
                      collective_timeout=timeout(args.collective_timeout))  # raises if K > num_samples
    # What a resume must match (resume.py), also written into every checkpoint.
    trajectory = trajectory_settings(args, accelerator.mixed_precision, num_samples,
                                     data_fingerprint(dataset, image_column, caption_column))
    # Ours to resume exactly, or another script's checkpoint (diffusers' example scripts) to continue
    # from its weights only; never one that would overwrite or mix with what another run wrote.
    start = plan_start(args.resume_from_checkpoint, output_dir, trajectory, max_train_steps=args.max_train_steps,
                       num_shards=K, merge_every=mf.merge_every, log=log)
    resume_dir, upstream = start.resume_dir, start.upstream

    prepare_output_dir(args, accelerator, dropped)  # as upstream, a bad Hub repo id or token fails now, not after training

    # ---- Models -----------------------------------------------------------------------------------
    tokenizer = CLIPTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer", revision=args.revision)
    text_encoder = CLIPTextModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder", revision=args.revision, variant=args.variant)
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision, variant=args.variant)
    unet = UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet", revision=args.non_ema_revision, variant=args.variant)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if args.use_lora:
        unet.to(accelerator.device, dtype=weight_dtype)  # frozen base in half precision, as upstream
        add_lora(unet, args.rank)
        if accelerator.mixed_precision in ("fp16", "bf16"):
            upcast_trainable_(unet)
    else:
        unet.train()
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    ema_unet = None
    if args.use_ema:
        ema_unet = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config, foreach=args.foreach_ema)
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise ValueError("xformers is not available: pip install 'sd-memfree[xformers]' or drop --enable_xformers_memory_efficient_attention.")
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- Optimizer, schedule --------------------------------------------------------------------
    params = trainable_parameters(unet)
    optimizer = create_optimizer(params, args, world)  # AdamW (8-bit with --use_8bit_adam), LR scaled with --scale_lr
    # Every proxy takes the same number of steps (MemFree's round schedule), so every shard weighs
    # the same in the final merge.
    schedule = memfree.schedule
    if schedule.total_steps != args.max_train_steps or schedule.last_round_steps:
        log.warning(f"--max_train_steps={args.max_train_steps} is not a whole number of rounds ({K} proxies x --merge_every={mf.merge_every}): "
                    f"the last round is shortened to {schedule.last_round_steps} step(s) per proxy so that every shard weighs the same "
                    f"in the final merge; training runs {schedule.total_steps} steps ({schedule.dropped_steps} that cannot be shared equally dropped).")
    total_steps = memfree.total_steps  # summed over proxies and processes
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=memfree.lr_schedule_steps)  # [memfree] each proxy's own schedule

    # ---- Data ---------------------------------------------------------------------------------------
    geometric, to_tensor = build_image_transforms(args.resolution, args.center_crop, args.random_flip, args.image_interpolation_mode)
    train_dataset = IndexedCaptionDataset(dataset, image_column, caption_column, tokenizer, geometric, to_tensor,
                                          augment=memfree.augment)  # [memfree] loss-aware augmentation (None when off)
    gas = args.gradient_accumulation_steps
    # Frozen encoders computed once (--cache_latents, --cache_text_embeddings): the loader reads the cached rows,
    # the loop encodes only the rest (augmented samples, or everything without the flags).
    train_dataset, collate_fn, encoders = encoder_cache.prepare(
        args, train_dataset, collate, hf_dataset=dataset, image_column=image_column, captions=train_dataset.captions,
        caption_of=train_dataset.caption_for, tokenizers=[tokenizer], vae=vae, text_encoders=[text_encoder],
        encode_text=lambda ids: text_encoder(ids[0], return_dict=False)[0], pipeline="sd", augment=memfree.augment,
        rank=rank, world=world, barrier=memfree.collectives.barrier, device=accelerator.device, log=log,
        progress=accelerator.is_local_main_process)
    loader = DataLoader(train_dataset, batch_size=args.train_batch_size, collate_fn=collate_fn, num_workers=args.dataloader_num_workers)
    # The proxies swap their own optimizer state and LR position in turn; the UNet is wrapped in DDP
    # over the processes that share its proxy (all of them without shards), never across proxies;
    # each micro-batch comes from the shard of the proxy that trains, and the loader follows shard
    # changes by itself.
    unet, optimizer, lr_scheduler, loader = memfree.prepare(unet, optimizer, lr_scheduler, loader)  # [memfree]
    if ema_unet is not None:
        ema_unet.to("cpu" if args.offload_ema else accelerator.device)

    # Every process's state for an exact resume (full fine-tuning's weights are read back from the
    # checkpoint's model folders, not stored twice).
    stateful = checkpointed_objects(accelerator.unwrap_model(unet), optimizer, lr_scheduler,
                                    memfree.stateful_objects(),  # [memfree] loading them finishes the method's own bookkeeping
                                    ema=ema_unet, scaler=accelerator.scaler, is_lora=args.use_lora, checkpoint=lambda: resume_dir)

    if upstream:
        continue_upstream(resume_dir, accelerator.unwrap_model(unet), args.use_lora, optimizer, lr_scheduler, stateful["counters"], gas,
                          ema=ema_unet, log=log)
    elif resume_dir is not None:
        load_process_state(resume_dir, rank, world, stateful)
        check_resumed_counters(resume_dir, memfree.global_step)  # its counters agree with its marker
        log.info(f"Resumed from {resume_dir} at step {memfree.global_step}")

    # Secrets (--hub_token) never reach train_args.json, the tracker config or the card.
    plain_args = public_args(args)
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config={k: v for k, v in plain_args.items() if v is not None})
        run_outputs.write_run_config(output_dir, mf, plain_args)

    log.info(f"***** Running training: {num_samples} samples, {K} shard(s), {total_steps} optimizer steps (summed over proxies), "
             f"batch {args.train_batch_size} per process x {layout.group_size} process(es) per proxy x accumulation {gas} *****")
    progress = tqdm(range(total_steps), initial=memfree.global_step, desc="Steps", disable=not accelerator.is_local_main_process)

    def save_checkpoint() -> None:
        """The model in the final output's form plus every process's state for an exact resume."""
        step = memfree.global_step
        # With shards the live parameters hold a proxy's weights: publish the last merge's.
        folder = run_outputs.save_checkpoint(output_dir, step, accelerator, stateful, method_config=mf, public_args=plain_args, trajectory=trajectory,
                                    unet=accelerator.unwrap_model(unet), is_lora=args.use_lora,
                                    trainable=memfree.merged_weights(),  # [memfree]
                                    barrier=memfree.collectives.barrier,
                                    ema=ema_unet, total_limit=args.checkpoints_total_limit)
        # Its size, so a user sees what K proxies' optimizer states cost (docs/design.md, "Checkpoint size").
        log.info(f"Saved checkpoint-{step} ({human_bytes(folder_bytes(folder))})")

    data_iter = iter(loader)
    # train_loss of every optimizer step, read from the device in one sync per flush (StepLossLog).
    step_log = StepLossLog(LOG_EVERY, gas, device=accelerator.device)

    def flush_logs() -> None:
        """Log train_loss and lr of each step since the last flush under its own step number, with
        the method's values of that step, then the progress bar. Called at the same steps on every
        process (the loss is gathered), and before any other tracker log, so steps only grow."""
        rows = step_log.flush(memfree.collectives.all_gather if world > 1 else None)
        if not rows:
            return
        method_logs = memfree.logs()  # [memfree] merges, redistributions at their steps; skip rates, augmentation strength
        for step, value, lr in rows:
            logs = {"train_loss": value, "lr": lr, **method_logs.get(step, {})}
            accelerator.log(logs, step=step)
        postfix = {"step_loss": value, "lr": lr}
        if K > 1:
            postfix.update(proxy=memfree.current_proxy if not memfree.done else "-",
                           round=memfree.local_step // (mf.merge_every * len(memfree.local_proxies)))
        if "agc/skip_rate" in logs:
            postfix["skip"] = f"{logs['agc/skip_rate']:.2f}"
        progress.set_postfix(**postfix)

    unet.train()
    loop_start, loop_cpu_start = time.perf_counter(), time.process_time()
    start_step = memfree.global_step
    # Non-finite losses are counted on the device (the step never waits) and read only where the
    # loop syncs anyway: every LOG_EVERY steps and before a checkpoint; a stop signal is acted on
    # there too (StepStops).
    stops = StepStops(stop, params, output_dir, args.learning_rate, device=accelerator.device, collectives=memfree.collectives,
                      progress=progress, end_training=accelerator.end_training, log=log,
                      stall_seconds=args.collective_timeout)

    heldout = monitor.HeldOutMonitor(heldout_split, args, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,  # [monitor] step 0's point
                                     scheduler=noise_scheduler, accelerator=accelerator, step=memfree.global_step, output_dir=output_dir)
    stop.defer()  # from here on SIGTERM / Ctrl-C finish the optimizer step and write a checkpoint
    while not memfree.done:
        batch = next(data_iter)
        # Randomness from the live proxy's stream: each process draws its slice of the proxy's
        # micro-batch (memfree.randn / randint), so the draws do not depend on the process count.
        with accelerator.accumulate(unet):
            sample_ids = batch["sample_ids"].to(accelerator.device, non_blocking=True)
            with torch.no_grad():
                posterior = encoders.latent_dist(batch)  # vae.encode(...).latent_dist, or the cached mean and std: a sample is mean + std * N(0, 1)
                latents = (posterior.mean + posterior.std * memfree.randn(posterior.mean.shape, dtype=posterior.mean.dtype)) * vae.config.scaling_factor  # [memfree]
                encoder_hidden_states = encoders.text(batch)  # text_encoder(input_ids)[0], or the cached embeddings
            noise = memfree.randn(latents.shape, dtype=latents.dtype)  # [memfree]
            if args.noise_offset:
                noise += args.noise_offset * memfree.randn((latents.shape[0], latents.shape[1], 1, 1), dtype=latents.dtype)  # [memfree]
            if args.input_perturbation:
                new_noise = noise + args.input_perturbation * memfree.randn(noise.shape, dtype=noise.dtype)  # [memfree]
            bsz = latents.shape[0]
            timesteps = memfree.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,)).long()  # [memfree]
            noisy_latents = noise_scheduler.add_noise(latents, new_noise if args.input_perturbation else noise, timesteps)
            if noise_scheduler.config.prediction_type == "epsilon":
                target = noise
            elif noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
            with accelerator.autocast():
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            losses = per_sample_loss(model_pred, target)  # [B], before any SNR weighting
            stops.observe(losses)  # raw losses: AGC never keeps a non-finite one, so it must not hide it
            weights = min_snr_weights(noise_scheduler, timesteps, args.snr_gamma, noise_scheduler.config.prediction_type) if args.snr_gamma is not None else None
            # AGC skips abnormally low losses for their timestep; reduce also counts the micro-step.
            loss = memfree.reduce(losses, timesteps, sample_ids, weights)  # [memfree]
            step_log.add(loss)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)  # a list: really clips (upstream passes an exhausted iterator for LoRA)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue

        # ---- after each optimizer step ----
        stops.end_step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skipped the update: the LR waits (as upstream's prepared scheduler)
            lr_scheduler.step()
        if ema_unet is not None:
            if args.offload_ema:
                ema_unet.to(accelerator.device, non_blocking=True)
            ema_unet.step(unet.parameters())
            if args.offload_ema:
                ema_unet.to("cpu", non_blocking=True)
        step_log.end_step(memfree.global_step + memfree.step_unit, lr_scheduler.get_last_lr()[0])  # before a turn change swaps the LR
        progress.update(memfree.step_unit)
        memfree.step()  # [memfree] counts the step; turns, merges, redistribution
        total = memfree.global_step  # optimizer steps summed over proxies and processes
        # The last step is checkpointed too when it falls on --checkpointing_steps, as upstream.
        checkpoint_due = total // args.checkpointing_steps > (total - memfree.step_unit) // args.checkpointing_steps
        sync_due = memfree.local_step % LOG_EVERY == 0 or memfree.done
        if step_log.full or sync_due or checkpoint_due:
            flush_logs()  # a checkpoint's logs are complete up to its step
        # Divergence and stop signals are checked at the sync points (one sync); a signal makes this
        # step's checkpoint and stops the run (exit 128 + signal), on every process after the same step.
        stops.after_step(total, checkpoint_due=checkpoint_due, sync_due=sync_due, last=memfree.done, save_checkpoint=save_checkpoint)
        if checkpoint_due:
            heldout.evaluate(total, unet, memfree.merged_weights())  # [monitor] main process only; the last merge's weights with shards
        # Validation after epoch e (0-based) when e % --validation_epochs == 0, as upstream; the
        # last step is left to the final validation.
        if (args.validation_prompts or args.validation_prompt) and not memfree.done \
                and memfree.local_step % steps_per_epoch == 0 and (memfree.local_step // steps_per_epoch - 1) % args.validation_epochs == 0:
            flush_logs()  # on every process: the flush gathers
            if accelerator.is_main_process:
                if ema_unet is not None:  # validate the EMA weights, as upstream; training goes on from its own
                    ema_unet.store(unet.parameters())
                    ema_unet.copy_to(unet.parameters())
                parts = {"unet": accelerator.unwrap_model(unet), "text_encoder": text_encoder, "vae": vae}
                log_validation(parts, args, accelerator, weight_dtype, memfree.global_step)
                if ema_unet is not None:
                    ema_unet.restore(unet.parameters())
    flush_logs()  # steps of a loop left early
    progress.close()
    stops.close()  # the loop is over: no more stall watch (the backends' timeouts still bound the rest)
    loop_seconds, loop_cpu_seconds = time.perf_counter() - loop_start, time.process_time() - loop_cpu_start

    # ---- Final merge and save --------------------------------------------------------------------
    # The budget ends with a merge (see RoundSchedule). Only a run stopped mid-round merges here,
    # with every local proxy weighted by the steps it took in that round.
    report = memfree.end_training()  # [memfree] whole-run skip rates (this process's proxies), shards, merges, skips per sample
    memfree.collectives.barrier()
    summary = {"global_step": memfree.global_step, "num_shards": K, "output_dir": str(output_dir),
               "train_loop_seconds": loop_seconds, "train_loop_cpu_seconds": loop_cpu_seconds, "steps_this_run": memfree.global_step - start_step}
    method_summary = report.summary
    summary.update({k: v for k, v in method_summary.items() if k.startswith("agc/")})
    if accelerator.is_main_process:
        final_unet = accelerator.unwrap_model(unet)
        run_outputs.check_final_weights(ema_unet.shadow_params if ema_unet is not None else params, memfree.global_step,
                                        stops.newest_checkpoint(), args.learning_rate)
        with run_outputs.staged_final_output(output_dir) as staging:  # written in full first, then moved into place
            if args.use_lora:
                save_lora(final_unet, staging)
            else:
                if ema_unet is not None:
                    ema_unet.copy_to(final_unet.parameters())
                save_full_pipeline(final_unet, args.pretrained_model_name_or_path, staging, revision=args.revision, variant=args.variant)
        # shard split and moves, merges
        state = run_outputs.write_memfree_state(output_dir, num_samples, memfree.global_step, method_summary)
        if mf.agc_enabled:  # local only (a list of the easiest images to extract); the scorer joins it to copies
            write_run_skip_counts(output_dir, report.skip_counts.cpu().tolist(), heldout_split.loaded, image_column, caption_column,
                                  train_rows=heldout_split.train_rows)  # every row the user gave; held-out ones marked
        summary.update(state)
        summary.update(heldout.finish(memfree.global_step, final_unet))  # [monitor] the end's point, monitor_curve.png
        images = []
        if args.validation_prompts or args.validation_prompt:
            parts = {"unet": final_unet} if not args.use_lora else {}
            if args.use_lora:
                # validation with the LoRA weights just saved, loaded the way users load them
                from diffusers import StableDiffusionPipeline

                pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                                                               safety_checker=None, requires_safety_checker=False, torch_dtype=weight_dtype)
                pipe.load_lora_weights(str(output_dir))
                parts = {"unet": pipe.unet}
            images = log_validation(parts, args, accelerator, weight_dtype, memfree.global_step, is_final=True)
        summary.update(run_outputs.publish_model(output_dir, args, mf, images, extra_sections=[heldout.card_section()]))  # [monitor] the curve on the card; the Hub upload with --push_to_hub
    accelerator.end_training()
    return summary


def cli(argv=None) -> None:
    """Command-line entry: one-line errors for bad input instead of tracebacks.

    Exit codes: 0 done; 2 bad input (incl. an unusable or locked --output_dir); 1 the run stopped on
    its own (non-finite loss, disk full); 143 / 130 stopped by SIGTERM / Ctrl-C (128 + signal).
    """
    from sd_memfree.run.runguard import run_cli

    run_cli(main, parse_args(argv))


if __name__ == "__main__":
    cli()
