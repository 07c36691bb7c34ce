"""Per-process training state for checkpoints: every stateful object plus the RNG streams.

Why not only ``accelerator.save_state``: it writes the optimizer and custom objects from the
main process alone, but with shard proxies spread over processes every process holds different
optimizer states, loss banks and live proxies. Each process therefore writes its own
``state_rank{r}.pt``; a resume needs the same number of processes.

Invariants:
- ``save_process_state`` followed by ``load_process_state`` restores every object's
  ``state_dict()`` and the Python, NumPy and torch (CPU and CUDA) RNG states exactly.
- Files are written to the given (temporary) checkpoint folder only; making the folder visible
  as a complete checkpoint is ``checkpointing.atomic_checkpoint_dir``'s job.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def state_file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"state_rank{rank}.pt"


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_process_state(folder: str | Path, rank: int, world_size: int, objects: dict[str, Any], extra: dict | None = None) -> Path:
    """Write ``{name: obj.state_dict()}`` of this process, its RNG states and ``extra`` (plain data)."""
    payload = {
        "world_size": world_size,
        "objects": {name: obj.state_dict() for name, obj in objects.items() if obj is not None},
        "rng": _rng_state(),
        "extra": extra or {},
    }
    path = state_file(folder, rank)
    torch.save(payload, path)
    return path


def load_process_state(folder: str | Path, rank: int, world_size: int, objects: dict[str, Any]) -> dict:
    """Restore what ``save_process_state`` wrote; returns its ``extra``.

    Raises:
        ValueError: the checkpoint was written by a different number of processes, or lacks an
            object this run needs (it was written with another configuration).
    """
    path = state_file(folder, rank)
    if not path.exists():
        raise ValueError(f"{path} is missing: the checkpoint was written by fewer processes; resume with the same number of processes.")
    payload = torch.load(path, map_location="cpu", weights_only=False)
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
        obj.load_state_dict(saved[name])
    _set_rng_state(payload["rng"])
    return payload["extra"]


class TrainableWeights:
    """``state_dict`` view over the trainable tensors of a module (LoRA: only the adapters)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.module.named_parameters() if p.requires_grad}

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

    def load_state_dict(self, state: dict[str, int]) -> None:
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
