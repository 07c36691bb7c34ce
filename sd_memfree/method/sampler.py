"""``ShardBatchSampler``: which samples feed each micro-step (method.md, section 1).

Invariant: a pure function of (members, generation, seed, schedule, origin, micro-step): the
batch at micro-step m does not depend on prefetching, workers or how many processes share it.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..data import DataError


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
