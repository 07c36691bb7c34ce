"""What the demo and the memorization benchmark measure beside the scorer's own metrics.

The scorer (``sd_memfree.scoring``) gives the SSCD similarity statistics and the pixel copy rate.
This module adds, for tiny models on tiny data:

- ``pixel_nearest``: for every generation, its nearest *distinct* training image in pixel space
  and whether it passes the copy test ``d1/d2 < 1/3`` (the scorer's rule and preprocessing, so
  the copy rate equals its ``pixel_copy_frac``), hence the number of distinct images copied;
- ``denoising_loss``: the epsilon-prediction MSE on a set of images at fixed timesteps with fixed
  noise, so it is the same number every time the same model is evaluated;
- ``frechet_to``: the Frechet distance between two image sets in a fixed, seeded feature space
  (8x8 average-pooled pixels through a seeded Gaussian projection to 32 dimensions);
- ``generate_pixels``: seeded generations as pixel arrays (image ``g`` uses its own generator
  seeded ``seed + g``, as the scorer's ``generate_images``), on any device;
- ``vae_reconstructions``: the VAE's own reconstructions of images (the posterior mode, or seeded
  posterior samples: what a perfect memoriser of the training latents would generate), the
  references and the ceiling of the copy test when the raw-pixel rule is too strict for the VAE;
- ``wilson_interval``: the binomial (Wilson score) interval of a copy rate.

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


def load_pipeline(model_dir: str | Path, device: str | torch.device = "cpu"):
    """The fp32 ``StableDiffusionPipeline`` in ``model_dir`` on ``device`` (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _to_unit_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1 for im in images])).permute(0, 3, 1, 2)


@torch.no_grad()
def denoising_loss(model_dir, images: Sequence[Image.Image], captions: Sequence[str],
                   timesteps: Sequence[int] = tuple(range(50, 1000, 100)), seed: int = 1234, batch_size: int = 128,
                   device: str | torch.device | None = None) -> float:
    """Mean epsilon-prediction MSE of the pipeline in ``model_dir`` over ``images x timesteps``.

    The noise of pair (image i, timestep j) is drawn from one CPU generator seeded ``seed``, in a
    fixed order, and latents are the VAE posterior means: the number depends only on the model
    (and, by float round-off, the device). ``model_dir`` may also be a loaded pipeline, which is
    then used on its own device.
    """
    pipe = model_dir if hasattr(model_dir, "unet") else load_pipeline(model_dir, device or "cpu")
    dev = pipe.device
    vae, unet, sched = pipe.vae, pipe.unet.eval(), pipe.scheduler
    x = _to_unit_tensor(images).to(dev)
    lat = torch.cat([vae.encode(x[i : i + batch_size]).latent_dist.mode() for i in range(0, len(x), batch_size)]) * vae.config.scaling_factor
    ids = pipe.tokenizer(list(captions), padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids.to(dev)
    text = torch.cat([pipe.text_encoder(ids[i : i + batch_size])[0] for i in range(0, len(ids), batch_size)])
    gen = torch.Generator().manual_seed(seed)
    total, count = torch.zeros((), dtype=torch.float64, device=dev), 0
    for t in timesteps:
        noise = torch.randn(lat.shape, generator=gen).to(dev)
        tt = torch.full((len(lat),), int(t), dtype=torch.long, device=dev)
        noisy = sched.add_noise(lat, noise, tt)
        for i in range(0, len(lat), batch_size):
            pred = unet(noisy[i : i + batch_size], tt[i : i + batch_size], text[i : i + batch_size]).sample
            total += (pred - noise[i : i + batch_size]).square().mean(dim=(1, 2, 3)).double().sum()  # summed on the device: one sync at the end
            count += len(pred)
    return float(total) / count


@torch.no_grad()
def generate_pixels(pipe, prompts: Sequence[str], seed: int = 42, num_inference_steps: int = 20, guidance_scale: float = 1.0,
                    resolution: int | None = None, batch_size: int = 256) -> np.ndarray:
    """``[len(prompts), H, W, 3]`` float32 in [0, 1]: image ``g`` from a CPU generator seeded ``seed + g``.

    Like ``sd_memfree.scoring.generate.generate_images`` (one generator per image, so an image
    does not depend on the batch it fell in), but kept in memory and on the pipeline's device.
    """
    out = []
    for b0 in range(0, len(prompts), batch_size):
        batch = list(prompts[b0 : b0 + batch_size])
        gens = [torch.Generator().manual_seed(seed + b0 + j) for j in range(len(batch))]
        out.append(pipe(prompt=batch, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        height=resolution, width=resolution, generator=gens, output_type="np").images)
    return np.concatenate(out).astype(np.float32)


@torch.no_grad()
def vae_reconstructions(pipe, images: Sequence[Image.Image], sample_seed: int | None = None, batch_size: int = 256) -> np.ndarray:
    """``[N, H, W, 3]`` float32 in [0, 1]: ``decode(encode(x))`` of every image.

    ``sample_seed=None`` decodes the posterior mode (the copy test's references); an int decodes
    a posterior sample drawn from a CPU generator seeded ``sample_seed`` (a training latent: what
    a perfect memoriser of the training data would generate).
    """
    dev = pipe.device
    x = _to_unit_tensor(images).to(dev)
    gen = torch.Generator().manual_seed(sample_seed) if sample_seed is not None else None
    out = []
    for i in range(0, len(x), batch_size):
        dist = pipe.vae.encode(x[i : i + batch_size]).latent_dist
        z = dist.mode() if gen is None else dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(dev)
        out.append(((pipe.vae.decode(z).sample.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).float().cpu())
    return torch.cat(out).numpy()


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate ``k / n`` (95% for z = 1.96); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


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
