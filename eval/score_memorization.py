"""Score a Stable Diffusion model's memorization of its training set (see docs/scoring.md)."""

from sd_memfree.scoring.run import cli, main, parse_args  # noqa: F401  (main, parse_args: in-process use)

if __name__ == "__main__":
    cli()
