"""What the training script's checkpoints hold and when it refuses to resume (issues 9 and 10).

Each checkpoint holds the model in the final output's form (loadable with diffusers), the state
for an exact resume (JSON + safetensors, no pickle) and ``trajectory.json``; the last step is
checkpointed when it falls on --checkpointing_steps; other scripts' checkpoints are never
resumed or overwritten; a resume with other trajectory settings or data stops with one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import Hostile, cli_error, fake_upstream_checkpoint, same, train_argv, tree_digest, upstream_full_checkpoint
from train_scripts import train_sd_ietagc as train


def run(argv):
    return train.main(train.parse_args(argv))


def test_lora_checkpoints_load_with_diffusers_and_4_steps_resume_to_8(tiny_model_dir, tiny_data_dir, tmp_path):
    """LoRA, K=1. A 4-step run with --checkpointing_steps=2 leaves checkpoint-2 and checkpoint-4
    (the last step); each loads with pipe.load_lora_weights; checkpoint-4's LoRA equals the final
    output. Resuming 'latest' with --max_train_steps=8 equals an uninterrupted 8-step run, bit for bit
    (random flips on: the data order and augmentation resume too; the resumed run's own checkpoints
    at 6 and 8 must not perturb it). The one LoRA resume of the suite."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    run(train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--random_flip", "--checkpointing_steps=2", steps=4))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    ckpt4 = out / "checkpoint-4"
    assert same(load_file(ckpt4 / "pytorch_lora_weights.safetensors"), load_file(out / "pytorch_lora_weights.safetensors"))
    assert not list(ckpt4.rglob("*.pt")) and not list(ckpt4.rglob("*.pkl")) and not list(ckpt4.rglob("*.bin"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    for step in (2, 4):
        pipe.load_lora_weights(str(out / f"checkpoint-{step}"), adapter_name=f"s{step}")
    assert set(pipe.get_list_adapters()["unet"]) == {"s2", "s4"}

    summary = run(train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--random_flip", "--checkpointing_steps=2",
                             "--resume_from_checkpoint=latest", steps=8))
    assert summary["steps_this_run"] == 4
    straight = tmp_path / "straight"
    run(train_argv(tiny_model_dir, tiny_data_dir, straight, "--use_lora", "--random_flip", steps=8))
    assert same(load_file(out / "pytorch_lora_weights.safetensors"), load_file(straight / "pytorch_lora_weights.safetensors"))


def test_full_checkpoint_holds_unet_and_ema_loadable(tiny_model_dir, tiny_data_dir, tmp_path):
    """Full fine-tuning with EMA, K=1: checkpoint-2 (the last step) holds unet/ (the trained
    weights) and unet_ema/ (the EMA, which the final output holds), as upstream does. The state
    files do not repeat them, and a resume from checkpoint-1 (weights read back from unet/ and
    unet_ema/) ends on the same final model."""
    from diffusers import UNet2DConditionModel

    from sd_memfree.run.state import read_process_state

    out = tmp_path / "ema"
    run(train_argv(tiny_model_dir, tiny_data_dir, out, "--use_ema", "--checkpointing_steps=1", steps=2))
    objects = read_process_state(out / "checkpoint-1", 0)["objects"]
    assert objects["ema"]["omitted"] == ["shadow_params"] and objects["trainable"]["state"] == {}
    resumed = tmp_path / "resumed"
    run(train_argv(tiny_model_dir, tiny_data_dir, resumed, "--use_ema", f"--resume_from_checkpoint={out / 'checkpoint-1'}", steps=2))
    assert same(load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors"), load_file(out / "unet" / "diffusion_pytorch_model.safetensors"))
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
    (a complete round), not proxy 0's live weights. (The budget is 8 steps, two whole rounds: with
    6 the last round is shortened to one step per proxy, so proxy 0's turn would end at step 5.)"""
    from diffusers import UNet2DConditionModel

    method = ["--num_shards=2", "--merge_every=2"]
    run(train_argv(tiny_model_dir, tiny_data_dir, tmp_path / "four", *method, steps=4))
    # 8 steps: two whole rounds (a budget of 6 would shorten the second round to one step each,
    # so that step 5 would end proxy 0's turn).
    run(train_argv(tiny_model_dir, tiny_data_dir, tmp_path / "eight", *method, "--checkpointing_steps=5", steps=8))
    ckpt_unet = UNet2DConditionModel.from_pretrained(tmp_path / "eight" / "checkpoint-5", subfolder="unet").state_dict()
    merged4 = load_file(tmp_path / "four" / "unet" / "diffusion_pytorch_model.safetensors")
    assert same({k: ckpt_unet[k] for k in merged4}, merged4)
    live = read_live_trainable(tmp_path / "eight" / "checkpoint-5")
    assert any(not torch.equal(live[k], merged4[k]) for k in live)


def state_bytes(ckpt: Path) -> int:
    """Tensor bytes in the state file: its size less the 8-byte length and the JSON header."""
    path = ckpt / "state_rank0.safetensors"
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


@pytest.mark.parametrize("mode", ["per_proxy", "shared"])
def test_shard_checkpoint_size_and_resume_from_every_position(tiny_model_dir, tiny_data_dir, tmp_path, mode):
    """K=2, H=2, full fine-tuning, P trainable float32 values, AdamW (2 moments of P floats = 8P
    bytes per optimizer state). State file sizes (beside unet/, which holds the last merge):

    - checkpoint-2, between turns (proxy 0 done, proxy 1 not started): live == merged, not
      stored; running sum 4P; optimizer states: per_proxy 1 x 8P (proxy 1 has none yet) -> 12P,
      shared 8P -> 12P;
    - checkpoint-3, mid-turn: live 4P + sum 4P + per_proxy 2 x 8P -> 24P (shared: 16P);
    - checkpoint-4, right after the merge: sum zero and live == merged, not stored -> per_proxy
      16P, shared 8P (the upstream size: unet/ + one optimizer state).

    Plus at most 64 KiB of small tensors (RNG states, shard assignment, step counters); the
    safetensors header (names and shapes) is not counted.
    Resuming from checkpoint-2 and from checkpoint-4 to 8 steps equals the straight 8-step run.
    """
    from diffusers import UNet2DConditionModel

    P = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").parameters())
    method = ["--num_shards=2", "--merge_every=2", f"--proxy_optimizer_state={mode}"]
    out = tmp_path / "run"
    run(train_argv(tiny_model_dir, tiny_data_dir, out, *method, "--checkpointing_steps=1", steps=4))
    expected = {"per_proxy": {2: 12 * P, 3: 24 * P, 4: 16 * P}, "shared": {2: 12 * P, 3: 16 * P, 4: 8 * P}}[mode]
    for step, size in expected.items():
        assert size <= state_bytes(out / f"checkpoint-{step}") <= size + 64 * 1024, (step, state_bytes(out / f"checkpoint-{step}"), size)
    straight = tmp_path / "straight"
    run(train_argv(tiny_model_dir, tiny_data_dir, straight, *method, steps=8))
    final = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    for step in (2, 4):
        resumed = tmp_path / f"from{step}"
        run(train_argv(tiny_model_dir, tiny_data_dir, resumed, *method, f"--resume_from_checkpoint={out / f'checkpoint-{step}'}", steps=8))
        assert same(load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors"), final), step


def read_live_trainable(ckpt: Path) -> dict:
    from sd_memfree.run.state import read_process_state

    trainable = read_process_state(ckpt, 0)["objects"]["trainable"]
    assert trainable["omitted"] == []  # mid-turn the live weights differ from unet/, so they are stored
    return trainable["state"]


def test_crafted_pickle_in_a_checkpoint_does_not_run(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """A checkpoint whose state is replaced by a pickle that creates a file when loaded (what
    torch.load(weights_only=False) did on resume): the resume stops with one line, nothing runs."""
    out = tmp_path / "victim"
    run(train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--checkpointing_steps=2", steps=2))
    ckpt = out / "checkpoint-2"
    for f in ckpt.glob("state_rank0.*"):
        f.unlink()
    marker = tmp_path / "pwned"
    torch.save({"world_size": 1, "objects": Hostile(marker)}, ckpt / "state_rank0.pt")
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--resume_from_checkpoint=latest", steps=4))
    assert "state_rank0.pt" in line and "never loaded" in line
    assert not marker.exists()


def test_full_run_continues_from_an_upstream_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """diffusers' checkpoint-2 of a full fine-tune: unet/ = base weights + 0.01, optimizer.bin =
    AdamW moments at step 30 (plain tensors: loads with weights_only=True), the other pickles
    hostile. A fresh run there stops with one line; 'latest' continues: with --learning_rate=0 the
    final UNet equals the checkpoint's exactly (its weights were loaded), our checkpoint-4 holds
    AdamW step 30 + 2 (its moments were loaded), no pickle ran, the upstream folder is unchanged.
    With --num_shards=2 it stops with one line."""
    out, marker, before = upstream_full_checkpoint(tiny_model_dir, tmp_path)

    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, out, steps=4))
    assert "checkpoint-2" in line and "accelerate save_state checkpoint" in line and "--resume_from_checkpoint=latest" in line
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, out, "--num_shards=2", "--resume_from_checkpoint=latest", steps=4))
    assert "checkpoint-2" in line and "without shards only" in line

    summary = run(train_argv(tiny_model_dir, tiny_data_dir, out, "--learning_rate=0", "--checkpointing_steps=2", "--resume_from_checkpoint=latest", steps=4))
    assert summary["steps_this_run"] == 2 and summary["global_step"] == 4
    assert same(load_file(out / "unet" / "diffusion_pytorch_model.safetensors"), load_file(tmp_path / "their_unet" / "diffusion_pytorch_model.safetensors"))
    from sd_memfree.run.state import read_process_state

    assert read_process_state(out / "checkpoint-4", 0)["objects"]["optimizer"]["state"][0]["step"].item() == 32
    assert tree_digest(out / "checkpoint-2") == before and not marker.exists()


def test_lora_run_continues_from_an_upstream_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """diffusers' checkpoint-2 of a LoRA run (its pytorch_lora_weights.safetensors: 2 trained
    steps of ours, the same format) with a hostile optimizer.bin, given as an explicit path: the
    run continues from the LoRA weights (with --learning_rate=0 the output equals them), the
    hostile optimizer.bin is refused by weights_only (moments start from zero), nothing ran.
    A later upstream checkpoint-6 in output_dir stops the run (we would write over it)."""
    trained = tmp_path / "trained"
    run(train_argv(tiny_model_dir, tiny_data_dir, trained, "--use_lora", steps=2))
    theirs = trained / "pytorch_lora_weights.safetensors"
    out, marker = tmp_path / "out", tmp_path / "pwned"
    ckpt = fake_upstream_checkpoint(out, 2, marker, {"pytorch_lora_weights.safetensors": theirs})
    argv = train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--learning_rate=0", f"--resume_from_checkpoint={ckpt}", steps=4)
    later = fake_upstream_checkpoint(out, 6, marker, {"pytorch_lora_weights.safetensors": theirs})
    line = cli_error(capsys, train.cli, argv)
    assert "checkpoint-6" in line and "never overwrites" in line
    shutil.rmtree(later)
    line = cli_error(capsys, train.cli, [a for a in argv if a != "--use_lora"])
    assert "add --use_lora" in line
    summary = run(argv)
    assert summary["steps_this_run"] == 2
    assert same(load_file(out / "pytorch_lora_weights.safetensors"), load_file(theirs))
    assert not marker.exists()


@pytest.fixture(scope="module")
def shard_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """checkpoint-2 of a K=2 run with AGC, half-way through its one whole round (a 2-step budget
    would shorten that round to one step per proxy, and no longer budget could resume from it)."""
    out = tmp_path_factory.mktemp("traj") / "a"
    run(train_argv(tiny_model_dir, tiny_data_dir, out, "--num_shards=2", "--merge_every=2", "--agc_ratio=1.02", "--checkpointing_steps=2", steps=4))
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
    base = train_argv(tiny_model_dir, tiny_data_dir, tmp_path / "b", "--num_shards=2", "--merge_every=2", "--agc_ratio=1.02", f"--resume_from_checkpoint={shard_checkpoint}", steps=8)
    flag = change.split("=")[0]
    argv = [a for a in base if a.split("=")[0] != flag] + [change]
    line = cli_error(capsys, train.cli, argv)
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
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, other, tmp_path / "b", *method, steps=8))
    assert f"other data ({len(rows)} samples, fingerprint" in line and "this run's" in line
    summary = run(train_argv(tiny_model_dir, tiny_data_dir, tmp_path / "c", *method, steps=8))
    assert summary["steps_this_run"] == 6


def test_resume_into_another_budget_from_a_shortened_round_stops(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """K=2, H=2, 6 steps: the second round is shortened to one step per proxy (steps 5-6), so
    checkpoint-5 holds proxy 0 after its only step of that round. Under an 8-step budget step 5 is
    proxy 0's first of two: resuming there would mix the two schedules. One line names both budgets;
    the same budget resumes."""
    method = ["--num_shards=2", "--merge_every=2", "--checkpointing_steps=5"]
    run(train_argv(tiny_model_dir, tiny_data_dir, tmp_path / "a", *method, steps=6))
    ckpt = tmp_path / "a" / "checkpoint-5"
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, tmp_path / "b", *method, f"--resume_from_checkpoint={ckpt}", steps=8))
    assert "--max_train_steps=6 but this run has --max_train_steps=8" in line and "step <= 4" in line, line
    assert run(train_argv(tiny_model_dir, tiny_data_dir, tmp_path / "c", *method, f"--resume_from_checkpoint={ckpt}", steps=6))["steps_this_run"] == 1
