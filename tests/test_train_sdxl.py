"""train_scripts/train_sdxl_ietagc.py on the tiny SDXL model, offline: upstream's flags, full and
LoRA outputs that StableDiffusionXLPipeline loads, the method on, exact resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import (add_image, cli_error, fake_upstream_checkpoint, nan_losses_at, one_thread, png_with_corrupt_data, run_two_processes,
                     same, stop_with_signal, train_argv, tree_digest, upstream_full_checkpoint)
from train_scripts import train_sdxl_ietagc as train

UPSTREAM_FLAGS = """
pretrained_model_name_or_path pretrained_vae_model_name_or_path revision variant dataset_name dataset_config_name
train_data_dir image_column caption_column validation_prompt num_validation_images validation_epochs max_train_samples
proportion_empty_prompts output_dir cache_dir seed resolution center_crop random_flip train_batch_size num_train_epochs
max_train_steps checkpointing_steps checkpoints_total_limit resume_from_checkpoint gradient_accumulation_steps
gradient_checkpointing learning_rate scale_lr lr_scheduler lr_warmup_steps timestep_bias_strategy timestep_bias_multiplier
timestep_bias_begin timestep_bias_end timestep_bias_portion snr_gamma use_ema allow_tf32 dataloader_num_workers
use_8bit_adam adam_beta1 adam_beta2 adam_weight_decay adam_epsilon max_grad_norm push_to_hub hub_token prediction_type
hub_model_id logging_dir report_to mixed_precision local_rank enable_npu_flash_attention
enable_xformers_memory_efficient_attention noise_offset image_interpolation_mode
train_text_encoder rank debug_loss
""".split()  # train_text_to_image_sdxl.py; last line: only in train_text_to_image_lora_sdxl.py (diffusers main, 2026)

METHOD = ["--num_shards=2", "--merge_every=2", "--agc_ratio=1.02", "--agc_ema=0.1", "--redistribute_fraction=0.5",
          "--loss_aware_augmentation"]


def sdxl_argv(model, data, out, *extra, steps=8):
    """The tiny SDXL run: random flips on (SDXL's crop conditioning sees them), seed 3."""
    return train_argv(model, data, out, "--random_flip", *extra, steps=steps, seed=3)


def run(argv):
    return train.main(train.parse_args(argv))


def test_help_lists_every_upstream_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    assert [f for f in UPSTREAM_FLAGS if f"--{f}" not in text] == []
    a = train.parse_args(["--pretrained_model_name_or_path=x", "--train_data_dir=y"])
    assert (a.resolution, a.train_batch_size, a.learning_rate, a.lr_scheduler, a.lr_warmup_steps, a.validation_epochs) == (1024, 16, 1e-4, "constant", 500, 1)
    assert (a.timestep_bias_strategy, a.timestep_bias_portion, a.rank, a.output_dir, a.proportion_empty_prompts) == ("none", 0.25, 4, "sdxl-model-finetuned", 0)
    assert train.parse_args(["--pretrained_model_name_or_path=x", "--train_data_dir=y", "--use_lora"]).output_dir == "sd-model-finetuned-lora"


def test_full_with_the_method_loads_in_the_sdxl_pipeline(sdxl20, tiny_data_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "full"
    summary = run(sdxl_argv(sdxl20, tiny_data_dir, out, *METHOD, "--timestep_bias_strategy=later", "--proportion_empty_prompts=0.5"))
    assert summary["num_merges"] == 2 and 0 < summary["agc/skip_rate"] < 1
    state = json.loads((out / "memfree_state.json").read_text())
    assert state["moves"] and sum(state["shard_sizes"]) == 12
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    base = load_file(sdxl20 / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(base[n], p) for n, p in pipe.unet.state_dict().items())  # trained
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_lora_with_shards_and_kohya_export_load(sdxl20, tiny_data_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "lora"
    run(sdxl_argv(sdxl20, tiny_data_dir, out, *METHOD, "--use_lora", "--save_kohya_lora"))
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl20)
    pipe.load_lora_weights(str(out))
    kohya = load_file(out / "pytorch_lora_weights_kohya.safetensors")
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    again = StableDiffusionXLPipeline.from_pretrained(sdxl20)
    again.load_lora_weights(str(out / "pytorch_lora_weights_kohya.safetensors"))
    x, text, pooled = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 64), torch.randn(1, 32)
    cond = {"time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]]), "text_embeds": pooled}
    with torch.no_grad():
        a = pipe.unet(x, 5, text, added_cond_kwargs=cond).sample
        b = again.unet(x, 5, text, added_cond_kwargs=cond).sample
    assert torch.allclose(a, b, atol=1e-6)


@pytest.fixture(scope="module")
def straight_method_run(sdxl20, tiny_data_dir, tmp_path_factory) -> tuple[Path, dict]:
    """One process, the method on, 8 steps, one thread: the straight run that a resumed run and two
    processes must each equal (run once for both). Returns its output folder and summary."""
    out = tmp_path_factory.mktemp("sdxl-straight") / "run"
    with one_thread():
        return out, run(sdxl_argv(sdxl20, tiny_data_dir, out, *METHOD, steps=8))


def test_resume_equals_a_straight_run(sdxl20, tiny_data_dir, tmp_path, straight_method_run):
    (straight, _), resumed = straight_method_run, tmp_path / "resumed"
    with one_thread():
        run(sdxl_argv(sdxl20, tiny_data_dir, resumed, *METHOD, "--checkpointing_steps=4", steps=4))
        run(sdxl_argv(sdxl20, tiny_data_dir, resumed, *METHOD, "--checkpointing_steps=4", "--resume_from_checkpoint=latest", steps=8))
    a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert json.loads((straight / "memfree_state.json").read_text()) == json.loads((resumed / "memfree_state.json").read_text())


@pytest.mark.parametrize("extra, message", [
    (["--train_text_encoder"], "--train_text_encoder is not supported"),
    (["--save_kohya_lora"], "add --use_lora"),
    (["--use_ema", "--num_shards=2"], "--use_ema with --num_shards > 1"),
    (["--proportion_empty_prompts=2"], "must be in [0, 1]"),
    (["--timestep_bias_strategy=later", "--timestep_bias_multiplier=0"], "must be > 0"),
])
def test_bad_flags_stop_with_one_line(extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--pretrained_model_name_or_path=x", "--train_data_dir=y", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err


def test_an_sd_model_is_refused_naming_the_missing_parts(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.cli(sdxl_argv(tiny_model_dir, tiny_data_dir, tmp_path / "x"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "text_encoder_2, tokenizer_2" in err


@pytest.mark.multiprocess
def test_two_processes_equal_one_process(sdxl20, tiny_data_dir, tmp_path, straight_method_run):
    """2 processes (gloo, one proxy each) == 1 process taking turns, bit for bit: each proxy owns
    its RNG and data streams wherever it runs (MemFree), and merges add unfused per-proxy terms."""
    mp, (sp, summary) = tmp_path / "mp", straight_method_run
    run_two_processes("train_sdxl_ietagc.py", sdxl_argv(sdxl20, tiny_data_dir, mp, *METHOD, steps=8))
    assert summary["num_merges"] == 2 and summary["moves"]
    a = load_file(mp / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(sp / "unet" / "diffusion_pytorch_model.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert json.loads((mp / "memfree_state.json").read_text())["moves"] == json.loads((sp / "memfree_state.json").read_text())["moves"]


def test_cli_builds_the_tiny_sdxl_model_and_runs_the_recipe(tmp_path, capsys):
    """``sd-memfree make-tiny-model --arch sdxl`` writes an SDXL folder (two text encoders, text_time
    conditioning); ``sd-memfree train-sdxl`` is the recipe's command line (its bad input: exit 2)."""
    from sd_memfree import cli

    cli.main(["make-tiny-model", str(tmp_path / "m"), "--arch", "sdxl"])
    model = tmp_path / "m"
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert json.loads((model / "unet" / "config.json").read_text())["addition_embed_type"] == "text_time"
    assert (model / "text_encoder_2" / "config.json").exists() and (model / "tokenizer_2").is_dir()
    with pytest.raises(SystemExit) as e:
        cli.main(["train-sdxl", f"--pretrained_model_name_or_path={model}", "--train_data_dir=x", "--train_text_encoder"])
    assert e.value.code == 2 and "--train_text_encoder is not supported" in capsys.readouterr().err


def test_resume_with_other_settings_or_a_held_lock_stops(sdxl20, tiny_data_dir, tmp_path, capsys):
    from sd_memfree.run.runlock import RunLock

    out = tmp_path / "run"
    run(sdxl_argv(sdxl20, tiny_data_dir, out, "--checkpointing_steps=2", steps=2))
    with pytest.raises(SystemExit) as e:
        train.cli(sdxl_argv(sdxl20, tiny_data_dir, out, "--checkpointing_steps=2", "--resume_from_checkpoint=latest", "--timestep_bias_strategy=later", steps=4))
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the data loading's progress bars
    assert e.value.code == 2 and err.startswith("error: ") and "--timestep_bias_strategy=none" in err
    lock = RunLock(out)
    lock.acquire()
    try:
        with pytest.raises(SystemExit) as e:
            train.cli(sdxl_argv(sdxl20, tiny_data_dir, out, "--resume_from_checkpoint=latest", steps=4))
        assert e.value.code == 2 and "pid" in capsys.readouterr().err
    finally:
        lock.release()


def test_a_diverging_run_stops_without_saving_non_finite_weights(sdxl20, tiny_data_dir, tmp_path, capsys):
    """A learning rate of 1e30 makes the weights inf after the first step: the run stops with one
    line (exit 1) before the checkpoint at step 2, and nothing is written."""
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        train.cli(sdxl_argv(sdxl20, tiny_data_dir, out, "--learning_rate=1e30", "--checkpointing_steps=2", "--max_grad_norm=0", steps=4))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and err.startswith("error: the run diverged at step 2") and "NaN/inf" in err
    assert not list(out.glob("checkpoint-*")) and not (out / "unet").exists()


def test_final_save_refuses_non_finite_weights_naming_the_newest_checkpoint(sdxl20, tiny_data_dir, tmp_path, capsys, monkeypatch):
    """One NaN step on the last step (below the stop checks' limit) makes the LoRA weights NaN: the
    final save refuses them with the SD script's line, naming the newest checkpoint to resume from."""
    nan_losses_at(monkeypatch, {3}, nan_gradients=True)
    out = tmp_path / "last"
    line = cli_error(capsys, train.cli, sdxl_argv(sdxl20, tiny_data_dir, out, "--use_lora", "--checkpointing_steps=2", steps=3), 1)
    assert line.startswith(f"error: the trained weights are NaN/inf after step 3: the final model was not saved (newest checkpoint: {out}/checkpoint-2)"), line
    assert not (out / "pytorch_lora_weights.safetensors").exists() and (out / "checkpoint-2").is_dir()


# ---- as the SD script: stop signals, --drop_bad_samples, diffusers' own checkpoints ----------------

def test_sigterm_finishes_the_step_checkpoints_and_resume_finishes(sdxl20, tiny_data_dir, tmp_path):
    """The real script in a subprocess with 100000 steps; SIGTERM comes once checkpoint-2 exists.
    It exits 143 with one line naming the checkpoint it wrote (its last one) and how to resume, no
    traceback, no lock left; resuming from it runs to the end. (Ctrl-C takes the same path in the
    library's StopSignals, exit 130: tested once, through the SD script, in test_train_safety.py.)"""
    import signal

    from sd_memfree.run import checkpointing
    from sd_memfree.run.runlock import LOCK_NAME

    out = tmp_path / "run"
    argv = sdxl_argv(sdxl20, tiny_data_dir, out, "--use_lora", "--rank=2", "--checkpointing_steps=2", steps=100000)
    step = stop_with_signal("train_sdxl_ietagc.py", argv, out, signal.SIGTERM, 143)
    steps = [s for s, _ in checkpointing.list_checkpoints(out)]
    assert step >= 2 and steps[-1] == step
    assert not (out / LOCK_NAME).exists() and not (out / "pytorch_lora_weights.safetensors").exists()
    summary = run(sdxl_argv(sdxl20, tiny_data_dir, out, "--use_lora", "--rank=2", "--checkpointing_steps=2", "--resume_from_checkpoint=latest",
                            steps=step + 2))
    assert summary["global_step"] == step + 2 and summary["steps_this_run"] == 2
    assert (out / "pytorch_lora_weights.safetensors").exists()


def test_drop_bad_samples_trains_on_the_rest_and_lists_them(sdxl20, tiny_data_dir, tmp_path, capsys):
    """A 13th image that does not decode: without the flag one line names it (exit 2, nothing
    written); with --drop_bad_samples the run trains on the 12 others and lists it."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    add_image(data, "scrambled.png", png_with_corrupt_data())
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.cli(sdxl_argv(sdxl20, data, out, "--use_lora", steps=2))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "scrambled.png (sample 12)" in last and "--drop_bad_samples" in last
    assert not out.exists()
    summary = run(sdxl_argv(sdxl20, data, out, "--use_lora", "--drop_bad_samples", steps=2))
    assert summary["global_step"] == 2
    assert json.loads((out / "memfree_state.json").read_text())["num_samples"] == 12
    dropped = json.loads((out / "dropped_samples.json").read_text())
    assert [d["where"] for d in dropped] == [f"{data / 'scrambled.png'} (sample 12)"]


def test_full_run_continues_from_a_diffusers_sdxl_checkpoint(sdxl20, tiny_data_dir, tmp_path, capsys):
    """checkpoint-2 as diffusers' train_text_to_image_sdxl.py writes it (accelerate's save_state):
    unet/ = base weights + 0.01, optimizer.bin = AdamW moments at step 30 (plain tensors: loads
    with weights_only=True), scheduler.bin and random_states_0.pkl hostile pickles. A fresh run
    there stops with one line, so does --num_shards=2; 'latest' continues: with --learning_rate=0
    the final UNet equals the checkpoint's (its weights were loaded), our checkpoint-4 holds AdamW
    step 30 + 2 (its moments were loaded), no pickle ran, the folder is unchanged."""
    from sd_memfree.run.state import read_process_state

    out, marker, before = upstream_full_checkpoint(sdxl20, tmp_path)

    def one_line(argv):
        return cli_error(capsys, train.cli, argv)

    line = one_line(sdxl_argv(sdxl20, tiny_data_dir, out, steps=4))
    assert "checkpoint-2" in line and "never overwrites" in line and "--resume_from_checkpoint=latest" in line
    line = one_line(sdxl_argv(sdxl20, tiny_data_dir, out, "--num_shards=2", "--resume_from_checkpoint=latest", steps=4))
    assert "checkpoint-2" in line and "without shards only" in line

    summary = run(sdxl_argv(sdxl20, tiny_data_dir, out, "--learning_rate=0", "--checkpointing_steps=2", "--resume_from_checkpoint=latest", steps=4))
    assert summary["steps_this_run"] == 2 and summary["global_step"] == 4
    assert same(load_file(out / "unet" / "diffusion_pytorch_model.safetensors"),
                load_file(tmp_path / "their_unet" / "diffusion_pytorch_model.safetensors"))
    assert read_process_state(out / "checkpoint-4", 0)["objects"]["optimizer"]["state"][0]["step"].item() == 32
    assert tree_digest(out / "checkpoint-2") == before and not marker.exists()


def test_lora_run_continues_from_a_diffusers_sdxl_lora_checkpoint(sdxl20, tiny_data_dir, tmp_path, capsys):
    """checkpoint-2 of diffusers' train_text_to_image_lora_sdxl.py (its pytorch_lora_weights.safetensors,
    the format StableDiffusionXLPipeline.save_lora_weights writes: 2 trained steps of ours) with a
    hostile optimizer.bin, given as a path: the run continues from the LoRA weights (with
    --learning_rate=0 the output equals them), the optimizer.bin is refused by weights_only (the
    moments start from zero), nothing ran, the folder is unchanged. A LoRA that also trained the
    text encoders (--train_text_encoder, which sd_memfree does not train) stops with one line."""
    trained = tmp_path / "trained"
    run(sdxl_argv(sdxl20, tiny_data_dir, trained, "--use_lora", steps=2))
    theirs = trained / "pytorch_lora_weights.safetensors"
    out, marker = tmp_path / "out", tmp_path / "pwned"
    with_te = tmp_path / "with_te"  # as written with --train_text_encoder: text-encoder adapters beside the UNet's
    with_te.mkdir()
    save_file({**load_file(theirs), "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32)},
              str(with_te / "pytorch_lora_weights.safetensors"))
    te_ckpt = fake_upstream_checkpoint(tmp_path / "te_out", 2, marker, {"pytorch_lora_weights.safetensors": with_te / "pytorch_lora_weights.safetensors"})
    with pytest.raises(SystemExit) as e:
        train.cli(sdxl_argv(sdxl20, tiny_data_dir, tmp_path / "te_out", "--use_lora", f"--resume_from_checkpoint={te_ckpt}", steps=4))
    assert e.value.code == 2 and "--train_text_encoder" in capsys.readouterr().err.strip().splitlines()[-1]

    ckpt = fake_upstream_checkpoint(out, 2, marker, {"pytorch_lora_weights.safetensors": theirs})
    before = tree_digest(ckpt)
    summary = run(sdxl_argv(sdxl20, tiny_data_dir, out, "--use_lora", "--learning_rate=0", f"--resume_from_checkpoint={ckpt}", steps=4))
    assert summary["steps_this_run"] == 2 and summary["global_step"] == 4
    assert same(load_file(out / "pytorch_lora_weights.safetensors"), load_file(theirs))
    assert tree_digest(ckpt) == before and not marker.exists()
