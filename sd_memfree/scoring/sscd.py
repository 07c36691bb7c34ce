"""SSCD copy-detection descriptors: find the TorchScript file, preprocess, embed in batches.

SSCD (Pizzi et al. 2022) is a ResNet-50 + GeM pooling + 512-d projection released as TorchScript
files. Nothing is downloaded here: a known name that is not in the cache stops with a message
saying where to get the file and where to put it.

Invariants:
- ``embed_images`` returns float32 ``[N, D]`` rows of unit L2 norm, in the order of the input,
  whatever the batch size (we re-normalise because normalisation is idempotent and not every
  TorchScript export ends with it).
- Two named preprocessings, and only these: ``dcr`` (resize 256, centre crop 224, mean/std 0.5:
  what Somepalli et al. and IET-AGC used) and ``sscd`` (short side 288, ImageNet normalisation:
  what the SSCD authors recommend). ``sscd`` keeps the aspect ratio, so images of different shapes
  are embedded in separate sub-batches.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from PIL import Image

SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/{name}.torchscript.pt"
KNOWN_SSCD_MODELS = ("sscd_disc_mixup", "sscd_disc_large", "sscd_disc_blur", "sscd_disc_advanced", "sscd_imagenet_mixup")
PREPROCESSINGS = ("dcr", "sscd")


class MissingWeightsError(FileNotFoundError):
    """A weights file the scorer needs is not on disk; the message says where to get and put it."""


def cache_root() -> Path:
    """``$SD_MEMFREE_CACHE`` or ``~/.cache/sd_memfree``: where SSCD files and embedding caches live."""
    return Path(os.environ.get("SD_MEMFREE_CACHE", Path.home() / ".cache" / "sd_memfree")).expanduser()


def resolve_sscd_path(name_or_path: str) -> Path:
    """An existing file path is used as is; a known model name is looked up in ``<cache>/sscd/``.

    Raises:
        MissingWeightsError: with the download URL and the destination path.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = path.name.removesuffix(".pt").removesuffix(".torchscript")
    if name in KNOWN_SSCD_MODELS:
        cached = cache_root() / "sscd" / f"{name}.torchscript.pt"
        if cached.is_file():
            return cached
        raise MissingWeightsError(
            f"SSCD model '{name}' is not on disk: download {SSCD_URL.format(name=name)} to {cached} "
            f"(or pass its path to --sscd_model)."
        )
    raise MissingWeightsError(
        f"--sscd_model {name_or_path!r} is neither a file nor a known SSCD name ({', '.join(KNOWN_SSCD_MODELS)})."
    )


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (the embedding cache key's model part)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_sscd(name_or_path: str, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load an SSCD TorchScript file (or a stand-in of the same interface) in eval mode."""
    model = torch.jit.load(str(resolve_sscd_path(name_or_path)), map_location=device)
    return model.eval()


def make_transform(preprocess: str) -> Callable[[Image.Image], torch.Tensor]:
    """The named preprocessing: PIL image -> normalised ``[3, H, W]`` float tensor."""
    from torchvision import transforms as T

    if preprocess == "dcr":
        return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    if preprocess == "sscd":
        return T.Compose([T.Resize(288), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    raise ValueError(f"--preprocess must be one of {PREPROCESSINGS}, got {preprocess!r}.")


@torch.no_grad()
def embed_images(
    model: torch.nn.Module,
    images: Iterable[Image.Image],
    preprocess: str,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    total: int | None = None,
    desc: str = "SSCD embed",
) -> torch.Tensor:
    """Embed PIL images with ``model`` under the named preprocessing.

    Returns:
        ``[N, D]`` float32 on the CPU, unit-norm rows, in input order.
    """
    from tqdm.auto import tqdm

    transform = make_transform(preprocess)
    out: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        # Group by shape: ``sscd`` keeps aspect ratios, and a batch tensor needs one shape.
        order: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(batch):
            order.setdefault(tuple(t.shape), []).append(i)
        rows: list[torch.Tensor | None] = [None] * len(batch)
        for idx in order.values():
            x = torch.stack([batch[i] for i in idx]).to(device)
            emb = torch.nn.functional.normalize(model(x).float(), dim=-1).cpu()
            for j, i in enumerate(idx):
                rows[i] = emb[j]
        out.append(torch.stack(rows))  # type: ignore[arg-type]
        batch.clear()

    for img in tqdm(images, total=total, desc=desc, unit="img", leave=False):
        batch.append(transform(img.convert("RGB")))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


def embed_dataset_images(model, dataset: Sequence, image_column: str, preprocess: str, batch_size: int, device) -> torch.Tensor:
    """Embed the image column of a ``datasets.Dataset`` (decoded lazily, row by row)."""
    images = dataset.select_columns([image_column]) if hasattr(dataset, "select_columns") else dataset
    return embed_images(
        model, (row[image_column] for row in images), preprocess, batch_size, device, total=len(dataset), desc="SSCD embed (training set)"
    )
