"""Training speed of the plain path against an upstream-style loop, and of IET-AGC / IET-AGC+
against the plain path.

Runs, in this process, on the tiny offline pipeline and the same data, interleaved (upstream,
plain, IET-AGC, IET-AGC+, upstream, ...) so that machine noise hits every configuration alike:
- ``upstream``: the training loop written the way diffusers' ``train_text_to_image.py`` /
  ``train_text_to_image_lora.py`` write it (``upstream_style_run``: a shuffled ``DataLoader``
  (RandomSampler) over ``with_transform`` preprocessing, noise from the global RNG,
  ``F.mse_loss`` mean, ``accelerator.gather(...).mean().item()`` and ``loss.item()`` every step,
  ``accelerator.log`` and a progress-bar postfix every step);
- ``plain``, ``iet_agc``, ``iet_agc_plus``: the real training script.
It prints optimizer-steps-per-second ratios (median over repeats, with the min-max over repeats
of the per-repeat ratio; wall time, and process CPU time, which stays meaningful when other
jobs share the machine) and the peak-memory ratio (CUDA: max allocated per run; CPU: peak RSS
of one run per configuration in a fresh subprocess). The last line is one JSON object of the
figures.

    python benchmarks/overhead.py [--steps 200] [--repeats 3] [--use_lora]

Goals (issue 10): plain / upstream >= 0.98, IET-AGC / plain >= 0.97 (issue 3: IET-AGC+ >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {
    "upstream": None,  # upstream_style_run, not the script
    "plain": [],
    "iet_agc": ["--num_shards=4", "--merge_every=25", "--agc_ratio=1.25"],
    "iet_agc_plus": ["--num_shards=4", "--merge_every=25", "--agc_ratio=1.25", "--redistribute_fraction=0.25",
                     "--loss_aware_augmentation"],
}


def train_argv(model: Path, data: Path, out: Path, steps: int, extra: list[str], use_lora: bool) -> list[str]:
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={out}",
            "--resolution=32", "--train_batch_size=8", f"--max_train_steps={steps}", "--learning_rate=1e-4",
            "--lr_warmup_steps=0", "--seed=0", "--report_to=none", f"--checkpointing_steps={10**9}",
            *(["--use_lora", "--rank=4"] if use_lora else []), *extra]


def upstream_style_run(model: Path, data: Path, steps: int, use_lora: bool, resolution: int = 32, batch_size: int = 8,
                       mixed_precision: str | None = None) -> dict:
    """diffusers' training loop, condensed from examples/text_to_image/train_text_to_image.py and
    train_text_to_image_lora.py (huggingface/diffusers 58eb52c), with the benchmark's settings:
    resolution 32, batch 8 and float32 unless given (``mixed_precision`` as upstream's flag), lr 1e-4 constant, seed 0, no tracker, no checkpoints. The loop body
    is upstream's line for line (LoRA: upstream's exhausted ``params_to_clip`` iterator too)."""
    import math

    import datasets
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from torchvision import transforms
    from tqdm.auto import tqdm
    from transformers import CLIPTextModel, CLIPTokenizer

    max_grad_norm = 1.0
    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision=mixed_precision, log_with=None)
    set_seed(0)
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if use_lora:
        unet.requires_grad_(False)
        unet.to(accelerator.device, dtype=weight_dtype)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        trainable = filter(lambda p: p.requires_grad, unet.parameters())
    else:
        unet.train()
        trainable = unet.parameters()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lora_layers = trainable  # the LoRA script clips this (by now exhausted) iterator

    dataset = datasets.load_dataset("imagefolder", data_dir=str(data))["train"]
    train_transforms = transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.LANCZOS), transforms.RandomCrop(resolution),
        transforms.Lambda(lambda x: x), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def preprocess_train(examples):
        images = [image.convert("RGB") for image in examples["image"]]
        examples["pixel_values"] = [train_transforms(image) for image in images]
        examples["input_ids"] = tokenizer(list(examples["text"]), max_length=tokenizer.model_max_length, padding="max_length",
                                          truncation=True, return_tensors="pt").input_ids
        return examples

    def collate_fn(examples):
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
        return {"pixel_values": pixel_values, "input_ids": torch.stack([example["input_ids"] for example in examples])}

    train_dataloader = torch.utils.data.DataLoader(dataset.with_transform(preprocess_train), shuffle=True, collate_fn=collate_fn,
                                                   batch_size=batch_size, num_workers=0)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps * accelerator.num_processes)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader, lr_scheduler)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    num_train_epochs = math.ceil(steps / len(train_dataloader))
    global_step = 0
    progress_bar = tqdm(range(0, steps), initial=0, desc="Steps", disable=not accelerator.is_local_main_process)

    start, cpu_start = time.perf_counter(), time.process_time()
    for _epoch in range(num_train_epochs):
        unet.train()
        train_loss = 0.0
        for _step, batch in enumerate(train_dataloader):
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
                timesteps = timesteps.long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                target = noise
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                avg_loss = accelerator.gather(loss.repeat(batch_size)).mean()
                train_loss += avg_loss.item() / 1
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers if use_lora else unet.parameters(), max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                progress_bar.update(1)
                global_step += 1
                accelerator.log({"train_loss": train_loss}, step=global_step)
                train_loss = 0.0
            logs = {"step_loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            progress_bar.set_postfix(**logs)
            if global_step >= steps:
                break
    progress_bar.close()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    accelerator.end_training()
    return {"steps_per_s": global_step / seconds, "steps_per_cpu_s": global_step / cpu_seconds}


def run_once(model, data, steps, name, use_lora) -> dict:
    import torch

    from train_scripts import train_sd_ietagc as train

    if name == "upstream":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        res = upstream_style_run(model, data, steps, use_lora)
        return {**res, "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        s = train.main(train.parse_args(train_argv(model, data, Path(tmp) / name, steps, CONFIGS[name], use_lora)))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"steps_per_s": s["steps_this_run"] / s["train_loop_seconds"],
            "steps_per_cpu_s": s["steps_this_run"] / s["train_loop_cpu_seconds"], "peak_cuda_bytes": peak}


def peak_rss(model, data, steps, name, use_lora) -> int:
    """Peak resident memory (bytes) of one run in a fresh process (CPU has no allocator peak)."""
    code = (
        "import resource,sys,tempfile; from pathlib import Path; sys.path.insert(0, %r);"
        "from benchmarks.overhead import run_once; run_once(Path(%r), Path(%r), %d, %r, %r);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)" % (str(REPO), str(model), str(data), steps, name, use_lora)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1]) * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--use_lora", action="store_true")
    p.add_argument("--cache", default=str(REPO / "bench_out" / "overhead"))
    p.add_argument("--no_memory", action="store_true", help="skip the CPU peak-RSS subprocess runs")
    args = p.parse_args()

    import logging

    import torch

    from sd_memfree.testing.tiny import make_tiny_dataset, make_tiny_model

    logging.disable(logging.WARNING)
    cache = Path(args.cache)
    model, data = cache / "model", cache / "data"
    if not (model / "model_index.json").exists():
        make_tiny_model(model)
    if not (data / "metadata.jsonl").exists():
        make_tiny_dataset(data, num_images=64, size=32, duplicate_fraction=0.25, duplicate_times=4)

    for name in ("upstream", "plain"):  # warm-up: imports, allocator, caches
        run_once(model, data, 10, name, args.use_lora)
    speeds: dict[str, list[float]] = {name: [] for name in CONFIGS}
    cpu_speeds: dict[str, list[float]] = {name: [] for name in CONFIGS}
    peaks: dict[str, list[int]] = {name: [] for name in CONFIGS}
    for r in range(args.repeats):
        for name in CONFIGS:
            res = run_once(model, data, args.steps, name, args.use_lora)
            speeds[name].append(res["steps_per_s"])
            cpu_speeds[name].append(res["steps_per_cpu_s"])
            if res["peak_cuda_bytes"] is not None:
                peaks[name].append(res["peak_cuda_bytes"])
            print(f"repeat {r}  {name:<13} {res['steps_per_s']:.2f} steps/s  {res['steps_per_cpu_s']:.2f} steps/CPU-s", flush=True)
    if not torch.cuda.is_available() and not args.no_memory:
        for name in CONFIGS:
            peaks[name].append(peak_rss(model, data, max(20, args.steps // 4), name, args.use_lora))

    # (numerator, denominator) of each reported ratio
    pairs = {"plain_vs_upstream": ("plain", "upstream"), "iet_agc": ("iet_agc", "plain"), "iet_agc_plus": ("iet_agc_plus", "plain")}

    def ratios(per_run: dict[str, list[float]]) -> dict:
        """Median ratio, and the min and max of the per-repeat ratios (runs of one repeat are adjacent)."""
        out = {}
        for key, (a, b) in pairs.items():
            each = [x / y for x, y in zip(per_run[a], per_run[b])]
            out[key] = {"median": round(statistics.median(per_run[a]) / statistics.median(per_run[b]), 4),
                        "min": round(min(each), 4), "max": round(max(each), 4)}
        return out

    figures = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "mode": "lora" if args.use_lora else "full",
        "steps": args.steps, "repeats": args.repeats,
        "steps_per_s": {k: round(statistics.median(v), 3) for k, v in speeds.items()},
        "time_ratio": ratios(speeds),
        # Process CPU time: robust when other jobs share the machine (wall time is not).
        "steps_per_cpu_s": {k: round(statistics.median(v), 3) for k, v in cpu_speeds.items()},
        "cpu_time_ratio": ratios(cpu_speeds),
    }
    if all(peaks.values()):
        kind = "peak_cuda_allocated" if torch.cuda.is_available() else "peak_rss"
        figures[kind + "_bytes"] = {k: max(v) for k, v in peaks.items()}
        figures["memory_ratio"] = {key: round(max(peaks[a]) / max(peaks[b]), 4) for key, (a, b) in pairs.items()}
    goals = {"plain_vs_upstream": "plain / upstream-style, goal 0.98", "iet_agc": "IET-AGC / plain, goal 0.97",
             "iet_agc_plus": "IET-AGC+ / plain, floor 0.95"}
    for key, label in goals.items():
        w, c = figures["time_ratio"][key], figures["cpu_time_ratio"][key]
        print(f"{label:<36} wall {w['median']:.3f} ({w['min']:.3f}-{w['max']:.3f})   CPU {c['median']:.3f} ({c['min']:.3f}-{c['max']:.3f})")
    if "memory_ratio" in figures:
        print("peak memory ratio " + ", ".join(f"{k} {v:.3f}" for k, v in figures["memory_ratio"].items()))
    print(json.dumps(figures))

if __name__ == "__main__":
    main()
