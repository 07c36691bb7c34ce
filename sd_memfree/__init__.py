"""sd_memfree: fine-tune Stable Diffusion without reproducing training images (IET-AGC / IET-AGC+).

The plugin object is ``sd_memfree.MemFree`` (docs/plugin.md), configured by
``sd_memfree.MemFreeConfig``; both are imported on first use, so ``import sd_memfree`` stays light.
"""

__version__ = "0.1.0"

__all__ = ["MemFree", "MemFreeConfig", "StepEvents"]


def __getattr__(name: str):
    if name in ("MemFree", "StepEvents"):
        from . import memfree

        return getattr(memfree, name)
    if name == "MemFreeConfig":
        from .config import MemFreeConfig

        return MemFreeConfig
    raise AttributeError(f"module 'sd_memfree' has no attribute {name!r}")
