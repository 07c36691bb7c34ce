"""Which shard each training sample belongs to, AGC skip counts and redistribution
(method.md, sections 1 and 3).

Invariants:
- Every sample is in exactly one shard; the initial split is a seeded shuffle cut into K shards
  whose sizes differ by at most one (the first ``N % K`` shards hold one extra sample).
- The split depends only on (num_samples, num_shards, seed), and ``redistribute`` only on the
  assignment and the counts, so every process of a multi-process run computes the same shards.
- Redistribution never empties a shard, and every move is logged as
  ``{"step", "from", "to", "sample_ids"}``.
- ``record_skips`` never synchronises host and device.
"""

import math

import torch

# fraction * size is floored; a product such as 0.29 * 100 = 28.999999999999996 must still give 29.
_FLOOR_TOLERANCE = 1e-9


class ShardAssignment:
    """Sample id -> shard, per-sample skip counts, and the IET-AGC+ redistribution.

    Args:
        num_samples: N, the number of training samples (ids 0..N-1).
        num_shards: K, the number of shards (= proxies).
        seed: the run seed; the same seed gives the same split.
    """

    def __init__(self, num_samples: int, num_shards: int, seed: int) -> None:
        if num_shards < 1:
            raise ValueError(f"--num_shards={num_shards} must be >= 1; use 1 to turn sharding off.")
        if num_shards > num_samples:
            raise ValueError(
                f"--num_shards={num_shards} is more than the {num_samples} training samples; "
                f"use at most {num_samples} shards or add data"
            )
        self.num_samples = num_samples
        self.num_shards = num_shards
        self.seed = seed
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
        base, extra = divmod(num_samples, num_shards)
        self.shard_of = torch.empty(num_samples, dtype=torch.long)
        start = 0
        for k in range(num_shards):
            end = start + base + (1 if k < extra else 0)
            self.shard_of[order[start:end]] = k
            start = end
        self.skip_counts = torch.zeros(num_samples, dtype=torch.long)
        # Whole-run counts: never reset by redistribution (memfree_skip_counts.json, the scorer's join).
        self.total_skip_counts = torch.zeros(num_samples, dtype=torch.long)
        self.moves: list[dict] = []

    def members(self, k: int) -> list[int]:
        """Sample ids of shard k, ascending."""
        return torch.nonzero(self.shard_of == k).flatten().tolist()

    def sizes(self) -> list[int]:
        """Number of samples in each shard."""
        return torch.bincount(self.shard_of, minlength=self.num_shards).tolist()

    def to(self, device: torch.device | str) -> "ShardAssignment":
        """Keep the skip counts on ``device`` (the training device, so counting never syncs)."""
        self.skip_counts = self.skip_counts.to(device)
        self.total_skip_counts = self.total_skip_counts.to(device)
        return self

    def record_skips(self, sample_ids: torch.Tensor, keep: torch.Tensor) -> None:
        """Add 1 to the skip count of every skipped sample; each occurrence of a repeated id counts.

        Args:
            sample_ids: LongTensor [B] of sample ids (moved to the counts' device if needed).
            keep: BoolTensor [B] from ``LossBank.keep_mask``.
        """
        device = self.skip_counts.device
        ids = sample_ids.to(device, non_blocking=True)
        skipped = (~keep).to(device, non_blocking=True).long()
        self.skip_counts.index_add_(0, ids, skipped)
        self.total_skip_counts.index_add_(0, ids, skipped)

    def redistribute(self, fraction: float, step: int, counts: torch.Tensor | None = None) -> list[dict]:
        """Move each shard's most-skipped samples to the next shard, then reset the skip counts.

        All shards choose from the assignment as it was before any move. Shard k takes its
        members skipped at least once, highest count first and lower sample id first on ties,
        at most ``floor(fraction * size_k)`` of them and never all its members, and moves them
        to shard ``(k + 1) % K``.

        Args:
            fraction: the ``--redistribute_fraction`` (reference 0.25).
            step: the global optimizer step, recorded in the move log.
            counts: skip counts [N] to decide from (the all-reduced counts of a multi-process
                run); defaults to this object's ``skip_counts``.

        Returns:
            The move records of this redistribution (also appended to ``self.moves``), one per
            shard that moved something: ``{"step", "from", "to", "sample_ids"}``.
        """
        counts = (self.skip_counts if counts is None else counts).cpu()
        if counts.shape != (self.num_samples,):
            raise ValueError(f"counts has shape {tuple(counts.shape)}; expected ({self.num_samples},), one per sample.")
        shard_of = self.shard_of.clone()
        records = []
        for k in range(self.num_shards):
            members = torch.nonzero(self.shard_of == k).flatten()  # ascending ids
            limit = min(math.floor(fraction * len(members) + _FLOOR_TOLERANCE), len(members) - 1)
            candidates = members[counts[members] >= 1]
            # stable sort on descending count keeps ascending ids among equal counts
            order = torch.sort(counts[candidates], descending=True, stable=True).indices
            chosen = candidates[order][: max(limit, 0)]
            if len(chosen) == 0:
                continue
            target = (k + 1) % self.num_shards
            shard_of[chosen] = target
            records.append({"step": step, "from": k, "to": target, "sample_ids": chosen.tolist()})
        self.shard_of = shard_of
        self.skip_counts.zero_()
        self.moves.extend(records)
        return records

    def state_dict(self) -> dict:
        """The split, skip counts and move log (plain tensors, ints and lists)."""
        return {
            "shard_of": self.shard_of.clone(),
            "skip_counts": self.skip_counts.clone(),
            "total_skip_counts": self.total_skip_counts.clone(),
            "moves": [dict(m, sample_ids=list(m["sample_ids"])) for m in self.moves],
            "num_shards": self.num_shards,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a checkpoint's assignment; it must have the same number of samples and shards."""
        num_samples = len(state_dict["shard_of"])
        if num_samples != self.num_samples:
            raise ValueError(
                f"checkpoint's shard assignment covers {num_samples} samples but the training set has "
                f"{self.num_samples}; resume with the same data or start a new --output_dir"
            )
        if state_dict["num_shards"] != self.num_shards:
            raise ValueError(
                f"checkpoint was written with --num_shards={state_dict['num_shards']} but this run uses "
                f"--num_shards={self.num_shards}; resume with the same value or start a new --output_dir"
            )
        self.shard_of = state_dict["shard_of"].to(dtype=torch.long, device="cpu").clone()
        self.skip_counts = state_dict["skip_counts"].to(dtype=torch.long, device=self.skip_counts.device).clone()
        # Checkpoints written before whole-run counts existed: start them from the current counts.
        total = state_dict.get("total_skip_counts", state_dict["skip_counts"])
        self.total_skip_counts = total.to(dtype=torch.long, device=self.skip_counts.device).clone()
        self.moves = [dict(m, sample_ids=list(m["sample_ids"])) for m in state_dict["moves"]]
        self.seed = state_dict["seed"]

    def summary(self) -> dict:
        """JSON-able record for ``memfree_state.json``: split, sizes and redistribution log."""
        return {
            "num_shards": self.num_shards,
            "seed": self.seed,
            "shard_sizes": self.sizes(),
            "num_redistributed_samples": sum(len(m["sample_ids"]) for m in self.moves),
            "moves": [dict(m) for m in self.moves],
            "shard_of": self.shard_of.tolist(),
        }
