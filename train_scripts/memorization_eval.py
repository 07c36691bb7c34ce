"""What the demo and the memorization benchmark measure beside the scorer's own metrics.

The scorer (``sd_memfree.scoring``) gives the SSCD similarity statistics and the pixel copy rate.
This module adds, for tiny models on tiny data:

- ``pixel_nearest``: for every generation, its nearest *distinct* training image in pixel space
  and whether it passes the copy test ``d1/d2 < 1/3`` (the scorer's rule and preprocessing, so
  the copy rate equals its ``pixel_copy_frac``), hence the number of distinct images copied;
- ``denoising_loss``: the epsilon-prediction MSE on a set of images at fixed timesteps with fixed
  noise, so it is the same number every time the same model is evaluated;
- ``frechet_to``: the Frechet distance between two image sets in a fixed, seeded feature space
  (8x8 average-pooled pixels through a seeded Gaussian projection to 32 dimensions).

Invariants: every function is deterministic given its inputs (seeds are arguments).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

COPY_RATIO = 1 / 3


def read_imagefolder(folder: str | Path) -> tuple[list[Image.Image], list[str], list[str]]:
    """Images, captions and file names of an imagefolder (``metadata.jsonl`` order)."""
    folder = Path(folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    images = []
    for r in rows:
        with Image.open(folder / r["file_name"]) as im:
            images.append(im.convert("RGB"))
    return images, [r["text"] for r in rows], [r["file_name"] for r in rows]


def to_pixels(images: Sequence[Image.Image], size: int) -> np.ndarray:
    """``[N, size, size, 3]`` float32 in [0, 1], preprocessed exactly as the scorer's pixel test."""
    from sd_memfree.scoring.run import _pixels  # the scorer's own crop/resize, so the numbers agree

    return _pixels(iter(images), len(images), size)


def pixel_nearest(generated: np.ndarray, train: np.ndarray) -> dict:
    """Nearest distinct training image of every generation, and the copy test.

    Returns:
        ``nearest`` (index into ``train``, first occurrence of the distinct image), ``copy``
        (bool per generation: ``d1 < d2 / 3``), ``copy_frac``, ``distinct_copied`` (number of
        distinct training images that at least one generation copies), ``distinct_train``.
    """
    from sd_memfree.scoring.metrics import distinct_rows
    from sd_memfree.scoring.search import topk_search

    keep = distinct_rows(train)
    q = torch.from_numpy(generated.reshape(len(generated), -1).astype(np.float32))
    x = torch.from_numpy(train[keep].reshape(len(keep), -1).astype(np.float32))
    top = topk_search(q, x, k=2, metric="neg_sq_l2")
    d = (-top.values).double().clamp_min(0)
    copy = (d[:, 0] < COPY_RATIO * d[:, 1]).numpy()
    nearest = keep[top.indices[:, 0].numpy()]
    return {
        "nearest": nearest, "copy": copy, "copy_frac": float(copy.mean()),
        "distinct_copied": int(len(set(nearest[copy].tolist()))), "distinct_train": int(len(keep)),
        "d1": d[:, 0].numpy(), "d2": d[:, 1].numpy(),
    }


@torch.no_grad()
def denoising_loss(model_dir: str | Path, images: Sequence[Image.Image], captions: Sequence[str],
                   timesteps: Sequence[int] = tuple(range(50, 1000, 100)), seed: int = 1234, batch_size: int = 128) -> float:
    """Mean epsilon-prediction MSE of the pipeline in ``model_dir`` over ``images x timesteps``.

    The noise of pair (image i, timestep j) is drawn from one generator seeded ``seed``, in a
    fixed order, and latents are the VAE posterior means: the number depends only on the model.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    vae, unet, sched = pipe.vae, pipe.unet.eval(), pipe.scheduler
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1 for im in images])).permute(0, 3, 1, 2)
    lat = torch.cat([vae.encode(x[i : i + batch_size]).latent_dist.mode() for i in range(0, len(x), batch_size)]) * vae.config.scaling_factor
    ids = pipe.tokenizer(list(captions), padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    text = torch.cat([pipe.text_encoder(ids[i : i + batch_size])[0] for i in range(0, len(ids), batch_size)])
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for t in timesteps:
        noise = torch.randn(lat.shape, generator=gen)
        tt = torch.full((len(lat),), int(t), dtype=torch.long)
        noisy = sched.add_noise(lat, noise, tt)
        for i in range(0, len(lat), batch_size):
            pred = unet(noisy[i : i + batch_size], tt[i : i + batch_size], text[i : i + batch_size]).sample
            total += float((pred - noise[i : i + batch_size]).square().mean(dim=(1, 2, 3)).sum())
            count += len(pred)
    return total / count


def seeded_features(pixels: np.ndarray, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """``[N, dim]``: 8x8 average-pooled pixels (192 values) times a seeded Gaussian matrix."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).double()
    pooled = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
    proj = torch.randn(pooled.shape[1], dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return pooled @ proj / pooled.shape[1] ** 0.5


def frechet_to(pixels_a: np.ndarray, pixels_b: np.ndarray, dim: int = 32, seed: int = 0) -> float:
    """Frechet distance of two image sets in ``seeded_features`` space (the scorer's formula)."""
    from sd_memfree.scoring.fid import frechet_distance

    fa, fb = seeded_features(pixels_a, dim, seed), seeded_features(pixels_b, dim, seed)
    return frechet_distance(fa.mean(0), torch.cov(fa.T), fb.mean(0), torch.cov(fb.T))
