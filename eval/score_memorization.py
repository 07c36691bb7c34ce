"""Score a Stable Diffusion model's memorization of its training set (see docs/scoring.md)."""

from sd_memfree.scoring.run import main, parse_args

if __name__ == "__main__":
    main(parse_args())
