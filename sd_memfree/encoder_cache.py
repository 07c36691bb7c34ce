"""Frozen encoders computed once: cached VAE posteriors and text embeddings (issue 20).

``--cache_latents`` encodes every training image once and keeps, per image and orientation, the
VAE posterior's mean and standard deviation; each step then draws ``mean + std * memfree.randn``
exactly as the live path draws from ``vae.encode(...).latent_dist``. ``--cache_text_embeddings``
encodes every distinct caption once (and the empty one where prompts are dropped).

Invariants:
- Cached equals live under the same draws: a cached row holds what ``vae.encode`` gives for the
  pixels the recipe's own dataset yields for that item (built by calling the dataset itself, with
  augmentation off, at seeds whose flip draw is known), so the two differ only by the float
  round-off of encoding in other batch compositions. The random stream is untouched: the loop
  draws the same ``memfree.randn`` either way.
- A cached latent is only ever used for the crop it was encoded from: the cache needs
  ``--center_crop`` (one crop per image), and SDXL's crop and size conditioning are stored with
  the latent, never re-drawn.
- Loss-aware augmentation keeps working: an item whose augmentation magnitude is not 0 is read
  through the recipe's dataset (augmented) and encoded live, all of a micro-batch's in one call.
- The cache on disk (``cache_store.CacheStore``) is keyed by the encoder's weights, the
  settings that shape the pixels or tokens, and each image's bytes or caption: a change reads
  other files; a corrupt file is found (checksum) and re-encoded with one log line; processes
  each encode their own slice, and concurrent builders write identical files atomically.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .cache_store import CacheStore, default_root, digest, module_digest

FORMAT = "v1"  # bump when what an entry holds changes
logger = logging.getLogger(__name__)  # every process's own warnings (accelerate's logger keeps the main one's only)


def add_arguments(parser) -> None:
    """The caching flags (one call in each recipe's ``parse_args``)."""
    parser.add_argument("--cache_latents", action="store_true",
                        help="Encode every training image with the VAE once (posterior mean and std per image and orientation) "
                             "instead of every step; needs --center_crop. Augmented samples are still encoded live.")
    parser.add_argument("--cache_text_embeddings", action="store_true",
                        help="Encode every distinct caption with the (frozen) text encoder(s) once instead of every step.")
    parser.add_argument("--latent_cache_dir", type=str, default=None,
                        help="Folder of the --cache_latents / --cache_text_embeddings files (default: $SD_MEMFREE_CACHE, else "
                             "sd-memfree under $HF_HOME, i.e. ~/.cache/huggingface/sd-memfree). --cache_dir keeps upstream's meaning.")


def check_arguments(parser, args) -> None:
    """One-line ``parser.error`` for settings the cache cannot honour."""
    if args.cache_latents and not args.center_crop:
        parser.error("--cache_latents needs --center_crop: with random crops every step sees another crop, which one cached "
                     "latent cannot hold (and SDXL's crop conditioning would no longer match it); add --center_crop or drop --cache_latents.")


def drawn_flip(aug_seed: int) -> bool:
    """Whether the recipes' datasets flip an item seeded ``aug_seed`` (with center crop and no
    augmentation the flip is the first draw of the CPU generator: torchvision's
    ``RandomHorizontalFlip`` and the SDXL dataset both flip when ``torch.rand < 0.5``)."""
    g = torch.Generator().manual_seed(aug_seed)
    return bool(torch.rand((), generator=g) < 0.5)


def _seed_with_flip(flip: bool) -> int:
    return next(s for s in range(1000) if drawn_flip(s) == flip)


# Seeds at which the recipe's dataset yields the unflipped / flipped pixels of any item.
FLIP_SEEDS = {False: _seed_with_flip(False), True: _seed_with_flip(True)}


def image_digests(hf_dataset, image_column: str) -> list[str]:
    """SHA-256 of each image file's bytes (what the cache keys each latent by)."""
    import hashlib

    import datasets

    raw = hf_dataset
    if isinstance(hf_dataset.features.get(image_column), datasets.Image):
        raw = hf_dataset.cast_column(image_column, datasets.Image(decode=False))
    out = []
    for item in raw.select_columns([image_column]).iter(batch_size=256):
        for image in item[image_column]:
            if isinstance(image, dict):
                data = image.get("bytes") or Path(image["path"]).read_bytes()
            else:  # an in-memory PIL image
                data = image.mode.encode() + str(image.size).encode() + image.tobytes()
            out.append(hashlib.sha256(data).hexdigest())
    return out


def tokenizer_digest(tokenizer) -> str:
    return digest(type(tokenizer).__name__, tokenizer.model_max_length, sorted(tokenizer.get_vocab().items()))


@contextlib.contextmanager
def _augmentation_off(dataset):
    """The recipe's dataset without loss-aware augmentation (it keeps ``augment`` on itself or on
    its ``base``), so it yields the pixels a strength-0 item gets, whatever the strengths are now."""
    holders = [d for d in (dataset, getattr(dataset, "base", None)) if d is not None and hasattr(d, "augment")]
    saved = [h.augment for h in holders]
    for h in holders:
        h.augment = None
    try:
        yield dataset
    finally:
        for h, a in zip(holders, saved):
            h.augment = a


def _slice(names: Sequence[str], rank: int, world: int) -> list[str]:
    return [n for j, n in enumerate(names) if j % world == rank]


def _build(store: CacheStore, todo: dict[str, Any], encode: Callable[[list], list[dict]], batch_size: int, desc: str,
           progress: bool) -> int:
    """Encode ``todo`` (name -> what ``encode`` takes) in batches; returns the entries written."""
    from tqdm.auto import tqdm

    names = list(todo)
    with tqdm(total=len(names), desc=desc, unit="entry", disable=not progress or None) as bar:
        for start in range(0, len(names), batch_size):
            chunk = names[start:start + batch_size]
            for name, tensors in zip(chunk, encode([todo[n] for n in chunk])):
                store.write(name, tensors)
            bar.update(len(chunk))
    return len(names)


def _scan_and_build(store: CacheStore, names: list[str], payload: dict[str, Any], encode, *, rank: int, world: int,
                    barrier: Callable[[], None], batch_size: int, desc: str, progress: bool) -> dict:
    """Each process checks and encodes its slice of the distinct entries, then all wait; a
    process that still misses entries (no shared disk) encodes them itself."""
    unique = sorted(set(names))
    todo, corrupt = {}, 0
    for name in _slice(unique, rank, world):
        _, status = store.status(name)
        if status != "ok":
            if status != "missing":
                corrupt += 1
                logger.warning(f"cache file {store.path(name)} is {status}; rebuilding it.")
            todo[name] = payload[name]
    built = _build(store, todo, encode, batch_size, desc, progress)
    barrier()
    missing = {n: payload[n] for n in unique if not store.path(n).exists()}
    built += _build(store, missing, encode, batch_size, desc, progress)
    size = sum(store.path(n).stat().st_size for n in unique)
    return {"entries": len(unique), "built": built, "corrupt": corrupt, "bytes": size}


class LatentCache:
    """Per sample, the file holding its VAE posterior for each orientation (and, for SDXL, the
    original size and crop corner the recipe's dataset gave those pixels).

    Entry tensors: ``mean.{o}``, ``std.{o}`` for orientation ``o`` in {0, 1} (1: flipped, only
    with ``--random_flip``), plus ``{key}.{o}`` for every extra item field (e.g. ``crop_top_left``).
    """

    def __init__(self, store: CacheStore, names: list[str], random_flip: bool,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.store, self.names, self.random_flip = store, names, random_flip
        # The layout the VAE gives its posterior in on this device (channels_last on some CPU
        # kernels): cached latents take it too, so the UNet runs the same kernels on the same
        # values as live, and cached equals live bit for bit, not only to round-off.
        self.memory_format = memory_format

    def entry(self, sample_id: int, aug_seed: int) -> dict[str, torch.Tensor]:
        o = int(self.random_flip and drawn_flip(aug_seed))
        tensors = self.store.load(self.names[sample_id])
        return {k.rsplit(".", 1)[0]: v for k, v in tensors.items() if k.endswith(f".{o}")}

    @classmethod
    def build(cls, dataset, hf_dataset, image_column: str, vae, settings: dict, root: Path, *, rank: int = 0, world: int = 1,
              barrier: Callable[[], None] = lambda: None, batch_size: int = 8, probe_batch: int = 1, progress: bool = True,
              log=None) -> "LatentCache":
        """Encode (or reuse) every image's posterior. ``dataset`` is the recipe's training dataset
        (indexed by ``(sample_id, aug_seed)``, items with ``pixel_values``); ``settings`` is
        everything besides the VAE's weights that shapes the pixels (resolution, crop, flip,
        interpolation, the recipe's pipeline); ``probe_batch`` is the training micro-batch."""
        key = digest("latents", FORMAT, module_digest(vae), str(vae.dtype), settings)
        store = CacheStore(Path(root) / "latents" / key[:24])
        names = image_digests(hf_dataset, image_column)
        first = {}
        for i, name in enumerate(names):
            first.setdefault(name, i)
        orientations = (False, True) if settings.get("random_flip") else (False,)
        device = next(vae.parameters()).device

        def encode(sample_ids: list[int]) -> list[dict]:
            out = [{} for _ in sample_ids]
            for o, flip in enumerate(orientations):
                with _augmentation_off(dataset):
                    items = dataset.__getitems__([(i, FLIP_SEEDS[flip]) for i in sample_ids])
                pixels = torch.stack([it["pixel_values"] for it in items]).to(device, dtype=vae.dtype)
                with torch.no_grad():
                    posterior = vae.encode(pixels).latent_dist
                for j, it in enumerate(items):
                    out[j][f"mean.{o}"] = posterior.mean[j]
                    out[j][f"std.{o}"] = posterior.std[j]
                    for k, v in it.items():  # SDXL's original_size and crop_top_left
                        if k not in ("pixel_values", "sample_id") and not k.startswith("input_ids"):
                            out[j][f"{k}.{o}"] = torch.as_tensor(v)
            return out

        stats = _scan_and_build(store, names, first, encode, rank=rank, world=world, barrier=barrier, batch_size=batch_size,
                                desc="Caching latents", progress=progress)
        # One micro-batch through the live path: the posterior's memory layout (CPU kernels pick it by batch size).
        with _augmentation_off(dataset):
            items = dataset.__getitems__([(j % len(names), FLIP_SEEDS[False]) for j in range(probe_batch)])
        probe = torch.stack([it["pixel_values"] for it in items]).to(device, dtype=vae.dtype)
        with torch.no_grad():
            mean = vae.encode(probe).latent_dist.mean
        # (a channel slice of the moments: channels innermost when the VAE ran channels-last kernels)
        channels_last = mean.dim() == 4 and mean.shape[1] > 1 and mean.stride(1) < mean.stride(3)
        if log is not None:
            log.info(f"latent cache {store.folder}: {stats['entries']} image(s), {stats['bytes'] / max(1, stats['entries']) / 1024:.1f} KiB "
                     f"per image ({len(orientations)} orientation(s)), {stats['bytes'] / 2**20:.1f} MiB in all; encoded {stats['built']} "
                     f"now ({stats['corrupt']} corrupt), reused the rest")
        cache = cls(store, names, bool(settings.get("random_flip")),
                    torch.channels_last if channels_last else torch.contiguous_format)
        cache.stats = stats
        return cache


def distinct_captions(captions: Sequence, empty: bool = False) -> list[str]:
    """Every caption a sample can be trained with (each entry of a caption list), and "" when
    prompts may be emptied; sorted, without repeats."""
    out = set()
    for c in captions:
        out.update([c] if isinstance(c, str) else list(c))
    if empty:
        out.add("")
    return sorted(out)


class TextCache:
    """Per distinct caption, the text encoder outputs the recipe's ``encode_text`` gives for it:
    entry tensors ``out.0`` (hidden states), ``out.1`` (SDXL's pooled embedding), ..."""

    def __init__(self, store: CacheStore, names: dict[str, str]) -> None:
        self.store, self.names = store, names

    def entry(self, caption: str) -> list[torch.Tensor]:
        tensors = self.store.load(self.names[caption])
        return [tensors[f"out.{j}"] for j in range(len(tensors))]

    @classmethod
    def build(cls, captions: Sequence[str], tokenizers: Sequence, encoders: Sequence[torch.nn.Module],
              encode_text: Callable[[list[torch.Tensor]], Any], root: Path, *, rank: int = 0, world: int = 1,
              barrier: Callable[[], None] = lambda: None, batch_size: int = 32, progress: bool = True, log=None) -> "TextCache":
        """Encode (or reuse) every caption in ``captions``; ``encode_text`` takes one token-id
        tensor per tokenizer and returns a tensor or a tuple of tensors (the recipe's own call)."""
        key = digest("text", FORMAT, [module_digest(e) for e in encoders], [str(e.dtype) for e in encoders],
                     [tokenizer_digest(t) for t in tokenizers])
        store = CacheStore(Path(root) / "text" / key[:24])
        names = {c: digest(c) for c in captions}
        device = next(encoders[0].parameters()).device

        def encode(chunk: list[str]) -> list[dict]:
            ids = [t(list(chunk), max_length=t.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids.to(device)
                   for t in tokenizers]
            with torch.no_grad():
                outs = encode_text(ids)
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            return [{f"out.{j}": o[i] for j, o in enumerate(outs)} for i in range(len(chunk))]

        stats = _scan_and_build(store, list(names.values()), {v: k for k, v in names.items()}, encode, rank=rank, world=world,
                                barrier=barrier, batch_size=batch_size, desc="Caching text embeddings", progress=progress)
        if log is not None:
            log.info(f"text embedding cache {store.folder}: {stats['entries']} caption(s), "
                     f"{stats['bytes'] / max(1, stats['entries']) / 1024:.1f} KiB per caption, {stats['bytes'] / 2**20:.1f} MiB in all; "
                     f"encoded {stats['built']} now ({stats['corrupt']} corrupt), reused the rest")
        cache = cls(store, names)
        cache.stats = stats
        return cache


class CachedDataset(torch.utils.data.Dataset):
    """The recipe's dataset with the cached rows read from disk instead of decoded and encoded.

    Items (keys ``(sample_id, aug_seed)``, as the recipe's dataset): a cached row has
    ``latent_mean`` / ``latent_std`` (and its stored SDXL fields); a live row (no latent cache,
    or augmented now) has the recipe's ``pixel_values`` and fields. Text: ``text_embeds`` (a list
    of tensors) with the text cache, else ``input_ids`` (``input_ids_2``) from ``tokenizers``.
    """

    def __init__(self, base, caption_of: Callable[[int, int], str], tokenizers: Sequence, latents: LatentCache | None,
                 text: TextCache | None, augment=None) -> None:
        self.base, self.caption_of, self.tokenizers = base, caption_of, list(tokenizers)
        self.latents, self.text, self.augment = latents, text, augment

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> dict:
        return self.__getitems__([key])[0]

    def _live(self, sample_id: int) -> bool:
        return self.latents is None or (self.augment is not None and self.augment.magnitude(sample_id) > 0)

    def __getitems__(self, keys) -> list[dict]:
        keys = [(int(i), int(s)) for i, s in keys]
        is_live = [self._live(i) for i, _ in keys]  # read once: the strengths may change meanwhile
        live_keys = [k for k, flag in zip(keys, is_live) if flag]
        live = iter(self.base.__getitems__(live_keys) if live_keys else [])
        items = []
        for (i, s), flag in zip(keys, is_live):
            if flag:
                item = {k: v for k, v in next(live).items() if not k.startswith("input_ids")}
            else:
                entry = self.latents.entry(i, s)
                item = {"latent_mean": entry.pop("mean"), "latent_std": entry.pop("std"), "sample_id": i,
                        **{k: tuple(v.tolist()) for k, v in entry.items()}}
            items.append(item)
        captions = [self.caption_of(i, s) for i, s in keys]
        if self.text is not None:
            for item, c in zip(items, captions):
                item["text_embeds"] = self.text.entry(c)
        else:
            for n, t in enumerate(self.tokenizers):
                ids = t(captions, max_length=t.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids
                for j, item in enumerate(items):
                    item["input_ids" if n == 0 else f"input_ids_{n + 1}"] = ids[j]
        return items


def collate(examples: Sequence[dict]) -> dict:
    """A micro-batch of ``CachedDataset`` items: ``sample_ids``; ``pixel_values`` of the live rows
    and ``live`` (bool [B]) when any is live; ``latent_mean`` / ``latent_std`` of the cached
    rows; ``original_sizes`` / ``crop_top_lefts`` when the items have them; ``text_embeds`` (a
    list of [B, ...] tensors) or ``input_ids`` (``input_ids_2``)."""
    batch = {"sample_ids": torch.tensor([e["sample_id"] for e in examples], dtype=torch.long),
             "live": torch.tensor(["pixel_values" in e for e in examples], dtype=torch.bool)}
    live = [e for e in examples if "pixel_values" in e]
    cached = [e for e in examples if "pixel_values" not in e]
    if live:
        batch["pixel_values"] = torch.stack([e["pixel_values"] for e in live]).contiguous(memory_format=torch.contiguous_format).float()
    if cached:
        batch["latent_mean"] = torch.stack([e["latent_mean"] for e in cached])
        batch["latent_std"] = torch.stack([e["latent_std"] for e in cached])
    for field, name in (("original_size", "original_sizes"), ("crop_top_left", "crop_top_lefts")):
        if field in examples[0]:
            batch[name] = torch.tensor([list(e[field]) for e in examples], dtype=torch.long)
    if "text_embeds" in examples[0]:
        batch["text_embeds"] = [torch.stack([e["text_embeds"][j] for e in examples]) for j in range(len(examples[0]["text_embeds"]))]
    for name in ("input_ids", "input_ids_2"):
        if name in examples[0]:
            batch[name] = torch.stack([e[name] for e in examples])
    return batch


@dataclass
class Posterior:
    """The VAE posterior of a micro-batch: a sample is ``mean + std * N(0, 1)`` (as ``latent_dist.sample``)."""

    mean: torch.Tensor
    std: torch.Tensor


class FrozenEncoders:
    """The loop's two encode calls, for live and cached batches alike (the recipe's batch keys
    ``pixel_values`` / ``input_ids`` when nothing is cached, ``CachedDataset``'s otherwise).

    Args:
        vae: the frozen VAE (on the training device, in the dtype the live path encodes in).
        encode_text: the recipe's text call: one token-id tensor per tokenizer -> a tensor (SD's
            hidden states) or a tuple (SDXL's hidden states and pooled embedding).
        device: the training device.
    """

    def __init__(self, vae, encode_text: Callable[[list[torch.Tensor]], Any], device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.vae, self.encode_text, self.device = vae, encode_text, device
        self.memory_format = memory_format  # of the live posterior (LatentCache.memory_format)

    def latent_dist(self, batch: dict) -> Posterior:
        """Cached rows from the cache, live rows (augmented, or no cache) encoded in one VAE call."""
        live = batch.get("live")
        encoded = None
        if "pixel_values" in batch:
            pixels = batch["pixel_values"].to(self.device, dtype=self.vae.dtype, non_blocking=True)
            dist = self.vae.encode(pixels).latent_dist
            encoded = (dist.mean, dist.std)
        if "latent_mean" not in batch:
            return Posterior(*encoded)
        fmt = self.memory_format
        mean = batch["latent_mean"].to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        std = batch["latent_std"].to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        if encoded is None:
            return Posterior(mean, std)
        live = live.to(self.device)
        full_mean = torch.empty((len(live), *mean.shape[1:]), dtype=mean.dtype, device=mean.device, memory_format=fmt)
        full_std = torch.empty_like(full_mean)
        full_mean[~live], full_std[~live] = mean, std
        full_mean[live], full_std[live] = encoded[0].to(mean.dtype), encoded[1].to(mean.dtype)
        return Posterior(full_mean, full_std)

    def text(self, batch: dict):
        """The text encoder output(s) of the batch's captions: read from the cache, or encoded."""
        if "text_embeds" in batch:
            outs = [t.to(self.device, non_blocking=True) for t in batch["text_embeds"]]
            return outs[0] if len(outs) == 1 else tuple(outs)
        ids = [batch["input_ids"].to(self.device, non_blocking=True)]
        if "input_ids_2" in batch:
            ids.append(batch["input_ids_2"].to(self.device, non_blocking=True))
        return self.encode_text(ids)


def prepare(args, dataset, collate_fn, *, hf_dataset, image_column: str, captions: Sequence, caption_of: Callable[[int, int], str],
            tokenizers: Sequence, vae, text_encoders: Sequence[torch.nn.Module], encode_text, pipeline: str, augment, rank: int,
            world: int, barrier: Callable[[], None], device, log, progress: bool = True, empty_captions: bool = False):
    """Build or reuse the caches the flags ask for; returns ``(dataset, collate_fn, encoders)``
    for the loader and the loop (the recipe's own dataset and collate when nothing is cached).

    ``pipeline`` names the recipe's pixel pipeline ("sd": resize, crop, flip; "sdxl": resize,
    flip, crop), part of the latent key.
    """
    encoders = FrozenEncoders(vae, encode_text, device)
    if not (args.cache_latents or args.cache_text_embeddings):
        return dataset, collate_fn, encoders
    root = Path(args.latent_cache_dir).expanduser() if args.latent_cache_dir else default_root()
    latents = text = None
    if args.cache_latents:
        settings = {"pipeline": pipeline, "resolution": args.resolution, "center_crop": args.center_crop,
                    "random_flip": args.random_flip, "interpolation": args.image_interpolation_mode}
        latents = LatentCache.build(dataset, hf_dataset, image_column, vae, settings, root, rank=rank, world=world, barrier=barrier,
                                    probe_batch=args.train_batch_size, progress=progress, log=log)
    if args.cache_text_embeddings:
        text = TextCache.build(distinct_captions(captions, empty=empty_captions), tokenizers, text_encoders, encode_text, root,
                               rank=rank, world=world, barrier=barrier, progress=progress, log=log)
    if latents is not None:
        encoders.memory_format = latents.memory_format
    return CachedDataset(dataset, caption_of, tokenizers, latents, text, augment), collate, encoders
