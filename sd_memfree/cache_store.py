"""A folder of content-addressed safetensors files: the on-disk half of the encoder caches.

Invariants:
- Files are safetensors (never pickle). Each file's metadata holds the SHA-256 of its tensors'
  bytes; ``read`` recomputes it, so a truncated or bit-flipped file is reported as corrupt (None)
  instead of being trained on.
- ``write`` is atomic: the file is written under a unique temporary name in the same folder and
  renamed into place with ``os.replace``. Two processes (or two runs) writing the same entry at
  once write identical bytes, so whichever rename lands last leaves a complete, correct file:
  no lock is needed, and a reader sees either no file or a whole one.
- Entry names are hashes of everything the content depends on (``digest``), so a changed model,
  setting or image reads a different file: nothing is ever invalidated in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import torch

CACHE_ENV = "SD_MEMFREE_CACHE"  # overrides the default root, as HF_HOME does for huggingface_hub


def default_root() -> Path:
    """``$SD_MEMFREE_CACHE``, else ``sd-memfree`` beside Hugging Face's own caches
    (``$HF_HOME``, by default ``~/.cache/huggingface``), so the usual cache clean-ups find it."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME).expanduser() / "sd-memfree"


def digest(*parts) -> str:
    """SHA-256 (hex) of ``parts``: str, bytes, or JSON-able values, each length-prefixed so that
    ("ab", "c") and ("a", "bc") differ."""
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else part.encode() if isinstance(part, str) else json.dumps(part, sort_keys=True).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes of every tensor, in name
    order): the identity of a frozen encoder. Fine-tuned, re-downloaded or re-cast weights differ."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class CacheStore:
    """Entries ``name -> {tensor name: CPU tensor}`` under ``folder`` (two-level fan-out by name).

    Args:
        folder: the store's folder; created on the first write.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        return self.folder / name[:2] / f"{name}.safetensors"

    def write(self, name: str, tensors: dict[str, torch.Tensor]) -> int:
        """Write one entry atomically; returns its size in bytes."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            save_file(tensors, str(tmp), metadata={"sha256": _tensors_digest(tensors)})
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target.stat().st_size

    def read(self, name: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None if it is missing or corrupt (see ``status``)."""
        entry, _ = self.status(name)
        return entry

    def status(self, name: str) -> tuple[dict[str, torch.Tensor] | None, str]:
        """``(tensors, "ok")``, ``(None, "missing")`` or ``(None, "corrupt: <why>")``."""
        from safetensors import safe_open

        path = self.path(name)
        if not path.exists():
            return None, "missing"
        try:
            with safe_open(str(path), framework="pt") as f:
                expected = (f.metadata() or {}).get("sha256")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for bad headers and short files
            return None, f"corrupt: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if expected is None or expected != _tensors_digest(tensors):
            return None, "corrupt: its contents do not match the checksum it was written with"
        return tensors, "ok"

    def load(self, name: str) -> dict[str, torch.Tensor]:
        """An entry that must be there (the cache was built before training): one-line error otherwise."""
        tensors, status = self.status(name)
        if tensors is None:
            raise RuntimeError(f"cache file {self.path(name)} is {status} (removed or damaged during the run); "
                               "start the run again: the cache rebuilds what is missing.")
        return tensors
