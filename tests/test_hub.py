"""Model card and upload filtering, offline (the Hub API is faked)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS
from PIL import Image

from sd_memfree.hub import (
    files_to_upload,
    memorization_section,
    push_to_hub,
    upload_ignore_patterns,
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
    assert (
        f"sd-memfree score --model {tmp_path} --train_data_dir ./my_images "
        "--sscd_model sscd_disc_large --out report/"
    ) in text


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
    assert f'from_pretrained("{local_model}"' in text
    loaded, _ = card(out, dataset="lambdalabs/naruto-blip-captions")
    assert loaded.data.datasets == ["lambdalabs/naruto-blip-captions"]


def test_validation_images_saved_and_referenced(tmp_path):
    images = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    _, text = card(tmp_path, images=images)
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        assert f"![image_{i}](./image_{i}.png)" in text
        assert Image.open(tmp_path / f"image_{i}.png").getpixel((0, 0)) == color


def make_output_dir(root: Path) -> Path:
    for rel in (
        "unet/diffusion_pytorch_model.safetensors",
        "unet/config.json",
        "model_index.json",
        "README.md",
        "image_0.png",
        "memfree_config.json",
        "memfree_state.json",
        "checkpoint-10/model.safetensors",
        "checkpoint-10/.complete",
        ".tmp-checkpoint-20/random_states_0.pkl",
        ".tmp-checkpoint-30.old/.complete",
        "logs/train/events.out.tfevents.1.host",
        "step_100/pytorch_lora_weights.safetensors",
        "epoch_1/pytorch_lora_weights.safetensors",
        "unet/diffusion_pytorch_model.safetensors.partial",
        ".git/config",
    ):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("---\nlicense: mit\n---\n" if rel == "README.md" else "x")
    return root


# Hand-written: model files, card, its image and the memfree files; nothing else.
EXPECTED_UPLOAD = [
    "README.md",
    "image_0.png",
    "memfree_config.json",
    "memfree_state.json",
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
]


def test_files_to_upload_exact_list(tmp_path):
    assert files_to_upload(make_output_dir(tmp_path)) == EXPECTED_UPLOAD


def test_files_to_upload_matches_what_hf_api_would_send(tmp_path, monkeypatch):
    """Cross-check with HfApi's own folder walk and filter (the step upload_folder runs before
    it uploads; README validation is a network call, so it is stubbed)."""
    out = make_output_dir(tmp_path)
    api = HfApi()
    monkeypatch.setattr(api, "_validate_yaml", lambda **kwargs: None)
    ops = api._prepare_upload_folder_additions(out, "", ignore_patterns=upload_ignore_patterns() + DEFAULT_IGNORE_PATTERNS)
    assert sorted(op.path_in_repo for op in ops) == files_to_upload(out) == EXPECTED_UPLOAD


def test_custom_logging_dir_is_ignored(tmp_path):
    (tmp_path / "tb" / "run").mkdir(parents=True)
    (tmp_path / "tb" / "run" / "events").write_text("x")
    (tmp_path / "model_index.json").write_text("{}")
    assert "tb/**" in upload_ignore_patterns(logging_dir="tb")
    assert files_to_upload(tmp_path, upload_ignore_patterns(logging_dir="tb")) == ["model_index.json"]
    assert files_to_upload(tmp_path) == ["model_index.json", "tb/run/events"]


class FakeApi:
    """Records calls; create_repo fills in a namespace like the Hub does for a bare name."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"someone/{repo_id}")

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


def test_push_to_hub_records_calls_without_network(tmp_path):
    api = FakeApi()
    assert push_to_hub(tmp_path, "sd-private", api=api) == "someone/sd-private"
    assert api.calls == [
        ("create_repo", "sd-private", {"exist_ok": True}),
        (
            "upload_folder",
            {
                "repo_id": "someone/sd-private",
                "folder_path": tmp_path,
                "commit_message": "End of training",
                "ignore_patterns": ["checkpoint-*", ".tmp-checkpoint-*", "logs/**", "step_*", "epoch_*", "*.partial"],
            },
        ),
    ]


def test_push_to_hub_passes_logging_dir_and_message(tmp_path):
    api = FakeApi()
    push_to_hub(tmp_path, "me/x", commit_message="final", api=api, logging_dir="tb")
    upload = api.calls[1][1]
    assert upload["commit_message"] == "final"
    assert "tb/**" in upload["ignore_patterns"] and "logs/**" not in upload["ignore_patterns"]


def test_written_card_and_images_are_uploaded(tmp_path):
    """Writing the card adds README.md and image_0/1.png to the upload list, nothing else."""
    save_dir = make_output_dir(tmp_path)
    (save_dir / "image_0.png").unlink()
    write_model_card(save_dir, repo_id="me/x", base_model=BASE, method_config=ALL_OFF, training_args=ARGS,
                     is_lora=False, images=[Image.new("RGB", (4, 4))] * 2)
    assert files_to_upload(save_dir) == sorted(EXPECTED_UPLOAD + ["image_1.png"])
