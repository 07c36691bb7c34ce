"""The scorer on SDXL models, offline: the tiny SDXL folder (two text encoders, size and crop
conditioning) scored end to end, full and with --lora_weights written by the SDXL recipe; the
detection score with SDXL's pooled embeddings and time ids; unsupported pipelines refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import cli_error, noise_magnitude_probe
from sd_memfree.scoring import generate, run
from sd_memfree.testing import standin

SDXL = "StableDiffusionXLPipeline"


@pytest.fixture(scope="module")
def sdxl_dir(tiny_sdxl_dir) -> Path:
    return tiny_sdxl_dir


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_dir):
    return generate.load_pipeline(str(sdxl_dir), None, torch.device("cpu"))


@pytest.fixture(scope="module")
def lora_dir(sdxl_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """LoRA weights as the SDXL recipe writes them (2 steps at a large learning rate, so the
    adapter moves the generations visibly)."""
    from train_scripts import train_sdxl_ietagc as train

    out = tmp_path_factory.mktemp("score-sdxl-lora") / "lora"
    train.main(train.parse_args([
        f"--pretrained_model_name_or_path={sdxl_dir}", f"--train_data_dir={tiny_data_dir}", f"--output_dir={out}",
        "--resolution=32", "--train_batch_size=2", "--max_train_steps=2", "--learning_rate=5e-2", "--lr_warmup_steps=0",
        "--seed=0", "--report_to=none", "--use_lora",
    ]))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    return out


@pytest.fixture(scope="module")
def scored(sdxl_dir, lora_dir, tiny_data_dir, tmp_path_factory):
    """Both runs with the same prompts, seeds and stand-in weights: {'full': (out, metrics), 'lora': ...}."""
    root = tmp_path_factory.mktemp("score-sdxl-weights")
    clip_name, clip_file = standin.make_tiny_clip(root / "clip")
    sscd_file = standin.make_standin_sscd(root / "sscd.pt")
    runs = {}
    for name, extra in (("full", []), ("lora", ["--lora_weights", str(lora_dir)])):
        out = tmp_path_factory.mktemp(f"score-sdxl-{name}")
        runs[name] = out, run.main(run.parse_args([
            "--model", str(sdxl_dir), *extra, "--train_data_dir", str(tiny_data_dir), "--sscd_model", str(sscd_file),
            "--num_prompts", "3", "--num_inference_steps", "2", "--batch_size", "2", "--seed", "42",
            "--clip_model", clip_name, "--clip_pretrained", str(clip_file), "--no_fid",
            "--embedding_cache_dir", str(root / "cache"), "--num_pairs", "2", "--out", str(out),
        ]))
    return runs


def test_sdxl_folder_loads_as_sdxl_at_its_own_size(sdxl_pipe, tiny_model_dir):
    """model_index.json picks the class; the default size is UNet sample size 16 x VAE scale 2 = 32
    (what SDXL's __call__ uses when not told; 128 x 8 = 1024 for SDXL base)."""
    assert type(sdxl_pipe).__name__ == SDXL
    assert sdxl_pipe.unet.config.sample_size == 16 and sdxl_pipe.vae_scale_factor == 2
    assert generate.default_resolution(sdxl_pipe) == 32
    assert generate.pipeline_class_name(str(tiny_model_dir)) == "StableDiffusionPipeline"


def test_sdxl_probe_equals_hand_computed_first_step_with_and_without_guidance(sdxl_pipe):
    """First step, same x_T: ||unet(x, t0, text, pooled) - unet(x, t0, uncond)|| per generation,
    where SDXL base's unconditional (force_zeros_for_empty_prompt) is zero embeddings and zero
    pooled embeddings, and both calls get the generation's time ids (32, 32, 0, 0, 32, 32):
    original size, crop top-left, target size. With guidance (no extra call) and without (one
    extra call) it is the same number, and equals the two UNet calls made here by hand."""
    pipe = sdxl_pipe
    assert pipe.config.force_zeros_for_empty_prompt
    prompts = ["a red circle at the top left", "a blue square"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with_cfg = noise_magnitude_probe(pipe, prompts, latents, 7.5)
    without = noise_magnitude_probe(pipe, prompts, latents, 1.0)
    pipe.scheduler.set_timesteps(3)
    t0 = pipe.scheduler.timesteps[0]
    with torch.no_grad():
        text, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]]).expand(2, -1)
        x = pipe.scheduler.scale_model_input(latents * pipe.scheduler.init_noise_sigma, t0)
        eps_text = pipe.unet(x, t0, text, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        eps_uncond = pipe.unet(x, t0, torch.zeros_like(text), added_cond_kwargs={"text_embeds": torch.zeros_like(pooled), "time_ids": time_ids}).sample
    want = (eps_text - eps_uncond).flatten(1).norm(dim=1)
    torch.testing.assert_close(with_cfg, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(without, want, rtol=1e-4, atol=1e-6)
    assert with_cfg[0] != pytest.approx(float(with_cfg[1]), rel=1e-3)  # per prompt, not per batch


def test_sdxl_empty_prompt_scores_against_the_pipelines_own_unconditional(sdxl_pipe):
    """The score measures how far the prompt pulls eps from the unconditional one. With
    force_zeros_for_empty_prompt off, the unconditional embeddings (and pooled ones) ARE the empty
    prompt's, so the empty prompt scores 0 (up to round-off; guidance or not) while a real prompt
    scores > 0. With SDXL base's setting (on), the unconditional is zeros, which the empty
    prompt's encoding is not: there it scores > 0 too. (The tiny random text encoders map every prompt near one point,
    so with zeros as the reference a real prompt and "" score within 0.1% of each other.)"""
    pipe = sdxl_pipe
    prompts = ["a red circle at the top left", ""]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    zeros_uncond = noise_magnitude_probe(pipe, prompts, latents, 1.0)
    assert torch.isfinite(zeros_uncond).all() and (zeros_uncond > 0.1).all()
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        for guidance in (7.5, 1.0):
            got = noise_magnitude_probe(pipe, prompts, latents, guidance)
            assert float(got[0]) > 0.1 and float(got[1]) < 1e-4 * float(got[0]), (guidance, got)  # 0 up to round-off
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)


def _finite(d: dict) -> bool:
    return all(v is None or isinstance(v, (str, bool)) or math.isfinite(v) for v in d.values())


@pytest.mark.parametrize("name", ["full", "lora"])
def test_sdxl_scored_end_to_end(scored, name):
    """3 prompts x 1 image of the SDXL folder (and with the LoRA): every metric present and finite,
    generations at the model's own 32 px, one positive finite detection score per generation."""
    out, result = scored[name]
    assert result["run"]["pipeline"] == SDXL and result["run"]["resolution"] == 32
    pngs = sorted((out / "generated").glob("*.png"))
    assert [p.name for p in pngs] == ["00000.png", "00001.png", "00002.png"]
    assert all(Image.open(p).size == (32, 32) for p in pngs)
    g = result["gen_vs_train"]
    assert g["count"] == 3 and _finite(g) and -1 <= g["mean"] <= 1
    assert result["train_vs_train"]["count"] == 12 and _finite(result["train_vs_train"])
    assert math.isfinite(result["clip_score"]) and -1 <= result["clip_score"] <= 1
    assert _finite(result["pixel"]) and result["pixel"]["pixel_distinct_train"] == 8
    nm = result["noise_magnitude"]
    assert nm["count"] == 3 and nm["steps"] == 2 and _finite(nm)
    per_image = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    assert all(math.isfinite(p["noise_magnitude"]) and p["noise_magnitude"] > 0 for p in per_image)
    for f in ("metrics.json", "report.html", "model_card_snippet.md"):
        assert (out / f).is_file()


def test_sdxl_lora_weights_change_the_generations(scored, lora_dir):
    """Same prompts and seeds, base vs base + LoRA: the images and the detection scores differ."""
    (full_out, full), (lora_out, lora) = scored["full"], scored["lora"]
    assert lora["run"]["lora_weights"] == str(lora_dir) and full["run"]["lora_weights"] is None
    meta = [[json.loads(line) for line in (o / "generated" / "metadata.jsonl").read_text().splitlines()] for o in (full_out, lora_out)]
    assert [(m["text"], m["seed"]) for m in meta[0]] == [(m["text"], m["seed"]) for m in meta[1]]
    diffs = [np.abs(np.asarray(Image.open(full_out / "generated" / m["file_name"]), dtype=np.int16)
                    - np.asarray(Image.open(lora_out / "generated" / m["file_name"]), dtype=np.int16)).mean() for m in meta[0]]
    assert min(diffs) > 1.0, diffs  # mean |difference| over a 0-255 scale, every image
    assert [m["noise_magnitude"] for m in meta[0]] != pytest.approx([m["noise_magnitude"] for m in meta[1]], rel=1e-3)


def test_unsupported_pipeline_or_no_model_index_is_one_line_before_any_work(tmp_path, sdxl_dir, lora_dir, tiny_data_dir, capsys, monkeypatch):
    """A pipeline class the scorer cannot drive, or a LoRA folder passed as --model (no
    model_index.json): one line naming the problem and the fix, exit 2, nothing loaded or written."""
    def refuse(*a, **k):
        raise AssertionError("the pipeline was loaded before the input was checked")

    monkeypatch.setattr(generate, "load_pipeline", refuse)
    other = tmp_path / "flux"
    other.mkdir()
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    common = ["--train_data_dir", str(tiny_data_dir), "--sscd_model", str(tmp_path / "unused.pt"), "--out", str(tmp_path / "o")]
    err = cli_error(capsys, run.cli, ["--model", str(other), *common])
    assert "is a FluxPipeline pipeline" in err and "StableDiffusionPipeline or StableDiffusionXLPipeline" in err and "--generated_dir" in err
    err = cli_error(capsys, run.cli, ["--model", str(lora_dir), *common])
    assert f"--model {lora_dir}" in err and "model_index.json" in err and "--lora_weights" in err
    assert not (tmp_path / "o").exists()
