"""The mitigation settings of IET-AGC / IET-AGC+ as one dataclass (method.md, sections 1-4).

The dataclass is the single source of truth: the training script's argument group, the
``memfree_config.json`` written to ``output_dir`` and the resume check are all derived from its
fields. With the defaults every mitigation is off and training is a plain diffusers fine-tune.

Invariants:
- Every instance is valid: ``__post_init__`` rejects bad values and inconsistent combinations
  with a one-line ``ValueError`` that names the flag and the fix.
- ``MemFreeConfig.load_json(p)`` after ``cfg.save_json(p)`` gives ``cfg`` back.
"""

import argparse
import dataclasses
import json
import math
import os
import tempfile
import typing
from dataclasses import dataclass, field
from typing import Any

ARGUMENT_GROUP_TITLE = "IET-AGC / IET-AGC+ (memorization mitigation)"

# Fields that change what a checkpoint contains (number of proxies, number of optimizer states):
# a checkpoint written with other values cannot be resumed.
_CHECKPOINT_STRUCTURE_FIELDS = ("num_shards", "proxy_optimizer_state")

# Above this AGC ratio almost no sample is ever skipped (the skip needs a loss below 1/ratio of the
# running mean): AGC would be on in name only, and the model card would claim it.
MAX_AGC_RATIO = 10.0
# RandAugment's default number of magnitude bins is 31: magnitudes 0..30.
MAX_AUGMENT_MAGNITUDE = 30


@dataclass
class MemFreeConfig:
    """Settings of IET-AGC (arXiv 2407.15328) and IET-AGC+ (arXiv 2502.09434).

    Each field is one command-line flag ``--<field name>``; the help text lives in the field
    metadata. See ``docs/method.md`` for the method these settings control.
    """

    num_shards: int = field(
        default=1,
        metadata={
            "help": "IET: split the training set into this many shards and train one proxy per "
            "shard, merging the proxies every --merge_every steps (reference: 4). More shards "
            "means each proxy sees fewer samples, which lowers memorization but also fidelity "
            "to the training set. 1 turns sharding off."
        },
    )
    merge_every: int = field(
        default=2000,
        metadata={
            "help": "IET: local optimizer steps each proxy takes per round before the proxies are "
            "merged (reference: 2000 for SD at batch 8). Longer rounds let proxies drift further "
            "apart; shorter rounds behave more like plain fine-tuning."
        },
    )
    proxy_optimizer_state: str = field(
        default="per_proxy",
        metadata={
            "help": "IET: 'per_proxy' keeps one optimizer state per proxy, as the reference does; "
            "for full fine-tuning the inactive ones live in CPU memory (AdamW: 2 x trainable "
            "params x 4 bytes each, e.g. ~6.9 GB per proxy for the SD UNet). 'shared' keeps a "
            "single optimizer state for all proxies: K times less memory, a departure from the "
            "reference.",
            "choices": ("per_proxy", "shared"),
        },
    )
    agc_ratio: float = field(
        default=0.0,
        metadata={
            "help": "AGC: skip a sample when ratio x its loss is below its proxy's running mean "
            "loss at that timestep (reference: 1.25 for SD, 2.0 for CIFAR from scratch). Larger "
            "ratios skip fewer samples (weaker mitigation, better fidelity). 0 turns AGC off."
        },
    )
    agc_ema: float = field(
        default=0.8,
        metadata={
            "help": "AGC: decay of the per-timestep loss bank, M = ema * M + (1 - ema) * loss "
            "(reference: 0.8). Larger values give a smoother, slower-moving threshold."
        },
    )
    redistribute_fraction: float = field(
        default=0.0,
        metadata={
            "help": "IET-AGC+: at each redistribution every shard moves up to this fraction of its "
            "samples, the most often skipped by AGC, to the next shard (reference: 0.25), so "
            "over-skipped content is still learnt by a proxy that has not memorized it. "
            "Needs --num_shards >= 2 and --agc_ratio > 0. 0 turns redistribution off."
        },
    )
    redistribute_at: str = field(
        default="mid_round",
        metadata={
            "help": "IET-AGC+: when to redistribute. 'mid_round' (the reference): every proxy takes "
            "the first half of its --merge_every steps, then the shards are redistributed, then "
            "every proxy takes its second half; the same for any number of processes (one process "
            "pauses its proxies half-way, keeping one extra copy of the trainable weights per "
            "proxy). 'merge': right after each merge.",
            "choices": ("mid_round", "merge"),
        },
    )
    loss_aware_augmentation: bool = field(
        default=False,
        metadata={
            "help": "IET-AGC+: augment each sample with RandAugment whose magnitude grows as its "
            "last kept loss nears the AGC skip threshold, i.e. samples about to be memorized are "
            "augmented most. Lowers memorization at some cost in fidelity; no extra forward "
            "passes. Needs --agc_ratio > 0."
        },
    )
    augment_max_magnitude: int = field(
        default=5,
        metadata={
            "help": "IET-AGC+: RandAugment magnitude (of 31 bins) at augmentation strength 1, i.e. "
            "for a sample exactly at the skip threshold (reference: 5). Larger values hide "
            "training images better but distort what the model learns."
        },
    )
    augment_alpha: float = field(
        default=5.0,
        metadata={
            "help": "IET-AGC+: augmentation strength is exp(-alpha x relative distance of the "
            "loss to the skip threshold) (reference: 5). Larger values augment only samples very "
            "close to the threshold."
        },
    )

    def __post_init__(self) -> None:
        types = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), types[f.name]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"--{f.name}={value!r} must be a whole number.")
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise ValueError(f"--{f.name}={value!r} must be a finite number.")
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"--{f.name}={value!r} must be true or false.")
        if self.num_shards < 1:
            raise ValueError(f"--num_shards={self.num_shards} must be >= 1; use 1 to turn sharding off.")
        if self.merge_every < 1:
            raise ValueError(f"--merge_every={self.merge_every} must be >= 1 local optimizer step.")
        for name in ("proxy_optimizer_state", "redistribute_at"):
            choices = _metadata(name)["choices"]
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name}={getattr(self, name)!r} is not one of {', '.join(choices)}.")
        if not (self.agc_ratio == 0 or 1 <= self.agc_ratio <= MAX_AGC_RATIO):
            raise ValueError(
                f"--agc_ratio={self.agc_ratio} must be 0 (AGC off) or in [1, {MAX_AGC_RATIO:g}]: below 1 it skips samples whose "
                f"loss is above the running mean, above {MAX_AGC_RATIO:g} it skips almost none (reference: 1.25 for SD)."
            )
        if not 0 <= self.agc_ema < 1:
            raise ValueError(f"--agc_ema={self.agc_ema} must be in [0, 1); the reference uses 0.8.")
        if not 0 <= self.redistribute_fraction < 1:
            raise ValueError(
                f"--redistribute_fraction={self.redistribute_fraction} must be in [0, 1); "
                "the reference uses 0.25, 0 turns redistribution off."
            )
        if not 0 <= self.augment_max_magnitude <= MAX_AUGMENT_MAGNITUDE:
            raise ValueError(
                f"--augment_max_magnitude={self.augment_max_magnitude} must be in [0, {MAX_AUGMENT_MAGNITUDE}] "
                "(RandAugment's 31 magnitude bins); the reference uses 5."
            )
        if not self.augment_alpha > 0:
            raise ValueError(f"--augment_alpha={self.augment_alpha} must be > 0; the reference uses 5.")
        if self.redistribution_enabled and self.num_shards < 2:
            raise ValueError(
                f"--redistribute_fraction={self.redistribute_fraction} needs --num_shards >= 2 "
                f"(got {self.num_shards}); add shards or set --redistribute_fraction=0."
            )
        if self.redistribution_enabled and not self.agc_enabled:
            raise ValueError(
                f"--redistribute_fraction={self.redistribute_fraction} moves the samples AGC skips "
                "most, so it needs --agc_ratio > 0 (reference: 1.25)."
            )
        if self.loss_aware_augmentation and not self.agc_enabled:
            raise ValueError(
                "--loss_aware_augmentation measures the distance to the AGC skip threshold, "
                "so it needs --agc_ratio > 0 (reference: 1.25)."
            )

    @property
    def sharding_enabled(self) -> bool:
        """True when there is more than one shard (and therefore more than one proxy)."""
        return self.num_shards > 1

    @property
    def agc_enabled(self) -> bool:
        """True when AGC skips low-loss samples."""
        return self.agc_ratio > 0

    @property
    def redistribution_enabled(self) -> bool:
        """True when shards exchange their most-skipped samples."""
        return self.redistribute_fraction > 0

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
        """Add one argument group with a ``--<field name>`` flag per field.

        Args:
            parser: the training script's parser.

        Returns:
            The argument group that was added.
        """
        group = parser.add_argument_group(ARGUMENT_GROUP_TITLE)
        types = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kwargs: dict[str, Any] = {"default": f.default, "help": f.metadata["help"]}
            if types[f.name] is bool:
                kwargs["action"] = "store_true"
            else:
                kwargs["type"] = types[f.name]
                if "choices" in f.metadata:
                    kwargs["choices"] = f.metadata["choices"]
            group.add_argument(f"--{f.name}", **kwargs)
        return group

    @classmethod
    def from_args(cls, namespace: argparse.Namespace) -> "MemFreeConfig":
        """Build (and validate) a config from a parsed namespace, reading only this class's fields."""
        return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict."""
        return dataclasses.asdict(self)

    def save_json(self, path: str | os.PathLike) -> None:
        """Write the config as JSON atomically (a crash never leaves a half-written file)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".memfree_config.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2, sort_keys=True, allow_nan=False)  # strict JSON, never Infinity/NaN
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> "MemFreeConfig":
        """Read a config written by ``save_json``; unknown keys are an error, not silently dropped."""
        with open(path) as f:
            data = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{os.fspath(path)} has unknown settings {unknown}; it was written by another "
                "version of sd_memfree."
            )
        return cls(**data)

    def check_compatible(self, other: "MemFreeConfig") -> None:
        """Raise if a checkpoint written with ``other`` cannot be resumed with ``self``.

        Only the fields that change the checkpoint's structure are compared (number of proxies,
        number of optimizer states); the others may change between runs.

        Args:
            other: the configuration the checkpoint was written with.
        """
        differing = [n for n in _CHECKPOINT_STRUCTURE_FIELDS if getattr(self, n) != getattr(other, n)]
        if differing:
            was = ", ".join(f"--{n}={getattr(other, n)}" for n in differing)
            now = ", ".join(f"--{n}={getattr(self, n)}" for n in differing)
            raise ValueError(
                f"checkpoint was written with {was} but this run uses {now}; "
                "resume with the same value or start a new --output_dir"
            )


def _metadata(name: str) -> Any:
    return {f.name: f.metadata for f in dataclasses.fields(MemFreeConfig)}[name]
