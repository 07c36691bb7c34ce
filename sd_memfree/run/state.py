"""Per-process training state for checkpoints: every stateful object plus the RNG streams.

Why not only ``accelerator.save_state``: it writes the optimizer and custom objects from the
main process alone, but with shard proxies spread over processes every process holds different
optimizer states, loss banks and live proxies. Each process therefore writes its own
``state_rank{r}.json`` and ``state_rank{r}.safetensors``; a resume needs the same number of
processes.

Why not pickle (``torch.save``): loading a pickle runs whatever code the file names, so a
checkpoint received from someone else (or planted in a shared folder) would run code on resume.
State is split into tensors, stored with safetensors (raw buffers, no code), and everything else
(numbers, strings, lists, tuples, dicts with any JSON-able keys, small NumPy arrays), stored as
JSON with a few tagged objects (``{"__tensor__": name}``, ``{"__tuple__": [...]}``,
``{"__items__": [[key, value], ...]}`` for dicts whose keys are not plain strings,
``{"__ndarray__": [...], "dtype": ...}``, ``{"__float__": "inf"}``). An object whose state holds
anything else cannot be checkpointed (``TypeError`` at save, naming where).

Invariants:
- ``save_process_state`` followed by ``load_process_state`` restores every object's
  ``state_dict()`` (tensors bit for bit, dict key types, tuples vs lists) and the Python, NumPy
  and torch (CPU and CUDA) RNG states exactly.
- Loading never unpickles: only ``json`` and ``safetensors`` read the files. A folder holding
  only the old pickle format (``state_rank{r}.pt``) is refused with one line.
- Files are written to the given (temporary) checkpoint folder only; making the folder visible
  as a complete checkpoint is ``checkpointing.atomic_checkpoint_dir``'s job.
- Nothing non-finite is saved: ``save_process_state`` checks every floating tensor of the state
  (inactive proxies' stashed optimizer states, paused weights, the running sum, loss banks, EMA,
  and what ``Slimmed`` leaves to the model folders) with one fused reduction per dtype, agrees on
  the outcome with the other processes, and raises ``NonFiniteState`` before writing anything.
- Loading a damaged or forged state (a FIFO, JSON of another shape or nested too deep, a bad
  safetensors header, a counter that is not a count, a bad RNG state, tensors that do not fit)
  raises one ``ValueError`` line, never a traceback from deep inside torch or json.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..safeio import UnsafeFile, check_regular_file, read_json

STATE_FORMAT = "sd_memfree-state-1"
_TAGS = ("__tensor__", "__tuple__", "__items__", "__ndarray__", "__float__")


def state_files(folder: str | Path, rank: int) -> tuple[Path, Path]:
    """The JSON and safetensors files process ``rank`` writes in a checkpoint folder."""
    folder = Path(folder)
    return folder / f"state_rank{rank}.json", folder / f"state_rank{rank}.safetensors"


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be read as what it should be; the message is the one line."""


class NonFiniteState(ValueError):
    """The state a checkpoint would hold has NaN/inf tensors; nothing was written.

    Attributes:
        where: the state paths of the non-finite tensors on this process (empty when only another
            process found some).
    """

    def __init__(self, message: str, where: list[str]) -> None:
        super().__init__(message)
        self.where = where


def _nonfinite(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating tensors holding NaN/inf: one fused max-abs reduction per dtype and
    device (``_foreach_norm`` with ``ord=inf`` is inf or NaN exactly when an element is, and
    cannot overflow on large finite values), then one host read per group."""
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, t in named:
        if (t.is_floating_point() or t.is_complex()) and t.numel():
            groups.setdefault((t.dtype, t.device), []).append((name, t.detach()))
    bad = []
    for items in groups.values():
        norms = torch._foreach_norm([t for _, t in items], ord=float("inf"))
        flags = ~torch.isfinite(torch.stack(norms))
        if bool(flags.any()):
            bad += [name for (name, _), f in zip(items, flags.tolist()) if f]
    return bad


def _tensors_in(obj: Any, where: str) -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a nested state (dicts, lists, tuples) with its path."""
    if isinstance(obj, torch.Tensor):
        return [(where, obj)]
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in _tensors_in(v, f"{where}.{k}")]
    if isinstance(obj, (list, tuple)):
        return [t for i, v in enumerate(obj) for t in _tensors_in(v, f"{where}[{i}]")]
    return []


def _agree_any(flag: bool, world_size: int) -> bool:
    """``flag`` ORed over processes (every process calls ``save_process_state`` at the same
    point, so one all-reduce keeps them together: none waits forever on a save another
    abandoned). A host tensor: ``Collectives`` sends it to the host group under NCCL."""
    import torch.distributed as dist

    from ..collectives import Collectives

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return flag
    return bool(Collectives().all_reduce(torch.tensor([int(flag)]), op="max").item())


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        raise ValueError("the RNG state lacks python/numpy/torch entries")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Encoder:
    """Turns a state tree into JSON-able data plus a flat ``{name: tensor}`` for safetensors."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.where: dict[str, str] = {}  # tensor name -> its path in the state, for messages
        self._storages: set[int] = set()

    def tensor(self, t: torch.Tensor, where: str = "") -> dict[str, str]:
        t = t.detach().to("cpu")
        # safetensors refuses two entries over one storage (views of one buffer): copy the later ones.
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr in self._storages or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        elif ptr is not None:
            self._storages.add(ptr)
        name = str(len(self.tensors))
        self.tensors[name] = t
        self.where[name] = where
        return {"__tensor__": name}

    def __call__(self, obj: Any, where: str) -> Any:
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, where)
        if isinstance(obj, np.ndarray):
            return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
        if isinstance(obj, np.generic):
            return self(obj.item(), where)
        if isinstance(obj, tuple):
            return {"__tuple__": [self(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: self(v, f"{where}.{k}") for k, v in obj.items()}
            return {"__items__": [[self(k, where), self(v, f"{where}.{k}")] for k, v in obj.items()]}
        raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {where}: state may hold only tensors, "
                        "numbers, strings, lists, tuples, dicts and NumPy arrays")


class _TensorFile:
    """A safetensors handle with its names as a set (a checkpoint holds thousands of tensors)."""

    def __init__(self, handle: Any) -> None:
        self.get_tensor = handle.get_tensor
        self.names = set(handle.keys())


def _decode(obj: Any, tensors: Any, where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    tag = next((t for t in _TAGS if t in obj), None)
    if tag is None:
        return {k: _decode(v, tensors, where) for k, v in obj.items()}
    if tag == "__tensor__":
        if obj["__tensor__"] not in tensors.names:
            raise ValueError(f"{where} names tensor {obj['__tensor__']!r} that its safetensors file lacks; the checkpoint is damaged")
        return tensors.get_tensor(obj["__tensor__"])
    if tag == "__tuple__":
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if tag == "__items__":
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj["__items__"]}
    if tag == "__ndarray__":
        return np.array(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
    return float(obj["__float__"])


def save_process_state(folder: str | Path, rank: int, world_size: int, objects: dict[str, Any], extra: dict | None = None) -> Path:
    """Write ``{name: obj.state_dict()}`` of this process, its RNG states and ``extra`` (plain data).

    Returns:
        The JSON file written (its tensors are in the ``.safetensors`` file beside it).

    Raises:
        TypeError: some state holds an object that is neither a tensor nor plain data.
        NonFiniteState: a floating tensor of the state (or one ``Slimmed`` leaves to the model
            folders) holds NaN/inf on this or another process; no file was written.
    """
    from safetensors.torch import save_file

    encode = _Encoder()
    payload = {
        "format": STATE_FORMAT,
        "world_size": world_size,
        "objects": {name: encode(obj.state_dict(), name) for name, obj in objects.items() if obj is not None},
        "rng": encode(_rng_state(), "rng"),
        "extra": encode(extra or {}, "extra"),
    }
    # What the checkpoint holds beside the state files (the model folders) is checked too.
    omitted = [t for name, obj in objects.items() if isinstance(obj, Slimmed) for t in _tensors_in(obj.omitted_state, name)]
    bad = _nonfinite([(encode.where[n], t) for n, t in encode.tensors.items()] + omitted)
    if _agree_any(bool(bad), world_size):
        where = f"in {len(bad)} tensor(s): {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}" if bad else "on another process"
        raise NonFiniteState(f"the state of the checkpoint holds NaN/inf {where}", bad)
    json_path, tensor_path = state_files(folder, rank)
    save_file(encode.tensors, str(tensor_path), metadata={"format": STATE_FORMAT})
    json_path.write_text(json.dumps(payload, allow_nan=False))
    return json_path


def read_process_state(folder: str | Path, rank: int) -> dict:
    """Read (without pickle) what ``save_process_state`` wrote: ``world_size``, ``objects``, ``rng``, ``extra``.

    Raises:
        ValueError: the files are missing, in the old pickle format, or damaged.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    json_path, tensor_path = state_files(folder, rank)
    if not json_path.exists():
        if (folder / f"state_rank{rank}.pt").exists():
            raise ValueError(f"checkpoint {folder} holds state_rank{rank}.pt, the pickle format of older sd_memfree versions, "
                             "which is never loaded (unpickling can run code); resume from a newer checkpoint or start a new --output_dir.")
        raise ValueError(f"{json_path} is missing: the checkpoint was written by fewer processes; resume with the same number of processes.")
    fix = "resume from another checkpoint."
    payload = read_json(json_path, fix)
    check_regular_file(tensor_path, fix)
    try:
        if payload.get("format") != STATE_FORMAT:
            raise ValueError(f"format {payload.get('format')!r}, expected {STATE_FORMAT!r}")
        with safe_open(str(tensor_path), framework="pt", device="cpu") as handle:
            tensors = _TensorFile(handle)
            state = {key: _decode(payload[key], tensors, key) for key in ("world_size", "objects", "rng", "extra")}
        if type(state["world_size"]) is not int or not isinstance(state["objects"], dict):
            raise ValueError("world_size or objects of the wrong type")
        return state
    except (OSError, KeyError, ValueError, TypeError, AttributeError, RecursionError, SafetensorError) as e:
        raise ValueError(f"checkpoint state {json_path} is damaged or not sd_memfree state ({e}); resume from another checkpoint.") from None


def load_process_state(folder: str | Path, rank: int, world_size: int, objects: dict[str, Any]) -> dict:
    """Restore what ``save_process_state`` wrote; returns its ``extra``.

    Raises:
        ValueError: the checkpoint was written by a different number of processes, lacks an
            object this run needs (it was written with another configuration), or is not a
            readable sd_memfree state (e.g. the old pickle format).
    """
    payload = read_process_state(folder, rank)
    if payload["world_size"] != world_size:
        raise ValueError(
            f"checkpoint {folder} was written by {payload['world_size']} processes but this run has {world_size}; "
            f"resume with --num_processes {payload['world_size']}."
        )
    saved = payload["objects"]
    for name, obj in objects.items():
        if obj is None:
            continue
        if name not in saved:
            raise ValueError(f"checkpoint {folder} has no state for '{name}': it was written with another configuration; resume with the same flags.")
        try:
            obj.load_state_dict(saved[name])
        except (UnsafeFile, DamagedCheckpoint):
            raise  # already one line naming the file (the model folders Slimmed reads)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError, OverflowError) as e:
            # A forged or damaged state fails deep inside torch or our objects: one line instead.
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(f"checkpoint {folder}: the state of '{name}' does not fit this run ({first}); it is damaged, or "
                             "written with other flags: resume with the same flags or from another checkpoint.") from None
    try:
        _set_rng_state(payload["rng"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"checkpoint {folder}: its RNG state is damaged ({first}); resume from another checkpoint.") from None
    return payload["extra"]


class Slimmed:
    """Checkpoints a stateful object without the entries the checkpoint holds elsewhere (the model
    folder written beside the state) or that the rest implies (an all-zero running sum).

    Why: a full fine-tuning checkpoint of SD is mostly copies of 860M float32 values; writing the
    model folder *and* the same values in the state would add 3.4 GB per copy (docs/design.md,
    "Checkpoint size").

    Args:
        obj: the stateful object.
        drop: given ``obj.state_dict()``, the keys to leave out.
        fill: given the keys left out, their values (called on load, from the checkpoint's other files).

    Invariant: ``load_state_dict(state_dict())`` gives ``obj`` the state it would get from
    ``obj.state_dict()`` as long as ``fill`` returns what ``drop`` left out.
    """

    def __init__(self, obj: Any, drop, fill):
        self.obj, self.drop, self.fill = obj, drop, fill
        self.omitted_state: dict[str, Any] = {}  # what the last state_dict() left out (references), checked for NaN/inf

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.obj.state_dict())
        omitted = [k for k in self.drop(state)]
        self.omitted_state = {k: state[k] for k in omitted}
        return {"state": {k: v for k, v in state.items() if k not in omitted}, "omitted": omitted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        full = dict(state["state"])
        if state["omitted"]:
            full.update(self.fill(list(state["omitted"])))
        self.obj.load_state_dict(full)


class TrainableWeights:
    """``state_dict`` view over the trainable tensors of a module (LoRA: only the adapters)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        # References, as torch's state_dict: the checkpoint writer copies to the file, not to memory.
        return {n: p.detach() for n, p in self.module.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        if set(params) != set(state):
            raise ValueError("checkpoint trainable tensors do not match this model (full vs LoRA, or another --rank); resume with the same flags.")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n].to(p.device, p.dtype))


class Counters:
    """Plain integers the loop needs after a resume (steps, micro-steps, sampler origin, ...)."""

    def __init__(self, **values: int):
        self.__dict__["values"] = dict(values)

    def __getattr__(self, name: str) -> int:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: int) -> None:
        self.__dict__["values"][name] = value

    def state_dict(self) -> dict[str, int]:
        return dict(self.values)

    # A count beyond 2**53 cannot come from a run (nor survive a float): it is forged or damaged.
    MAX_COUNT = 2 ** 53

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Take the saved counts; every one must be a known name holding a count in [0, 2**53]
        (a name the state lacks keeps its value: states of earlier versions had fewer counters;
        ``startpoint.check_resumed_counters`` then holds the step against the checkpoint's marker).

        Raises:
            ValueError: an unknown name, or a value that is not such a count.
        """
        if not isinstance(state, dict) or not set(state) <= set(self.values):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"counters {got} are not this run's {sorted(self.values)}")
        for name, value in state.items():
            if type(value) is not int or not 0 <= value <= self.MAX_COUNT:
                raise ValueError(f"counters.{name} = {value!r} is not a count")
        self.values.update(state)


class ProxyGenerators:
    """One RNG stream per proxy for VAE sampling, noise and timesteps.

    Why: a proxy must draw the same noise whether it takes turns with others in one process or
    trains alone on its own process, so the stream belongs to the proxy, not to the process.
    """

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __getitem__(self, k: int) -> torch.Generator:
        return self.generators[k]

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {"states": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict[str, list[torch.Tensor]]) -> None:
        if len(state["states"]) != len(self.generators):
            raise ValueError("checkpoint has RNG streams for another number of proxies; resume with the same --num_shards.")
        for g, st in zip(self.generators, state["states"]):
            g.set_state(st)


def _model_folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers model folder (one or several ``*.safetensors`` shards)."""
    from safetensors.torch import load_file

    from safetensors import SafetensorError

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"checkpoint model folder {folder} holds no .safetensors weights; the checkpoint is damaged.")
    tensors: dict[str, torch.Tensor] = {}
    fix = "the checkpoint is damaged: resume from another checkpoint."
    for f in files:
        check_regular_file(f, fix)
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise DamagedCheckpoint(f"{f} is not a readable safetensors file ({first}); {fix}") from None
    return tensors


def weights_from_model_folders(stateful: dict[str, Any], module: torch.nn.Module, checkpoint: Any) -> None:
    """Full fine-tuning: let the checkpoint's ``unet/`` (and ``unet_ema/``) hold the weights that
    ``stateful['trainable']``, ``stateful['proxies']`` and ``stateful['ema']`` would write again.

    What is left out of the state files, and where a resume reads it back from:
    - ``trainable`` (the live weights): always without shards (``unet/`` is the live model); with
      shards only while the live weights equal the merged ones (between turns);
    - ``proxies``: ``merged`` (``unet/`` holds the last merge) and the running sum while it is all
      zeros (after a merge, before the next turn ends);
    - ``ema``: the shadow parameters (``unet_ema/``).

    Args:
        stateful: the name -> stateful object dict the checkpoint writes; wrapped in place.
        module: the (unwrapped) UNet whose parameters train.
        checkpoint: called on load, returns the checkpoint folder being resumed.
    """
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    all_names = [n for n, _ in module.named_parameters()]
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def folder_tensors(sub: str) -> dict[str, torch.Tensor]:
        if sub not in cache:
            cache[sub] = _model_folder_tensors(Path(checkpoint()) / sub)
        return cache[sub]

    def flat_merged() -> torch.Tensor:
        unet = folder_tensors("unet")
        return torch.cat([unet[n].reshape(-1).float() for n in names])

    proxies = stateful.get("proxies")

    def live_stored(state: dict[str, torch.Tensor]) -> list[str]:
        if proxies is None:
            return list(state)
        merged = proxies.state_dict()["merged"]
        offset = 0
        for n in names:
            live = state[n]
            view = merged[offset: offset + live.numel()].view(live.shape)
            offset += live.numel()
            if not torch.equal(live.to(view.device, view.dtype), view):
                return []
        return list(state)

    stateful["trainable"] = Slimmed(stateful["trainable"], drop=live_stored,
                                    fill=lambda keys: {k: folder_tensors("unet")[k] for k in keys})
    if proxies is not None:
        stateful["proxies"] = Slimmed(
            proxies, drop=lambda s: ["merged"] + (["running_sum"] if s["total_weight"] == 0 else []),
            fill=lambda keys: {"merged": flat_merged(), **({"running_sum": torch.zeros(sum(p.numel() for p in proxies.params))}
                                                           if "running_sum" in keys else {})})
    if stateful.get("ema") is not None:
        stateful["ema"] = Slimmed(stateful["ema"], drop=lambda s: ["shadow_params"],
                                  fill=lambda keys: {"shadow_params": [folder_tensors("unet_ema")[n] for n in all_names]})
