"""Where processes sit (``ProcessLayout``) and every collective the library issues (``Collectives``).

K proxies over W processes (architecture.md, "Scale"):

- W divides K (W <= K): process p trains the proxies ``k % W == p`` in turn; no gradient
  all-reduce; a merge is one all-reduce over all W processes.
- W = K x D: the processes form K groups of D (ranks ``g*D .. g*D+D-1`` train proxy g), data
  parallel inside the group (gradients all-reduced every step within the group only, as upstream
  DDP does; a proxy's micro-batch is D x ``--train_batch_size``), and a merge is one all-reduce
  across the groups, among the processes of equal data rank (D such merges run side by side, each
  summing one copy of every proxy). K = 1 is the case R = 1: plain data parallelism over W.

This is the two-dimensional mesh (replica x data-parallel) of DiLoCo and PyTorch's post-local-SGD
averagers, built from ``torch.distributed.new_group``. Groups are kept contiguous in rank order,
so the per-step gradient traffic stays inside a node whenever D divides the GPUs per node.

Why one module: NCCL reduces device tensors only ("No backend type associated with device type
cpu"), and the method keeps some state on the host (the merged weights of full fine-tuning, the
augmentation strengths in shared memory, skip counts without AGC). ``Collectives`` picks the group
by where the tensor lives: a device tensor goes to the default backend, a host tensor to a gloo
twin of the same group when the default backend cannot reduce host tensors. No other module calls
``torch.distributed`` reductions, so no call site can send a host tensor to NCCL.

Invariants:
- Every process builds its ``Collectives`` at the same point of the program with the same layout
  (building it is itself collective: ``new_group`` must be entered by every process).
- With one process every method is the identity (no process group needed).
- ``all_gather`` concatenates along dim 0 in rank order of the group, so the data group's gather
  of the replicas' slices is the proxy's whole micro-batch, in the order one process would hold it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch

OVER = ("world", "data", "merge")
_OPS = ("sum", "max", "min")


def spreads(num_proxies: int) -> list[int]:
    """Process counts that can share ``num_proxies`` proxies: its divisors (shown with the first
    multiples; any multiple works)."""
    divisors = [w for w in range(1, num_proxies + 1) if num_proxies % w == 0]
    return divisors + [num_proxies * m for m in (2, 3, 4)]


def check_spread(num_proxies: int, world_size: int) -> None:
    """Raises a one-line ValueError naming the process counts that work, unless ``world_size``
    divides ``num_proxies`` or is a multiple of it."""
    if num_proxies < 1 or world_size < 1:
        raise ValueError(f"need at least one proxy and one process, got --num_shards={num_proxies} over {world_size} processes.")
    if num_proxies % world_size == 0 or world_size % num_proxies == 0:
        return
    counts = ", ".join(str(w) for w in spreads(num_proxies))
    raise ValueError(
        f"--num_shards={num_proxies} cannot be spread over {world_size} processes: launch a number of processes that "
        f"divides {num_proxies} or is a multiple of it ({counts}, ...), or use --num_shards={world_size}"
    )


@dataclass(frozen=True)
class ProcessLayout:
    """Which proxies process ``rank`` of ``world_size`` trains, and with whom.

    Attributes:
        num_proxies: K.
        world_size: W (a divisor or a multiple of K, see ``check_spread``).
        rank: this process.
    """

    num_proxies: int
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        check_spread(self.num_proxies, self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}.")

    @property
    def num_groups(self) -> int:
        """R, the proxy groups that train side by side (min(K, W))."""
        return min(self.num_proxies, self.world_size)

    @property
    def group_size(self) -> int:
        """D, the processes that train one proxy together (data parallel)."""
        return self.world_size // self.num_groups

    @property
    def group(self) -> int:
        """This process's proxy group (0 .. R-1)."""
        return self.rank // self.group_size

    @property
    def data_rank(self) -> int:
        """This process's slice of its proxy's micro-batch (0 .. D-1)."""
        return self.rank % self.group_size

    @property
    def local_proxies(self) -> list[int]:
        """The proxies this process trains, in turn order."""
        return [k for k in range(self.num_proxies) if k % self.num_groups == self.group]

    @property
    def step_unit(self) -> int:
        """Proxy optimizer steps taken per local optimizer step, over all processes (R)."""
        return self.num_groups

    def ranks(self, over: str) -> list[int]:
        """The ranks that share this process's collective ``over`` ("world", "data", "merge")."""
        D = self.group_size
        if over == "world":
            return list(range(self.world_size))
        if over == "data":
            return [self.group * D + d for d in range(D)]
        if over == "merge":
            return [g * D + self.data_rank for g in range(self.num_groups)]
        raise ValueError(f"over must be one of {OVER}, got {over!r}.")

    def all_ranks(self, over: str) -> list[list[int]]:
        """Every group of kind ``over`` (each process enters ``new_group`` for all of them)."""
        D, R = self.group_size, self.num_groups
        if over == "data":
            return [[g * D + d for d in range(D)] for g in range(R)]
        if over == "merge":
            return [[g * D + d for g in range(R)] for d in range(D)]
        return [list(range(self.world_size))]


def backend_devices(group: Any = None) -> set[str]:
    """Device types the backend of ``group`` can reduce, from ``get_backend_config`` ("cuda:nccl"
    -> {"cuda"}; "cpu:gloo,cuda:nccl" -> {"cpu", "cuda"})."""
    import torch.distributed as dist

    config = dist.get_backend_config(group)
    devices = set()
    for part in config.split(","):
        device, _, backend = part.partition(":")
        devices.update(["cpu", "cuda"] if not backend else [device.strip()])  # a bare name ("gloo") serves both
    return devices


def route(device_type: str, default_devices: set[str]) -> str:
    """Which twin of a group reduces a tensor on ``device_type``: "default" when the default
    backend can, else "host" (gloo). Pure: the whole routing policy."""
    return "default" if device_type in default_devices else "host"


class Collectives:
    """Every collective of one run (see the module docstring).

    Args:
        layout: the ``ProcessLayout``; None for a world-only instance (K = 1, W from the process
            group), as the run guard needs before the method is configured.
        timeout: the backend timeout of the groups built here (the default group's is set where it
            is initialised, ``runguard.take_run_lock``).
    """

    def __init__(self, layout: ProcessLayout | None = None, *, timeout: timedelta | None = None) -> None:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        if layout is None:
            layout = ProcessLayout(1, world, rank)
        if layout.world_size != world or layout.rank != rank:
            raise ValueError(f"layout for process {layout.rank} of {layout.world_size}, but this is process {rank} of {world}.")
        self.layout = layout
        self._groups: dict[tuple[str, str], Any] = {}
        self._default_devices: set[str] = set()
        if world == 1:
            return
        self._default_devices = backend_devices()
        need_host = "cpu" not in self._default_devices
        kwargs = {"timeout": timeout} if timeout is not None else {}
        self._groups[("world", "default")] = None  # the default group
        if need_host:
            self._groups[("world", "host")] = _world_host_group(kwargs)
        for over in ("data", "merge"):
            all_ranks = layout.all_ranks(over)
            if len(all_ranks) == 1:  # the whole world (or every group a single process)
                if len(all_ranks[0]) == world:
                    self._groups[(over, "default")] = None
                    if need_host:
                        self._groups[(over, "host")] = self._groups[("world", "host")]
                continue
            mine = layout.ranks(over)
            if len(mine) == 1:
                continue  # every group of this kind is one process: nothing to build
            for twin, backend in (("default", None), ("host", "gloo")) if need_host else (("default", None),):
                for ranks in all_ranks:  # every process enters every new_group, in the same order
                    group = dist.new_group(ranks=ranks, backend=backend, **kwargs)
                    if ranks == mine:
                        self._groups[(over, twin)] = group

    # -- sizes ----------------------------------------------------------------------------------

    def size(self, over: str = "world") -> int:
        """Processes in this process's group ``over``."""
        return len(self.layout.ranks(over))

    # -- groups ---------------------------------------------------------------------------------

    def group(self, over: str, device: torch.device | str) -> Any:
        """The process group that reduces tensors on ``device`` among this process's group
        ``over`` (None: the default group), e.g. for ``DistributedDataParallel(process_group=...)``."""
        device_type = torch.device(device).type
        twin = route(device_type, self._default_devices)
        if (over, twin) not in self._groups:
            raise RuntimeError(f"no '{over}' group with more than one process here ({self.layout}).")
        return self._groups[(over, twin)]

    # -- collectives ----------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, *, over: str = "world", op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` in place over the group ``over`` ("sum", "max" or "min"); returns it."""
        if op not in _OPS:
            raise ValueError(f"op must be one of {_OPS}, got {op!r}.")
        if self.size(over) == 1:
            return tensor
        import torch.distributed as dist

        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        dist.all_reduce(tensor, op=reduce_op, group=self.group(over, tensor.device))
        return tensor

    def all_gather(self, tensor: torch.Tensor, *, over: str = "world") -> torch.Tensor:
        """Every process's ``tensor`` (same shape everywhere) concatenated along dim 0 in rank order."""
        n = self.size(over)
        if n == 1:
            return tensor
        import torch.distributed as dist

        out = torch.empty((n * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        dist.all_gather_into_tensor(out, tensor.contiguous(), group=self.group(over, tensor.device))
        return out

    def barrier(self) -> None:
        """Every process of the world reaches this point (over the host group where there is one:
        it needs no device)."""
        if self.layout.world_size == 1:
            return
        import torch.distributed as dist

        dist.barrier(group=self._groups.get(("world", "host")))

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """Process 0 runs the block first, the others after it (e.g. one process fills a
        download or dataset cache that the others then read), as accelerate's context of that name."""
        if self.layout.rank != 0:
            self.barrier()
        yield
        if self.layout.rank == 0:
            self.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of process ``src`` on every process (picklable plain data: only objects this
        program built are sent, never a file's contents)."""
        if self.layout.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self._groups.get(("world", "host")),
                                   device=None if ("world", "host") in self._groups else _object_device(self._default_devices))
        return box[0]


# The host (gloo) twin of the default group, one per process group: built once, by every process at
# the same point (the first Collectives), and shared by every later Collectives of the run.
_WORLD_HOST: dict[int, Any] = {}


def _world_host_group(kwargs: dict[str, Any]) -> Any:
    import torch.distributed as dist

    key = id(dist.group.WORLD)
    if key not in _WORLD_HOST:
        _WORLD_HOST.clear()  # a new default group: the old twin died with the old one
        _WORLD_HOST[key] = dist.new_group(backend="gloo", **kwargs)
    return _WORLD_HOST[key]


def _object_device(default_devices: set[str]) -> torch.device | None:
    """Where the default backend moves pickled objects (NCCL: the current CUDA device)."""
    if "cpu" in default_devices:
        return torch.device("cpu")
    if "cuda" in default_devices and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


DEFAULT_TIMEOUT_SECONDS = 300.0


def add_arguments(parser) -> None:
    """The launch flags both recipes share."""
    parser.add_argument("--collective_timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS,
                        help="Seconds a process waits in a collective (a merge, a gradient all-reduce, a sync) for the others "
                             "before the run stops with one line naming the step and the newest checkpoint: bounds a hang when "
                             "a node stops answering (the backends' own defaults are 10-30 minutes).")


BACKSTOP_SECONDS = 60.0


def timeout(seconds: float | None) -> timedelta | None:
    """The backends' timeout for ``--collective_timeout`` (``timeout=`` of ``init_process_group`` /
    ``new_group``): a minute longer, so that inside the loop the run's own stall watch
    (``stopping.StallWatch``) speaks first with its one line, and NCCL's watchdog, which ends a
    process without one, only backs it up (e.g. in a checkpoint's barrier)."""
    if seconds is None:
        return None
    if not seconds > 0:
        raise ValueError(f"--collective_timeout must be > 0 seconds, got {seconds:g}.")
    return timedelta(seconds=seconds + BACKSTOP_SECONDS)


def refuse_sharded_engines(accelerator: Any) -> None:
    """One line, before anything loads, for DeepSpeed / FSDP / Megatron launches: they shard the
    weights and optimizer over processes, while a proxy is a whole copy of the trainable weights
    that merges average; proxies already spread over processes (see the module docstring)."""
    kind = str(getattr(getattr(accelerator, "distributed_type", None), "value", accelerator.distributed_type)).upper()
    for engine in ("DEEPSPEED", "FSDP", "MEGATRON_LM"):
        if engine in kind:
            raise ValueError(
                f"accelerate is configured for {engine.replace('_', '-')}, which sd_memfree does not support (each proxy is a whole "
                "copy of the trainable weights, merged by averaging); run `accelerate config` and choose multi-GPU (DDP), or use "
                "--use_lora / --gradient_checkpointing / --mixed_precision to fit memory.")
