"""Tiny, offline Stable-Diffusion-architecture pipelines and small captioned image sets.

Everything here is built from configs and random (seeded) weights, so tests, benchmarks and the
demo run without a network. The outputs go through the same ``save_pretrained`` /
``from_pretrained`` / ``load_dataset("imagefolder")`` code paths that real checkpoints and user
datasets take.

Invariants:
- ``make_tiny_pipeline(seed)`` is deterministic: the same seed gives bit-identical weights.
- A tiny model folder loads with ``StableDiffusionPipeline.from_pretrained(dir)`` and with the
  training script's ``--pretrained_model_name_or_path dir`` (subfolders ``unet``, ``vae``,
  ``text_encoder``, ``tokenizer``, ``scheduler``).
- ``make_tiny_dataset`` writes an imagefolder layout: PNG files plus ``metadata.jsonl`` with
  ``file_name`` and ``text``; duplicated images are byte-identical copies with the same caption.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Latent channels and VAE downsampling of the tiny model: two VAE blocks halve the resolution
# once (real SD: four blocks, /8). Resolutions must be divisible by 2 * 2 (VAE x UNet levels).
TINY_VAE_SCALE = 2


def _clip_bpe_path() -> Path:
    """The CLIP BPE merges that ship inside the open_clip_torch wheel (no download needed)."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():  # pragma: no cover - depends on the installed wheel
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {path}; reinstall open_clip_torch.")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-unicode table (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer_files(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` of the real CLIP tokenizer (49408 tokens).

    Built the way open_clip's ``SimpleTokenizer`` builds its vocabulary from the bundled merges,
    so token ids equal those of ``openai/clip-vit-large-patch14``'s tokenizer.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(_clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m) for m in merges)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


@dataclass(frozen=True)
class TinyModelConfig:
    """Sizes of the tiny pipeline. Defaults follow diffusers' own SD unit tests."""

    unet_channels: tuple[int, ...] = (32, 64)
    vae_channels: tuple[int, ...] = (32, 64)
    text_hidden: int = 32
    text_layers: int = 2
    latent_channels: int = 4
    sample_size: int = 32  # pixel resolution the model is meant for


def make_tiny_pipeline(seed: int = 0, config: TinyModelConfig | None = None, tokenizer_dir: str | None = None):
    """Build a tiny ``StableDiffusionPipeline`` from configs with seeded random weights."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = config or TinyModelConfig()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=cfg.sample_size // TINY_VAE_SCALE,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(cfg.unet_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(cfg.unet_channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=cfg.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        latent_channels=cfg.latent_channels,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=cfg.sample_size,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_size=cfg.text_hidden,
            intermediate_size=4 * cfg.text_hidden,
            num_attention_heads=4,
            num_hidden_layers=cfg.text_layers,
            vocab_size=49408,
            max_position_embeddings=77,
            projection_dim=cfg.text_hidden,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = write_clip_tokenizer_files(tokenizer_dir or tmp)
        tokenizer = CLIPTokenizer(str(vocab), str(merges), pad_token="<|endoftext|>", model_max_length=77)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, prediction_type="epsilon", steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def make_tiny_model(out_dir: str | os.PathLike, seed: int = 0, config: TinyModelConfig | None = None) -> Path:
    """Write a tiny pipeline folder that ``from_pretrained`` loads like a Hub checkpoint."""
    out_dir = Path(out_dir)
    pipe = make_tiny_pipeline(seed=seed, config=config)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# --- tiny captioned image sets -------------------------------------------------------------

_COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
    "teal": (30, 160, 160), "pink": (240, 130, 180),
}
_SHAPES = ("circle", "square", "triangle", "ring", "cross", "stripes", "diamond", "dots")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color, size: int) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w = max(2, size // 10)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=w)
    elif shape == "cross":
        draw.rectangle((cx - w, y0, cx + w, y1), fill=color)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=color)
    elif shape == "stripes":
        for x in range(x0, x1, 2 * w):
            draw.rectangle((x, y0, x + w - 1, y1), fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=color)
    elif shape == "dots":
        for dx in (0.25, 0.75):
            for dy in (0.25, 0.75):
                px, py = x0 + dx * (x1 - x0), y0 + dy * (y1 - y0)
                draw.ellipse((px - w, py - w, px + w, py + w), fill=color)


def make_tiny_image(index: int, size: int = 64, seed: int = 0) -> tuple[Image.Image, str]:
    """One procedurally drawn image and a caption that describes it, determined by (index, seed).

    Different indices give visibly different images (shape, colours, position, size, texture).
    """
    rng = np.random.default_rng([seed, index])
    names = list(_COLORS)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    shape = _SHAPES[rng.integers(len(_SHAPES))]
    # Background: a colour plus a smooth random gradient so no two images share pixels.
    base = np.array(_COLORS[names[bg]], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    grad = rng.uniform(-40, 40, size=(2, 3)).astype(np.float32)
    pixels = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
    pixels += rng.normal(0, 6, size=pixels.shape)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    extent = int(size * rng.uniform(0.35, 0.7))
    x0 = int(rng.integers(0, size - extent + 1))
    y0 = int(rng.integers(0, size - extent + 1))
    _draw_shape(draw, shape, (x0, y0, x0 + extent, y0 + extent), _COLORS[names[fg]], size)
    where = ("top" if y0 + extent / 2 < size / 3 else "bottom" if y0 + extent / 2 > 2 * size / 3 else "middle")
    side = ("left" if x0 + extent / 2 < size / 3 else "right" if x0 + extent / 2 > 2 * size / 3 else "centre")
    caption = f"a {names[fg]} {shape} at the {where} {side} on a {names[bg]} background, picture {index}"
    return img, caption


def make_tiny_dataset(
    out_dir: str | os.PathLike,
    num_images: int = 32,
    size: int = 64,
    duplicate_fraction: float = 0.0,
    duplicate_times: int = 1,
    seed: int = 0,
) -> Path:
    """Write ``num_images`` distinct captioned images in imagefolder layout.

    Args:
        duplicate_fraction: fraction of the distinct images (rounded down) that are written
            ``duplicate_times`` times in total (same pixels, same caption), like LAION's duplicates.
        duplicate_times: total copies of each duplicated image (1 = no duplication).

    Returns:
        The folder. ``metadata.jsonl`` has one row per file (``file_name``, ``text``).
    """
    if num_images < 1:
        raise ValueError(f"--num_images must be >= 1, got {num_images}.")
    if not 0.0 <= duplicate_fraction <= 1.0:
        raise ValueError(f"--duplicate_fraction must be in [0, 1], got {duplicate_fraction}.")
    if duplicate_times < 1:
        raise ValueError(f"--duplicate_times must be >= 1, got {duplicate_times}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_dup = int(num_images * duplicate_fraction)
    rows = []
    for i in range(num_images):
        img, caption = make_tiny_image(i, size=size, seed=seed)
        copies = duplicate_times if i < num_dup else 1
        for c in range(copies):
            name = f"{i:05d}.png" if c == 0 else f"{i:05d}_dup{c}.png"
            img.save(out_dir / name)
            rows.append({"file_name": name, "text": caption})
    with open(out_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return out_dir
