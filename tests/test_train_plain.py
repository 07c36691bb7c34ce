"""The training script's plain path (no shards, no AGC) on the tiny model, in-process, offline.

Each test calls ``main(parse_args([...]))`` exactly as ``accelerate launch`` would run it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_scripts import train_sd_ietagc as train

UPSTREAM_FLAGS = """
input_perturbation pretrained_model_name_or_path revision variant dataset_name dataset_config_name train_data_dir
image_column caption_column max_train_samples validation_prompts output_dir cache_dir seed resolution center_crop
random_flip train_batch_size num_train_epochs max_train_steps gradient_accumulation_steps gradient_checkpointing
learning_rate scale_lr lr_scheduler lr_warmup_steps snr_gamma dream_training dream_detail_preservation use_8bit_adam
allow_tf32 use_ema offload_ema foreach_ema non_ema_revision dataloader_num_workers adam_beta1 adam_beta2
adam_weight_decay adam_epsilon max_grad_norm push_to_hub hub_token prediction_type hub_model_id logging_dir
mixed_precision report_to local_rank checkpointing_steps checkpoints_total_limit resume_from_checkpoint
enable_xformers_memory_efficient_attention noise_offset validation_epochs tracker_project_name
image_interpolation_mode
validation_prompt num_validation_images rank
""".split()  # first block: train_text_to_image.py; last line: only in train_text_to_image_lora.py


def base_args(model, data, out, *extra, steps=4):
    return [
        f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={out}",
        "--resolution=32", "--train_batch_size=2", f"--max_train_steps={steps}", "--learning_rate=1e-3",
        "--lr_warmup_steps=0", "--seed=7", "--report_to=none", "--checkpointing_steps=1000000", *extra,
    ]


def run(argv):
    return train.main(train.parse_args(argv))


def test_help_lists_every_upstream_flag(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    missing = [f for f in UPSTREAM_FLAGS if f"--{f}" not in text]
    assert missing == []


def test_upstream_defaults_kept():
    a = train.parse_args(["--pretrained_model_name_or_path=x", "--train_data_dir=y"])
    assert (a.resolution, a.train_batch_size, a.learning_rate, a.lr_scheduler, a.lr_warmup_steps) == (512, 16, 1e-4, "constant", 500)
    assert (a.adam_weight_decay, a.max_grad_norm, a.checkpointing_steps, a.rank, a.validation_epochs) == (1e-2, 1.0, 500, 4, 5)
    assert train.parse_args(["--pretrained_model_name_or_path=x", "--train_data_dir=y", "--use_lora"]).validation_epochs == 1


def test_full_finetune_outputs_a_loadable_pipeline(tiny_model_dir, tiny_data_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "full"
    summary = run(base_args(tiny_model_dir, tiny_data_dir, out))
    assert summary["global_step"] == 4
    before = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "trainable UNet weights did not change"
    for part in ("vae", "text_encoder"):
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        b, a = load_file(tiny_model_dir / part / name), load_file(out / part / name)
        assert all(torch.equal(b[k], a[k]) for k in b), f"frozen {part} changed"
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    img = pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (32, 32)
    card = (out / "README.md").read_text()
    assert "sd-memfree" in card
    assert json.loads((out / "memfree_config.json").read_text())["num_shards"] == 1


def test_lora_outputs_loadable_weights(tiny_model_dir, tiny_data_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "lora"
    run(base_args(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--rank=4"))
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("unet.") for k in lora)
    assert not (out / "unet").exists(), "LoRA runs save adapters only"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    gen = lambda: pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="pt",  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images
    base_img = gen()
    pipe.load_lora_weights(out)
    lora_img = gen()
    assert lora_img.shape == base_img.shape
    # lora_B starts at zero with gaussian init; 4 steps at lr 1e-3 move it, so outputs differ.
    assert not torch.allclose(base_img, lora_img)


def _final_tensors(out: Path, lora: bool) -> dict:
    return load_file(out / ("pytorch_lora_weights.safetensors" if lora else "unet/diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_equals_straight_run(tiny_model_dir, tiny_data_dir, tmp_path, lora):
    """4 steps straight == 2 steps, stop, resume from checkpoint-2, 2 more steps (bit-identical on CPU)."""
    extra = ["--use_lora"] if lora else []
    straight = tmp_path / "straight"
    run(base_args(tiny_model_dir, tiny_data_dir, straight, *extra, "--random_flip", steps=4))
    first = tmp_path / "first"
    run(base_args(tiny_model_dir, tiny_data_dir, first, *extra, "--random_flip", "--checkpointing_steps=2", steps=4))
    # ``first`` ran 4 steps with a checkpoint at 2; resume a fresh output dir from that checkpoint.
    resumed = tmp_path / "resumed"
    run(base_args(tiny_model_dir, tiny_data_dir, resumed, *extra, "--random_flip", f"--resume_from_checkpoint={first / 'checkpoint-2'}", steps=4))
    a, b = _final_tensors(straight, lora), _final_tensors(resumed, lora)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = _final_tensors(first, lora)
    assert all(torch.equal(a[k], c[k]) for k in a), "writing a checkpoint must not perturb training"


def test_checkpoints_total_limit_keeps_newest(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "ckpt"
    run(base_args(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--checkpointing_steps=1", "--checkpoints_total_limit=2", steps=4))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not list(out.glob(".tmp-checkpoint-*"))
    # resume "latest" continues from checkpoint-3 to the same final weights
    again = run(base_args(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--resume_from_checkpoint=latest", steps=4))
    assert again["global_step"] == 4


def test_push_to_hub_uploads_model_not_checkpoints(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    from sd_memfree import hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, exist_ok=False, **kw):
            calls.append(("create_repo", repo_id))

            class R:
                pass

            r = R()
            r.repo_id = repo_id
            return r

        def upload_folder(self, repo_id, folder_path, commit_message=None, allow_patterns=None, ignore_patterns=None, **kw):
            calls.append(("upload", repo_id, sorted(hub.files_to_upload(folder_path, allow_patterns, ignore_patterns))))

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    out = tmp_path / "pushed"
    run(base_args(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--checkpointing_steps=2", "--push_to_hub",
                  "--hub_model_id=me/tiny-private", "--hub_token=tok"))
    uploads = [c for c in calls if c[0] == "upload"]
    assert len(uploads) == 1 and uploads[0][1] == "me/tiny-private"
    files = uploads[0][2]
    assert "pytorch_lora_weights.safetensors" in files and "README.md" in files and "memfree_config.json" in files
    assert not [f for f in files if f.startswith(("checkpoint-", "logs/", ".tmp-checkpoint"))]
    assert (out / "checkpoint-2").exists()


# ---- bad inputs stop before training, with one line naming the fix -----------------------------

def _one_line_error(capsys, argv, pattern):
    with pytest.raises(SystemExit) as exc:
        train.cli(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(pattern, err[-1]), err
    return err[-1]


def test_no_dataset_given(capsys):
    _one_line_error(capsys, ["--pretrained_model_name_or_path=x"], r"--dataset_name .* or --train_data_dir")


def test_missing_image_file(capsys, tiny_model_dir, tiny_data_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    (data / "00001.png").unlink()
    _one_line_error(capsys, base_args(tiny_model_dir, data, tmp_path / "o"), r"00001\.png.*missing.*add it or remove")
    assert not (tmp_path / "o").exists(), "nothing is written before validation passes"


def test_corrupt_image_file(capsys, tiny_model_dir, tiny_data_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    (data / "00002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _one_line_error(capsys, base_args(tiny_model_dir, data, tmp_path / "o"), r"cannot be used: .*00002\.png .*fix or remove them, or pass --drop_bad_samples")


def test_missing_caption_column(capsys, tiny_model_dir, tiny_data_dir, tmp_path):
    _one_line_error(capsys, base_args(tiny_model_dir, tiny_data_dir, tmp_path / "o", "--caption_column=caption"),
                    r"--caption_column 'caption' is not a column.*image, text")


def test_empty_dataset(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "empty"
    data.mkdir()
    (data / "metadata.jsonl").write_text("")
    _one_line_error(capsys, base_args(tiny_model_dir, data, tmp_path / "o"), r"(empty|no images|could not load)")


def test_model_folder_missing_or_incomplete(capsys, tiny_model_dir, tiny_data_dir, tmp_path):
    import shutil

    _one_line_error(capsys, base_args(tmp_path / "nope", tiny_data_dir, tmp_path / "o"), r"does not exist")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    _one_line_error(capsys, base_args(broken, tiny_data_dir, tmp_path / "o"), r"lacks the subfolder\(s\) vae")


def test_resolution_the_vae_cannot_take(capsys, tiny_model_dir, tiny_data_dir, tmp_path):
    argv = base_args(tiny_model_dir, tiny_data_dir, tmp_path / "o")
    argv = [a for a in argv if not a.startswith("--resolution")] + ["--resolution=1"]
    _one_line_error(capsys, argv, r"--resolution=1 is too small for this model: its VAE downsamples by 2, so use at least 2\.")
    _one_line_error(capsys, argv[:-1] + ["--resolution=30", "--validation_prompt=a ring"],
                    r"--resolution=30 trains, but .* multiple of 8 \(e\.g\. 24 or 32\)")


def test_upstream_options_together_full(tiny_model_dir, tiny_data_dir, tmp_path):
    """EMA, accumulation, Min-SNR, noise offset, input perturbation, v-prediction, gradient
    checkpointing, cosine schedule, scale_lr, center crop, max_train_samples, --dataset_name
    (a local folder) and validation prompts, all in one short run."""
    out = tmp_path / "kitchen"
    argv = [a for a in base_args(tiny_model_dir, tiny_data_dir, out, steps=3) if not a.startswith("--train_data_dir")]
    summary = run(argv + [f"--dataset_name={tiny_data_dir}", "--use_ema", "--gradient_accumulation_steps=2", "--snr_gamma=5.0",
                          "--noise_offset=0.05", "--input_perturbation=0.1", "--prediction_type=v_prediction",
                          "--gradient_checkpointing", "--lr_scheduler=cosine", "--scale_lr", "--center_crop", "--random_flip",
                          "--max_train_samples=6", "--validation_prompts", "a red circle", "--report_to=tensorboard"])
    assert summary["global_step"] == 3
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet is not None
    assert (out / "image_0.png").exists(), "validation images go into the model card folder"
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_upstream_options_together_lora(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "kitchen-lora"
    summary = run(base_args(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--rank=2", "--validation_prompt=a blue square",
                            "--num_validation_images=2", "--gradient_accumulation_steps=2", "--snr_gamma=5.0",
                            "--dataloader_num_workers=2", steps=2))
    assert summary["global_step"] == 2
    assert (out / "pytorch_lora_weights.safetensors").exists()


def test_unknown_prediction_type_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--pretrained_model_name_or_path=x", "--train_data_dir=y", "--prediction_type=sample"])
    assert "--prediction_type=sample is unknown" in capsys.readouterr().err


def test_gradient_clipping_receives_the_lora_parameters(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """Upstream hands the clipper an exhausted iterator for LoRA, so nothing is clipped; ours
    passes the list of trainable tensors, every one with a gradient at clip time."""
    import accelerate

    seen = []
    real = accelerate.Accelerator.clip_grad_norm_

    def spy(self, parameters, max_norm, norm_type=2):
        params = list(parameters)
        seen.append((len(params), sum(p.grad is not None for p in params)))
        return real(self, params, max_norm, norm_type)

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", spy)
    run(base_args(tiny_model_dir, tiny_data_dir, tmp_path / "clip", "--use_lora", "--rank=2", steps=2))
    assert len(seen) == 2
    n_lora = seen[0][0]
    assert n_lora > 0 and all(s == (n_lora, n_lora) for s in seen)


def test_lora_upcast_follows_accelerate_mixed_precision(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """bf16 set through accelerate's environment (as `accelerate config` would), not the flag:
    the LoRA tensors still train in float32 while the frozen UNet runs in bf16."""
    from safetensors.torch import load_file as load

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = tmp_path / "bf16"
    run(base_args(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--rank=2", "--checkpointing_steps=1", steps=2))
    state = torch.load(out / "checkpoint-1" / "state_rank0.pt", weights_only=False)
    trainable = state["objects"]["trainable"]
    assert trainable and all(t.dtype == torch.float32 for t in trainable.values())
    assert load(out / "pytorch_lora_weights.safetensors")


def test_fresh_run_refuses_an_output_dir_with_checkpoints(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """A new run would prune the earlier run's checkpoints: it stops and says how to continue."""
    out = tmp_path / "existing"
    run(base_args(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--checkpointing_steps=1", steps=2))
    before = sorted(p.name for p in out.glob("checkpoint-*"))
    _one_line_error(capsys, base_args(tiny_model_dir, tiny_data_dir, out, "--use_lora", steps=2),
                    r"already holds checkpoints .*checkpoint-1.*--resume_from_checkpoint=latest")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == before
