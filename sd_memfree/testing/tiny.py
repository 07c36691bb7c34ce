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
    norm_num_groups: int = 32  # GroupNorm groups; must divide every channel count


def make_tiny_pipeline(seed: int = 0, config: TinyModelConfig | None = None, tokenizer_dir: str | None = None):
    """Build a tiny ``StableDiffusionPipeline`` from configs with seeded random weights."""
    import tempfile

    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = config or TinyModelConfig()
    torch.manual_seed(seed)
    unet = _tiny_unet(cfg, cross_attention_dim=cfg.text_hidden)
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(cfg)
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


def _tiny_unet(cfg: "TinyModelConfig", **kwargs):
    """The tiny UNet both builders share (SD, and SDXL with its extra conditioning in ``kwargs``)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=cfg.sample_size // TINY_VAE_SCALE,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(cfg.unet_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(cfg.unet_channels) - 1) + ("UpBlock2D",),
        attention_head_dim=8,
        norm_num_groups=cfg.norm_num_groups,
        **kwargs,
    )


def _tiny_vae(cfg: "TinyModelConfig"):
    """The tiny VAE both builders share."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=cfg.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        latent_channels=cfg.latent_channels,
        layers_per_block=1,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.sample_size,
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


_SKIES = {"blue": (90, 150, 235), "orange": (245, 150, 60), "pink": (240, 150, 190), "grey": (150, 150, 160),
          "night": (20, 25, 70), "yellow": (240, 220, 120)}
_GROUNDS = {"green": (50, 150, 60), "sand": (215, 190, 120), "snow": (235, 240, 245), "brown": (120, 80, 40),
            "dark green": (20, 90, 40)}
_MOUNTAINS = {"grey": (110, 110, 120), "purple": (110, 70, 140), "blue": (60, 80, 140), "white": (230, 230, 240),
              "black": (35, 35, 40)}


def make_tiny_landscape(index: int, size: int = 32, seed: int = 0) -> tuple[Image.Image, str]:
    """One procedurally drawn landscape and its caption, determined by (index, seed).

    A domain unlike ``make_tiny_image``'s shapes: a sky gradient, 1-3 mountains, a sun or moon,
    a horizon and ground, sometimes a lake. Different indices give visibly different images.
    """
    rng = np.random.default_rng([seed, index, 7])
    sky = list(_SKIES)[rng.integers(len(_SKIES))]
    ground = list(_GROUNDS)[rng.integers(len(_GROUNDS))]
    mountain = list(_MOUNTAINS)[rng.integers(len(_MOUNTAINS))]
    horizon = int(size * rng.uniform(0.5, 0.8))
    yy = np.arange(size, dtype=np.float32)[:, None, None] / size
    top = np.array(_SKIES[sky], np.float32) * rng.uniform(0.6, 0.9)
    pixels = np.broadcast_to(top + yy * (np.array(_SKIES[sky], np.float32) - top) * 2, (size, size, 3)).copy()
    pixels += rng.normal(0, 4, size=pixels.shape)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    sun_x = float(rng.uniform(0.1, 0.9)) * size
    sun_r = size * float(rng.uniform(0.07, 0.15))
    sun_y = float(rng.uniform(0.1, 0.35)) * size
    body = "moon" if sky == "night" else "sun"
    draw.ellipse((sun_x - sun_r, sun_y - sun_r, sun_x + sun_r, sun_y + sun_r), fill=(245, 245, 220) if body == "moon" else (255, 230, 60))
    n_mountains = int(rng.integers(1, 4))
    for _ in range(n_mountains):
        cx, half, height = rng.uniform(0, size), rng.uniform(0.15, 0.4) * size, rng.uniform(0.2, 0.5) * size
        shade = np.array(_MOUNTAINS[mountain]) * rng.uniform(0.8, 1.1)
        draw.polygon([(cx - half, horizon), (cx, horizon - height), (cx + half, horizon)], fill=tuple(int(min(255, c)) for c in shade))
    draw.rectangle((0, horizon, size, size), fill=_GROUNDS[ground])
    lake = bool(rng.random() < 0.4)
    if lake:
        lx = rng.uniform(0.1, 0.6) * size
        draw.ellipse((lx, horizon + 2, lx + size * 0.35, min(size - 1, horizon + 2 + size * 0.12)), fill=(60, 110, 200))
    where = "left" if sun_x < size / 3 else "right" if sun_x > 2 * size / 3 else "middle"
    count = ("one", "two", "three")[n_mountains - 1]
    plural = "mountain" if n_mountains == 1 else "mountains"
    caption = (f"a landscape with a {sky} sky, {count} {mountain} {plural}, the {body} on the {where}, "
               f"{ground} ground{' and a lake' if lake else ''}, picture {index}")
    return img, caption


_TARTAN_COLORS = {"red": (190, 30, 40), "green": (30, 110, 60), "navy": (25, 35, 95), "black": (25, 25, 30),
                  "yellow": (235, 200, 50), "white": (235, 235, 225), "purple": (100, 45, 120), "brown": (120, 75, 40)}
_TARTAN_WIDTHS = ("narrow", "medium", "wide")


def make_tiny_tartan(index: int, size: int = 32, seed: int = 0) -> tuple[Image.Image, str]:
    """One procedurally woven tartan and its caption, determined by (index, seed).

    A full-frame texture, unlike the shapes (one object on a background) and the landscapes (a
    scene): a ground colour crossed by bands of a second colour in both directions (darker where
    they cross, as in weaving) and thin lines of a third, with a random period and phase per
    direction. The caption names the three colours, the band width and whether the pattern is
    square or stretched; different indices give visibly different images.
    """
    rng = np.random.default_rng([seed, index, 11])
    names = list(_TARTAN_COLORS)
    ground, band, line = (names[i] for i in rng.choice(len(names), size=3, replace=False))
    width = int(rng.integers(len(_TARTAN_WIDTHS)))
    scale = max(1, size // 16)
    band_px = (1 + width) * scale  # 1, 2 or 3 px at 16 px
    square = bool(rng.random() < 0.5)
    period_x = band_px + int(rng.integers(3, 7)) * scale
    period_y = period_x if square else band_px + int(rng.integers(3, 7)) * scale + 2 * scale
    ox, oy = rng.integers(0, period_x), rng.integers(0, period_y)
    x = (np.arange(size) + ox) % period_x
    y = (np.arange(size) + oy) % period_y
    vert, horiz = (x < band_px)[None, :], (y < band_px)[:, None]
    lines = ((x == band_px + (period_x - band_px) // 2)[None, :]) | ((y == band_px + (period_y - band_px) // 2)[:, None])
    col = lambda n: np.array(_TARTAN_COLORS[n], np.float32)
    pixels = np.broadcast_to(col(ground), (size, size, 3)).copy()
    pixels[np.broadcast_to(vert | horiz, (size, size))] = col(band)
    pixels[np.broadcast_to(vert & horiz, (size, size))] = col(band) * 0.6  # warp over weft: darker crossings
    pixels[np.broadcast_to(lines, (size, size))] = col(line)
    pixels += rng.normal(0, 4, size=pixels.shape)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    caption = (f"a {'square' if square else 'stretched'} tartan with a {ground} ground, {_TARTAN_WIDTHS[width]} {band} bands "
               f"and thin {line} lines, picture {index}")
    return img, caption


IMAGE_KINDS = {"shapes": make_tiny_image, "landscapes": make_tiny_landscape, "tartans": make_tiny_tartan}


def make_tiny_dataset(
    out_dir: str | os.PathLike,
    num_images: int = 32,
    size: int = 64,
    duplicate_fraction: float = 0.0,
    duplicate_times: int = 1,
    seed: int = 0,
    kind: str = "shapes",
    first_index: int = 0,
) -> Path:
    """Write ``num_images`` distinct captioned images in imagefolder layout.

    Args:
        duplicate_fraction: fraction of the distinct images (rounded down) that are written
            ``duplicate_times`` times in total (same pixels, same caption), like LAION's duplicates.
        duplicate_times: total copies of each duplicated image (1 = no duplication).
        kind: ``"shapes"`` (``make_tiny_image``), ``"landscapes"`` (``make_tiny_landscape``) or
            ``"tartans"`` (``make_tiny_tartan``, a domain the tiny base never saw in any part).
        first_index: image indices are ``first_index .. first_index + num_images - 1``, so a
            held-out set of the same distribution is the same call with a disjoint index range.

    Returns:
        The folder. ``metadata.jsonl`` has one row per file (``file_name``, ``text``).
    """
    if num_images < 1:
        raise ValueError(f"--num_images must be >= 1, got {num_images}.")
    if not 0.0 <= duplicate_fraction <= 1.0:
        raise ValueError(f"--duplicate_fraction must be in [0, 1], got {duplicate_fraction}.")
    if duplicate_times < 1:
        raise ValueError(f"--duplicate_times must be >= 1, got {duplicate_times}.")
    if kind not in IMAGE_KINDS:
        raise ValueError(f"--kind must be one of {sorted(IMAGE_KINDS)}, got {kind!r}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_dup = int(num_images * duplicate_fraction)
    rows = []
    for i in range(first_index, first_index + num_images):
        img, caption = IMAGE_KINDS[kind](i, size=size, seed=seed)
        copies = duplicate_times if i - first_index < num_dup else 1
        for c in range(copies):
            name = f"{i:05d}.png" if c == 0 else f"{i:05d}_dup{c}.png"
            img.save(out_dir / name)
            rows.append({"file_name": name, "text": caption})
    with open(out_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return out_dir


# --- a pretrained tiny base model (built once, cached) ---------------------------------------


@dataclass(frozen=True)
class TinyBaseConfig:
    """How the pretrained tiny base is built: a VAE trained on both image kinds, then a UNet
    pretrained on shapes only, so that fine-tuning on landscapes has something to learn.

    Sizes are chosen so the build takes a few minutes on 2 CPU cores.
    """

    size: int = 32
    seed: int = 0
    # Smaller than TinyModelConfig's defaults (GroupNorm 8): per-op overhead dominates on a CPU,
    # and these sizes keep a fine-tuning step near 0.2 s on one core.
    unet_channels: tuple[int, ...] = (32, 32)
    vae_channels: tuple[int, ...] = (16, 32)
    norm_num_groups: int = 8
    vae_images: int = 1024  # half shapes, half landscapes, from index ranges no data set uses
    vae_steps: int = 400
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_images: int = 2048  # shapes only: the base never sees a landscape in the UNet
    unet_steps: int = 500
    unet_lr: float = 1e-3
    batch_size: int = 16
    # Fraction of pretraining captions replaced by "" (SD trains the same way): the base gets a
    # meaningful unconditional prediction, so classifier-free guidance and the detection score
    # ||eps(x_t, prompt) - eps(x_t, "")|| mean something.
    caption_dropout: float = 0.1

    def key(self) -> str:
        import hashlib

        # v2: caption dropout (a v1 cache was built without it and must not be reused).
        return "tiny-base-v2-" + hashlib.sha256(repr(self).encode()).hexdigest()[:12]


# Index ranges of the images the base was built from; fine-tuning and held-out sets use 0..9999.
BASE_FIRST_INDEX = 100_000


def default_cache_dir() -> Path:
    """``$SD_MEMFREE_CACHE`` or ``~/.cache/sd_memfree`` (where the built base model is kept)."""
    return Path(os.environ.get("SD_MEMFREE_CACHE", Path.home() / ".cache" / "sd_memfree")).expanduser()


def _to_tensor(images):
    import torch

    arr = np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def build_tiny_base(out_dir: str | os.PathLike, config: TinyBaseConfig | None = None, progress: bool = True) -> dict:
    """Train the tiny pipeline's VAE and pretrain its UNet, then ``save_pretrained`` it.

    The text encoder stays random (frozen, as in SD fine-tuning); captions still map to distinct
    embeddings. Writes ``base_info.json`` with the VAE's reconstruction error on held-out
    landscapes (the fine-tuning domain) and the pretraining losses.

    Returns:
        The contents of ``base_info.json``.
    """
    import time

    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    cfg = config or TinyBaseConfig()
    t0 = time.time()
    out_dir = Path(out_dir)
    model_cfg = TinyModelConfig(unet_channels=cfg.unet_channels, vae_channels=cfg.vae_channels,
                                norm_num_groups=cfg.norm_num_groups, sample_size=cfg.size)
    pipe = make_tiny_pipeline(seed=cfg.seed, config=model_cfg)
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    gen = torch.Generator().manual_seed(cfg.seed)

    # 1. VAE: reconstruction + a tiny KL term, on shapes and landscapes (SD's VAE is generic too).
    half = cfg.vae_images // 2
    vae_x = torch.cat([
        _to_tensor([make_tiny_image(BASE_FIRST_INDEX + i, cfg.size, cfg.seed)[0] for i in range(half)]),
        _to_tensor([make_tiny_landscape(BASE_FIRST_INDEX + i, cfg.size, cfg.seed)[0] for i in range(half)]),
    ])
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    vae_start = time.time()
    for _ in tqdm(range(cfg.vae_steps), desc="base: train VAE", disable=not progress):
        x = vae_x[torch.randint(len(vae_x), (cfg.batch_size,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.mse_loss(rec, x) + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    # Held-out reconstruction error, in [0, 1] pixel units, on the fine-tuning domain.
    test = _to_tensor([make_tiny_landscape(BASE_FIRST_INDEX + 50_000 + i, cfg.size, cfg.seed)[0] for i in range(128)])
    with torch.no_grad():
        rec = vae.decode(vae.encode(test).latent_dist.mode()).sample.clamp(-1, 1)
    mse01 = float(((rec - test) / 2).square().mean())
    # Unit-variance latents for the diffusion model, as SD's scaling_factor does.
    with torch.no_grad():
        lat_mean = torch.cat([vae.encode(vae_x[i : i + 256]).latent_dist.mode() for i in range(0, len(vae_x), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / lat_mean.std()))

    # 2. UNet: epsilon-prediction DDPM pretraining on shapes with their captions.
    shapes = [make_tiny_image(BASE_FIRST_INDEX + i, cfg.size, cfg.seed + 1) for i in range(cfg.unet_images)]
    with torch.no_grad():
        x = _to_tensor([im for im, _ in shapes])
        dist = [vae.encode(x[i : i + 256]).latent_dist for i in range(0, len(x), 256)]
        mean, std = torch.cat([d.mean for d in dist]), torch.cat([d.std for d in dist])
        ids = tokenizer([c for _, c in shapes], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        text = torch.cat([text_encoder(ids[i : i + 256])[0] for i in range(0, len(ids), 256)])
        empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        empty = text_encoder(empty_ids)[0]  # [1, 77, D]: the unconditional embedding the pipeline uses
    sched = pipe.scheduler
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr)
    unet.train()
    unet_start, vae_seconds = time.time(), time.time() - vae_start
    losses = []
    for _ in tqdm(range(cfg.unet_steps), desc="base: pretrain UNet", disable=not progress):
        idx = torch.randint(len(mean), (cfg.batch_size,), generator=gen)
        lat = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * vae.config.scaling_factor
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        cond = torch.where(drop[:, None, None], empty, text[idx])
        loss = F.mse_loss(unet(sched.add_noise(lat, noise, t), t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    unet.eval()

    tmp = out_dir.with_name(out_dir.name + ".partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    info = {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}, "vae_recon_mse": mse01, "vae_recon_psnr_db": float(-10 * np.log10(mse01)),
        "vae_scaling_factor": vae.config.scaling_factor,
        "unet_pretrain_loss_first50": float(np.mean(losses[:50])), "unet_pretrain_loss_last50": float(np.mean(losses[-50:])),
        "vae_train_seconds": vae_seconds, "unet_pretrain_seconds": time.time() - unet_start,
        "build_seconds": time.time() - t0,
    }
    (tmp / "base_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    if out_dir.exists():  # a concurrent build finished first: keep theirs
        import shutil

        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out_dir)
    return info


def tiny_base_model(cache_dir: str | os.PathLike | None = None, config: TinyBaseConfig | None = None, progress: bool = True) -> Path:
    """The pretrained tiny base pipeline folder, built on first use and cached under ``cache_dir``
    (default ``default_cache_dir()``), keyed by its config."""
    cfg = config or TinyBaseConfig()
    path = Path(cache_dir or default_cache_dir()) / cfg.key()
    if not (path / "model_index.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_base(path, cfg, progress=progress)
    return path


# --- tiny SDXL-architecture model (kept apart from the SD builder above) -------------------------

# Micro-conditioning of SDXL: six numbers (original size, crop top-left, target size), each
# embedded with this many channels, plus the pooled text embedding of the second text encoder.
TINY_SDXL_TIME_EMBED_DIM = 8


def make_tiny_sdxl_pipeline(seed: int = 0, config: TinyModelConfig | None = None, tokenizer_dir: str | None = None):
    """Build a tiny ``StableDiffusionXLPipeline`` from configs with seeded random weights: two text
    encoders (``CLIPTextModel`` + ``CLIPTextModelWithProjection``, hidden states concatenated as
    the cross-attention input), size and crop conditioning (``addition_embed_type="text_time"``).
    Deterministic: the same seed gives bit-identical weights."""
    import tempfile

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    cfg = config or TinyModelConfig()
    text_config = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=cfg.text_hidden,
                       intermediate_size=4 * cfg.text_hidden, num_attention_heads=4, num_hidden_layers=cfg.text_layers,
                       vocab_size=49408, max_position_embeddings=77, projection_dim=cfg.text_hidden, hidden_act="gelu")
    torch.manual_seed(seed)
    unet = _tiny_unet(
        cfg,
        cross_attention_dim=2 * cfg.text_hidden,  # both encoders' hidden states, concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED_DIM + cfg.text_hidden,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(cfg)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = write_clip_tokenizer_files(tokenizer_dir or tmp)
        tokenizer = CLIPTokenizer(str(vocab), str(merges), pad_token="<|endoftext|>", model_max_length=77)
        tokenizer_2 = CLIPTokenizer(str(vocab), str(merges), pad_token="!", model_max_length=77)  # SDXL's second tokenizer pads with "!"
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)


def make_tiny_sdxl_model(out_dir: str | os.PathLike, seed: int = 0, config: TinyModelConfig | None = None) -> Path:
    """Write a tiny SDXL pipeline folder that ``StableDiffusionXLPipeline.from_pretrained`` loads."""
    out_dir = Path(out_dir)
    make_tiny_sdxl_pipeline(seed=seed, config=config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir
