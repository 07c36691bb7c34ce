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
- The detection score (``NoiseMagnitudeProbe``, Wen et al., ICLR 2024) of generation ``g`` is
  ``mean over the first DETECTION_STEPS sampling steps of ||eps(x_t, prompt) - eps(x_t, "")||_2``
  on that generation's own trajectory; with classifier-free guidance both predictions are the
  pipeline's own UNet outputs (no extra work), without it one extra UNet call per early step.
  ``eps(x_t, "")`` is the pipeline's own unconditional prediction, the one its guidance uses, so
  both paths give the same number: SD's empty-prompt embeddings; SDXL's empty-prompt embeddings
  and pooled embeddings, or zeros of both when ``force_zeros_for_empty_prompt`` (SDXL base's
  setting), with the generation's own size and crop conditioning.
- Generation runs the pipeline class ``model_index.json`` names, one of ``SUPPORTED_PIPELINES``.
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

from sd_memfree.data import caption_text  # noqa: F401  (the caption reading training's skip counts use)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One image to score: its file, its prompt and (when known) the training row of the prompt."""

    file_name: str
    text: str
    seed: int | None = None
    train_index: int | None = None
    noise_magnitude: float | None = None


# Wen et al. average the first sampling steps; the text-conditional signal is strongest early.
DETECTION_STEPS = 5


class NoiseMagnitudeProbe:
    """Records the memorization detection score of Wen et al. (ICLR 2024, "Detecting, Explaining,
    and Mitigating Memorization in Diffusion Models") from the pipeline's own UNet calls.

    A forward hook on ``pipe.unet``: under classifier-free guidance the UNet batch is
    ``[uncond; text]`` (diffusers' order), so ``||eps_text - eps_uncond||`` comes for free; without
    guidance the hook adds one UNet call with the pipeline's unconditional embeddings (for SDXL
    also its pooled ones, in ``added_cond_kwargs["text_embeds"]``; the size and crop
    ``time_ids`` stay the generation's). Only the first ``steps`` calls of each ``begin`` are used.

    Usage::

        with NoiseMagnitudeProbe(pipe) as probe:
            probe.begin(batch_size)
            pipe(...)
            scores = probe.result()  # [batch_size] float, or None if no step ran
    """

    def __init__(self, pipe, steps: int = DETECTION_STEPS):
        self.pipe, self.steps = pipe, steps
        self._values: list[torch.Tensor] = []
        self._batch = 0
        self._inside = False
        self._empty: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._handle = None

    def __enter__(self) -> "NoiseMagnitudeProbe":
        self._handle = self.pipe.unet.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def begin(self, batch: int) -> None:
        self._values, self._batch = [], batch

    def _unconditional(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(embeds [batch, L, D], pooled [batch, P] or None)``: what the pipeline's own guidance
        feeds its unconditional half (asked of ``encode_prompt`` itself, so SDXL's
        ``force_zeros_for_empty_prompt`` is honoured). SD's ``encode_prompt`` returns
        ``(embeds, negative_embeds)``, SDXL's adds ``(pooled, negative_pooled)``."""
        if self._empty is None:
            with torch.no_grad():
                out = self.pipe.encode_prompt(prompt="", device=like.device, num_images_per_prompt=1, do_classifier_free_guidance=True)
            self._empty = (out[1], out[3] if len(out) == 4 else None)
        embeds, pooled = self._empty
        return embeds.to(like.dtype).expand(batch, -1, -1), None if pooled is None else pooled.to(like.dtype).expand(batch, -1)

    @torch.no_grad()
    def _hook(self, module, args, kwargs, output):
        if self._inside or len(self._values) >= self.steps:
            return
        eps = output[0] if isinstance(output, tuple) else output.sample
        if eps.shape[0] == 2 * self._batch:
            uncond, text = eps.chunk(2)
        else:
            text = eps
            sample = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            rest = {k: v for k, v in kwargs.items() if k not in ("sample", "timestep", "encoder_hidden_states")}
            embeds, pooled = self._unconditional(sample.shape[0], text)
            if pooled is not None:
                rest["added_cond_kwargs"] = {**rest["added_cond_kwargs"], "text_embeds": pooled}
            self._inside = True  # the extra call must not be recorded by this hook
            try:
                out = module(sample, t, encoder_hidden_states=embeds, **rest)
            finally:
                self._inside = False
            uncond = out[0] if isinstance(out, tuple) else out.sample
        self._values.append((text.float() - uncond.float()).flatten(1).norm(dim=1).cpu())

    def result(self) -> torch.Tensor | None:
        return torch.stack(self._values).mean(0) if self._values else None


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


# The text-to-image pipelines whose text conditioning NoiseMagnitudeProbe knows.
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


class ModelError(ValueError):
    """A ``--model`` the scorer cannot generate with; the message names the problem and the fix."""


def pipeline_class_name(model: str) -> str:
    """The pipeline class ``model``'s ``model_index.json`` names (folder or Hub id), checked.

    Raises:
        ModelError: no readable ``model_index.json``, or a class not in ``SUPPORTED_PIPELINES``.
    """
    from diffusers import DiffusionPipeline

    try:
        name = DiffusionPipeline.load_config(model).get("_class_name")
    except OSError as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        raise ModelError(f"--model {model}: cannot read its model_index.json ({reason}); pass a diffusers pipeline folder "
                         "(save_pretrained) or Hub id, and for a LoRA the base model with --lora_weights.") from None
    if name not in SUPPORTED_PIPELINES:
        raise ModelError(f"--model {model} is a {name} pipeline, which the scorer cannot generate with; pass a "
                         f"{' or '.join(SUPPORTED_PIPELINES)} folder, or generate the images yourself and pass --generated_dir.")
    return name


def load_pipeline(model: str, lora_weights: str | None, device: torch.device):
    """The pipeline ``model_index.json`` names (one of ``SUPPORTED_PIPELINES``) from a folder or Hub
    id, the way ``DiffusionPipeline.from_pretrained`` picks it, with LoRA weights loaded on top if given.

    Raises:
        ModelError: see ``pipeline_class_name``.
    """
    from diffusers import DiffusionPipeline

    name = pipeline_class_name(model)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    # Only SD has a safety checker; generations are scored, never shown, so it stays off.
    extra = {"safety_checker": None, "requires_safety_checker": False} if name == "StableDiffusionPipeline" else {}
    pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, **extra)
    if lora_weights:
        pipe.load_lora_weights(lora_weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def default_resolution(pipe) -> int:
    """The size a pipeline generates when not told: UNet sample size x VAE scale, as both SD's
    and SDXL's ``__call__`` compute it (512 for SD 1.5, 1024 for SDXL base, 32 for the tiny ones)."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


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
    detection_steps: int = DETECTION_STEPS,
) -> list[Generation]:
    """Generate ``images_per_prompt`` images per prompt into ``out_dir`` (PNG + ``metadata.jsonl``),
    recording each generation's detection score (``NoiseMagnitudeProbe``) as ``noise_magnitude``.
    ``resolution`` None: the pipeline's own default (``default_resolution``)."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(g, idx, text) for g, (idx, text) in enumerate((p for p in prompts for _ in range(images_per_prompt)))]
    device = pipe.device
    records: list[Generation] = []
    with NoiseMagnitudeProbe(pipe, detection_steps) as probe:
        for b0 in tqdm(range(0, len(jobs), batch_size), desc="generate", unit="batch"):
            batch = jobs[b0 : b0 + batch_size]
            gens = [torch.Generator(device="cpu").manual_seed(seed + g) for g, _, _ in batch]
            probe.begin(len(batch))
            images = pipe(
                prompt=[t for _, _, t in batch],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=gens,
            ).images
            scores = probe.result()
            for j, ((g, idx, text), im) in enumerate(zip(batch, images)):
                name = f"{g:05d}.png"
                im.save(out_dir / name)
                records.append(Generation(name, text, seed + g, idx, float(scores[j]) if scores is not None else None))
    with open(out_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.__dict__) + "\n")
    return records


class GeneratedDirError(ValueError):
    """A ``--generated_dir`` that cannot be scored; the message names the folder or line and the fix."""


def read_generated_dir(folder: str | Path) -> list[Generation]:
    """Read a generations folder (image files + ``metadata.jsonl`` with ``file_name`` and ``text``).

    Raises:
        GeneratedDirError: missing folder or metadata, bad JSON, missing keys or files, no rows.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise GeneratedDirError(f"--generated_dir {folder} is not a folder; pass the folder of images to score (with a metadata.jsonl).")
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise GeneratedDirError(f"{meta} not found: --generated_dir needs a metadata.jsonl with one {{\"file_name\", \"text\"}} row per image.")
    out = []
    try:
        with open(meta, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError:
        raise GeneratedDirError(f"{meta} is not UTF-8 text; write it as UTF-8 JSON lines.") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GeneratedDirError(f"{meta}:{lineno} is not valid JSON ({e.msg}); fix that line.") from None
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            raise GeneratedDirError(f"{meta}:{lineno} needs 'file_name' and 'text'.")
        if not (folder / row["file_name"]).is_file():
            raise GeneratedDirError(f"{folder / row['file_name']} listed in {meta}:{lineno} is missing; add it or remove that row.")
        nm = row.get("noise_magnitude")
        out.append(Generation(row["file_name"], caption_text(row["text"]), row.get("seed"), row.get("train_index"), float(nm) if nm is not None else None))
    if not out:
        raise GeneratedDirError(f"{meta} lists no images; --generated_dir needs at least one.")
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
