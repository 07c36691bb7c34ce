"""Generations to score: sample training captions, run the pipeline, or read a folder of images.

A generations folder has the imagefolder layout of the training data: image files plus
``metadata.jsonl`` rows ``{"file_name", "text"}`` (and, when we generated them, ``seed`` and
``train_index``, the row of the training caption). ``generate_images`` writes that layout and
``read_generated_dir`` reads it, so ``--generated_dir`` can re-score an earlier run.

Invariants:
- Prompt sampling is a pure function of (captions, num_prompts, seed): without replacement,
  ``random.Random(seed)``.
- Generated image ``g`` (0-based, prompt-major) uses its own ``torch.Generator`` seeded
  ``seed + g``, so an image does not depend on the batch size or on which batch it fell in.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One image to score: its file, its prompt and (when known) the training row of the prompt."""

    file_name: str
    text: str
    seed: int | None = None
    train_index: int | None = None


def caption_text(caption) -> str:
    """A caption cell as one string (datasets may store several captions per image: take the first)."""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple)) and caption:
        return str(caption[0])
    return str(caption)


def sample_prompts(captions: Sequence, num_prompts: int, seed: int) -> list[tuple[int, str]]:
    """``num_prompts`` distinct training rows ``(index, caption)`` drawn with ``random.Random(seed)``.

    If the set has fewer captions, all of them are used (the count actually scored is recorded).
    """
    if num_prompts < 1:
        raise ValueError(f"--num_prompts must be >= 1, got {num_prompts}.")
    n = len(captions)
    if num_prompts > n:
        logger.warning("--num_prompts %d > %d training captions: scoring all %d.", num_prompts, n, n)
        num_prompts = n
    rows = sorted(random.Random(seed).sample(range(n), num_prompts))
    return [(i, caption_text(captions[i])) for i in rows]


def load_pipeline(model: str, lora_weights: str | None, device: torch.device):
    """``StableDiffusionPipeline`` from a folder or Hub id, with LoRA weights loaded on top if given."""
    from diffusers import StableDiffusionPipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if lora_weights:
        pipe.load_lora_weights(lora_weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate_images(
    pipe,
    prompts: Sequence[tuple[int, str]],
    out_dir: str | Path,
    images_per_prompt: int = 1,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    batch_size: int = 8,
    seed: int = 42,
) -> list[Generation]:
    """Generate ``images_per_prompt`` images per prompt into ``out_dir`` (PNG + ``metadata.jsonl``)."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(g, idx, text) for g, (idx, text) in enumerate((p for p in prompts for _ in range(images_per_prompt)))]
    device = pipe.device
    records: list[Generation] = []
    for b0 in tqdm(range(0, len(jobs), batch_size), desc="generate", unit="batch"):
        batch = jobs[b0 : b0 + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(seed + g) for g, _, _ in batch]
        images = pipe(
            prompt=[t for _, _, t in batch],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
            generator=gens,
        ).images
        for (g, idx, text), im in zip(batch, images):
            name = f"{g:05d}.png"
            im.save(out_dir / name)
            records.append(Generation(name, text, seed + g, idx))
    with open(out_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.__dict__) + "\n")
    return records


def read_generated_dir(folder: str | Path) -> list[Generation]:
    """Read a generations folder (image files + ``metadata.jsonl`` with ``file_name`` and ``text``)."""
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: --generated_dir needs a metadata.jsonl with one {{\"file_name\", \"text\"}} row per image.")
    out = []
    with open(meta, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "file_name" not in row or "text" not in row:
                raise ValueError(f"{meta}:{lineno} needs 'file_name' and 'text'.")
            if not (folder / row["file_name"]).is_file():
                raise FileNotFoundError(f"{folder / row['file_name']} listed in {meta}:{lineno} is missing.")
            out.append(Generation(row["file_name"], caption_text(row["text"]), row.get("seed"), row.get("train_index")))
    if not out:
        raise ValueError(f"{meta} lists no images.")
    return out


class ImageFiles(Sequence):
    """Images opened lazily from disk, so thousands of generations never sit in memory at once."""

    def __init__(self, folder: str | Path, names: Sequence[str]):
        self.folder, self.names = Path(folder), list(names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        with Image.open(self.folder / self.names[i]) as im:
            return im.convert("RGB")
