"""What the training script's checkpoints hold and when it refuses to resume (issues 9 and 10).

Each checkpoint holds the model in the final output's form (loadable with diffusers), the state
for an exact resume (JSON + safetensors, no pickle) and ``trajectory.json``; the last step is
checkpointed when it falls on --checkpointing_steps; other scripts' checkpoints are never
resumed or overwritten; a resume with other trajectory settings or data stops with one line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from train_scripts import train_sd_ietagc as train


class Hostile:
    """Unpickling this calls ``open(marker, "w")``: the file appears iff the pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def args(model, data, out, *extra, steps=4):
    return [
        f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={out}",
        "--resolution=32", "--train_batch_size=2", f"--max_train_steps={steps}", "--learning_rate=1e-3",
        "--lr_warmup_steps=0", "--seed=7", "--report_to=none", "--checkpointing_steps=1000000", *extra,
    ]


def run(argv):
    return train.main(train.parse_args(argv))


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        train.cli(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_checkpoints_load_with_diffusers_and_4_steps_resume_to_8(tiny_model_dir, tiny_data_dir, tmp_path):
    """LoRA, K=1. A 4-step run with --checkpointing_steps=2 leaves checkpoint-2 and checkpoint-4
    (the last step); each loads with pipe.load_lora_weights; checkpoint-4's LoRA equals the final
    output. Resuming 'latest' with --max_train_steps=8 equals an uninterrupted 8-step run, bit for bit."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    run(args(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--checkpointing_steps=2", steps=4))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    ckpt4 = out / "checkpoint-4"
    assert same(load_file(ckpt4 / "pytorch_lora_weights.safetensors"), load_file(out / "pytorch_lora_weights.safetensors"))
    assert not list(ckpt4.rglob("*.pt")) and not list(ckpt4.rglob("*.pkl")) and not list(ckpt4.rglob("*.bin"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    for step in (2, 4):
        pipe.load_lora_weights(str(out / f"checkpoint-{step}"), adapter_name=f"s{step}")
    assert set(pipe.get_list_adapters()["unet"]) == {"s2", "s4"}

    summary = run(args(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--checkpointing_steps=2", "--resume_from_checkpoint=latest", steps=8))
    assert summary["steps_this_run"] == 4
    straight = tmp_path / "straight"
    run(args(tiny_model_dir, tiny_data_dir, straight, "--use_lora", steps=8))
    assert same(load_file(out / "pytorch_lora_weights.safetensors"), load_file(straight / "pytorch_lora_weights.safetensors"))


def test_full_checkpoint_holds_unet_and_ema_loadable(tiny_model_dir, tiny_data_dir, tmp_path):
    """Full fine-tuning with EMA, K=1: checkpoint-2 (the last step) holds unet/ (the trained
    weights) and unet_ema/ (the EMA, which the final output holds), as upstream does."""
    from diffusers import UNet2DConditionModel

    out = tmp_path / "ema"
    run(args(tiny_model_dir, tiny_data_dir, out, "--use_ema", "--checkpointing_steps=2", steps=2))
    ckpt = out / "checkpoint-2"
    final = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    ema = UNet2DConditionModel.from_pretrained(ckpt, subfolder="unet_ema").state_dict()
    assert same({k: ema[k] for k in final}, final)
    live = UNet2DConditionModel.from_pretrained(ckpt, subfolder="unet").state_dict()
    base = load_file(Path(tiny_model_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    assert not same(live, base) and not same(live, final)  # trained, and not the EMA


def test_shard_checkpoint_holds_the_last_merge_not_the_live_proxy(tiny_model_dir, tiny_data_dir, tmp_path):
    """K=2, H=2: the first merge is at step 4; checkpoint-5 is taken while proxy 0 is one step
    into round 2. Its unet/ must equal the merge at step 4, i.e. the final output of a 4-step run
    (a complete round), not proxy 0's live weights."""
    from diffusers import UNet2DConditionModel

    method = ["--num_shards=2", "--merge_every=2"]
    run(args(tiny_model_dir, tiny_data_dir, tmp_path / "four", *method, steps=4))
    run(args(tiny_model_dir, tiny_data_dir, tmp_path / "six", *method, "--checkpointing_steps=5", steps=6))
    ckpt_unet = UNet2DConditionModel.from_pretrained(tmp_path / "six" / "checkpoint-5", subfolder="unet").state_dict()
    merged4 = load_file(tmp_path / "four" / "unet" / "diffusion_pytorch_model.safetensors")
    assert same({k: ckpt_unet[k] for k in merged4}, merged4)
    live = read_live_trainable(tmp_path / "six" / "checkpoint-5")
    assert any(not torch.equal(live[k], merged4[k]) for k in live)


def read_live_trainable(ckpt: Path) -> dict:
    from sd_memfree.state import read_process_state

    return read_process_state(ckpt, 0)["objects"]["trainable"]


def test_crafted_pickle_in_a_checkpoint_does_not_run(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """A checkpoint whose state is replaced by a pickle that creates a file when loaded (what
    torch.load(weights_only=False) did on resume): the resume stops with one line, nothing runs."""
    out = tmp_path / "victim"
    run(args(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--checkpointing_steps=2", steps=2))
    ckpt = out / "checkpoint-2"
    for f in ckpt.glob("state_rank0.*"):
        f.unlink()
    marker = tmp_path / "pwned"
    torch.save({"world_size": 1, "objects": Hostile(marker)}, ckpt / "state_rank0.pt")
    line = one_line_error(capsys, args(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--resume_from_checkpoint=latest", steps=4))
    assert "state_rank0.pt" in line and "never loaded" in line
    assert not marker.exists()


def fake_upstream_checkpoint(out: Path, step: int, marker: Path, lora: bool, model: Path) -> Path:
    """checkpoint-<step> as diffusers' train_text_to_image(.py|_lora.py) writes it through
    accelerate's save_state and its save hook; the pickles create ``marker`` if ever loaded."""
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        torch.save({"x": Hostile(marker)}, ckpt / name)
    if lora:
        save_file({"unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": torch.zeros(4, 32)}, str(ckpt / "pytorch_lora_weights.safetensors"))
    else:
        shutil.copytree(model / "unet", ckpt / "unet")
    return ckpt


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_upstream_checkpoints_are_never_resumed_or_overwritten(tiny_model_dir, tiny_data_dir, tmp_path, capsys, lora):
    """An output_dir holding diffusers' checkpoint-2 (no .complete marker): 'latest', a fresh
    run and an explicit path each stop with one line that says what the folder is; its files are
    unchanged and none of its pickles was loaded."""
    out = tmp_path / "upstream"
    marker = tmp_path / "pwned"
    ckpt = fake_upstream_checkpoint(out, 2, marker, lora, Path(tiny_model_dir))
    before = tree_digest(out)
    flags = ["--use_lora"] if lora else []
    for extra in (["--resume_from_checkpoint=latest"], [], [f"--resume_from_checkpoint={ckpt}"]):
        line = one_line_error(capsys, args(tiny_model_dir, tiny_data_dir, out, *flags, "--checkpointing_steps=2", *extra, steps=2))
        assert "checkpoint-2" in line and "accelerate save_state checkpoint" in line and "not fully written" not in line
        assert "new --output_dir" in line
    assert tree_digest(out) == before
    assert not marker.exists()


@pytest.fixture(scope="module")
def shard_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """checkpoint-2 of a K=2 run with AGC."""
    out = tmp_path_factory.mktemp("traj") / "a"
    run(args(tiny_model_dir, tiny_data_dir, out, "--num_shards=2", "--merge_every=2", "--agc_ratio=1.02", "--checkpointing_steps=2", steps=2))
    return out / "checkpoint-2"


@pytest.mark.parametrize("change, saved, new", [
    ("--merge_every=3", "--merge_every=2", "--merge_every=3"),
    ("--num_shards=4", "--num_shards=2", "--num_shards=4"),
    ("--agc_ratio=0", "--agc_ratio=1.02", "--agc_ratio=0"),
    ("--train_batch_size=1", "--train_batch_size=2", "--train_batch_size=1"),
    ("--seed=8", "--seed=7", "--seed=8"),
    ("--use_lora", "--use_lora=False", "--use_lora=True"),
])
def test_resume_with_another_trajectory_setting_stops(tiny_model_dir, tiny_data_dir, tmp_path, capsys, shard_checkpoint, change, saved, new):
    """Each changed flag is named with the checkpoint's value first, then this run's."""
    base = args(tiny_model_dir, tiny_data_dir, tmp_path / "b", "--num_shards=2", "--merge_every=2", "--agc_ratio=1.02",
                f"--resume_from_checkpoint={shard_checkpoint}", steps=8)
    flag = change.split("=")[0]
    argv = [a for a in base if a.split("=")[0] != flag] + [change]
    line = one_line_error(capsys, argv)
    assert line.index(saved) < line.index(new), line
    assert not (tmp_path / "b").exists()


def test_resume_on_other_data_of_the_same_size_stops(tiny_model_dir, tiny_data_dir, tmp_path, capsys, shard_checkpoint):
    """Same number of images, one caption changed -> 'other data', naming both fingerprints;
    a longer --max_train_steps alone is accepted (the run is extended)."""
    other = tmp_path / "data"
    shutil.copytree(tiny_data_dir, other)
    rows = [json.loads(line) for line in (other / "metadata.jsonl").read_text().splitlines() if line.strip()]
    rows[0]["text"] = rows[0]["text"] + " (edited)"
    (other / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    method = ["--num_shards=2", "--merge_every=2", "--agc_ratio=1.02", f"--resume_from_checkpoint={shard_checkpoint}"]
    line = one_line_error(capsys, args(tiny_model_dir, other, tmp_path / "b", *method, steps=8))
    assert f"other data ({len(rows)} samples, fingerprint" in line and "this run's" in line
    summary = run(args(tiny_model_dir, tiny_data_dir, tmp_path / "c", *method, steps=3))
    assert summary["steps_this_run"] == 1
