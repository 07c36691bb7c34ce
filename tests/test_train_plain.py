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

from helpers import cli_error, run_two_processes, scaled_accelerator, train_argv
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
    summary = run(train_argv(tiny_model_dir, tiny_data_dir, out))
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
    run(train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--rank=4"))
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


def _final_unet(out: Path) -> dict:
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


def test_resume_equals_straight_run(tiny_model_dir, tiny_data_dir, tmp_path):
    """Full fine-tuning: 4 steps straight == 2 steps, stop, resume from checkpoint-2, 2 more steps
    (bit-identical on CPU). LoRA's resume: test_checkpoint_contents.py (4 steps resumed to 8)."""
    straight = tmp_path / "straight"
    run(train_argv(tiny_model_dir, tiny_data_dir, straight, "--random_flip", steps=4))
    first = tmp_path / "first"
    run(train_argv(tiny_model_dir, tiny_data_dir, first, "--random_flip", "--checkpointing_steps=2", steps=4))
    # ``first`` ran 4 steps with a checkpoint at 2; resume a fresh output dir from that checkpoint.
    resumed = tmp_path / "resumed"
    run(train_argv(tiny_model_dir, tiny_data_dir, resumed, "--random_flip", f"--resume_from_checkpoint={first / 'checkpoint-2'}", steps=4))
    a, b = _final_unet(straight), _final_unet(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = _final_unet(first)
    assert all(torch.equal(a[k], c[k]) for k in a), "writing a checkpoint must not perturb training"


def test_checkpoints_total_limit_keeps_newest(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "ckpt"
    run(train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--checkpointing_steps=1", "--checkpoints_total_limit=2", steps=4))
    # the last step (4) falls on --checkpointing_steps, so it is checkpointed too (as upstream)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert not list(out.glob(".tmp-checkpoint-*"))
    # resume "latest" continues from checkpoint-4 to step 6, still keeping the newest two
    again = run(train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--checkpointing_steps=1", "--checkpoints_total_limit=2",
                          "--resume_from_checkpoint=latest", steps=6))
    assert again["global_step"] == 6 and again["steps_this_run"] == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]


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
    run(train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--checkpointing_steps=2", "--push_to_hub",
                  "--hub_model_id=me/tiny-private", "--hub_token=tok"))
    uploads = [c for c in calls if c[0] == "upload"]
    assert len(uploads) == 1 and uploads[0][1] == "me/tiny-private"
    files = uploads[0][2]
    assert "pytorch_lora_weights.safetensors" in files and "README.md" in files and "memfree_config.json" in files
    assert not [f for f in files if f.startswith(("checkpoint-", "logs/", ".tmp-checkpoint"))]
    assert (out / "checkpoint-2").exists()


# ---- bad inputs stop before training, with one line naming the fix -----------------------------

def test_no_dataset_given(capsys):
    line = cli_error(capsys, train.cli, ["--pretrained_model_name_or_path=x"], usage=True)
    assert re.search(r"--dataset_name .* or --train_data_dir", line), line


def test_missing_image_file(capsys, tiny_model_dir, tiny_data_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    (data / "00001.png").unlink()
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, data, tmp_path / "o"))
    assert re.search(r"00001\.png.*missing.*add it or remove", line), line
    assert not (tmp_path / "o").exists(), "nothing is written before validation passes"


def test_corrupt_image_file(capsys, tiny_model_dir, tiny_data_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    (data / "00002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, data, tmp_path / "o"))
    assert re.search(r"cannot be used: .*00002\.png .*fix or remove them, or pass --drop_bad_samples", line), line


def test_missing_caption_column(capsys, tiny_model_dir, tiny_data_dir, tmp_path):
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, tmp_path / "o", "--caption_column=caption"))
    assert re.search(r"--caption_column 'caption' is not a column.*image, text", line), line


def test_empty_dataset(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "empty"
    data.mkdir()
    (data / "metadata.jsonl").write_text("")
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, data, tmp_path / "o"))
    assert re.search(r"(empty|no images|could not load)", line), line


def test_model_folder_missing_or_incomplete(capsys, tiny_model_dir, tiny_data_dir, tmp_path):
    import shutil

    line = cli_error(capsys, train.cli, train_argv(tmp_path / "nope", tiny_data_dir, tmp_path / "o"))
    assert re.search(r"does not exist", line), line
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    line = cli_error(capsys, train.cli, train_argv(broken, tiny_data_dir, tmp_path / "o"))
    assert re.search(r"lacks the subfolder\(s\) vae", line), line


def test_resolution_the_vae_cannot_take(capsys, tiny_model_dir, tiny_data_dir, tmp_path):
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, tmp_path / "o", resolution=1))
    assert re.search(r"--resolution=1 is too small for this model: its VAE downsamples by 2, so use at least 2\.", line), line
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, tmp_path / "o", "--validation_prompt=a ring", resolution=30))
    assert re.search(r"--resolution=30 trains, but .* multiple of 8 \(e\.g\. 24 or 32\)", line), line


def test_upstream_options_together_full(tiny_model_dir, tiny_data_dir, tmp_path):
    """EMA, accumulation, Min-SNR, noise offset, input perturbation, v-prediction, gradient
    checkpointing, cosine schedule, scale_lr, center crop, max_train_samples, --dataset_name
    (a local folder) and validation prompts, all in one short run."""
    out = tmp_path / "kitchen"
    argv = [a for a in train_argv(tiny_model_dir, tiny_data_dir, out, steps=3) if not a.startswith("--train_data_dir")]
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
    summary = run(train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--rank=2", "--validation_prompt=a blue square",
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
    run(train_argv(tiny_model_dir, tiny_data_dir, tmp_path / "clip", "--use_lora", "--rank=2", steps=2))
    assert len(seen) == 2
    n_lora = seen[0][0]
    assert n_lora > 0 and all(s == (n_lora, n_lora) for s in seen)


def test_lora_upcast_follows_accelerate_mixed_precision(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """bf16 set through accelerate's environment (as `accelerate config` would), not the flag:
    the LoRA tensors still train in float32 while the frozen UNet runs in bf16."""
    from safetensors.torch import load_file as load

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = tmp_path / "bf16"
    run(train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--rank=2", "--checkpointing_steps=1", steps=2))
    from sd_memfree.run.state import read_process_state

    state = read_process_state(out / "checkpoint-1", 0)
    trainable = state["objects"]["trainable"]
    assert trainable and all(t.dtype == torch.float32 for t in trainable.values())
    assert load(out / "pytorch_lora_weights.safetensors")


def test_fresh_run_refuses_an_output_dir_with_checkpoints(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """A new run would prune the earlier run's checkpoints: it stops and says how to continue."""
    out = tmp_path / "existing"
    run(train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--checkpointing_steps=1", steps=2))
    before = sorted(p.name for p in out.glob("checkpoint-*"))
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", steps=2))
    assert re.search(r"already holds checkpoints .*checkpoint-2.*--resume_from_checkpoint=latest", line), line
    assert sorted(p.name for p in out.glob("checkpoint-*")) == before


# ---- the plain path against upstream, point by point (issue 10) ---------------------------------

def _scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the TensorBoard tracker wrote under out/logs: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for run_dir in sorted({p.parent for p in (out / "logs").rglob("events.out.tfevents.*")}):  # hparams go in a sub-run
        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


def test_lora_default_output_dir_is_upstreams():
    """Each upstream script's default: sd-model-finetuned (full), sd-model-finetuned-lora (LoRA)."""
    a = ["--pretrained_model_name_or_path=x", "--train_data_dir=y"]
    assert train.parse_args(a).output_dir == "sd-model-finetuned"
    assert train.parse_args(a + ["--use_lora"]).output_dir == "sd-model-finetuned-lora"
    assert train.parse_args(a + ["--use_lora", "--output_dir=mine"]).output_dir == "mine"


def test_train_loss_logged_for_every_optimizer_step(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    """12 steps x 2 micro-batches: the tracker holds train_loss at steps 1..12 (flushed at 10 and
    12), each the mean of that step's two micro-batch losses, as upstream's
    ``train_loss += loss / gradient_accumulation_steps``; the progress bar shows step_loss and lr."""
    from sd_memfree.memfree import MemFree

    micro = []
    real = MemFree.reduce

    def spy(*a, **k):  # the loss of each micro-batch, as the loop backpropagates it
        loss = real(*a, **k)
        micro.append(loss.item())
        return loss

    monkeypatch.setattr(MemFree, "reduce", spy)
    out = tmp_path / "logged"
    run(train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--gradient_accumulation_steps=2",
                  "--lr_scheduler=linear", "--lr_warmup_steps=4", "--report_to=tensorboard", steps=12))
    assert len(micro) == 24
    scalars = _scalars(out)
    logged = scalars["train_loss"]
    assert [s for s, _ in logged] == list(range(1, 13))
    for step, value in logged:
        assert value == pytest.approx((micro[2 * step - 2] + micro[2 * step - 1]) / 2, rel=1e-6), step
    # lr after each step: warm-up 1e-3 * s / 4 to step 4, then linear decay to 0 at step 12
    want = [1e-3 * s / 4 if s <= 4 else 1e-3 * (12 - s) / 8 for s in range(1, 13)]
    assert [s for s, _ in scalars["lr"]] == list(range(1, 13))
    assert [v for _, v in scalars["lr"]] == pytest.approx(want, abs=1e-9)
    err = capsys.readouterr().err
    assert "step_loss=" in err and "lr=" in err


def test_lr_schedule_waits_when_loss_scaling_skips_the_step(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """Warm-up over 4 steps at lr 1e-3: step 1 skipped, so the LR after steps 1..4 is
    [0, 0.25, 0.5, 0.75] x 1e-3 (upstream's prepared scheduler does not step either), where a
    scheduler stepping regardless would give [0.25, 0.5, 0.75, 1.0] x 1e-3.

    On CPU accelerate makes no GradScaler, so the test gives it torch's (scale 1) and writes an
    inf into one gradient of step 1, as an fp16 overflow would: the unscale, overflow check and
    skip are torch's and accelerate's real code; fp16 autocast itself is not exercised."""
    import accelerate

    skipped = []
    monkeypatch.setattr(accelerate, "Accelerator", scaled_accelerator(skipped))
    out = tmp_path / "scaled"
    run(train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--lr_scheduler=constant_with_warmup",
                  "--lr_warmup_steps=4", "--report_to=tensorboard", steps=4))
    assert skipped == [True, False, False, False], "the overflow must skip step 1 only"
    assert [v for _, v in _scalars(out)["lr"]] == pytest.approx([0.0, 0.25e-3, 0.5e-3, 0.75e-3], rel=1e-6, abs=1e-12)  # TensorBoard keeps float32


def test_validation_uses_the_ema_weights_and_training_goes_on_from_its_own(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """12 images, batch 2: an epoch is 6 steps, so validation runs after epoch 0 (step 6, as
    upstream's ``epoch % validation_epochs == 0``) with the EMA weights swapped in; afterwards the
    training weights come back, so the final model equals a run without validation."""
    from diffusers.training_utils import EMAModel

    emas, seen = [], []
    real_step, real_validation = EMAModel.step, train.log_validation

    def ema_step(self, parameters):
        if not emas:
            emas.append(self)
        return real_step(self, parameters)

    def validation(parts, args, accelerator, weight_dtype, step, is_final=False):
        if not is_final:
            ema = emas[0]
            weights = [p.detach().clone() for p in parts["unet"].parameters()]
            seen.append((step, all(torch.equal(w, s.to(w.device)) for w, s in zip(weights, ema.shadow_params)),
                         any(not torch.equal(w, t.to(w.device)) for w, t in zip(weights, ema.temp_stored_params))))
        return real_validation(parts, args, accelerator, weight_dtype, step, is_final)

    monkeypatch.setattr(EMAModel, "step", ema_step)
    monkeypatch.setattr(train, "log_validation", validation)
    validated = tmp_path / "validated"
    run(train_argv(tiny_model_dir, tiny_data_dir, validated, "--use_ema", "--validation_epochs=1",
                  "--validation_prompts", "a red circle", steps=8))
    assert seen == [(6, True, True)], "one validation after epoch 0, on the EMA weights, which differ from the training weights"
    plain = tmp_path / "plain"
    run(train_argv(tiny_model_dir, tiny_data_dir, plain, "--use_ema", steps=8))
    a, b = _final_unet(validated), _final_unet(plain)
    assert all(torch.equal(a[k], b[k]) for k in a), "validation must hand the training weights back"


def _base_with_safety_checker(src: Path, dst: Path) -> Path:
    """The tiny model plus a (tiny, random) StableDiffusionSafetyChecker and CLIPImageProcessor."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    layer = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=dict(layer, vocab_size=100), projection_dim=8,
                                                      vision_config=dict(layer, image_size=32, patch_size=16)))
    pipe.register_modules(safety_checker=checker, feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                                       crop_size={"height": 32, "width": 32}))
    pipe.register_to_config(requires_safety_checker=True)
    pipe.save_pretrained(dst)
    return dst


def test_saved_pipeline_keeps_the_base_safety_checker(tiny_model_dir, tiny_data_dir, tmp_path):
    """A base with a safety checker gives a fine-tuned pipeline with the same checker (as
    upstream's save); a base without one gives none (the tiny model has none)."""
    base = _base_with_safety_checker(tiny_model_dir, tmp_path / "base")
    out = tmp_path / "checked"
    run(train_argv(base, tiny_data_dir, out, steps=1))
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert index["feature_extractor"][1] == "CLIPImageProcessor"
    b = load_file(base / "safety_checker" / "model.safetensors")
    a = load_file(out / "safety_checker" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from sd_memfree.trainable import save_full_pipeline
    from diffusers import UNet2DConditionModel

    bare = save_full_pipeline(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"), str(tiny_model_dir), tmp_path / "bare")
    assert json.loads((bare / "model_index.json").read_text())["safety_checker"] == [None, None]
    assert not (bare / "safety_checker").exists()


def test_final_lora_validation_honours_revision_and_variant(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """A base saved only as variant "v1" (file names *.v1.safetensors) cannot load without
    --variant; every pipeline the run builds, the final LoRA validation's included, gets the
    run's --revision and --variant."""
    from diffusers import StableDiffusionPipeline

    base = tmp_path / "variant-base"
    StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False).save_pretrained(base, variant="v1")
    calls = []
    real = StableDiffusionPipeline.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        calls.append((kwargs.get("revision"), kwargs.get("variant")))
        return real(cls, path, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(spy))
    out = tmp_path / "lora-variant"
    run(train_argv(base, tiny_data_dir, out, "--use_lora", "--rank=2", "--variant=v1", "--revision=main",
                  "--validation_prompt=a red circle", "--num_validation_images=1", steps=1))
    assert len(calls) >= 2 and set(calls) == {("main", "v1")}
    assert (out / "pytorch_lora_weights.safetensors").exists()


def test_plain_step_is_upstreams_math(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """With the random draws forced equal, our plain path computes upstream's update: the UNet
    inputs and targets of each of our 3 steps are recorded, then replayed through upstream's step
    (``F.mse_loss(..., reduction="mean")``, backward, ``clip_grad_norm_(unet.parameters(), 1)``,
    AdamW, ``zero_grad``) from the same initial UNet. Losses and final weights agree to float
    round-off (our loss is a mean of per-sample means, upstream's one mean over the batch)."""
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    from sd_memfree.method import losses
    from sd_memfree.memfree import MemFree

    inputs, targets, ours = [], [], []
    real_forward, real_loss, real_mean = UNet2DConditionModel.forward, losses.per_sample_loss, MemFree.reduce

    def forward(self, sample, timestep, encoder_hidden_states, *a, **k):
        inputs.append((sample.detach().clone(), timestep.detach().clone(), encoder_hidden_states.detach().clone()))
        return real_forward(self, sample, timestep, encoder_hidden_states, *a, **k)

    def per_sample(pred, target):
        targets.append(target.detach().clone())
        return real_loss(pred, target)

    def mean(*a, **k):
        loss = real_mean(*a, **k)
        ours.append(loss.item())
        return loss

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    monkeypatch.setattr(losses, "per_sample_loss", per_sample)
    monkeypatch.setattr(MemFree, "reduce", mean)
    out = tmp_path / "ours"
    run(train_argv(tiny_model_dir, tiny_data_dir, out, steps=3))
    monkeypatch.undo()
    assert len(inputs) == len(targets) == 3

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    upstream = []
    for (noisy_latents, timesteps, encoder_hidden_states), target in zip(inputs, targets):
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        upstream.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    assert ours == pytest.approx(upstream, rel=1e-5)
    saved = _final_unet(out)
    replayed = unet.state_dict()
    assert saved.keys() == replayed.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, replayed[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.multiprocess
def test_train_loss_is_averaged_over_processes(tiny_model_dir, tiny_data_dir, tmp_path):
    """2 processes data-parallel (gloo), 3 steps: the tracker's train_loss at step s is the mean of
    the two processes' step-s losses (upstream: ``accelerator.gather(loss.repeat(bsz)).mean()``),
    gathered once per flush. Each process records its own losses through a spy on MemFree.reduce."""
    repo = Path(train.__file__).resolve().parents[1]
    out = tmp_path / "dp"
    launcher = tmp_path / "spy_launch.py"
    launcher.write_text(
        "import json, os, sys\n"
        f"sys.path.insert(0, {str(repo)!r})\n"
        "from sd_memfree.memfree import MemFree\n"
        "from train_scripts import train_sd_ietagc as train\n"
        "seen, real = [], MemFree.reduce\n"
        "def spy(*a, **k):\n"
        "    loss = real(*a, **k)\n"
        "    seen.append(loss.item())\n"
        "    return loss\n"
        "MemFree.reduce = spy\n"
        "args = train.parse_args(sys.argv[1:])\n"
        "train.main(args)\n"
        "open(os.path.join(args.output_dir, 'losses_%s.json' % os.environ['RANK']), 'w').write(json.dumps(seen))\n")
    run_two_processes(launcher, train_argv(tiny_model_dir, tiny_data_dir, out, "--report_to=tensorboard", steps=3))
    per_rank = [json.loads((out / f"losses_{r}.json").read_text()) for r in (0, 1)]
    assert all(len(v) == 3 for v in per_rank) and per_rank[0] != per_rank[1]
    logged = _scalars(out)["train_loss"]
    assert [s for s, _ in logged] == [1, 2, 3]
    assert [v for _, v in logged] == pytest.approx([(a + b) / 2 for a, b in zip(*per_rank)], rel=1e-6)
