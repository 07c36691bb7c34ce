"""Model card and upload filtering, offline (the Hub API is faked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from PIL import Image

from hub_fakes import RecordingApi
from sd_memfree.hub import (
    HubError,
    create_repo,
    files_to_upload,
    memorization_section,
    push_to_hub,
    upload_allow_patterns,
    write_model_card,
)

BASE = "stabilityai/stable-diffusion-2-1-base"
TAGS = [
    "stable-diffusion",
    "stable-diffusion-diffusers",
    "text-to-image",
    "diffusers",
    "diffusers-training",
    "sd-memfree",
    "iet-agc",
    "memorization-mitigation",
]
IET_AGC_PLUS = dict(
    num_shards=4,
    merge_every=2000,
    proxy_optimizer_state="per_proxy",
    agc_ratio=1.25,
    agc_ema=0.8,
    redistribute_fraction=0.25,
    redistribute_at="mid_round",
    loss_aware_augmentation=True,
    augment_max_magnitude=5,
    augment_alpha=5.0,
)
ALL_OFF = dict(IET_AGC_PLUS, num_shards=1, agc_ratio=0.0, redistribute_fraction=0.0, loss_aware_augmentation=False)
ARGS = dict(
    learning_rate=2.5e-6,
    max_train_steps=20000,
    train_batch_size=8,
    resolution=256,
    mixed_precision="fp16",
    rank=16,
    output_dir="ignored-in-card",
)
METRICS = {
    "sim_mean": 0.31234,
    "sim_95pc": 0.51234,
    "frac_gt_0.5": 0.0625,
    "clip_score": 0.3012,
    "sscd_model": "sscd_disc_large",
    "preprocess": "paper",
    "num_prompts": 4000,
    "train_vs_train": {"sim_95pc": 0.4},
}


def card(tmp_path: Path, **overrides) -> tuple[ModelCard, str]:
    kwargs = dict(
        repo_id="me/sd-private",
        base_model=BASE,
        method_config=IET_AGC_PLUS,
        training_args=ARGS,
        is_lora=False,
    )
    kwargs.update(overrides)
    path = write_model_card(tmp_path, **kwargs)
    assert path == tmp_path / "README.md"
    return ModelCard.load(path), path.read_text()


def test_full_card_metadata_parses_without_lora_tag(tmp_path):
    loaded, text = card(tmp_path, is_lora=False)
    assert loaded.data.base_model == BASE
    assert loaded.data.license == "creativeml-openrail-m"
    assert loaded.data.library_name == "diffusers"
    assert loaded.data.tags == TAGS
    assert 'StableDiffusionPipeline.from_pretrained("me/sd-private"' in text
    assert "load_lora_weights" not in text


def test_lora_card_has_lora_tag_and_loading_code(tmp_path):
    loaded, text = card(tmp_path, is_lora=True)
    assert loaded.data.tags == TAGS + ["lora"]
    assert f'StableDiffusionPipeline.from_pretrained("{BASE}"' in text
    assert 'pipe.load_lora_weights("me/sd-private")' in text
    assert "| `rank` | 16 |" in text


def test_card_states_method_settings_and_papers(tmp_path):
    """IET-AGC+ config: 4 shards merged every 2000 steps, ratio 1.25, 25% redistribution,
    loss-aware augmentation, and the key training settings (2.5e-6 -> "2.5e-06")."""
    _, text = card(tmp_path)
    assert "**IET-AGC+**" in text
    assert "split into 4 shards" in text and "every 2000 local optimizer steps" in text
    assert "1.25 x its loss" in text
    assert "up to 25% of its samples" in text
    assert "Loss-aware augmentation" in text
    assert "arxiv.org/abs/2407.15328" in text and "arxiv.org/abs/2502.09434" in text
    for row in ("| `learning_rate` | 2.5e-06 |", "| `max_train_steps` | 20000 |", "| `train_batch_size` | 8 |",
                "| `resolution` | 256 |", "| `mixed_precision` | fp16 |"):
        assert row in text
    assert "ignored-in-card" not in text
    assert "| `rank` |" not in text  # full fine-tune: LoRA rank is not a setting of this model


def test_card_names_only_what_was_on(tmp_path):
    """Shards + AGC without redistribution/augmentation is IET-AGC; everything off is plain."""
    _, text = card(tmp_path, method_config=dict(IET_AGC_PLUS, redistribute_fraction=0.0, loss_aware_augmentation=False))
    assert "**IET-AGC**" in text and "IET-AGC+**" not in text
    assert "Redistribution**" not in text and "Loss-aware augmentation**" not in text
    _, text = card(tmp_path, method_config=ALL_OFF)
    assert "No mitigation was enabled" in text
    assert "shards; one proxy" not in text and "x its loss" not in text


def test_card_states_scores_when_given(tmp_path):
    """0.51234 -> 4 significant digits "0.5123"; the scorer's settings are listed."""
    _, text = card(tmp_path, metrics=METRICS)
    assert "| `sim_95pc` | 0.5123 |" in text
    assert "| `sim_mean` | 0.3123 |" in text
    assert "| `frac_gt_0.5` | 0.0625 | fraction of generations with similarity > 0.5" in text
    assert "| `train_vs_train/sim_95pc` | 0.4 |" in text
    assert "- `sscd_model`: sscd_disc_large" in text
    assert "- `num_prompts`: 4000" in text
    assert "not been scored" not in text


def test_card_gives_scoring_command_when_unscored(tmp_path):
    _, text = card(tmp_path, dataset="./my_images")
    assert "has not been scored for memorization yet" in text


def test_memorization_section_order_and_settings():
    """Known scores first in the scorer's order (sim_mean before sim_95pc before clip_score),
    num_prompts is a setting even though it is a number, unknown scores are still shown."""
    text = memorization_section({"clip_score": 0.3, "new_metric": 1.5, "sim_95pc": 0.5, "num_prompts": 10, "sim_mean": 0.2})
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| `")]
    assert rows == ["`sim_mean`", "`sim_95pc`", "`clip_score`", "`new_metric`"]
    assert "- `num_prompts`: 10" in text
    assert "--model <output_dir> --train_data_dir <train_data_dir>" in memorization_section(None)


def test_local_base_model_and_dataset_stay_out_of_metadata(tmp_path):
    """A local folder as base model / dataset is not a Hub id: the Hub would reject it in the
    metadata, so it is named in the text only."""
    local_model = tmp_path / "tiny-sd"
    local_model.mkdir()
    out = tmp_path / "out"
    loaded, text = card(out, base_model=str(local_model), dataset=str(local_model), is_lora=True)
    assert loaded.data.base_model is None
    assert loaded.data.datasets is None
    assert 'from_pretrained("path/to/tiny-sd"' in text and str(local_model) not in text
    loaded, _ = card(out, dataset="lambdalabs/naruto-blip-captions")
    assert loaded.data.datasets == ["lambdalabs/naruto-blip-captions"]


def test_validation_images_saved_and_referenced(tmp_path):
    images = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    _, text = card(tmp_path, images=images)
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        assert f"![image_{i}](./image_{i}.png)" in text
        assert Image.open(tmp_path / f"image_{i}.png").getpixel((0, 0)) == color


def make_output_dir(root: Path, lora: bool = False) -> Path:
    """A run folder with the model, its card (showing image_0.png) and everything that must stay
    local: checkpoints, crash leftovers of an interrupted publish, logs in a custom folder, the
    run's settings, the skip statistics, scorer outputs and stray images."""
    model = ["pytorch_lora_weights.safetensors"] if lora else [
        "unet/diffusion_pytorch_model.safetensors", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
        "model_index.json"]
    for rel in (
        *model,
        "README.md",
        "image_0.png",
        "image_7.png",  # not shown by the card
        "memfree_config.json",
        "memfree_state.json",
        "train_args.json",
        "dropped_samples.json",
        "checkpoint-10/model.safetensors",
        "checkpoint-10/.complete",
        ".tmp-checkpoint-20/random_states_0.pkl",
        ".tmp-checkpoint-30.old/.complete",
        ".tmp-final/unet/diffusion_pytorch_model.safetensors",
        ".old-unet/diffusion_pytorch_model.safetensors",
        ".old-pytorch_lora_weights.safetensors",
        "logs/train/events.out.tfevents.1.host",
        "tb/run/events.out.tfevents.2.host",
        "step_100/pytorch_lora_weights.safetensors",
        "report/report.html",
        "report.html",
        "per_image.jsonl",
        "metrics.json",
        "generated/00000.png",
        "unet/diffusion_pytorch_model.safetensors.partial",
        ".git/config",
    ):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (root / "README.md").write_text("---\nlicense: mit\n---\n\n![image_0](./image_0.png)\n![gone](./image_5.png)\n")
    if not lora:
        (root / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.0", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None]}))
        (root / "safety_checker").mkdir()
        (root / "safety_checker" / "stray.bin").write_text("x")  # null in model_index.json: not part of the model
    return root


# Hand-written: model files, card, the image it shows and memfree_config.json; nothing else.
EXPECTED_FULL = [
    "README.md",
    "image_0.png",
    "memfree_config.json",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
]
EXPECTED_LORA = ["README.md", "image_0.png", "memfree_config.json", "pytorch_lora_weights.safetensors"]


def test_files_to_upload_is_an_allow_list(tmp_path):
    assert files_to_upload(make_output_dir(tmp_path / "full")) == EXPECTED_FULL
    assert files_to_upload(make_output_dir(tmp_path / "lora", lora=True)) == EXPECTED_LORA


def test_memfree_state_only_with_opt_in(tmp_path):
    out = make_output_dir(tmp_path)
    assert files_to_upload(out, upload_allow_patterns(out, include_memfree_state=True)) == sorted(EXPECTED_FULL + ["memfree_state.json"])


@pytest.mark.parametrize("lora", [False, True])
def test_push_to_hub_sends_exactly_the_listed_files(tmp_path, lora):
    """What huggingface_hub itself would send with the kwargs push_to_hub passes equals
    files_to_upload's list and the hand-written one."""
    out = make_output_dir(tmp_path, lora=lora)
    api = RecordingApi()
    assert push_to_hub(out, "sd-private", api=api) == "someone/sd-private"
    assert api.calls[0] == ("create_repo", "sd-private", {"exist_ok": True})
    assert api.calls[1][1]["repo_id"] == "someone/sd-private" and api.calls[1][1]["commit_message"] == "End of training"
    assert api.uploads == [files_to_upload(out)] == [EXPECTED_LORA if lora else EXPECTED_FULL]
    push_to_hub(out, "me/x", api=api, include_memfree_state=True, commit_message="final")
    assert api.uploads[-1] == sorted((EXPECTED_LORA if lora else EXPECTED_FULL) + ["memfree_state.json"])
    assert api.calls[-1][1]["commit_message"] == "final"


def test_written_card_and_images_are_uploaded(tmp_path):
    """Writing the card shows image_0 and image_1, so both go out; image_7 (not shown) stays."""
    save_dir = make_output_dir(tmp_path)
    write_model_card(save_dir, repo_id="me/x", base_model=BASE, method_config=ALL_OFF, training_args=ARGS,
                     is_lora=False, images=[Image.new("RGB", (4, 4))] * 2)
    assert files_to_upload(save_dir) == sorted(EXPECTED_FULL + ["image_1.png"])


def test_create_repo_failure_is_one_line_without_the_token():
    token = "hf_FAKEtoken0123456789"
    api = RecordingApi(fail=RuntimeError(f"401 Client Error: Unauthorized for token {token}\nmore detail"))
    with pytest.raises(HubError) as err:
        create_repo("me/x", token=token, api=api)
    msg = str(err.value)
    assert "\n" not in msg and token not in msg
    assert "'me/x'" in msg and "hf auth login" in msg
    with pytest.raises(HubError, match="not a valid Hub repo id"):
        create_repo("me/x/y", api=RecordingApi())


def test_card_has_no_local_paths(tmp_path):
    """A local base model, dataset and scorer files appear by name only; the scorer's top matches
    (training captions) are not in the card."""
    local_model = tmp_path / "secret-place" / "tiny-sd"
    local_model.mkdir(parents=True)
    data = tmp_path / "secret-place" / "my-images"
    metrics = {**METRICS, "sscd_model": str(tmp_path / "secret-place" / "sscd.pt"),
               "run": {"generated_dir": str(tmp_path / "secret-place" / "gen"), "dataset": str(data)},
               "top_matches": [{"prompt": "a private caption", "generated_file": "00001.png"}]}
    out = tmp_path / "out"
    for is_lora in (False, True):
        for m in (None, metrics):
            _, text = card(out, base_model=str(local_model), dataset=str(data), is_lora=is_lora, metrics=m)
            assert str(tmp_path) not in text and "secret-place" not in text and "a private caption" not in text
            assert "`tiny-sd` (a local model folder)" in text and "`my-images` (a local image folder)" in text
    assert "- `sscd_model`: sscd.pt" in text


def test_scoring_command_in_unscored_card(tmp_path):
    """Full model: score the published repo; LoRA: the base model plus --lora_weights; a Hub
    dataset is passed as --dataset_name."""
    _, text = card(tmp_path, dataset="./my_images")
    assert "sd-memfree score --model me/sd-private --train_data_dir path/to/my_images --sscd_model" in text
    _, text = card(tmp_path, is_lora=True, dataset="lambdalabs/naruto-blip-captions")
    assert (f"sd-memfree score --model {BASE} --lora_weights me/sd-private --dataset_name lambdalabs/naruto-blip-captions "
            "--sscd_model sscd_disc_large --out report/") in text
