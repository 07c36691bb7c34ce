"""The embedded demo: fine-tune the tiny offline pipeline on the tiny captioned set, on CPU.

    sd-memfree demo --out demo_out

Builds (once, cached in ``--out/cache``) a tiny Stable-Diffusion-architecture model and a small
captioned image set with duplicates, fine-tunes with the real training script, and writes a grid
of samples generated from training captions.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sd-memfree demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--max_train_steps", type=int, default=300)
    p.add_argument("--num_images", type=int, default=16)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sample_grid(model_dir: Path, prompts: list[str], resolution: int, steps: int, seed: int, cols: int = 4):
    """Generate one image per prompt with fixed seeds and tile them into one PIL image."""
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = [pipe(p, num_inference_steps=steps, height=resolution, width=resolution,
                   generator=torch.Generator().manual_seed(seed + i)).images[0] for i, p in enumerate(prompts)]
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * resolution, rows * resolution), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * resolution, (i // cols) * resolution))
    return grid


def main(args) -> dict:
    import json

    from sd_memfree.tiny import make_tiny_dataset, make_tiny_model
    from train_scripts import train_sd_ietagc as train

    out = Path(args.out)
    cache = out / "cache"
    model_dir, data_dir = cache / "tiny-model", cache / f"tiny-data-{args.num_images}-{args.resolution}"
    if not (model_dir / "model_index.json").exists():
        make_tiny_model(model_dir, seed=args.seed)
    if not (data_dir / "metadata.jsonl").exists():
        make_tiny_dataset(data_dir, num_images=args.num_images, size=args.resolution, duplicate_fraction=0.25, duplicate_times=4, seed=args.seed)
    run_dir = out / "plain"
    summary = train.main(train.parse_args([
        f"--pretrained_model_name_or_path={model_dir}", f"--train_data_dir={data_dir}", f"--output_dir={run_dir}",
        f"--resolution={args.resolution}", "--train_batch_size=8", f"--max_train_steps={args.max_train_steps}",
        "--learning_rate=1e-3", "--lr_warmup_steps=0", f"--seed={args.seed}", "--report_to=tensorboard",
        f"--checkpointing_steps={10**9}",
    ]))
    captions = [json.loads(line)["text"] for line in (data_dir / "metadata.jsonl").read_text().splitlines()][:8]
    grid = sample_grid(run_dir, captions, args.resolution, args.num_inference_steps, args.seed)
    grid_path = out / "samples.png"
    grid.save(grid_path)
    print(f"fine-tuned model: {run_dir}\nsample grid: {grid_path}")
    return {**summary, "grid": str(grid_path)}


def cli(argv=None) -> None:
    main(parse_args(argv))


if __name__ == "__main__":
    cli()
