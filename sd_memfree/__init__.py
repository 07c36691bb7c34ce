"""sd_memfree: fine-tune Stable Diffusion without reproducing training images (IET-AGC / IET-AGC+)."""

__version__ = "0.1.0"
