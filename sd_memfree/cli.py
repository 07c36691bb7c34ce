"""The ``sd-memfree`` console command.

Subcommands that run recipes (``train``, ``demo``) import them from the installed
``train_scripts`` package at call time: this launcher is the one place in ``sd_memfree`` that
knows about recipes (as torchtune's ``tune run`` does); library modules never import them.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _make_tiny_model(argv: list[str]) -> None:
    from sd_memfree.tiny import make_tiny_model

    p = argparse.ArgumentParser(prog="sd-memfree make-tiny-model", description="Write a tiny offline Stable-Diffusion-architecture pipeline folder.")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(make_tiny_model(a.dir, seed=a.seed))


def _make_tiny_dataset(argv: list[str]) -> None:
    from sd_memfree.tiny import IMAGE_KINDS, make_tiny_dataset

    p = argparse.ArgumentParser(prog="sd-memfree make-tiny-dataset", description="Write a small captioned image set (imagefolder layout).")
    p.add_argument("dir")
    p.add_argument("--num_images", type=int, default=32, help="distinct images")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--duplicate_fraction", type=float, default=0.0, help="fraction of the distinct images that are duplicated")
    p.add_argument("--duplicate_times", type=int, default=1, help="total copies of each duplicated image")
    p.add_argument("--kind", default="shapes", choices=sorted(IMAGE_KINDS), help="procedural image family")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        print(make_tiny_dataset(a.dir, a.num_images, a.size, a.duplicate_fraction, a.duplicate_times, a.seed, kind=a.kind))
    except ValueError as e:
        p.error(str(e))


def _recipe(module: str, entry: str = "cli"):
    def run(argv: list[str]) -> None:
        getattr(importlib.import_module(module), entry)(argv)

    return run


def _score(argv: list[str]) -> None:
    from sd_memfree.scoring import run

    run.main(run.parse_args(argv))


COMMANDS = {
    "make-tiny-model": (_make_tiny_model, "write a tiny offline SD pipeline folder"),
    "make-tiny-dataset": (_make_tiny_dataset, "write a small captioned image set"),
    "train": (_recipe("train_scripts.train_sd_ietagc"), "run train_scripts/train_sd_ietagc.py (same flags)"),
    "score": (_score, "score a model's memorization (eval/score_memorization.py)"),
    "demo": (_recipe("train_scripts.demo"), "the embedded demo on the tiny model and data (CPU, minutes)"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<18} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: sd-memfree <command> [args]\n\ncommands:\n" + "\n".join(lines))
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    main()
