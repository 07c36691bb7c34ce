"""``MemFree``: IET-AGC / IET-AGC+ as one object any diffusers training loop can use.

In the spirit of Opacus' ``PrivacyEngine``: the training loop stays as it was; the plugin owns the
method's state and every cross-process sync. It holds the shard split (``ShardAssignment``), the
proxies (``ProxySet``), one loss bank per proxy (``LossBank``), the skip statistics (``SkipStats``),
the loss-aware augmentation strengths (``AugmentationStrengths``), one RNG stream per proxy
(``ProxyGenerators``) and the round schedule (``RoundSchedule``, the one source of truth for
"where are we"). The loop makes a handful of calls (docs/plugin.md)::

    memfree = MemFree(config, num_samples=len(dataset), num_train_timesteps=1000,
                      max_train_steps=steps, seed=seed, accelerator=accelerator)
    lr_scheduler = get_scheduler(..., num_training_steps=memfree.lr_schedule_steps)
    model, optimizer, lr_scheduler, loader = memfree.prepare(model, optimizer, lr_scheduler, DataLoader(dataset, batch_size))
    batches = iter(loader)                                 # follows shard changes (and a loaded checkpoint) by itself
    while not memfree.done:                                # from the loaded step after a resume
        batch = next(batches)
        noise = memfree.randn(latents.shape)               # the live proxy's stream, this process's slice
        timesteps = memfree.randint(0, 1000, (bsz,))
        ...                                                # forward, per-sample losses [B]
        loss = memfree.reduce(losses, timesteps, batch["sample_ids"], weights)
        accelerator.backward(loss); optimizer.step(); optimizer.zero_grad()
        lr_scheduler.step()                                # unless fp16 loss scaling skipped the step
        memfree.step()                                     # turns, merges, redistribution
        ... accelerator.log(values, step=s) for s, values in memfree.logs().items()  # at logging steps
    report = memfree.end_training()                        # final merge; skip rates, shards, skip counts

Invariants:
- The order of operations and the random streams are those of ``train_sd_ietagc.py``'s loop:
  a loop written with ``MemFree`` trains bit-identical weights (tests/test_memfree.py).
- ``reduce`` never synchronises host and device (with D > 1 processes per proxy and AGC, one
  gather of the micro-batch's losses in the proxy's group, so every bank sees the whole
  micro-batch);
  ``step`` syncs only when a merge or redistribution is due; ``logs`` syncs (logging time).
- With the config off (one shard, AGC off) ``reduce`` is the (weighted) mean and ``step``,
  ``finish`` do nothing but count.
- The data the loop sees always follows the state: an iterator of ``prepare``'s / ``dataloader``'s
  loader starts afresh (at the current micro-step, from the current shards) after a
  redistribution or a loaded checkpoint, and a new sampler iterator always starts there too.
- ``state_dict()`` holds tensors and plain data only (sd_memfree/run/state.py writes it without
  pickle); ``stateful_objects()`` names the same objects under the names the SD script's
  checkpoints use. Loading a checkpoint into them needs no further call: the loaded counters
  tell the plugin, which makes the right proxy live before it next trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from .method.agc import LossBank, SkipStats
from .config import MemFreeConfig
from .method.sampler import ShardBatchSampler
from .method.losses import masked_mean
from .collectives import Collectives, ProcessLayout
from .method.proxies import ProxySet
from .method.schedule import RoundSchedule
from .method.shards import ShardAssignment
from .run.state import Counters, ProxyGenerators


class _LoopCounters(Counters):
    """``Counters`` that tell their ``MemFree`` when a checkpoint was loaded into them (the same
    state as ``Counters``, so checkpoints are unchanged)."""

    def __init__(self, on_load, **values: int):
        super().__init__(**values)
        self.__dict__["_on_load"] = on_load  # beside ``values``: not part of the state

    def load_state_dict(self, state: dict[str, int]) -> None:
        super().load_state_dict(state)
        self.__dict__["_on_load"]()


@dataclass
class StepEvents:
    """What ``MemFree.step`` did after an optimizer step.

    Attributes:
        logs: tracker values of the merge / redistribution (empty when neither happened).
        merged: the proxies were merged.
        redistributed: shards exchanged samples.
        reload_data: the shard membership changed: batches the data loader prefetched belong to
            the old shards, so build a new iterator (``iter(loader)``) before the next batch.
    """

    logs: dict[str, Any] = field(default_factory=dict)
    merged: bool = False
    redistributed: bool = False
    reload_data: bool = False


@dataclass
class TrainingReport:
    """What ``MemFree.end_training`` returns at the end of a run.

    Attributes:
        merge_logs: tracker values of the final merge ({} when the budget ended with a merge).
        summary: ``MemFree.summary()``: whole-run skip rates of this process's proxies
            (``agc/...``), the shard split and move log, the number of merges.
        skip_counts: LongTensor [N], whole-run AGC skips per sample summed over processes
            (zeros without AGC).
    """

    merge_logs: dict[str, float]
    summary: dict[str, Any]
    skip_counts: torch.Tensor


class MemFree:
    """IET-AGC / IET-AGC+ for one training run (method.md, sections 1-4).

    Args:
        config: the mitigation settings.
        num_samples: N, the training set size (sample ids ``0..N-1``).
        num_train_timesteps: the noise scheduler's ``num_train_timesteps`` (loss banks' size).
        max_train_steps: the budget, optimizer steps summed over proxies and processes (shortened
            to whole shares per proxy, see ``RoundSchedule``; ``total_steps`` is what runs).
        seed: the run seed (shard split, data order, per-proxy RNG streams).
        accelerator: an ``accelerate.Accelerator``; gives rank, world size and device.
        rank, world_size, device: the same without accelerate (``torch.distributed`` must be
            initialised when ``world_size > 1``).
        gradient_accumulation_steps: micro-steps per optimizer step.
        storage_device: where the merged weights, the running sum and stashed optimizer states
            live: "cpu" for full fine-tuning (K copies of a UNet's optimizer state do not fit on
            the accelerator), the training device for LoRA (small tensors).
        collectives: the run's ``Collectives`` (built here from the layout when not given).
        collective_timeout: the backend timeout of the process groups built here.

    Invariant (``collectives.ProcessLayout``): W processes hold the K proxies. W divides K:
    process p trains the proxies ``k % W == p`` in turn, with no gradient all-reduce. W = K x D:
    each proxy is trained by D processes, data parallel among themselves only (``prepare`` wraps
    the model in DDP over that group), each taking a slice of the proxy's micro-batch of
    D x batch_size. K = 1 is plain data parallelism over W. A merge is one all-reduce across the
    groups. Set up once: ``prepare`` (accelerate loops) or ``attach`` + ``dataloader`` (loops
    without it); the other calls raise a one-line error when made out of order.
    """

    def __init__(self, config: MemFreeConfig, *, num_samples: int, num_train_timesteps: int, max_train_steps: int,
                 seed: int = 0, accelerator: Any = None, rank: int | None = None, world_size: int | None = None,
                 device: torch.device | str | None = None, gradient_accumulation_steps: int | None = None,
                 storage_device: torch.device | str = "cpu", collectives: Collectives | None = None,
                 collective_timeout: Any = None) -> None:
        if not isinstance(config, MemFreeConfig):
            raise TypeError(f"MemFree needs a MemFreeConfig, got {type(config).__name__}; build one with MemFreeConfig(...).")
        self.config = mf = config
        self.accelerator = accelerator
        if accelerator is not None:
            rank = accelerator.process_index if rank is None else rank
            world_size = accelerator.num_processes if world_size is None else world_size
            device = accelerator.device if device is None else device
            if gradient_accumulation_steps is None:
                gradient_accumulation_steps = accelerator.gradient_accumulation_steps
        self.rank, self.world_size = rank or 0, world_size or 1
        self.device = torch.device(device if device is not None else "cpu")
        self.gradient_accumulation_steps = gradient_accumulation_steps or 1
        self.num_samples, self.num_train_timesteps, self.seed = num_samples, num_train_timesteps, seed
        self.storage_device = storage_device
        K = self.num_proxies = mf.num_shards
        # Where this process sits: K proxies over W processes, W a divisor or a multiple of K
        # (collectives.ProcessLayout; raises a one-line error naming the counts that work).
        self.layout = ProcessLayout(K, self.world_size, self.rank)
        self.local_proxies = self.layout.local_proxies
        # The D processes of a proxy group split its micro-batch (K = 1: all W processes).
        self.data_world, self.data_rank = self.layout.group_size, self.layout.data_rank
        self.collectives = collectives if collectives is not None else Collectives(self.layout, timeout=collective_timeout)
        self.assignment = ShardAssignment(num_samples, K, seed)  # raises if K > num_samples
        # Which proxy trains and when turns end, merges and redistributions are due; the sampler
        # reads it too. Every proxy takes the same number of steps, so every shard weighs the same.
        self.schedule = RoundSchedule(K, mf.merge_every, self.local_proxies, max_train_steps,
                                      redistribute_at=mf.redistribute_at if mf.redistribution_enabled else None,
                                      gradient_accumulation_steps=self.gradient_accumulation_steps)
        self.strengths = self.augment = None
        if mf.loss_aware_augmentation:  # per-sample strengths in shared memory, read by the data workers
            from .method.augment import AugmentationStrengths, LossAwareAugment

            self.strengths = AugmentationStrengths(num_samples)
            self.augment = LossAwareAugment(self.strengths, max_magnitude=mf.augment_max_magnitude)
        self.banks = [LossBank(num_train_timesteps, ratio=mf.agc_ratio, ema=mf.agc_ema, device=self.device)
                      for _ in range(K)] if mf.agc_enabled else []
        self.skip_stats = SkipStats(num_train_timesteps, num_proxies=K, device=self.device) if mf.agc_enabled else None
        self.run_skip_stats = SkipStats(num_train_timesteps, num_proxies=K, device=self.device) if mf.agc_enabled else None
        if mf.agc_enabled:
            self.assignment.to(self.device)
        # RNG streams belong to proxies (see ProxyGenerators): every process of a proxy group draws
        # the proxy's whole micro-batch and takes its slice (``randn``), so the draws do not depend
        # on how many processes share the proxy.
        self.rng = ProxyGenerators([seed * 1000 + k for k in range(K)], device=self.device)
        self.counters = _LoopCounters(self._state_loaded, global_step=0, micro_step=0, sampler_origin=0, turn_steps=0,
                                      redistributions=0)
        self.proxies: ProxySet | None = None
        self.sampler = None
        self._phase = "built"  # -> "ready" (prepare / attach) -> "ended" (end_training / finish)
        self._loaded = False  # a checkpoint was loaded: the live proxy is checked before training goes on
        self._data_version = 0  # bumped when the data a loader iterator prefetched went stale
        self._pending_logs: dict[int, dict[str, Any]] = {}  # step -> merge / redistribution values not yet read

    # -- sizes ----------------------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        """Optimizer steps the run takes, summed over proxies and processes."""
        return self.schedule.total_steps

    @property
    def local_steps(self) -> int:
        """Optimizer steps this process takes (the loop's ``max_train_steps``)."""
        return self.schedule.local_steps

    @property
    def step_unit(self) -> int:
        """Proxy optimizer steps per local step over all processes (R, the proxy groups that
        train side by side; 1 with one process or one shard)."""
        return self.layout.step_unit

    @property
    def local_step(self) -> int:
        """Optimizer steps this process has taken (after a resume: the loaded position). The loop
        runs while ``local_step < local_steps``."""
        return self.counters.global_step

    @property
    def global_step(self) -> int:
        """Optimizer steps taken, summed over proxies and processes: what checkpoints, logs and
        the progress bar count (``local_step * step_unit``)."""
        return self.counters.global_step * self.step_unit

    @property
    def done(self) -> bool:
        """This process has taken its ``local_steps``."""
        return self.counters.global_step >= self.local_steps

    @property
    def lr_schedule_steps(self) -> int:
        """``num_training_steps`` for the LR scheduler: with one optimizer state per proxy each
        proxy has its own schedule position, spanning its own steps."""
        if self.num_proxies > 1 and self.config.proxy_optimizer_state == "per_proxy":
            return self.schedule.steps_per_proxy
        return self.schedule.local_steps

    # -- setup ----------------------------------------------------------------------------------

    def attach(self, params: list[torch.nn.Parameter], optimizer: Any, lr_scheduler: Any = None) -> "MemFree":
        """Take over the trainable tensors, their optimizer and LR scheduler (each proxy swaps in
        its own optimizer state and schedule position). The lower-level setup for loops without
        accelerate (with ``dataloader``); ``prepare`` does it for accelerate loops. Call once,
        before the optimizer is wrapped and before any step. Returns self.

        With D > 1 processes per proxy, wrap the model for gradient all-reduce over
        ``collectives.group("data", device)`` yourself (``prepare`` does)."""
        self._require("built", "attach")
        if self.num_proxies > 1:
            self.proxies = ProxySet(list(params), self.num_proxies, self.assignment.sizes(), optimizer=optimizer,
                                    lr_scheduler=lr_scheduler, optimizer_state=self.config.proxy_optimizer_state,
                                    storage_device=self.storage_device, rank=self.rank, world_size=self.world_size,
                                    local_proxies=self.local_proxies, collectives=self.collectives)
        self._phase = "ready"
        return self

    def prepare(self, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any = None, data_loader: Any = None):
        """Set up the loop's objects for the method, as ``accelerator.prepare`` does for devices.

        - the proxies take over the optimizer's parameters (all its param groups, in order), the
          optimizer and the LR scheduler (``attach``);
        - the model goes to the device; with one process it is ``accelerator.prepare``d as
          upstream's; with several it is wrapped in ``DistributedDataParallel`` over its proxy
          group (the D processes that share its proxy, all W with one shard) when D > 1, and left
          unwrapped when D = 1 (proxies never all-reduce gradients); the optimizer is prepared;
        - ``data_loader``'s dataset, batch size and loading options (``collate_fn``,
          ``num_workers``, ``pin_memory``, ...) are kept, its sampler is replaced: see
          ``dataloader``. Its dataset is indexed by ``(sample_id, aug_seed)`` keys
          (``sd_memfree.data.IndexedCaptionDataset``).

        Call once, after building the optimizer and LR scheduler (with ``lr_schedule_steps``) and
        before loading a checkpoint. Needs the ``accelerator`` given at construction.

        Returns:
            ``(model, optimizer, lr_scheduler, data_loader)``, the prepared objects (what was
            passed as None stays None).
        """
        if self.accelerator is None:
            raise ValueError("MemFree.prepare needs the accelerator: build MemFree(..., accelerator=accelerator), "
                             "or without accelerate call attach() and dataloader() yourself.")
        self._require("built", "prepare")
        self.attach([p for group in optimizer.param_groups for p in group["params"]], optimizer, lr_scheduler)
        if self.world_size == 1 and self.num_proxies == 1:
            model, optimizer = self.accelerator.prepare(model, optimizer)
        else:
            model = self._wrap_data_parallel(model.to(self.accelerator.device))
            optimizer = self.accelerator.prepare(optimizer)
        if data_loader is not None:
            if data_loader.batch_size is None:
                raise ValueError("MemFree.prepare needs a DataLoader built with batch_size= (it hands out the batches itself), "
                                 "not with a batch_sampler.")
            options = {name: getattr(data_loader, name) for name in _LOADER_OPTIONS if hasattr(data_loader, name)}
            data_loader = self.dataloader(data_loader.dataset, data_loader.batch_size, **options)
        return model, optimizer, lr_scheduler, data_loader

    def _wrap_data_parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP over the proxy group when D > 1 (the group that reduces tensors on the model's
        device: NCCL for CUDA parameters, gloo for host ones), with accelerate's DDP options."""
        if self.data_world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        handler = getattr(self.accelerator, "ddp_handler", None)
        options = handler.to_kwargs() if handler is not None else {}
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       process_group=self.collectives.group("data", device), **options)

    def shard_at(self, micro_step: int) -> int:
        """The shard (= proxy) whose data feeds micro-step ``micro_step``."""
        return self.schedule.proxy_at_micro(micro_step)

    def batch_sampler(self, batch_size: int):
        """The ``ShardBatchSampler`` handing out ``(sample_id, aug_seed)`` micro-batches from the
        shard the schedule names (this process's slice in data-parallel training). Each of its
        iterators starts at the current micro-step with the current shards (after a
        redistribution or a loaded checkpoint too)."""
        self.sampler = _FollowingSampler(self, batch_size)
        return self.sampler

    def dataloader(self, dataset, batch_size: int, **kwargs):
        """A ``DataLoader`` over ``dataset`` with ``batch_sampler(batch_size)``; the dataset is
        indexed by ``(sample_id, aug_seed)`` (``sd_memfree.data.IndexedCaptionDataset``). Its own
        seeded generator leaves the global RNG untouched. Its iterators follow the shards: after a
        redistribution (or a loaded checkpoint) an iterator drops what it prefetched and goes on
        from the new shards, so the loop never rebuilds it."""
        kwargs.setdefault("generator", torch.Generator().manual_seed(self.seed))
        return _FollowingLoader(self, dataset, batch_sampler=self.batch_sampler(batch_size), **kwargs)

    # -- the loop -------------------------------------------------------------------------------

    @property
    def current_proxy(self) -> int:
        """The proxy that trains on the next micro-batch."""
        return self.shard_at(self.counters.micro_step)

    @property
    def generator(self) -> torch.Generator:
        """The live proxy's RNG stream, on the training device. Reading it changes nothing. With
        D > 1 processes per proxy draw through ``randn`` / ``randint`` instead, which take this
        process's slice of the proxy's draws."""
        return self.rng[self.current_proxy]

    def randn(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Standard normal draws for this process's part of the live proxy's micro-batch (VAE
        posterior sampling, noise, noise offset, input perturbation), on the training device.

        ``shape[0]`` is this process's batch. The proxy's stream draws for the whole micro-batch
        (D x ``shape[0]``) and this process takes its slice, so the result does not depend on
        how many processes share the proxy; with D = 1 it is
        ``torch.randn(shape, generator=generator)``.
        """
        g, D, d = self.generator, self.data_world, self.data_rank
        shape = tuple(shape)
        if D == 1:
            return torch.randn(shape, generator=g, device=g.device, dtype=dtype)
        full = torch.randn((D * shape[0], *shape[1:]), generator=g, device=g.device, dtype=dtype)
        return full[d * shape[0] : (d + 1) * shape[0]]

    def randint(self, low: int, high: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Integers in [low, high) for this process's part of the micro-batch (timesteps), drawn as
        ``randn`` draws: the whole micro-batch from the live proxy's stream, then this slice."""
        g, D, d = self.generator, self.data_world, self.data_rank
        shape = tuple(shape)
        full = torch.randint(low, high, (D * shape[0], *shape[1:]), generator=g, device=g.device)
        return full if D == 1 else full[d * shape[0] : (d + 1) * shape[0]]

    def multinomial(self, weights: torch.Tensor, num_samples: int) -> torch.Tensor:
        """``num_samples`` indices drawn with replacement in proportion to ``weights`` (biased
        timesteps), for this process's part of the micro-batch, drawn as ``randn`` draws."""
        g, D, d = self.generator, self.data_world, self.data_rank
        full = torch.multinomial(weights, D * num_samples, replacement=True, generator=g)
        return full if D == 1 else full[d * num_samples : (d + 1) * num_samples]

    def reduce(self, losses: torch.Tensor, timesteps: torch.Tensor, sample_ids: torch.Tensor,
               weights: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss of one micro-batch: the mean of the kept per-sample losses.

        AGC (when on): samples whose loss is abnormally low for their timestep are skipped, then
        the live proxy's loss bank, the augmentation strengths and the skip counts take the batch.
        Counts the micro-step. No host-device sync.

        Args:
            losses: Tensor [B] of per-sample losses before weighting (``losses.per_sample_loss``).
            timesteps: LongTensor [B] of training timesteps, on the training device.
            sample_ids: LongTensor [B] of sample ids (the batch's ``sample_ids``).
            weights: Tensor [B] of per-sample weights (Min-SNR), None for 1.

        Returns:
            The scalar loss to backpropagate.
        """
        self._require("ready", "reduce")
        if self._loaded:
            self._settle()
        keep, denominator = None, None
        if self.banks:  # AGC: skip abnormally low losses for their timestep, then update the bank
            k = self.current_proxy
            bank = self.banks[k]
            detached = losses.detach()
            keep = bank.keep_mask(detached, timesteps)
            seen_losses, seen_t, seen_ids, seen_keep = detached, timesteps, sample_ids, keep
            if self.data_world > 1:  # data-parallel: every process's bank and strengths take the whole global batch
                seen = self.collectives.all_gather(torch.stack([detached.double(), timesteps.double(), sample_ids.double()], dim=1),
                                                   over="data")
                seen_losses, seen_t, seen_ids = seen[:, 0].float(), seen[:, 1].long(), seen[:, 2].long()
                seen_keep = bank.keep_mask(seen_losses, seen_t)
                # The proxy's loss is the mean over its whole micro-batch's kept samples: DDP
                # averages the D processes' gradients, so each divides by 1/D of the global count.
                denominator = seen_keep.sum().clamp(min=1).to(losses.dtype) / self.data_world
            if self.strengths is not None:  # loss-aware augmentation strength for the next draw
                from .method.augment import augmentation_strength

                self.strengths.update(seen_ids, augmentation_strength(seen_losses, seen_t, bank.bank, self.config.agc_ratio,
                                                                      self.config.augment_alpha), seen_keep)
            bank.update(seen_losses, seen_t)
            finite = torch.isfinite(detached)  # a non-finite loss is not a skip: it is the loop's to report
            self.skip_stats.update(keep, timesteps, k, valid=finite)
            self.run_skip_stats.update(keep, timesteps, k, valid=finite)
            self.assignment.record_skips(sample_ids, keep)
        self.counters.micro_step += 1
        return masked_mean(losses, keep, weights, denominator=denominator)

    def step(self) -> StepEvents:
        """After each optimizer step (and after ``lr_scheduler.step()``): ends turns, merges and
        redistributes when the schedule says so, and switches the live proxy.

        Returns:
            What happened (for reading: the loaders of ``prepare`` / ``dataloader`` follow a
            shard change by themselves, and ``logs()`` hands out ``events.logs`` at their step).
        """
        self._require("ready", "step")
        if self._loaded:
            self._settle()
        self.counters.global_step += 1
        events = StepEvents()
        if self.num_proxies > 1:
            events = self._round_events(self.schedule.after_step(self.counters.global_step - 1))
        if self.strengths is not None:
            self.strengths.flush()
        if events.logs:
            self._pending_logs.setdefault(self.counters.global_step * self.step_unit, {}).update(events.logs)
        return events

    def _round_events(self, event) -> StepEvents:
        events = StepEvents()
        proxies, assignment, mf = self.proxies, self.assignment, self.config
        if proxies is None:
            raise RuntimeError("MemFree.step() with shards needs attach(params, optimizer, lr_scheduler) first.")
        total = self.counters.global_step * self.step_unit
        if event.turn_ends:
            if event.round_done_for_proxy:  # its h steps are done: bank its weights, restart from merged
                proxies.end_turn(event.steps_in_round)
            elif event.next_proxy != event.proxy:  # half-way: keep its weights for its second half
                proxies.pause_turn()
        if event.merge:
            events.merged = True
            events.logs.update(proxies.merge())  # one all-reduce across processes
        if event.redistribute:  # IET-AGC+ redistribution on its schedule
            # Every process decides from the same global counts: each sample's skips were counted
            # by the one process that trained it.
            counts = self.collectives.all_reduce(assignment.skip_counts.clone())
            if self.strengths is not None and self.step_unit > 1:
                # Each sample's strength comes from its proxy's group (whose D processes agree,
                # having seen the whole micro-batch): the group's first process sends it.
                self.strengths.flush()
                owned = torch.isin(assignment.shard_of.cpu(), torch.tensor(self.local_proxies)) & (self.data_rank == 0)
                synced = self.strengths.values * owned.to(self.strengths.values.dtype)
                self.strengths.values.copy_(self.collectives.all_reduce(synced))
            moves = assignment.redistribute(mf.redistribute_fraction, total, counts=counts)
            proxies.shard_sizes = assignment.sizes()
            self.counters.redistributions += 1
            self.counters.sampler_origin = self.counters.micro_step
            self._data_version += 1  # batches prefetched from the old shards are stale
            events.redistributed = events.reload_data = True
            events.logs["redistribution/moved"] = sum(len(m["sample_ids"]) for m in moves)
        if events.merged or events.redistributed:
            events.logs.update({f"shards/size_{j}": s for j, s in enumerate(assignment.sizes())})
        if event.turn_ends and event.next_proxy is not None:
            proxies.begin_turn(event.next_proxy)  # a paused proxy gets its own weights back
        return events

    def finish(self) -> dict[str, float]:
        """The final merge: the budget ends with a merge (``RoundSchedule``), so only a run
        stopped mid-round merges here, every local proxy weighted by the steps it took in that
        round. Idempotent. Returns the merge's logging values ({} when nothing was merged)."""
        if self._loaded:
            self._settle()
        if self._phase == "ended":
            return {}
        self._require("ready", "finish")
        self._phase = "ended"
        if self.proxies is None:
            return {}
        taken = self.schedule.steps_in_round(self.counters.global_step)
        if not taken:
            return {}
        self.proxies.end_round(taken)
        return self.proxies.merge()

    # -- reading --------------------------------------------------------------------------------

    def logs(self) -> dict[int, dict[str, Any]]:
        """Tracker values by step, since the last call: each merge's and redistribution's values
        (``StepEvents.logs``) at the step it happened, and the skip rates and mean augmentation
        strength since the last call at the current step (steps count optimizer steps of all
        processes, as ``total_steps``). Call at the loop's logging steps, the same on every process.

        Returns:
            ``{step: {name: value}}`` in step order; ``{}`` with the method off.
        """
        out, self._pending_logs = self._pending_logs, {}
        current = self.log_values()
        if current:
            out.setdefault(self.counters.global_step * self.step_unit, {}).update(current)
        return dict(sorted(out.items()))

    def log_values(self) -> dict[str, float]:
        """Skip rates since the last call and the mean augmentation strength (``logs`` holds them
        at their step, with the merge and redistribution values)."""
        logs: dict[str, float] = {}
        if self.skip_stats is not None:
            logs.update(self.skip_stats.summary())
        if self.strengths is not None:
            logs["augment/mean_strength"] = self.strengths.mean()
        return logs

    def total_skip_counts(self) -> torch.Tensor:
        """Whole-run skips per sample, summed over processes (a collective with W > 1: each
        process counted the samples it trained on)."""
        return self.collectives.all_reduce(self.assignment.total_skip_counts.clone())

    def end_training(self) -> TrainingReport:
        """End of the run, after the loop: the final merge (``finish``, once) and the run's
        results. Every process calls it (the skip counts are summed over processes).

        Returns:
            ``TrainingReport``: the final merge's values, ``summary()``, the whole-run skips per sample.
        """
        return TrainingReport(merge_logs=self.finish(), summary=self.summary(), skip_counts=self.total_skip_counts())

    def summary(self) -> dict[str, Any]:
        """Whole-run skip rates (this process's proxies), the shard split and move log, merges
        (reading changes nothing)."""
        out: dict[str, Any] = {}
        if self.run_skip_stats is not None:  # read, not reset: the whole run's
            out.update(self.run_skip_stats.summary(reset=False))
        out.update(self.assignment.summary())
        out["num_merges"] = self.proxies.num_merges if self.proxies is not None else 0
        return out

    def merged_weights(self) -> list[torch.Tensor] | None:
        """The last merge's values of the trainable tensors (views, in ``params`` order), or None
        without shards. What a checkpoint publishes while the live tensors hold a proxy's weights."""
        if self.proxies is None:
            return None
        return list(torch.split(self.proxies.state_dict()["merged"], [p.numel() for p in self.proxies.params]))

    # -- checkpoints ----------------------------------------------------------------------------

    def stateful_objects(self) -> dict[str, Any]:
        """The stateful objects under the names train_sd_ietagc.py's checkpoints use (None where
        off), for ``state.save_process_state``; loading them needs no further call. After the
        setup (``prepare`` / ``attach``): before it, the proxies do not exist yet."""
        self._require("ready", "stateful_objects")
        objects = {"counters": self.counters, "rng": self.rng, "assignment": self.assignment,
                   "proxies": self.proxies, "strengths": self.strengths}
        for k, bank in enumerate(self.banks):
            objects[f"loss_bank_{k}"] = bank
        return objects

    def state_dict(self) -> dict[str, Any]:
        """This process's method state: tensors and plain data only (no pickle needed)."""
        return {name: obj.state_dict() for name, obj in self.stateful_objects().items() if obj is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output. Load the model's trainable tensors and the optimizer
        and LR scheduler states first: the live proxy is switched here (a paused one gets its
        own weights back)."""
        for name, obj in self.stateful_objects().items():
            if obj is None:
                continue
            if name not in state:
                raise ValueError(f"MemFree state has no '{name}': it was saved with another configuration; resume with the same settings.")
            obj.load_state_dict(state[name])
        self.on_state_loaded()

    def on_state_loaded(self) -> None:
        """Finish loading a checkpoint now rather than at the next ``generator`` / ``reduce`` /
        ``step`` / data iterator: the proxy whose turn it is becomes live. Needed only when the
        model is used before training goes on; loading ``stateful_objects()`` does the rest."""
        self._state_loaded()
        self._settle()

    # -- internals ------------------------------------------------------------------------------

    def _state_loaded(self) -> None:
        """The counters were loaded (so was, or is being, the rest of a checkpoint)."""
        self._loaded = True
        self._data_version += 1  # an iterator from before the load yields another run position

    def _settle(self) -> None:
        """After a load, once every object is in place: the proxy whose turn it is becomes live
        (it already is after our own checkpoints; the check costs nothing)."""
        self._loaded = False
        if self.proxies is not None and self.proxies.live != self.current_proxy:
            self.proxies.begin_turn(self.current_proxy)

    def _members(self) -> list[list[int]]:
        return [self.assignment.members(k) for k in range(self.num_proxies)]

    def _require(self, phase: str, call: str) -> None:
        """One clear error for a call made out of order (set up once, train, end once)."""
        if self._phase == phase or (phase == "ready" and self._phase == "built" and self.num_proxies == 1):
            return  # one shard: no proxies to set up
        fix = {"built": f"MemFree.{call}() after the setup was done: prepare() (or attach()) is called once, before training",
               "ready": (f"MemFree.{call}() before prepare(): call prepare(model, optimizer, lr_scheduler, loader) "
                         "(or attach() without accelerate) first" if self._phase == "built"
                         else f"MemFree.{call}() after end_training(): the run is over")}[phase]
        raise RuntimeError(fix + ".")



# The DataLoader options ``MemFree.prepare`` carries over (its sampler is replaced).
_LOADER_OPTIONS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                   "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order")


class _FollowingSampler(ShardBatchSampler):
    """A ``ShardBatchSampler`` whose every iterator starts from its ``MemFree``'s current shards
    and micro-step, so a redistribution or a loaded checkpoint needs no bookkeeping."""

    def __init__(self, memfree: MemFree, batch_size: int):
        self.memfree = memfree
        super().__init__(memfree._members(), batch_size, memfree.seed, memfree.shard_at,
                         data_rank=memfree.data_rank, data_world=memfree.data_world)

    def __iter__(self):
        m = self.memfree
        if m._loaded:
            m._settle()
        self.set_members(m._members(), m.counters.sampler_origin, m.counters.redistributions)
        self.start = m.counters.micro_step
        return super().__iter__()


class _FollowingLoader(DataLoader):
    """A ``DataLoader`` whose iterators start afresh when its ``MemFree``'s data changed (a
    redistribution, a loaded checkpoint): what they prefetched from the old shards is dropped."""

    def __init__(self, memfree: MemFree, dataset, **kwargs):
        super().__init__(dataset, **kwargs)
        self.memfree = memfree

    def __iter__(self):
        return _FollowingIterator(self.memfree, super().__iter__)


class _FollowingIterator:
    """Yields from ``make()``'s iterator, making a new one when ``memfree``'s data version moved."""

    def __init__(self, memfree: MemFree, make):
        self.memfree, self.make = memfree, make
        self.version, self.it = memfree._data_version, make()

    def __iter__(self):
        return self

    def __next__(self):
        if self.memfree._data_version != self.version:
            self.version, self.it = self.memfree._data_version, self.make()
        return next(self.it)
