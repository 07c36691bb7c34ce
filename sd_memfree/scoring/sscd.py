"""SSCD copy-detection descriptors: find (or fetch) the TorchScript file, check it, preprocess, embed.

SSCD (Pizzi et al. 2022) is a ResNet + GeM pooling + projection (512-d; 1024-d for
``sscd_disc_large``) released as TorchScript files. A known name that is not in the cache is
downloaded from ``$SD_MEMFREE_SSCD_BASE_URL`` (default: the authors' URL) on first use, with a
progress bar, into a temporary file that is renamed into the cache only once it is complete and
has passed ``verify_sscd``. Offline (``HF_HUB_OFFLINE=1``) or without a network, the run stops
with one line saying what to download and where to put it.

Invariants:
- Every model is checked before use (``load_sscd``): it must load with ``torch.jit.load``
  (TorchScript, never a pickle) and map a probe batch to finite, non-zero ``[B, D]`` rows (unit
  norm and the published width for a downloaded known name); otherwise ``SSCDError`` names the
  file and the problem. ``embed_images`` applies the same finite / non-zero check to every batch,
  so a broken measurement can never read as "no memorization".
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

DEFAULT_SSCD_BASE_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection"
SSCD_URL = DEFAULT_SSCD_BASE_URL + "/{name}.torchscript.pt"
# Descriptor width of each published model (the SSCD README's model table).
KNOWN_SSCD_DIMS = {"sscd_disc_mixup": 512, "sscd_disc_large": 1024, "sscd_disc_blur": 512, "sscd_disc_advanced": 512, "sscd_imagenet_mixup": 512}
KNOWN_SSCD_MODELS = tuple(KNOWN_SSCD_DIMS)
PREPROCESSINGS = ("dcr", "sscd")


class MissingWeightsError(FileNotFoundError):
    """A weights file the scorer needs is not on disk; the message says where to get and put it."""


class SSCDError(ValueError):
    """An SSCD file that cannot be used (not TorchScript, wrong output, NaN / inf / zero rows);
    the message names the file and the problem."""


def sscd_base_url() -> str:
    """``$SD_MEMFREE_SSCD_BASE_URL`` (a mirror, or a test server) or the SSCD authors' URL."""
    return os.environ.get("SD_MEMFREE_SSCD_BASE_URL", DEFAULT_SSCD_BASE_URL).rstrip("/")


def sscd_url(name: str) -> str:
    return f"{sscd_base_url()}/{name}.torchscript.pt"


def offline() -> bool:
    """``HF_HUB_OFFLINE`` set to a true value: the ecosystem's switch for "never touch the network"."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> Path:
    """``$SD_MEMFREE_CACHE`` or ``~/.cache/sd_memfree``: where SSCD files and embedding caches live."""
    return Path(os.environ.get("SD_MEMFREE_CACHE", Path.home() / ".cache" / "sd_memfree")).expanduser()


def cached_sscd_path(name: str) -> Path:
    return cache_root() / "sscd" / f"{name}.torchscript.pt"


def resolve_sscd_path(name_or_path: str, download: bool = True) -> Path:
    """An existing file path is used as is; a known model name is looked up in ``<cache>/sscd/``
    and, if absent and ``download``, fetched there (``download_sscd``).

    A value with a folder part (``/some/path.pt``, ``./x.pt``) is always a path: if it does not
    exist, the error is about that path, never about the cache.

    Raises:
        MissingWeightsError: the file is not there (and could not be fetched); the message says
            what to download and where to put it.
        SSCDError: a downloaded file failed ``verify_sscd``.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = path.name.removesuffix(".pt").removesuffix(".torchscript")
    is_name = os.sep not in name_or_path and "/" not in name_or_path and name in KNOWN_SSCD_MODELS
    if not is_name:
        if path.exists():
            raise MissingWeightsError(f"--sscd_model {path} is not a file; pass an SSCD .torchscript.pt file.")
        hint = f" (to fetch it, pass the name '{name}')" if name in KNOWN_SSCD_MODELS else f" (or pass a known name: {', '.join(KNOWN_SSCD_MODELS)})"
        raise MissingWeightsError(f"--sscd_model {path}: no such file{hint}.")
    cached = cached_sscd_path(name)
    if cached.is_file():
        return cached
    if not download:
        raise MissingWeightsError(f"SSCD model '{name}' is not on disk: download {sscd_url(name)} to {cached} (or pass its path to --sscd_model).")
    return download_sscd(name)


def download_sscd(name: str, timeout: float = 60.0) -> Path:
    """Fetch ``<base>/<name>.torchscript.pt`` into the cache and return its path.

    Written to ``<dest>.tmp-<pid>`` with a progress bar; the size must match ``Content-Length``
    (when the server sends one) and the file must pass ``verify_sscd`` before it is renamed to
    ``<dest>``. On any failure nothing is left in the cache.

    Raises:
        MissingWeightsError: offline, unreachable, HTTP error or an interrupted transfer.
        SSCDError: the file arrived whole but is not a working SSCD model.
    """
    import http.client
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    dest, url = cached_sscd_path(name), sscd_url(name)
    manual = f"download {url} to {dest} (or pass its path to --sscd_model)"
    if offline():
        raise MissingWeightsError(f"SSCD model '{name}' is not in the cache and HF_HUB_OFFLINE is set: {manual}.")
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    try:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)  # an unwritable cache is reported like a failed download
            with urllib.request.urlopen(url, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {name}") as bar:
                    while block := response.read(1 << 20):
                        f.write(block)
                        bar.update(len(block))
            got = tmp.stat().st_size
            if total is not None and got != total:
                raise http.client.IncompleteRead(b"", total - got)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or (f"interrupted after {tmp.stat().st_size if tmp.exists() else 0} bytes" if isinstance(e, http.client.IncompleteRead) else e)
            raise MissingWeightsError(f"could not download SSCD model '{name}' from {url} ({reason}): {manual}.") from None
        verify_sscd(_jit_load(tmp, "cpu", f"the file downloaded from {url}"), f"the file downloaded from {url}", expected_dim=KNOWN_SSCD_DIMS[name], unit_norm=True)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (the embedding cache key's model part)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _jit_load(path: str | os.PathLike, device, what: str) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:  # torch raises RuntimeError/ValueError/... for anything not TorchScript
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise SSCDError(f"{what} is not a TorchScript model ({first}); SSCD files are the *.torchscript.pt files from {DEFAULT_SSCD_BASE_URL}.") from None


def check_embeddings(emb, batch: int, what: str, expected_dim: int | None = None) -> torch.Tensor:
    """``emb`` must be a finite ``[batch, D]`` tensor with no all-zero row (else ``SSCDError``)."""
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != batch:
        shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise SSCDError(f"{what} returned {shape} for a batch of {batch} images; an SSCD model returns [batch, dim] descriptors.")
    if expected_dim is not None and emb.shape[1] != expected_dim:
        raise SSCDError(f"{what} returned {emb.shape[1]}-d descriptors; this SSCD model has {expected_dim}-d ones.")
    bad = ~torch.isfinite(emb).all(1)
    if bad.any():
        raise SSCDError(f"{what} returned NaN or inf descriptors for {int(bad.sum())} of {batch} images; the similarity would be meaningless.")
    zero = emb.abs().amax(1) == 0
    if zero.any():
        raise SSCDError(f"{what} returned all-zero descriptors for {int(zero.sum())} of {batch} images; the similarity would be meaningless.")
    return emb


@torch.no_grad()
def verify_sscd(model, what: str, expected_dim: int | None = None, unit_norm: bool = False, device="cpu") -> int:
    """Run ``model`` on a fixed probe batch (two 224 px images, ``dcr``-normalised) and check it.

    Returns:
        The descriptor width ``D``.

    Raises:
        SSCDError: the output is not finite ``[2, D]`` rows, not ``expected_dim`` wide, has an
            all-zero row, or (``unit_norm``) rows whose L2 norm is not 1 within 1e-3.
    """
    probe = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    try:
        emb = model(probe.to(device))
    except Exception as e:
        raise SSCDError(f"{what} fails on a [2, 3, 224, 224] image batch ({type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}).") from None
    emb = check_embeddings(emb, 2, what, expected_dim).float()
    if unit_norm and not torch.allclose(emb.norm(dim=1), torch.ones(2, device=emb.device), atol=1e-3):
        raise SSCDError(f"{what} returned descriptors of norm {emb.norm(dim=1).tolist()}; SSCD's are unit-norm.")
    return int(emb.shape[1])


def load_sscd(name_or_path: str, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load an SSCD TorchScript file (or a stand-in of the same interface) in eval mode, checked
    by ``verify_sscd`` (fetching a known name first if needed)."""
    path = resolve_sscd_path(name_or_path)
    model = _jit_load(path, device, f"SSCD file {path}")
    name = path.name.removesuffix(".pt").removesuffix(".torchscript")
    known = path == cached_sscd_path(name) and name in KNOWN_SSCD_DIMS
    verify_sscd(model, f"SSCD file {path}", expected_dim=KNOWN_SSCD_DIMS[name] if known else None, device=device)
    return model


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
    source: str = "the SSCD model",
) -> torch.Tensor:
    """Embed PIL images with ``model`` under the named preprocessing.

    Returns:
        ``[N, D]`` float32 on the CPU, unit-norm rows, in input order.

    Raises:
        SSCDError: a batch gave NaN / inf / all-zero rows (``source`` names the model file).
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
            raw = check_embeddings(model(x), len(idx), source)
            emb = torch.nn.functional.normalize(raw.float(), dim=-1).cpu()
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


def embed_dataset_images(model, dataset: Sequence, image_column: str, preprocess: str, batch_size: int, device, source: str = "the SSCD model") -> torch.Tensor:
    """Embed the image column of a ``datasets.Dataset`` (decoded lazily, row by row)."""
    images = dataset.select_columns([image_column]) if hasattr(dataset, "select_columns") else dataset
    return embed_images(
        model, (row[image_column] for row in images), preprocess, batch_size, device, total=len(dataset), desc="SSCD embed (training set)", source=source
    )
