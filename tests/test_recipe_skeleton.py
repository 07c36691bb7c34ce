"""The recipe skeleton both training scripts share (sd_memfree/run/recipe_args.py, recipe_setup.py,
run_outputs.py, skipcounts.py): the same checks and outputs for both, no recipe importing the
other or the scorer, and the output writers' own guarantees, on hand-made inputs."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import REPO
from sd_memfree import hub
from sd_memfree.run import outputs as run_outputs
from sd_memfree.config import MemFreeConfig
from sd_memfree.run.recipe_args import public_args
from sd_memfree.run.recipe_setup import SD_SUBFOLDERS, check_model_folder
from sd_memfree.run.runguard import STAGING_DIR
from sd_memfree.run.stopping import RunStopped
from train_scripts import train_sd_ietagc as sd
from train_scripts import train_sdxl_ietagc as sdxl

RECIPES = {"sd": sd, "sdxl": sdxl}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (recipes import inside ``train``);
    relative imports resolved against the sd_memfree package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(["sd_memfree", *filter(None, [base])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def training_closure() -> set[str]:
    """The sd_memfree modules the two recipes reach through imports (transitively)."""
    todo = [REPO / "train_scripts" / "train_sd_ietagc.py", REPO / "train_scripts" / "train_sdxl_ietagc.py"]
    seen, modules = set(), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            if not name.startswith("sd_memfree"):
                continue
            modules.add(name)
            parts = name.split(".")
            for cut in (len(parts), len(parts) - 1):
                candidate = REPO.joinpath(*parts[:cut]).with_suffix(".py")
                if candidate.is_file():
                    todo.append(candidate)
                    break
    return modules


def test_training_imports_neither_the_scorer_nor_the_other_recipe():
    """Training writes its skip counts through sd_memfree.run.skipcounts; SDXL takes its shared helpers
    from the library, not from the SD script."""
    closure = training_closure()
    assert "sd_memfree.run.skipcounts" in closure and "sd_memfree.run.outputs" in closure  # the walk sees the lazy imports
    assert sorted(m for m in closure if m.startswith("sd_memfree.scoring")) == []
    assert not [m for m in imported_modules(REPO / "train_scripts" / "train_sdxl_ietagc.py") if "train_sd_ietagc" in m]


def test_recipes_name_no_staging_or_partial_file_of_their_own():
    """runguard removes what a failed final save leaves under its own names; a recipe that spelled
    them differently would leave litter behind."""
    for script in ("train_sd_ietagc.py", "train_sdxl_ietagc.py"):
        text = (REPO / "train_scripts" / script).read_text()
        assert STAGING_DIR not in text and ".partial" not in text, script  # ".partial" covers memfree_state.json.partial


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_both_recipes_take_and_check_the_shared_flags(recipe, capsys):
    base = ["--pretrained_model_name_or_path=x", "--train_data_dir=y"]
    args = recipe.parse_args([*base, "--push_to_hub", "--hub_upload_memfree_state", "--hub_token=hf_secret"])
    assert args.hub_upload_memfree_state and isinstance(args.memfree, MemFreeConfig)
    assert "hub_token" not in public_args(args) and "hf_secret" not in json.dumps(public_args(args))
    for bad, message in ((["--hub_upload_memfree_state"], "--hub_upload_memfree_state only applies with --push_to_hub"),
                         (["--hub_token=t", "--report_to=wandb"], "would expose the token"),
                         (["--use_ema", "--use_lora"], "--use_ema applies to full fine-tuning only"),
                         (["--use_ema", "--num_shards=2"], "--use_ema with --num_shards > 1 is not supported"),
                         (["--gradient_accumulation_steps=0"], "--gradient_accumulation_steps must be >= 1, got 0")):
        with pytest.raises(SystemExit) as e:
            recipe.parse_args([*base, *bad])
        assert e.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit):
        recipe.parse_args(["--pretrained_model_name_or_path=x"])
    assert "no training data given" in capsys.readouterr().err


def test_model_folder_check_names_the_missing_parts(tmp_path):
    (tmp_path / "m" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"lacks the subfolder\(s\) vae, text_encoder, tokenizer, scheduler;"):
        check_model_folder(str(tmp_path / "m"), SD_SUBFOLDERS)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_folder(str(tmp_path / "nowhere"))
    check_model_folder("stabilityai/stable-diffusion-2-1-base")  # a Hub id: the Hub checks it


def test_run_config_holds_the_method_and_the_flags_without_secrets(tmp_path):
    config = MemFreeConfig(num_shards=2, merge_every=3)
    run_outputs.write_run_config(tmp_path, config, {"learning_rate": 0.5, "output_dir": "o"})
    assert json.loads((tmp_path / "train_args.json").read_text()) == {"learning_rate": 0.5, "output_dir": "o"}
    assert MemFreeConfig(**json.loads((tmp_path / "memfree_config.json").read_text())) == config


def test_memfree_state_leaves_out_skip_rates_and_no_partial_file(tmp_path):
    state = run_outputs.write_memfree_state(tmp_path, 12, 8, {"agc/skip_rate": 0.25, "merges": [4, 8], "shard_sizes": [6, 6]})
    assert state == {"num_samples": 12, "global_step": 8, "merges": [4, 8], "shard_sizes": [6, 6]}
    assert json.loads((tmp_path / "memfree_state.json").read_text()) == state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memfree_state.json"]


def test_staged_output_publishes_in_full_or_not_at_all(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "old").write_text("old model")
    with run_outputs.staged_final_output(tmp_path) as staging:
        assert staging == tmp_path / STAGING_DIR and not staging.exists()
        (staging / "unet").mkdir(parents=True)
        (staging / "unet" / "new").write_text("new model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"] and [p.name for p in (tmp_path / "unet").iterdir()] == ["new"]
    with pytest.raises(OSError):
        with run_outputs.staged_final_output(tmp_path) as staging:
            (staging / "unet").mkdir(parents=True)
            raise OSError("disk full")
    assert [p.name for p in (tmp_path / "unet").iterdir()] == ["new"]  # nothing half-written was published


def test_final_weights_check_names_the_newest_checkpoint():
    run_outputs.check_final_weights([torch.ones(2)], 3, "none was written", 1e-4)
    with pytest.raises(RunStopped) as e:
        run_outputs.check_final_weights([torch.ones(2), torch.tensor([float("nan")])], 3, "out/checkpoint-2", 1e-4)
    assert str(e.value) == ("the trained weights are NaN/inf after step 3: the final model was not saved (newest checkpoint: "
                            "out/checkpoint-2); resuming replays the same steps and would diverge again: start a new run in a new "
                            "--output_dir with a lower --learning_rate (now 0.0001), or check the data.")
    assert e.value.exit_code == 1


@pytest.mark.parametrize("include_state", [False, True])
def test_publish_writes_the_card_and_pushes_the_state_only_when_asked(tmp_path, monkeypatch, include_state):
    pushed = []
    monkeypatch.setattr(hub, "push_to_hub", lambda out, repo, token=None, include_memfree_state=False:
                        pushed.append((repo, token, include_memfree_state)) or repo)
    args = SimpleNamespace(hub_model_id="me/model", pretrained_model_name_or_path="base/model", use_lora=True, push_to_hub=False,
                           hub_token="hf_secret", hub_upload_memfree_state=include_state, dataset_name=None, train_data_dir="data",
                           learning_rate=1e-4, max_train_steps=8, train_batch_size=2, resolution=32, mixed_precision="no",
                           gradient_accumulation_steps=1, seed=0)
    assert run_outputs.publish_model(tmp_path, args, MemFreeConfig(), images=[]) == {}
    assert (tmp_path / "README.md").is_file() and "hf_secret" not in (tmp_path / "README.md").read_text() and pushed == []
    args.push_to_hub = True
    assert run_outputs.publish_model(tmp_path, args, MemFreeConfig(), images=[]) == {"hub_repo": "me/model"}
    assert pushed == [("me/model", "hf_secret", include_state)]
