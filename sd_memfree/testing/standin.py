"""Stand-ins for the scorer's weights files, with random weights, for offline tests, benchmarks and
the demo, never for a real measurement (see ``sd_memfree.testing``). Each is written to disk and
then loaded by the *same* code path as the real file:

- ``make_standin_sscd``: a TorchScript model with SSCD's interface (ResNet trunk, GeM pooling,
  512-d projection, L2 norm), loaded by ``sscd.load_sscd``.
- ``make_copy_detector_sscd``: a TorchScript model with the same interface that *is* a (weak)
  copy detector, with fixed weights: an 8 x 8 colour thumbnail, mean-removed, mapped by an
  orthonormal projection (which keeps every inner product) and L2-normalised. It passes
  ``sscd.check_copy_detection``; the random ``make_standin_sscd`` does not. The audit's semantic-pass
  tests use it too (its similarities mean something: a copy scores near 1).
- ``make_tiny_clip``: a small open_clip architecture (registered as ``TINY_CLIP_NAME``) and its
  weights file, loaded by ``open_clip.create_model_and_transforms(name, pretrained=<file>)``.
- ``make_random_inception_weights``: a state dict of torch-fidelity's FID Inception-v3, loaded by
  torchmetrics' ``FrechetInceptionDistance(feature_extractor_weights_path=<file>)``.

Scores computed with them are meaningless except for equalities (identical images score 1.0,
identical sets have FID ~0); they exist so the plumbing is tested without a network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

TINY_CLIP_NAME = "sd-memfree-tiny-clip"


class GeM(nn.Module):
    """Generalised-mean pooling, SSCD's pooling (p = 3)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class StandinSSCD(nn.Module):
    """ResNet trunk -> GeM -> linear projection -> L2 norm, like ``sscd_disc_*``."""

    def __init__(self, trunk: str = "resnet18", dim: int = 512):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, trunk)(weights=None)
        self.trunk = nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc
        self.pool = GeM()
        self.project = nn.Linear(net.fc.in_features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.project(self.pool(self.trunk(x))), dim=-1)


def make_standin_sscd(path: str | os.PathLike, trunk: str = "resnet18", seed: int = 0) -> Path:
    """Write a scripted ``StandinSSCD`` with seeded random weights to ``path``."""
    torch.manual_seed(seed)
    model = torch.jit.script(StandinSSCD(trunk).eval())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path))
    return path


class ThumbnailCopyDetector(nn.Module):
    """8 x 8 thumbnail -> remove its mean -> orthonormal projection to ``dim`` -> L2 norm.

    The cosine of two outputs is the correlation of the two thumbnails: near 1 for an image and
    its re-encoded, resized or slightly cropped copy, near 0 for unrelated images.
    """

    def __init__(self, dim: int = 512, seed: int = 0):
        super().__init__()
        features = 3 * 8 * 8
        if dim < features:
            raise ValueError(f"dim must be at least {features}")
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, features, generator=g))  # [dim, 192], orthonormal columns
        self.register_buffer("project", q.T.contiguous())  # [192, dim], orthonormal rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        thumb = nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
        thumb = thumb - thumb.mean(dim=1, keepdim=True)
        return nn.functional.normalize(thumb @ self.project, dim=-1)


def make_copy_detector_sscd(path: str | os.PathLike, dim: int = 512, seed: int = 0) -> Path:
    """Write a scripted ``ThumbnailCopyDetector`` (``dim``-d output; ``seed`` picks the projection,
    so two seeds give two different files that both detect copies) to ``path``."""
    model = torch.jit.script(ThumbnailCopyDetector(dim, seed).eval())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path))
    return path


def make_tiny_clip(out_dir: str | os.PathLike, seed: int = 0) -> tuple[str, Path]:
    """Register a tiny open_clip architecture and write random weights for it.

    Returns:
        ``(model_name, weights_file)`` for ``--clip_model`` / ``--clip_pretrained``.
    """
    import open_clip

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    cfg_path = out_dir / f"{TINY_CLIP_NAME}.json"
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_NAME)
    weights = out_dir / f"{TINY_CLIP_NAME}.pt"
    torch.save(model.state_dict(), weights)
    return TINY_CLIP_NAME, weights


def make_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a randomly initialised state dict of torch-fidelity's FID Inception-v3 to ``path``."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _RandomInit(FeatureExtractorInceptionV3):
        # torch-fidelity's constructor insists on loading weights; keep the random init instead.
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({}, path)  # the constructor reads this (empty) file, then we overwrite it
    torch.manual_seed(seed)
    net = _RandomInit("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    # He init keeps the signal alive through ~90 layers, so different images give different
    # features (PyTorch's default init shrinks them to ~0 and every FID would be ~0).
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(nn.Module.state_dict(net), path)
    return path
