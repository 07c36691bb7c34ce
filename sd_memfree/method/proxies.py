"""``ProxySet``: K proxies that share one set of trainable tensors, and their merges.

IET (method.md section 1) trains K proxies, one per shard, each from the merged weights for a
round, then replaces the weights by the shard-size-weighted mean of the proxies' weights. The
reference code keeps one model per proxy on its own GPU. Here the proxies take turns on the one
live module (one process), or are spread over W processes (process p owns the proxies
``k % W == p``) and train concurrently; communication is one all-reduce per merge.

Why K copies of the weights are never needed: every proxy starts a round from ``merged``, so
when a proxy ends its turn its weights are folded into a running weighted sum and the live
tensors are reset to ``merged``. Weight memory is therefore two copies (``merged`` and the sum),
whatever K is, held on ``storage_device`` (CPU memory for full fine-tuning, the training device
for LoRA, whose tensors are small); only a round split into two turns per proxy (mid-round
redistribution) adds one copy per paused proxy (``pause_turn``).

Invariants:
- ``merged`` is what every proxy's turn starts from; after ``end_turn`` and after ``merge`` the
  live tensors equal ``merged`` (cast to their dtype).
- After a round where proxy k took ``s_k`` steps, ``merge`` sets the weights to
  ``sum_k n_k s_k theta_k / sum_k n_k s_k`` (n_k the shard size when its turn ended); for
  complete rounds this is the shard-size-weighted mean ``sum_k n_k theta_k / sum_k n_k``. A proxy
  that took no step contributes nothing; if none did, the weights are kept.
- A proxy's round may be split into several turns: ``pause_turn`` keeps the live proxy's
  weights (one copy per paused proxy, on ``storage_device``) and the next ``begin_turn`` of that
  proxy restores them. ``--redistribute_at mid_round`` needs this in a process that trains L > 1
  proxies (see ``RoundSchedule``): L paused copies at most, allocated on first use and reused.
- ``end_turn`` ends a proxy's round; it refuses a second one before ``merge``, and ``merge``
  refuses while a proxy is paused (its weights would be lost).
- With ``optimizer_state="per_proxy"`` each proxy has its own optimizer state and LR-schedule
  position; the optimizer object always holds the live proxy's state, ``ProxySet`` holds the
  others (tensors on ``storage_device``). A proxy that never trained starts from an empty
  optimizer state and the schedule position it had when the ``ProxySet`` was built.
- Nothing happens per optimizer step: the loop calls ``begin_turn``/``end_turn``/``merge`` at turn
  boundaries only.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from ..collectives import Collectives, ProcessLayout
from .merging import accumulate_, merge_weight

OPTIMIZER_STATE_MODES = ("per_proxy", "shared")


def _move_state(state: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Moves an optimizer's per-parameter state to ``device``.

    0-dim tensors (Adam's ``step`` counter) stay where the optimizer keeps them: their device is
    part of the optimizer's contract (CPU unless ``capturable``/``fused``) and they are tiny.
    """
    return {
        name: value.to(device, non_blocking=True) if isinstance(value, Tensor) and value.dim() > 0 else value
        for name, value in state.items()
    }


class ProxySet:
    """K proxies over one set of trainable parameters, with turn-taking and merges.

    Args:
        params: the live module's trainable parameters (the tensors every proxy trains in turn).
        num_proxies: K, one proxy per shard.
        shard_sizes: K shard sizes n_k (the merge weights' numerators; updatable through the
            ``shard_sizes`` attribute, e.g. after a redistribution).
        optimizer: the optimizer over ``params``; needed for ``optimizer_state="per_proxy"`` swaps.
        lr_scheduler: its LR scheduler; with ``"per_proxy"`` each proxy keeps its own position.
        optimizer_state: ``"per_proxy"`` (each proxy has its own optimizer state and schedule, as
            in the reference) or ``"shared"`` (one optimizer state for all proxies, never swapped).
        storage_device: where ``merged``, the running sum and stashed optimizer states live.
        rank, world_size: this process p of W (a divisor or a multiple of K).
        local_proxies: the proxies this process trains (default: ``ProcessLayout``'s).
        collectives: the run's ``Collectives``: a merge is one all-reduce over its "merge" group
            (one process per proxy group), on the backend that reduces ``storage_device`` tensors.
            Built from the layout when not given (every rank must then build its ``ProxySet`` at
            the same point, as for any collective).
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        num_proxies: int,
        shard_sizes: list[int],
        *,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any = None,
        optimizer_state: str = "per_proxy",
        storage_device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        local_proxies: list[int] | None = None,
        collectives: Collectives | None = None,
    ) -> None:
        if num_proxies < 1:
            raise ValueError(f"num_proxies must be >= 1, got {num_proxies}.")
        if optimizer_state not in OPTIMIZER_STATE_MODES:
            raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATE_MODES}, got {optimizer_state!r}.")
        if lr_scheduler is not None and optimizer is None:
            raise ValueError("ProxySet needs the optimizer of lr_scheduler too.")
        layout = ProcessLayout(num_proxies, world_size, rank)  # raises for a bad rank or spread

        self.params = list(params)
        self.num_proxies = num_proxies
        self.shard_sizes = shard_sizes
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.optimizer_state = optimizer_state
        self.storage_device = torch.device(storage_device)
        self.rank = rank
        self.world_size = world_size
        self.local_proxies = list(local_proxies) if local_proxies is not None else layout.local_proxies
        if collectives is None and world_size > 1:
            collectives = Collectives(layout)
        self._collectives = collectives
        # Host buffers that are copied to a CUDA device at every turn boundary (``merged`` at every
        # end_turn and merge, a paused proxy's weights at its next begin_turn) live in pinned
        # (page-locked) memory when the storage is the CPU and the params are on a CUDA device: a
        # host-to-device copy from pinned memory runs at ~54 GB/s on the H200 machine against
        # ~6.4 GB/s from pageable memory (docs/benchmarks.md, GPU check), which made the reset to
        # ``merged`` a large part of a full fine-tuning turn end. The running sum is only read and
        # written on the host (device copies are staged by accumulate_), so it stays pageable;
        # stashed optimizer states are already pinned (a non-blocking device-to-host copy lands in
        # torch's pinned host cache). Pinning is not done without CUDA (it needs the driver).
        self._pin = (
            self.storage_device.type == "cpu"
            and torch.cuda.is_available()
            and any(p.device.type == "cuda" for p in self.params)
        )

        # One flat float32 buffer holds the running sum and, in its last slot, the total weight:
        # a merge is then a single all-reduce of this buffer and nothing else.
        self._numel = sum(p.numel() for p in self.params)
        self._buffer = torch.zeros(self._numel + 1, dtype=torch.float32, device=self.storage_device)
        self._merged_flat = self._host_buffer()
        self._sum = self._views(self._buffer)
        self._merged = self._views(self._merged_flat)
        accumulate_(self._merged, self.params, 1.0)  # merged = the starting weights

        self._total_weight = 0  # sum of n_k * s_k folded into the running sum this round (local)
        self._steps = [0] * num_proxies
        self._turn_ended = [False] * num_proxies
        self._paused: dict[int, Tensor] = {}  # proxy -> flat weights kept between its turns
        self._is_paused = [False] * num_proxies
        self._live = self.local_proxies[0]
        self.num_merges = 0

        # The optimizer's flat parameter order names its per-parameter states in stashes (the
        # same indexing as torch's Optimizer.state_dict()).
        self._opt_params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer else []
        self._stashed_optimizer: dict[int, dict[int, dict[str, Any]]] = {}
        self._stashed_scheduler: dict[int, dict[str, Any]] = {}
        self._initial_scheduler = (
            copy.deepcopy(lr_scheduler.state_dict())
            if lr_scheduler is not None and optimizer_state == "per_proxy"
            else None
        )

    # -- attributes ---------------------------------------------------------------------------

    @property
    def live(self) -> int:
        """The proxy currently training in this process."""
        return self._live

    @property
    def shard_sizes(self) -> list[int]:
        return list(self._shard_sizes)

    @shard_sizes.setter
    def shard_sizes(self, sizes: list[int]) -> None:
        if len(sizes) != self.num_proxies or any(n < 0 for n in sizes):
            raise ValueError(f"shard_sizes must be {self.num_proxies} non-negative sizes, got {list(sizes)}.")
        self._shard_sizes = [int(n) for n in sizes]

    # -- the three verbs ----------------------------------------------------------------------

    def begin_turn(self, k: int) -> None:
        """Makes proxy k live: swaps optimizer state and schedule position (``"per_proxy"``).

        Parameters hold ``merged``, which a round starts from; if proxy k was paused in this
        round (``pause_turn``), its own weights are restored instead.
        """
        if k not in self.local_proxies:
            raise ValueError(
                f"proxy {k} is not trained by process {self.rank} (its proxies: {self.local_proxies})."
            )
        if self._is_paused[k]:
            self._copy_into_params(self._views(self._paused[k]))
            self._is_paused[k] = False
        if k == self._live:
            return
        if self.optimizer_state == "per_proxy" and self.optimizer is not None:
            self._stashed_optimizer[self._live] = self._stash_optimizer_state()
            self._restore_optimizer_state(self._stashed_optimizer.pop(k, {}))
            if self.lr_scheduler is not None:
                self._stashed_scheduler[self._live] = copy.deepcopy(self.lr_scheduler.state_dict())
                self.lr_scheduler.load_state_dict(self._stashed_scheduler.pop(k, self._initial_scheduler))
                # load_state_dict restores the position but not the optimizer's current LR.
                for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
                    group["lr"] = lr
        self._live = k

    def pause_turn(self) -> None:
        """Ends the live proxy's turn but keeps its weights for a later turn in this round.

        The weights are copied to this proxy's pause slot on ``storage_device`` (allocated on
        first use, then reused) and params are reset to ``merged``; ``begin_turn`` of the same
        proxy restores them. Its optimizer state stays its own as for any turn.
        """
        k = self._live
        if self._turn_ended[k]:
            raise RuntimeError(f"proxy {k} already ended its round; it cannot be paused before merge().")
        if k not in self._paused:
            self._paused[k] = self._host_buffer(empty=True)
        with torch.no_grad():
            for slot, p in zip(self._views(self._paused[k]), self.params):
                slot.copy_(p, non_blocking=True)
        self._synchronize_host_copies()
        self._is_paused[k] = True
        self._copy_into_params(self._merged)

    def end_turn(self, steps_taken: int) -> None:
        """Ends the live proxy's round: folds its weights into the running sum, resets params to ``merged``.

        Args:
            steps_taken: optimizer steps the live proxy took in this round (all its turns); its
                merge weight is ``shard_sizes[live] * steps_taken`` (nothing is added for 0).
        """
        k = self._live
        if steps_taken < 0:
            raise ValueError(f"steps_taken must be >= 0, got {steps_taken}.")
        if self._is_paused[k]:
            raise RuntimeError(f"proxy {k} is paused; begin_turn({k}) restores its weights before its round can end.")
        if self._turn_ended[k]:
            raise RuntimeError(
                f"proxy {k} already ended its turn this round; its weights were reset to the merged "
                "weights, so it cannot train again before merge()."
            )
        weight = merge_weight(self._shard_sizes[k], steps_taken)
        if weight > 0:
            accumulate_(self._sum, self.params, weight)
            self._total_weight += weight
        self._steps[k] += steps_taken
        self._turn_ended[k] = True
        self._copy_into_params(self._merged)

    def end_round(self, steps_in_round: dict[int, int]) -> None:
        """Ends the round of every local proxy still in it, for a merge when training stops mid-round.

        The live proxy and every paused one (its weights restored first) are folded with their
        steps; a proxy that has not trained in this round adds nothing.

        Args:
            steps_in_round: local proxy -> optimizer steps it took in this round
                (``RoundSchedule.steps_in_round``).
        """
        for k in [self._live] + [j for j in self.local_proxies if j != self._live]:
            if not self._turn_ended[k] and (k == self._live or self._is_paused[k]):
                self.begin_turn(k)
                self.end_turn(steps_in_round.get(k, 0))

    def merge(self) -> dict[str, float]:
        """Sets ``merged`` (and params) to the weighted mean of this round's proxies; starts a new round.

        With several processes this is one all-reduce (sum) of the running sum and total weight.
        If no proxy took a step, the weights are kept.

        Returns:
            Logging values: ``merge/index`` (1 for the first merge) and ``merge/total_weight``.
        """
        paused = [k for k in self.local_proxies if self._is_paused[k]]
        if paused:
            raise RuntimeError(f"proxies {paused} are paused mid-round; resume and end their turns (end_turn) before merge().")
        total = float(self._total_weight)
        if self._collectives is not None and self._collectives.size("merge") > 1:
            self._buffer[-1] = total
            self._collectives.all_reduce(self._buffer, over="merge")
            total = self._buffer[-1].item()
        if total > 0:
            if self._pin:
                # The last end_turn's copy out of pinned ``merged`` may still be in flight (it is
                # asynchronous from pinned memory): let it finish before the host overwrites it.
                self._synchronize_host_copies()
            torch.div(self._buffer[: self._numel], total, out=self._merged_flat)
            self._copy_into_params(self._merged)
        self._buffer.zero_()
        self._total_weight = 0
        self._steps = [0] * self.num_proxies
        self._turn_ended = [False] * self.num_proxies
        self.num_merges += 1
        return {"merge/index": self.num_merges, "merge/total_weight": total}

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-round (tensors are references, as in torch).

        Ownership: the optimizer and LR scheduler objects hold the *live* proxy's state and are
        checkpointed by their owner (accelerate); this holds the *other* proxies' stashed states,
        ``merged``, the running sum and the round's bookkeeping. The live params are the model's.

        With several processes each process has its own state (its proxies, its partial sum):
        each must save and load its own (accelerate's ``save_state`` writes registered objects,
        the model and the optimizer from the main process only), and ``load_state_dict`` refuses
        a state saved by another rank.
        """
        return {
            "num_proxies": self.num_proxies,
            "optimizer_state": self.optimizer_state,
            "world_size": self.world_size,
            "rank": self.rank,
            "shard_sizes": self.shard_sizes,
            "merged": self._merged_flat,
            "running_sum": self._buffer[: self._numel],
            "total_weight": self._total_weight,
            "steps": list(self._steps),
            "turn_ended": list(self._turn_ended),
            "paused": {k: self._paused[k] for k in self.local_proxies if self._is_paused[k]},
            "live": self._live,
            "num_merges": self.num_merges,
            "stashed_optimizer": self._stashed_optimizer,
            "stashed_scheduler": self._stashed_scheduler,
            "initial_scheduler": self._initial_scheduler,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores ``state_dict()``'s output; the optimizer/scheduler/params are restored by their owner."""
        for key, mine in (
            ("num_proxies", self.num_proxies),
            ("optimizer_state", self.optimizer_state),
            ("world_size", self.world_size),
            ("rank", self.rank),
        ):
            if state[key] != mine:
                raise ValueError(
                    f"ProxySet state has {key}={state[key]!r} but this run has {key}={mine!r}; "
                    "resume with the same settings (each process loads the state it saved)."
                )
        if state["merged"].numel() != self._numel:
            raise ValueError(
                f"ProxySet state holds {state['merged'].numel()} trainable values "
                f"but this run trains {self._numel}."
            )
        self.shard_sizes = state["shard_sizes"]
        self._synchronize_host_copies()  # no copy out of pinned ``merged`` may be in flight (merge)
        self._merged_flat.copy_(state["merged"])
        self._buffer[: self._numel].copy_(state["running_sum"])
        self._total_weight = int(state["total_weight"])
        self._steps = list(state["steps"])
        self._turn_ended = list(state["turn_ended"])
        self._is_paused = [False] * self.num_proxies
        for k, flat in state.get("paused", {}).items():  # absent in checkpoints of earlier versions: none paused
            self._paused[int(k)] = self._host_buffer(empty=True).copy_(flat)
            self._is_paused[int(k)] = True
        self._live = int(state["live"])
        self.num_merges = int(state["num_merges"])
        self._stashed_optimizer = {
            int(k): {int(i): _move_state(s, self.storage_device) for i, s in per_param.items()}
            for k, per_param in state["stashed_optimizer"].items()
        }
        self._stashed_scheduler = {int(k): copy.deepcopy(s) for k, s in state["stashed_scheduler"].items()}
        self._initial_scheduler = copy.deepcopy(state["initial_scheduler"])
        self._synchronize_host_copies()

    # -- internals ----------------------------------------------------------------------------

    def _views(self, flat: Tensor) -> list[Tensor]:
        """Per-parameter views into a flat buffer, in ``params`` order."""
        views, offset = [], 0
        for p in self.params:
            views.append(flat[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        return views

    def _host_buffer(self, empty: bool = False) -> Tensor:
        """A flat float32 buffer of every trainable value on ``storage_device`` (pinned: see __init__)."""
        make = torch.empty if empty else torch.zeros
        return make(self._numel, dtype=torch.float32, device=self.storage_device, pin_memory=self._pin)

    def _copy_into_params(self, source: list[Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, source):
                p.copy_(s, non_blocking=True)

    def _stash_optimizer_state(self) -> dict[int, dict[str, Any]]:
        """Takes the live proxy's state out of the optimizer (leaving it empty), onto storage_device."""
        stash = {}
        for i, p in enumerate(self._opt_params):
            state = self.optimizer.state.pop(p, None)
            if state:
                stash[i] = _move_state(state, self.storage_device)
        self._synchronize_host_copies()
        return stash

    def _restore_optimizer_state(self, stash: dict[int, dict[str, Any]]) -> None:
        for i, state in stash.items():
            p = self._opt_params[i]
            self.optimizer.state[p] = _move_state(state, p.device)

    def _synchronize_host_copies(self) -> None:
        """Device-to-host non-blocking copies must finish before the host reads (or pickles) them."""
        if self.storage_device.type == "cpu" and torch.accelerator.is_available():
            torch.accelerator.synchronize()
