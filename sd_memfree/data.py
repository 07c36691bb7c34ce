"""Training data: loading and validating captioned image sets, an indexed dataset that yields
sample ids, and the batch sampler that feeds each proxy from its own shard.

Invariants:
- ``load_image_caption_dataset`` either returns a non-empty dataset whose every image decodes in
  full and whose every caption is a non-empty string (or a list of them), or raises ``DataError``
  with one line naming the bad files and the fix, before any model is loaded. A bad sample is
  never found mid-run. ``check_samples(..., drop_bad=True)`` drops them instead and says which.
- An imagefolder ``file_name`` that is absolute or leaves the folder (``../x.png``) is never
  read: such a row becomes a sample whose image is refused by ``check_samples`` (one line, or
  dropped with ``--drop_bad_samples``), instead of a traceback inside ``datasets``.
- ``ShardBatchSampler`` is a pure function of (members, generation, seed, schedule, origin, micro-step): the
  batch drawn at micro-step ``m`` never depends on how many batches were prefetched, whether the
  run was resumed, or ``--dataloader_num_workers``. Each element carries its own augmentation
  seed, so random crops/flips/RandAugment are reproducible across resumes and workers too.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataError(ValueError):
    """Bad training data, reported before training starts."""


# The image path of a metadata row whose file_name is refused; ``_image_problem`` reports it.
REFUSED_PATH = "<refused file_name> "


def _outside(folder: Path, name: str) -> bool:
    """Whether an imagefolder ``file_name`` is absolute or resolves outside ``folder``."""
    if os.path.isabs(name) or Path(name).drive or ".." in Path(name.replace("\\", "/")).parts:
        return True
    root = folder.resolve()
    return root != (folder / name).resolve() and root not in (folder / name).resolve().parents


def _check_local_metadata(folder: Path, image_column: str) -> list[tuple[int, str]]:
    """Every file named in an imagefolder ``metadata.jsonl`` must exist (datasets drops them silently).

    Returns:
        ``(line number, file_name)`` of the rows whose file name is absolute or leaves ``folder``
        (never opened; ``load_image_caption_dataset`` turns them into refused samples).
    """
    meta = folder / "metadata.jsonl"
    outside: list[tuple[int, str]] = []
    if not meta.exists():
        return outside
    from .safeio import check_regular_file

    check_regular_file(meta, "replace it with the dataset's metadata file.")
    with open(meta, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{meta}:{lineno} is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{meta}:{lineno} is not valid JSON ({e.msg}); fix that line.") from None
            name = row.get("file_name") if isinstance(row, dict) else None
            if not isinstance(name, str) or not name:
                raise DataError(f"{meta}:{lineno} has no 'file_name' string; every row needs the image's file name.")
            if _outside(folder, name):
                outside.append((lineno, name))
            elif not (folder / name).exists():
                raise DataError(f"image file {folder / name} listed in {meta}:{lineno} is missing; add it or remove that row.")
    return outside


def _dataset_from_metadata(folder: Path, image_column: str):
    """An imagefolder read row by row from its ``metadata.jsonl``: the rows ``datasets`` cannot
    load (a file name outside the folder) keep their place with a refused image, so the check
    names them and ``--drop_bad_samples`` can drop them."""
    import datasets

    rows = []
    with open(folder / "metadata.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                name = row.pop("file_name")
                path = f"{REFUSED_PATH}{name}" if _outside(folder, name) else str(folder / name)
                rows.append({image_column: {"path": path, "bytes": None}, **row})
    return datasets.Dataset.from_list(rows).cast_column(image_column, datasets.Image())


def load_image_caption_dataset(
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    dataset_config_name: str | None = None,
    cache_dir: str | None = None,
    image_column: str | None = "image",
    caption_column: str | None = "text",
    max_train_samples: int | None = None,
    seed: int | None = None,
    verify_images: bool = True,
):
    """Load a captioned image set the way diffusers' text-to-image scripts do, and validate it.

    ``dataset_name`` is a Hub name or a local folder (anything ``datasets.load_dataset`` takes);
    ``train_data_dir`` is an imagefolder (images + ``metadata.jsonl``). ``max_train_samples``
    keeps the first N after a seeded shuffle, as upstream does.

    Returns:
        ``(dataset, image_column, caption_column)``: the ``train`` split, images decoded lazily.
    """
    import datasets

    if dataset_name is None and train_data_dir is None:
        raise DataError("no training data given: pass --dataset_name (Hub name or local folder) or --train_data_dir (imagefolder).")
    local = Path(dataset_name) if dataset_name is not None else Path(train_data_dir)
    looks_local = train_data_dir is not None or dataset_name.startswith((".", "/", "~")) or local.exists()
    outside: list = []  # metadata rows naming files outside the folder (only an imagefolder's are checked here)
    if looks_local:
        local = local.expanduser()
        if not local.exists():
            raise DataError(f"dataset folder {local} does not exist; check --{'train_data_dir' if dataset_name is None else 'dataset_name'}.")
        if local.is_dir() and dataset_name is None:
            if not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in local.rglob("*") if f.is_file()):
                raise DataError(f"the dataset is empty: no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) were found in {local}; add images with a metadata.jsonl.")
            outside = _check_local_metadata(local, image_column or "image")
    try:
        if outside:  # datasets would raise on them: read the rows ourselves, the check refuses those
            ds = _dataset_from_metadata(local, image_column or "image")
        elif dataset_name is not None:
            ds = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, data_dir=train_data_dir)
        else:
            ds = datasets.load_dataset("imagefolder", data_dir=str(local), cache_dir=cache_dir)
    except FileNotFoundError as e:
        raise DataError(f"could not load the dataset ({str(e).splitlines()[0]}); check the name or folder.") from None
    except (ValueError, datasets.exceptions.DatasetNotFoundError if hasattr(datasets, "exceptions") else ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"could not load the dataset: {msg}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"the dataset has no 'train' split (it has {sorted(ds)}); provide one.")
        ds = ds["train"]
    columns = ds.column_names
    image_column = image_column or columns[0]
    if image_column not in columns:
        raise DataError(f"--image_column '{image_column}' is not a column of the dataset (columns: {', '.join(columns)}); pass one of them.")
    caption_column = caption_column or (columns[1] if len(columns) > 1 else None)
    if caption_column is None or caption_column not in columns:
        hint = " (an imagefolder needs a metadata.jsonl with file_name and text)" if looks_local else ""
        raise DataError(f"--caption_column '{caption_column}' is not a column of the dataset (columns: {', '.join(columns)}){hint}; pass the caption column.")
    if len(ds) == 0:
        raise DataError("the dataset is empty: no images were found; check the folder or the split.")
    if max_train_samples is not None:
        ds = ds.shuffle(seed=seed).select(range(min(max_train_samples, len(ds))))
    if verify_images:
        ds, _ = check_samples(ds, image_column, caption_column)
    return ds, image_column, caption_column


def _caption_problem(caption) -> str | None:
    """Why a caption cannot be trained on, or None. Captions are strings or non-empty lists of
    strings (upstream picks one at random); None, empty and other types stop the run."""
    if isinstance(caption, str):
        return None if caption.strip() else "empty caption"
    if isinstance(caption, (list, tuple)):
        if caption and all(isinstance(c, str) and c.strip() for c in caption):
            return None
        return "caption list is empty or holds a non-string/empty entry"
    return f"caption is {caption!r}" if caption is None else f"caption is a {type(caption).__name__}, not a string"


def _image_problem(item) -> str | None:
    """Decode one image in full (``load``, not just ``verify``: a truncated JPEG or a PNG whose
    compressed data is corrupt has a valid header and CRCs) and return why it failed, or None."""
    from PIL import Image

    if isinstance(item, dict) and str(item.get("path") or "").startswith(REFUSED_PATH):
        return "its file_name is absolute or leaves the dataset folder, so it is never read; put the image inside the folder"
    if isinstance(item, dict) and not item.get("bytes") and item.get("path"):
        import stat

        try:
            mode = os.stat(item["path"]).st_mode
        except OSError as e:
            return f"{type(e).__name__}: {e.strerror}"
        if not stat.S_ISREG(mode):  # a FIFO would block open() forever
            return "not a regular file (a FIFO, device or folder), never opened"
    try:
        if isinstance(item, dict):
            src = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
            with Image.open(src) as im:
                im.load()
        elif isinstance(item, Image.Image):
            item.load()
        else:
            return f"not an image ({type(item).__name__})"
    except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, zlib.error, ...)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def _where(item, index: int) -> str:
    path = item.get("path") if isinstance(item, dict) else None
    return f"{path} (sample {index})" if path else f"sample {index}"


def check_samples(ds, image_column: str, caption_column: str, drop_bad: bool = False, num_workers: int | None = None,
                  progress: bool = True, chunk_size: int = 256):
    """Decode every image in full and check every caption, before any model loads.

    Images are decoded in threads (PIL releases the GIL while decoding) in chunks, so memory
    stays bounded on large sets; a progress bar shows the pass. See docs/design.md for the cost.

    Args:
        ds: a ``datasets.Dataset``.
        image_column, caption_column: its columns.
        drop_bad: drop bad samples (returned in the report) instead of raising.
        num_workers: decoding threads (default: the CPU count, at most 16).
        progress: show a tqdm bar.
        chunk_size: images handed to the threads at a time.

    Returns:
        ``(dataset, dropped)``: the dataset (without the bad samples when ``drop_bad``) and one
        ``{"index", "where", "problem"}`` dict per bad sample (indices of the dataset given).

    Raises:
        DataError: there are bad samples and ``drop_bad`` is False; one line naming them and the fix.
    """
    from concurrent.futures import ThreadPoolExecutor

    import datasets
    from tqdm.auto import tqdm

    bad: dict[int, dict] = {}
    for i, caption in enumerate(ds[caption_column]):
        problem = _caption_problem(caption)
        if problem:
            bad[i] = {"index": i, "where": f"sample {i}", "problem": problem}
    raw = ds.cast_column(image_column, datasets.Image(decode=False)) if isinstance(ds.features.get(image_column), datasets.Image) else ds
    raw = raw.select_columns([image_column])
    workers = num_workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(raw), desc="Checking images", unit="img", disable=not progress or None) as bar:
        start = 0
        for chunk in raw.iter(batch_size=chunk_size):
            items = chunk[image_column]
            for j, (item, problem) in enumerate(zip(items, pool.map(_image_problem, items))):
                where = _where(item, start + j)
                if start + j in bad:  # the caption's problem is already listed; name the file
                    bad[start + j]["where"] = where
                if problem:
                    entry = bad.setdefault(start + j, {"index": start + j, "where": where, "problem": problem})
                    if entry["problem"] != problem:
                        entry["problem"] += f"; {problem}"
            start += len(items)
            bar.update(len(items))
    dropped = [bad[i] for i in sorted(bad)]
    if dropped and not drop_bad:
        shown = "; ".join(f"{d['where']}: {d['problem']}" for d in dropped[:5])
        more = f" (and {len(dropped) - 5} more)" if len(dropped) > 5 else ""
        raise DataError(f"{len(dropped)} of {len(ds)} training samples cannot be used: {shown}{more}; "
                        "fix or remove them, or pass --drop_bad_samples to train without them.")
    if dropped:
        if len(dropped) == len(ds):
            raise DataError(f"all {len(ds)} training samples are bad (first: {dropped[0]['where']}: {dropped[0]['problem']}); fix the data.")
        ds = ds.select([i for i in range(len(ds)) if i not in bad])
    return ds, dropped


DROPPED_SAMPLES_FILE = "dropped_samples.json"  # in output_dir; local only: it names training files


def dropped_warning(dropped: list[dict], output_dir: str | os.PathLike) -> str:
    """The one log line for ``--drop_bad_samples``: how many were dropped, where they are listed, the first five."""
    return (f"--drop_bad_samples: dropped {len(dropped)} bad sample(s), listed in {Path(output_dir) / DROPPED_SAMPLES_FILE}: "
            + "; ".join(f"{d['where']}: {d['problem']}" for d in dropped[:5]))


def write_dropped_samples(output_dir: str | os.PathLike, dropped: list[dict]) -> None:
    """List ``check_samples``'s dropped samples in ``output_dir`` (nothing is written when none was)."""
    if dropped:
        from .safeio import replace_file

        replace_file(Path(output_dir) / DROPPED_SAMPLES_FILE, json.dumps(dropped, indent=2))


def check_resolution(resolution: int, vae_scale_factor: int, generates_images: bool = False) -> None:
    """Accept exactly the resolutions this model trains at (measured in tests/test_resolution.py).

    The VAE encoder halves the image ``len(block_out_channels) - 1`` times with a padded stride-2
    conv, so the latent has ``resolution // vae_scale_factor`` pixels a side, which must be >= 1.
    The UNet takes any latent size: when it is not divisible by ``2**num_upsamplers``, diffusers'
    ``UNet2DConditionModel.forward`` passes ``upsample_size`` so each up block matches its skip
    connection (``forward_upsample_size``). Generating images (validation prompts) goes through
    ``StableDiffusionPipeline``, whose ``check_inputs`` requires a multiple of 8.

    Args:
        resolution: ``--resolution``.
        vae_scale_factor: ``2 ** (len(vae.config.block_out_channels) - 1)``.
        generates_images: validation images are generated at this resolution.
    """
    if resolution < vae_scale_factor:
        raise DataError(f"--resolution={resolution} is too small for this model: its VAE downsamples by {vae_scale_factor}, "
                        f"so use at least {vae_scale_factor}.")
    if generates_images and resolution % 8 != 0:
        lo = max(8, resolution // 8 * 8)
        raise DataError(f"--resolution={resolution} trains, but validation images are generated with StableDiffusionPipeline, "
                        f"which needs a multiple of 8 (e.g. {lo} or {lo + 8}); pick one or drop the validation prompts.")


def build_image_transforms(resolution: int, center_crop: bool, random_flip: bool, interpolation: str = "lanczos"):
    """Upstream's resize -> crop -> flip, returned as (geometric PIL transform, to-tensor transform)."""
    from torchvision import transforms

    mode = getattr(transforms.InterpolationMode, interpolation.upper(), None)
    if mode is None:
        raise DataError(f"--image_interpolation_mode '{interpolation}' is unknown; use e.g. lanczos, bilinear or bicubic.")
    geometric = transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=mode),
            transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
            transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
        ]
    )
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    return geometric, to_tensor


def caption_text(caption) -> str:
    """A caption cell as one string (datasets may store several captions per image: take the first).

    The one reading of a caption that training's skip counts file and the scorer share, so the
    scorer's join of counts to images compares like with like."""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple)) and caption:
        return str(caption[0])
    return str(caption)


class IndexedCaptionDataset(Dataset):
    """Yields ``{"pixel_values", "input_ids", "sample_id"}`` for keys ``(sample_id, aug_seed)``.

    All randomness of one item (crop, flip, caption choice, loss-aware augmentation) comes from
    ``aug_seed`` under ``torch.random.fork_rng``, so the global RNG of the training process is
    untouched and the item is the same in any worker and after a resume.
    """

    def __init__(self, hf_dataset, image_column: str, caption_column: str, tokenizer, geometric, to_tensor,
                 augment: Callable | None = None):
        self.ds = hf_dataset
        self.image_column = image_column
        self.caption_column = caption_column
        self.tokenizer = tokenizer
        self.geometric = geometric
        self.to_tensor = to_tensor
        self.augment = augment
        # A plain list: datasets' lazy column would read Arrow on every index (small: captions only).
        self.captions = list(hf_dataset[caption_column])

    def __len__(self) -> int:
        return len(self.ds)

    def caption_for(self, sample_id: int, aug_seed: int) -> str:
        caption = self.captions[sample_id]
        if isinstance(caption, str):
            return caption
        if isinstance(caption, (list, tuple)) and caption:
            return random.Random(aug_seed).choice(list(caption))
        raise DataError(f"caption of sample {sample_id} is {caption!r}; captions must be strings or lists of strings.")

    def pixels(self, image, sample_id: int, aug_seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also queue the seeding of every
            # accelerator backend (CUDA, XPU, MTIA), which costs more than the crop and flip.
            torch.default_generator.manual_seed(aug_seed)
            image = image.convert("RGB")
            if self.augment is not None:  # RandAugment on the image as loaded, before resize/crop/flip (the reference's order)
                image = self.augment(image, sample_id)
            image = self.geometric(image)
            return self.to_tensor(image)

    def __getitem__(self, key) -> dict:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys) -> list[dict]:
        """A whole micro-batch (the DataLoader calls this when it exists): one dataset read and one
        tokenizer call, as upstream's batched ``with_transform``; items equal ``__getitem__``'s."""
        ids = [int(sample_id) for sample_id, _ in keys]
        images = self.ds[ids][self.image_column]
        captions = [self.caption_for(i, aug_seed) for i, (_, aug_seed) in zip(ids, keys)]
        input_ids = self.tokenizer(captions, max_length=self.tokenizer.model_max_length, padding="max_length",
                                   truncation=True, return_tensors="pt").input_ids
        return [{"pixel_values": self.pixels(image, i, aug_seed), "input_ids": input_ids[j], "sample_id": i}
                for j, (image, i, (_, aug_seed)) in enumerate(zip(images, ids, keys))]


def collate(examples: Sequence[dict]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(memory_format=torch.contiguous_format).float(),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "sample_ids": torch.tensor([e["sample_id"] for e in examples], dtype=torch.long),
    }


def add_data_arguments(parser, title: str) -> None:
    """The training scripts' data flags, with their names and meanings, as one argument group
    (the scorer and the audit read training data as training does)."""
    data = parser.add_argument_group(title)
    data.add_argument("--dataset_name", default=None, help="Hub dataset name or local folder (as in training).")
    data.add_argument("--dataset_config_name", default=None, help="Dataset config, if any.")
    data.add_argument("--train_data_dir", default=None, help="Imagefolder of the training images (+ metadata.jsonl).")
    data.add_argument("--image_column", default="image", help="Image column of the dataset.")
    data.add_argument("--caption_column", default="text", help="Caption column of the dataset.")
    data.add_argument("--cache_dir", default=None, help="datasets cache folder.")
