"""CLIP score with open_clip: cosine similarity of each generated image with its own prompt.

Scale: a raw cosine (about 0.30 for SD 2.1 on LAION captions), not torchmetrics' ``100 * max(cos, 0)``.

``pretrained`` is either a local file (passed to
``open_clip.create_model_and_transforms(..., pretrained=<file>)``) or an open_clip tag: its file is
taken from open_clip's caches (the Hugging Face cache or ``~/.cache/clip``) or, when missing and
online, fetched by open_clip's own ``download_pretrained`` (the path ``pretrained=<tag>`` takes).
Offline (``HF_HUB_OFFLINE=1``) or without a network, one line says what to fetch.

Invariants:
- ``clip_scores`` returns one float per (image, prompt) pair, in input order, in [-1, 1].
- A tag's own settings (QuickGELU, normalisation) are applied when it is resolved from the cache,
  so a cached ``ViT-B-16``/``openai`` file gives the same model as open_clip's own download path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from sd_memfree.scoring.sscd import MissingWeightsError, offline

DEFAULT_CLIP_MODEL = "ViT-B-16"
DEFAULT_CLIP_PRETRAINED = "openai"


def _cached_tag_file(cfg: dict) -> str | None:
    """Path of a tag's weights in open_clip's caches, without touching the network."""
    from huggingface_hub import try_to_load_from_cache

    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            hit = try_to_load_from_cache(repo_id, name)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    url = cfg.get("url", "")
    if url:
        path = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if path.is_file():
            return str(path)
    return None


def resolve_clip_weights(model_name: str, pretrained: str, download: bool = True) -> tuple[str, dict]:
    """``(weights file, open_clip keyword overrides)`` for a local file or a tag (cached, or
    fetched by open_clip when ``download`` and online).

    Raises:
        MissingWeightsError: neither a file nor a cached tag; the message says what to fetch.
    """
    import open_clip

    if os.path.isfile(pretrained):
        return pretrained, {}
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise MissingWeightsError(
            f"--clip_pretrained {pretrained!r} is neither a file nor an open_clip tag of {model_name} "
            f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(model_name)) or 'none'})."
        )
    path = _cached_tag_file(cfg)
    where = cfg.get("hf_hub") or cfg.get("url")
    if path is None and download and not offline():
        try:
            path = open_clip.download_pretrained(cfg) or None
        except Exception as e:  # network, HTTP or disk errors from huggingface_hub / urllib
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise MissingWeightsError(f"could not fetch CLIP weights {model_name}/{pretrained} from {where} ({first}); fetch them on a machine with a network, pass the file to --clip_pretrained, or use --no_clip_score.") from None
    if path is None:
        raise MissingWeightsError(
            f"CLIP weights {model_name}/{pretrained} are not cached{' and HF_HUB_OFFLINE is set' if offline() else ''}: on a machine with a network run "
            f"`python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{pretrained}')\"` "
            f"(fetches {where}) and copy the Hugging Face cache here, or pass the file to --clip_pretrained "
            f"(or use --no_clip_score)."
        )
    overrides = {"force_quick_gelu": bool(cfg.get("quick_gelu", False))}
    for key, arg in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation"), ("resize_mode", "image_resize_mode")):
        if key in cfg:
            overrides[arg] = cfg[key]
    return path, overrides


class ClipScorer:
    """An open_clip model, its eval transform and tokenizer, ready to score (image, prompt) pairs."""

    def __init__(self, model_name: str = DEFAULT_CLIP_MODEL, pretrained: str = DEFAULT_CLIP_PRETRAINED, device: str | torch.device = "cpu"):
        import open_clip

        path, overrides = resolve_clip_weights(model_name, pretrained)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=path, device=device, **overrides)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """``[B]`` cosine similarity of each image with its prompt."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts.")
        x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        t = self.tokenizer(list(prompts)).to(self.device)
        img = torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)
        txt = torch.nn.functional.normalize(self.model.encode_text(t).float(), dim=-1)
        return (img * txt).sum(-1).cpu()


def clip_scores(scorer: ClipScorer, images: Sequence[Image.Image], prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Per-pair CLIP scores, batched, with a progress bar."""
    from tqdm.auto import tqdm

    out = [scorer(images[i : i + batch_size], prompts[i : i + batch_size]) for i in tqdm(range(0, len(images), batch_size), desc="CLIP score", leave=False)]
    return torch.cat(out) if out else torch.zeros(0)
