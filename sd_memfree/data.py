"""Training data: loading and validating captioned image sets, an indexed dataset that yields
sample ids, and the batch sampler that feeds each proxy from its own shard.

Invariants:
- ``load_image_caption_dataset`` either returns a non-empty dataset whose image column decodes
  and whose caption column exists, or raises ``DataError`` with one line naming the fix, before
  any model is loaded.
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


def _check_local_metadata(folder: Path, image_column: str) -> None:
    """Every file named in an imagefolder ``metadata.jsonl`` must exist (datasets drops them silently)."""
    meta = folder / "metadata.jsonl"
    if not meta.exists():
        return
    with open(meta, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{meta}:{lineno} is not valid JSON ({e.msg}); fix that line.") from None
            name = row.get("file_name")
            if name is None:
                raise DataError(f"{meta}:{lineno} has no 'file_name'; every row needs the image's file name.")
            if not (folder / name).exists():
                raise DataError(f"image file {folder / name} listed in {meta}:{lineno} is missing; add it or remove that row.")


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
    if looks_local:
        local = local.expanduser()
        if not local.exists():
            raise DataError(f"dataset folder {local} does not exist; check --{'train_data_dir' if dataset_name is None else 'dataset_name'}.")
        if local.is_dir() and dataset_name is None:
            if not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in local.rglob("*") if f.is_file()):
                raise DataError(f"the dataset is empty: no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) were found in {local}; add images with a metadata.jsonl.")
            _check_local_metadata(local, image_column or "image")
    try:
        if dataset_name is not None:
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
        verify_image_column(ds, image_column)
    return ds, image_column, caption_column


def verify_image_column(ds, image_column: str) -> None:
    """Open every image header once (PIL ``verify``) so corrupt files fail now, not mid-run."""
    import datasets
    from PIL import Image

    raw = ds.cast_column(image_column, datasets.Image(decode=False)) if isinstance(ds.features.get(image_column), datasets.Image) else ds
    for i, item in enumerate(raw[image_column] if len(raw) <= 100_000 else (raw[j][image_column] for j in range(len(raw)))):
        where = f"sample {i}"
        try:
            if isinstance(item, dict):
                where = item.get("path") or where
                src = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
                with Image.open(src) as im:
                    im.verify()
            elif isinstance(item, Image.Image):
                item.load()
            else:
                raise TypeError(f"not an image ({type(item).__name__})")
        except Exception as e:  # PIL raises many types for bad files
            raise DataError(f"image {where} cannot be read ({type(e).__name__}: {e}); replace or remove it.") from None


def check_resolution(resolution: int, vae_scale_factor: int, unet_downsample: int) -> None:
    """The VAE and UNet need a resolution divisible by their total downsampling."""
    factor = vae_scale_factor * unet_downsample
    if resolution <= 0 or resolution % factor != 0:
        lo = max(factor, resolution // factor * factor)
        raise DataError(f"--resolution={resolution} cannot be taken by this model: it must be a multiple of {factor} (e.g. {lo} or {lo + factor}).")


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
            image = self.geometric(image.convert("RGB"))
            if self.augment is not None:
                image = self.augment(image, sample_id)
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


def _aug_seed(seed: int, shard: int, generation: int, position: int) -> int:
    """Seed of the item at ``position`` of a shard's stream: independent of which process or
    micro-step draws it, so one process taking turns and several processes training proxies
    concurrently see identical items."""
    return (seed * 1_000_003 + shard * 7_919_993 + generation * 104_729 + position) % (2**31 - 1)


class ShardBatchSampler:
    """Micro-batches for every micro-step, each drawn from the shard that the schedule names.

    Each shard is an endless stream of epochs; epoch ``e`` of shard ``k`` is a permutation of its
    current members seeded by ``(seed, k, e, generation)``. Batches may straddle epochs, so every
    micro-batch is full (constant shapes, no tail batch). The global micro-batch is
    ``batch_size * data_world`` samples; this process takes its slice ``data_rank``, which is how
    plain data-parallel training (one shard, several processes) splits the data.

    Args:
        members: per shard, the sample ids it holds (``members[k]``).
        schedule: micro-step -> shard drawn at that micro-step.
        origin: micro-step at which the current membership took effect (0, or the step of the last
            redistribution); the streams restart there.
        start: first micro-step the next ``__iter__`` yields (set before creating a new iterator).
    """

    def __init__(self, members: list[list[int]], batch_size: int, seed: int, schedule: Callable[[int], int],
                 data_rank: int = 0, data_world: int = 1, origin: int = 0, start: int = 0):
        self.batch_size = batch_size
        self.seed = seed
        self.schedule = schedule
        self.data_rank = data_rank
        self.data_world = data_world
        self.set_members(members, origin)
        self.start = start

    def set_members(self, members: list[list[int]], origin: int, generation: int = 0) -> None:
        """New membership from micro-step ``origin`` on; ``generation`` counts redistributions
        and seeds the new streams (the same on every process, unlike micro-step counts)."""
        self.members = [sorted(int(i) for i in m) for m in members]
        self.origin = origin
        self.generation = generation

    def _permutation(self, shard: int, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed((self.seed * 7919 + shard * 104_729 + epoch * 1_299_709 + self.generation * 15_485_863) % (2**63))
        m = self.members[shard]
        return [m[i] for i in torch.randperm(len(m), generator=g).tolist()]

    def batches(self, start: int) -> Iterator[list[tuple[int, int]]]:
        """Yield this process's micro-batch for micro-steps start, start+1, ... (forever)."""
        # Fast-forward: only counters move, no data is touched.
        consumed = [0] * len(self.members)
        for m in range(self.origin, start):
            consumed[self.schedule(m)] += self.batch_size * self.data_world
        perms: dict[tuple[int, int], list[int]] = {}
        m = start
        while True:
            k = self.schedule(m)
            n = len(self.members[k])
            if n == 0:
                raise DataError(f"shard {k} has no samples; use fewer shards.")
            pos = consumed[k] + self.data_rank * self.batch_size
            batch = []
            for slot in range(self.batch_size):
                epoch, idx = divmod(pos + slot, n)
                if (k, epoch) not in perms:
                    perms = {key: v for key, v in perms.items() if key[1] >= epoch - 1}
                    perms[(k, epoch)] = self._permutation(k, epoch)
                batch.append((perms[(k, epoch)][idx], _aug_seed(self.seed, k, self.generation, pos + slot)))
            consumed[k] += self.batch_size * self.data_world
            yield batch
            m += 1

    def __iter__(self):
        return self.batches(self.start)
