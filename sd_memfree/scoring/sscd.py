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
  file and the problem.
- A known name is trusted only once it has shown it detects copies (``check_copy_detection``: a
  few generated images and their re-encoded / resized / cropped copies must score far above
  pairs of different images), before it enters the cache and again for a file put in the cache
  by hand; the SHA-256 of what passed is then recorded (``verified.json`` in the cache) and every
  later load of that name must have the same bytes. The authors publish no checksums for their
  files (their README, github.com/facebookresearch/sscd-copy-detection, lists download links
  only), so ``KNOWN_SSCD_SHA256`` is empty: the first verified file's hash is the reference.
  A file given by path is the user's own choice and gets the probe checks only. ``embed_images`` applies the same finite / non-zero check to every batch,
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
import json
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
# SHA-256 of the authors' files, where they publish one (none is published; see the docstring).
KNOWN_SSCD_SHA256: dict[str, str] = {}
VERIFIED_FILE = "verified.json"  # in <cache>/sscd/: name -> SHA-256 of the file that passed the copy check
# A copy detector must score every copy above every pair of different images, and on average by
# this much: SSCD scores copies ~0.6-0.9 and unrelated images ~0-0.2; random weights score
# everything alike (all ~0 for random unit vectors, all ~1 for a random network).
MIN_COPY_MARGIN = 0.3


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
        what = f"the file downloaded from {url}"
        model = _jit_load(tmp, "cpu", what)
        verify_sscd(model, what, expected_dim=KNOWN_SSCD_DIMS[name], unit_norm=True)
        trust_known_file(name, tmp, model, what)  # before it is cached as the name
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
    by ``verify_sscd`` (fetching a known name first if needed); a known name's cached file must be
    the one that passed the copy check (``trust_known_file``)."""
    path = resolve_sscd_path(name_or_path)
    model = _jit_load(path, device, f"SSCD file {path}")
    name = path.name.removesuffix(".pt").removesuffix(".torchscript")
    known = path == cached_sscd_path(name) and name in KNOWN_SSCD_DIMS
    verify_sscd(model, f"SSCD file {path}", expected_dim=KNOWN_SSCD_DIMS[name] if known else None, device=device)
    if known:
        trust_known_file(name, path, model, f"SSCD file {path}", device=device)
    return model


def _verified(root: Path) -> dict:
    from ..safeio import UnsafeFile, read_json

    path = root / VERIFIED_FILE
    try:
        return read_json(path, "delete it; the models are verified again on their next use.") if path.exists() else {}
    except UnsafeFile:
        return {}  # a damaged record only costs a new verification


def trust_known_file(name: str, path: str | os.PathLike, model, what: str, device="cpu") -> str:
    """Accept ``path`` as known SSCD model ``name`` only if its bytes are the ones trusted before.

    The reference hash is the authors' (``KNOWN_SSCD_SHA256``) when published, else the one of
    the first file that passed ``check_copy_detection`` (recorded in ``<cache>/sscd/verified.json``).
    Without a reference the model is checked now and, if it passes, its hash is recorded.

    Returns:
        The file's SHA-256.

    Raises:
        SSCDError: the bytes differ from the reference, or the model does not detect copies.
    """
    from ..safeio import replace_file

    digest = file_sha256(path)
    root = cached_sscd_path(name).parent
    published = KNOWN_SSCD_SHA256.get(name)
    recorded = _verified(root).get(name)
    expected = published or recorded
    if expected and digest != expected:
        source = "the SSCD authors' published SHA-256" if published else f"the SHA-256 recorded in {root / VERIFIED_FILE} when it was first verified"
        raise SSCDError(f"{what} has SHA-256 {digest}, not {expected} ({source}); it is not the '{name}' model: delete it "
                        f"and fetch it again from {DEFAULT_SSCD_BASE_URL}.")
    if recorded != digest:
        check_copy_detection(model, what, device=device)
        records = {**_verified(root), name: digest}
        root.mkdir(parents=True, exist_ok=True)
        replace_file(root / VERIFIED_FILE, json.dumps(records, indent=1, sort_keys=True) + "\n")
    return digest


def copy_check_images(count: int = 4, size: int = 256, seed: int = 0) -> list[Image.Image]:
    """``count`` different generated images (no download): smooth gradients under large
    coloured shapes, at random places, so each has its own layout at every scale."""
    import random

    from PIL import ImageDraw

    rng = random.Random(seed)
    images = []
    for _ in range(count):
        a, b = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
        im = Image.new("RGB", (size, size))
        px = im.load()
        horizontal = rng.random() < 0.5
        for y in range(size):
            for x in range(size):
                t = (x if horizontal else y) / (size - 1)
                px[x, y] = tuple(int(a[c] * (1 - t) + b[c] * t) for c in range(3))
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = rng.randrange(size - 40), rng.randrange(size - 40)
            x1, y1 = x0 + rng.randrange(40, size // 2), y0 + rng.randrange(40, size // 2)
            colour = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        images.append(im)
    return images


def copies_of(image: Image.Image) -> list[Image.Image]:
    """Three copies a copy detector must recognise: JPEG re-encoded at quality 30, shrunk to 40 %
    and enlarged back, and cropped to the central 80 % and resized back."""
    import io

    w, h = image.size
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=30)
    jpeg = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    resized = image.resize((w * 2 // 5, h * 2 // 5), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    cropped = image.crop((w // 10, h // 10, w - w // 10, h - h // 10)).resize((w, h), Image.BILINEAR)
    return [jpeg, resized, cropped]


@torch.no_grad()
def check_copy_detection(model, what: str, device="cpu", margin: float = MIN_COPY_MARGIN) -> tuple[float, float]:
    """Check that ``model`` detects copies: every image's copies (``copies_of``) score above every
    pair of different images, and on average by at least ``margin``.

    Returns:
        ``(lowest copy similarity, highest similarity of different images)``.

    Raises:
        SSCDError: one line with both numbers; the model is not a copy detector (random or wrong
            weights), so a score it gave would read as "no memorization".
    """
    originals = copy_check_images()
    images = [im for original in originals for im in [original, *copies_of(original)]]
    emb = embed_images(model, images, "dcr", batch_size=len(images), device=device, source=what)
    group = torch.arange(len(originals)).repeat_interleave(len(images) // len(originals))
    sims = emb @ emb.T
    same = (group[:, None] == group[None, :]) & ~torch.eye(len(images), dtype=torch.bool)
    different = group[:, None] != group[None, :]
    copy_sims, other_sims = sims[same], sims[different]
    low, high = float(copy_sims.min()), float(other_sims.max())
    if low <= high or float(copy_sims.mean() - other_sims.mean()) < margin:
        raise SSCDError(f"{what} does not detect copies: an image and its re-encoded / resized / cropped copies score "
                        f"{low:.2f}..{float(copy_sims.max()):.2f} against {float(other_sims.min()):.2f}..{high:.2f} for different "
                        f"images (mean {float(copy_sims.mean()):.2f} vs {float(other_sims.mean()):.2f}); its weights are not SSCD's, "
                        f"so it would report no memorization: fetch it from {DEFAULT_SSCD_BASE_URL}.")
    return low, high


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
