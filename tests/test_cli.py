"""The ``sd-memfree`` console command: subcommands write what they say, offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hub_fakes import RecordingApi
from sd_memfree import cli


def test_make_tiny_dataset_writes_imagefolder_with_duplicates(tmp_path):
    """4 distinct images, half duplicated 3 times in total: 2*3 + 2*1 = 8 rows."""
    cli.main(["make-tiny-dataset", str(tmp_path / "d"), "--num_images", "4", "--size", "16",
              "--duplicate_fraction", "0.5", "--duplicate_times", "3"])
    rows = [json.loads(line) for line in (tmp_path / "d" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert len({r["text"] for r in rows}) == 4
    assert all((tmp_path / "d" / r["file_name"]).exists() for r in rows)
    dup = [r for r in rows if r["file_name"].startswith("00000")]
    assert len(dup) == 3 and len({(tmp_path / "d" / r["file_name"]).read_bytes() for r in dup}) == 1


def test_make_tiny_dataset_rejects_bad_fraction(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["make-tiny-dataset", str(tmp_path / "d"), "--duplicate_fraction", "1.5"])
    assert "--duplicate_fraction" in capsys.readouterr().err


def test_make_tiny_model_loads_like_a_hub_checkpoint(tmp_path):
    from diffusers import StableDiffusionPipeline

    cli.main(["make-tiny-model", str(tmp_path / "m")])
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "m" / sub).is_dir()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "m")
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]  # real CLIP ids


def test_unknown_command_prints_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["nope"])
    assert exc.value.code == 2
    assert "make-tiny-model" in capsys.readouterr().out


def test_library_never_imports_recipes():
    """Only the launcher (cli.py) names the recipe packages, and only as strings."""
    root = Path(cli.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "cli.py" and any(s in p.read_text() for s in ("import train_scripts", "from train_scripts", "from eval",
                                                                           "import eval", "recipes import", "sd_memfree.recipes",
                                                                           "from .recipes", "from . import recipes"))]
    assert offenders == []


def test_library_never_imports_the_testing_scaffolding():
    """Tiny models and stand-in weights (sd_memfree.testing) serve tests, the demo and benchmarks:
    only the launcher's make-tiny-* commands import them, never a library module."""
    root = Path(cli.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "cli.py" and p.parent.name != "testing" and "testing" in p.read_text()
                 and any(s in p.read_text() for s in ("from .testing", "from ..testing", "sd_memfree.testing", "from . import testing"))]
    assert offenders == []
    assert not (root / "tiny.py").exists() and not (root / "scoring" / "standin.py").exists()


def test_card_states_memorization_scores_and_pushes(tmp_path, monkeypatch):
    """`sd-memfree card` rewrites the card with the scorer's metrics and uploads the folder."""
    from sd_memfree import hub
    from sd_memfree.config import MemFreeConfig

    model = tmp_path / "sd-private"
    model.mkdir()
    (model / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (model / "train_args.json").write_text(json.dumps({"pretrained_model_name_or_path": "stabilityai/stable-diffusion-2-1-base",
                                                       "use_lora": True, "learning_rate": 1e-4, "train_data_dir": "./imgs"}))
    MemFreeConfig(num_shards=4, agc_ratio=1.25).save_json(model / "memfree_config.json")
    (tmp_path / "metrics.json").write_text(json.dumps({"sim_95pc": 0.4321, "frac_gt_0.5": 0.0125}))
    for stray in ("report.html", "per_image.jsonl", "metrics.json", "model_card_snippet.md", "generated/00000.png", "00003.png", "memfree_state.json"):
        (model / stray).parent.mkdir(exist_ok=True)
        (model / stray).write_text("x")  # a scorer run with --out inside the model folder, per-image files
    api = RecordingApi()
    monkeypatch.setattr(hub, "HfApi", api)
    cli.main(["card", str(model), "--metrics", str(tmp_path / "metrics.json"), "--push_to_hub", "--hub_model_id", "me/sd-private",
              "--hub_token", "hf_FAKEtoken"])
    card = (model / "README.md").read_text()
    assert "0.4321" in card and "lora" in card
    assert api.calls[1][1]["repo_id"] == "me/sd-private" and api.tokens[-1] == "hf_FAKEtoken"
    assert api.uploads == [["README.md", "memfree_config.json", "pytorch_lora_weights.safetensors"]]
    assert "./imgs" not in card and "`imgs` (a local image folder)" in card


def test_recipes_resolve_installed_first_then_a_checkout(monkeypatch):
    """`sd-memfree train` imports sd_memfree.recipes.<name> (an install); a source checkout that is
    not installed falls back to train_scripts.<name>; neither is one line naming the fix; a recipe
    that is there but misses a dependency raises that error, not a fallback."""
    modules = {"sd_memfree.recipes.train_sd_ietagc": "installed", "train_scripts.train_sd_ietagc": "checkout"}
    missing: set[str] = set()

    def fake_import(name):
        top = name.rsplit(".", 1)[0]
        if top in missing:
            raise ModuleNotFoundError(f"No module named {top!r}", name=top)
        return modules[name]

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    assert cli._import_recipe("train_sd_ietagc") == "installed"
    missing.add("sd_memfree.recipes")
    assert cli._import_recipe("train_sd_ietagc") == "checkout"
    missing.add("train_scripts")
    with pytest.raises(SystemExit, match="recipe train_sd_ietagc is not installed.*pip install"):
        cli._import_recipe("train_sd_ietagc")

    def broken_recipe(name):
        raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")

    monkeypatch.setattr(cli.importlib, "import_module", broken_recipe)
    with pytest.raises(ModuleNotFoundError, match="diffusers"):
        cli._import_recipe("train_sd_ietagc")
