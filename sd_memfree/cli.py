"""The ``sd-memfree`` console command.

Subcommands that run recipes (``train``, ``train-sdxl``, ``demo``) import them at call time from
``sd_memfree.recipes``: the repository's ``train_scripts/`` folder, installed under that name
(pyproject.toml's ``package-dir``), so an install adds no top-level package but ``sd_memfree``.
From a source checkout that is not installed (the repository root on ``sys.path``) they are
``train_scripts.<name>``. This launcher is the one place in ``sd_memfree`` that knows about recipes
(as torchtune's ``tune run`` does); library modules never import them.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _make_tiny_model(argv: list[str]) -> None:
    from sd_memfree.testing.tiny import make_tiny_model, make_tiny_sdxl_model

    p = argparse.ArgumentParser(prog="sd-memfree make-tiny-model", description="Write a tiny offline Stable-Diffusion-architecture pipeline folder.")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default="sd", choices=["sd", "sdxl"],
                   help="sd: StableDiffusionPipeline; sdxl: StableDiffusionXLPipeline (two text encoders, size and crop conditioning)")
    a = p.parse_args(argv)
    print((make_tiny_sdxl_model if a.arch == "sdxl" else make_tiny_model)(a.dir, seed=a.seed))


def _make_tiny_dataset(argv: list[str]) -> None:
    from sd_memfree.testing.tiny import IMAGE_KINDS, make_tiny_dataset

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


def _import_recipe(name: str):
    """The recipe module ``name``: installed as ``sd_memfree.recipes.<name>``, else (a source
    checkout on ``sys.path``, not installed) ``train_scripts.<name>``."""
    try:
        return importlib.import_module(f"sd_memfree.recipes.{name}")
    except ModuleNotFoundError as e:
        if e.name != "sd_memfree.recipes":
            raise  # the recipes are there and something they import is missing: say what
    try:
        return importlib.import_module(f"train_scripts.{name}")
    except ModuleNotFoundError as e:
        if e.name != "train_scripts":
            raise
    raise SystemExit(f"sd-memfree: the recipe {name} is not installed (no sd_memfree.recipes) and no train_scripts/ folder is "
                     "importable: reinstall sd-memfree (pip install sd-memfree, or pip install -e . in the repository).")


def _recipe(name: str, entry: str = "cli"):
    def run(argv: list[str]) -> None:
        getattr(_import_recipe(name), entry)(argv)

    return run


def _score(argv: list[str]) -> None:
    from sd_memfree.scoring import run

    run.cli(argv)


def _audit(argv: list[str]) -> None:
    from sd_memfree import audit

    audit.cli(argv)


def _card(argv: list[str]) -> None:
    """Rewrite a trained model's card with its memorization scores, optionally push it."""
    import json
    from pathlib import Path

    from sd_memfree import hub, monitor

    p = argparse.ArgumentParser(prog="sd-memfree card", description="Put the scorer's metrics into a trained model's card (and push).")
    p.add_argument("model_dir", help="the training script's --output_dir")
    p.add_argument("--metrics", required=True, help="metrics.json written by `sd-memfree score`")
    p.add_argument("--push_to_hub", action="store_true",
                   help="Upload the model, the card (and the images it shows) and memfree_config.json; nothing else in the folder.")
    p.add_argument("--hub_model_id", default=None)
    p.add_argument("--hub_token", default=None, help="Hub token (default: the stored `hf auth login`); never written anywhere.")
    p.add_argument("--hub_upload_memfree_state", action="store_true",
                   help="Also upload memfree_state.json (it lists the training samples AGC skipped most: kept local by default).")
    a = p.parse_args(argv)
    model_dir = Path(a.model_dir)
    needed = [model_dir / "train_args.json", model_dir / "memfree_config.json", Path(a.metrics)]
    missing = [str(f) for f in needed if not f.exists()]
    if missing:
        p.error(f"missing {', '.join(missing)}: pass a folder written by train_sd_ietagc.py and a metrics.json from `sd-memfree score`.")
    from PIL import Image

    train_args = json.loads(needed[0].read_text())
    images = [Image.open(f).copy() for f in sorted(model_dir.glob("image_*.png"))]  # keep the validation images
    repo_id = a.hub_model_id or train_args.get("hub_model_id") or model_dir.name
    hub.write_model_card(model_dir, repo_id=repo_id, base_model=train_args["pretrained_model_name_or_path"],
                         method_config=json.loads(needed[1].read_text()), training_args=train_args,
                         is_lora=bool(train_args.get("use_lora")), metrics=json.loads(needed[2].read_text()),
                         dataset=train_args.get("dataset_name") or train_args.get("train_data_dir"), images=images or None,
                         extra_sections=[monitor.card_section(model_dir)])  # the held-out curve, when training wrote one
    print(model_dir / "README.md")
    if a.push_to_hub:
        try:
            print(hub.push_to_hub(model_dir, repo_id, token=a.hub_token, include_memfree_state=a.hub_upload_memfree_state))
        except hub.HubError as e:
            p.error(str(e))


COMMANDS = {
    "make-tiny-model": (_make_tiny_model, "write a tiny offline SD (or --arch sdxl: SDXL) pipeline folder"),
    "make-tiny-dataset": (_make_tiny_dataset, "write a small captioned image set"),
    "train": (_recipe("train_sd_ietagc"), "run train_scripts/train_sd_ietagc.py (same flags)"),
    "train-sdxl": (_recipe("train_sdxl_ietagc"), "run train_scripts/train_sdxl_ietagc.py (same flags)"),
    "score": (_score, "score a model's memorization (docs/scoring.md; also eval/score_memorization.py in the repository)"),
    "audit": (_audit, "find duplicated images and captions in training data; a report and a deduplicated copy (before training)"),
    "card": (_card, "put memorization scores into a trained model's card (and --push_to_hub)"),
    "demo": (_recipe("demo"), "the embedded demo on the tiny model and data (CPU, minutes)"),
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
