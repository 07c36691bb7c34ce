"""What a real (tiny) training run writes and uploads: no secret anywhere, an exact allow-list
upload, the Hub repo created before any model loads. The Hub API is faked (tests/hub_fakes.py)."""

from __future__ import annotations

import json
import re

import pytest
from diffusers import UNet2DConditionModel

from helpers import train_argv
from hub_fakes import RecordingApi
from sd_memfree import hub
from train_scripts import train_sd_ietagc as train
from train_scripts import train_sdxl_ietagc as train_sdxl

TOKEN = "hf_FAKEtokenDoNotLeak0123456789abcdef"


def argv(model, data, out, *extra, steps=4):
    """A run that checkpoints, logs to TensorBoard and pushes with a token on the command line."""
    return train_argv(model, data, out, "--push_to_hub", "--hub_model_id=tiny-private", f"--hub_token={TOKEN}", *extra,
                      steps=steps, checkpointing_steps=2, report_to="tensorboard")


def files_containing(root, needle: bytes) -> list[str]:
    """Every file under root (binary ones too: safetensors, TensorBoard events) holding needle."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes())


# Hand-written from the pipeline's parts (model_index.json of the tiny model, safety checker and
# feature extractor removed) and the LoRA weights file: model, card, its image, memfree_config.json.
FULL_UPLOAD = [
    "README.md", "image_0.png", "memfree_config.json", "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]
LORA_UPLOAD = ["README.md", "image_0.png", "memfree_config.json", "pytorch_lora_weights.safetensors"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_token_written_nowhere_and_upload_is_the_allow_list(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, lora):
    api = RecordingApi()
    monkeypatch.setattr(hub, "HfApi", api)
    out = tmp_path / "run"
    extra = ["--use_lora"] if lora else []
    summary = train.main(train.parse_args(argv(tiny_model_dir, tiny_data_dir, out, "--validation_prompt=a red ring",
                                                "--num_validation_images=1", "--logging_dir=tb", *extra)))
    assert summary["hub_repo"] == "someone/tiny-private"
    # the run wrote what a run writes: checkpoint, TensorBoard events in the custom folder, train_args.json
    assert (out / "checkpoint-2").is_dir() and list((out / "tb").rglob("events.out.tfevents.*"))
    assert (out / "train_args.json").exists() and (out / "memfree_state.json").exists()
    assert files_containing(out, TOKEN.encode()) == []
    assert files_containing(out, TOKEN.encode("utf-16-le")) == []
    # repo created first (on the main process, before training), then one upload of exactly the allow-list
    assert [c[0] for c in api.calls] == ["create_repo", "create_repo", "upload_folder"]
    assert api.calls[0][1] == "tiny-private" and api.calls[2][1]["repo_id"] == "someone/tiny-private"
    assert api.uploads == [LORA_UPLOAD if lora else FULL_UPLOAD]
    assert api.tokens[1:] == [TOKEN, TOKEN]  # the token reaches the Hub client and nothing else
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and str(tiny_model_dir) not in card and str(tiny_data_dir) not in card


@pytest.mark.parametrize("recipe", ["sd", "sdxl"])
def test_memfree_state_uploaded_only_on_request(tiny_model_dir, sdxl20, tiny_data_dir, tmp_path, monkeypatch, recipe):
    """Both recipes take --hub_upload_memfree_state and upload the same allow-list with it."""
    api = RecordingApi()
    monkeypatch.setattr(hub, "HfApi", api)
    script, model = (train, tiny_model_dir) if recipe == "sd" else (train_sdxl, sdxl20)
    script.main(script.parse_args(argv(model, tiny_data_dir, tmp_path / "run", "--use_lora", "--hub_upload_memfree_state",
                                       "--report_to=none", steps=2)))
    assert api.uploads == [["README.md", "memfree_config.json", "memfree_state.json", "pytorch_lora_weights.safetensors"]]
    assert json.loads((tmp_path / "run" / "train_args.json").read_text())["hub_upload_memfree_state"] is True


@pytest.mark.parametrize("recipe", ["sd", "sdxl"])
def test_bad_repo_fails_before_any_model_loads(tiny_model_dir, sdxl20, tiny_data_dir, tmp_path, monkeypatch, capsys, recipe):
    """The Hub refuses (bad token or id): one line, exit 2, before the UNet is loaded (both recipes)."""
    api = RecordingApi(fail=RuntimeError(f"401 Client Error: Unauthorized (token {TOKEN})\nInvalid credentials"))
    monkeypatch.setattr(hub, "HfApi", api)
    script, model = (train, tiny_model_dir) if recipe == "sd" else (train_sdxl, sdxl20)

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the Hub repo was checked")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_models)
    with pytest.raises(SystemExit) as exc:
        script.cli(argv(model, tiny_data_dir, tmp_path / "run", "--report_to=none"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(r"cannot create or reach the Hub repo 'tiny-private' .*hf auth login", err[-1]), err
    assert TOKEN not in "\n".join(err)
    assert api.calls == [("create_repo", "tiny-private", {"exist_ok": True})]


def test_invalid_repo_id_fails_at_start(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hub, "HfApi", RecordingApi())
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit):
        train.cli(argv(tiny_model_dir, tiny_data_dir, tmp_path / "run", "--report_to=none", "--hub_model_id=me/bad/id"))
    assert "--hub_model_id 'me/bad/id' is not a valid Hub repo id" in capsys.readouterr().err


@pytest.mark.parametrize("report_to", ["wandb", "all"])
def test_hub_token_with_wandb_is_refused(report_to, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--pretrained_model_name_or_path=x", "--train_data_dir=y", f"--report_to={report_to}", f"--hub_token={TOKEN}"])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--hub_token with --report_to=wandb would expose the token" in last and "hf auth login" in last
    assert train.parse_args(["--pretrained_model_name_or_path=x", "--train_data_dir=y", "--report_to=wandb"]).report_to == "wandb"


def test_memfree_state_flag_needs_push(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--pretrained_model_name_or_path=x", "--train_data_dir=y", "--hub_upload_memfree_state"])
    assert "--hub_upload_memfree_state only applies with --push_to_hub" in capsys.readouterr().err
