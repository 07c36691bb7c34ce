"""The held-out monitor: held-out rows never reach training (checked by sample id), the loss is
the benchmark's denoising loss, logged at every checkpoint and at the end, in the summary, the
card and monitor.json; bad settings stop with one line."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from sd_memfree import monitor
from train_scripts import train_sd_ietagc as train


def base_args(model, data, out, *extra, steps=4):
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={out}",
            "--resolution=32", "--train_batch_size=2", f"--max_train_steps={steps}", "--learning_rate=1e-3",
            "--lr_warmup_steps=0", "--seed=7", "--report_to=none", "--checkpointing_steps=2", *extra]


def test_heldout_rows_are_chosen_by_seed():
    """round(0.25 x 14) = 4 rows (at least 1, at most n - 1), the same for the same seed."""
    a = monitor.heldout_rows(14, 0.25, seed=7)
    assert len(a) == 4 and a == sorted(a) and a == monitor.heldout_rows(14, 0.25, seed=7)
    assert a != monitor.heldout_rows(14, 0.25, seed=8)
    assert len(monitor.heldout_rows(3, 0.01, 0)) == 1 and len(monitor.heldout_rows(3, 0.99, 0)) == 2
    assert monitor.sample([5, 9, 11], 8, 0) == [5, 9, 11] and len(monitor.sample(list(range(100)), 8, 0)) == 8
    assert set(monitor.heldout_rows(14, 0.25, 7, exclude=range(10))) <= {10, 11, 12, 13}  # never a duplicated row
    assert monitor.heldout_rows(14, 0.5, 7, exclude=range(12)) == [12, 13]  # fewer when fewer are eligible


def test_heldout_rows_never_reach_training(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """Every item the training loader builds is recorded by sample id and mapped to its file:
    none is a held-out file. 12 rows (8 images, 2 of them x3), --heldout_fraction=0.25 -> 3 held
    out, 9 trained; the at-risk rows are those whose caption repeats (training rows only)."""
    from sd_memfree.data import IndexedCaptionDataset, load_image_caption_dataset
    from sd_memfree.scoring.risk import sample_file_names

    seen: list[str] = []
    original = IndexedCaptionDataset.__getitems__

    def recording(self, keys):
        names = sample_file_names(self.ds, self.image_column)
        seen.extend(names[int(sid)] for sid, _ in keys)
        return original(self, keys)

    monkeypatch.setattr(IndexedCaptionDataset, "__getitems__", recording)
    out = tmp_path / "run"
    summary = train.main(train.parse_args(base_args(tiny_model_dir, tiny_data_dir, out, "--heldout_fraction=0.25", steps=8)))
    doc = json.loads((out / monitor.MONITOR_FILE).read_text())
    full, image_col, _ = load_image_caption_dataset(train_data_dir=str(tiny_data_dir))
    names = sample_file_names(full, image_col)
    held = [names[i] for i in doc["heldout_rows_of_training_data"]]
    assert len(held) == 3 and summary["num_samples"] == 9 and len(seen) == 16
    assert set(seen).isdisjoint(held)
    assert sorted(doc["sets"]["heldout"]["files"]) == sorted(held)
    assert not set(doc["sets"]["at_risk"]["files"]) & set(held) and doc["sets"]["at_risk"]["source"] == "rows whose caption repeats"
    assert not any("_dup" in h or h.replace(".png", "_dup1.png") in names for h in held)  # no duplicated image held out
    assert doc["sets"]["at_risk"]["rows"] == 6
    assert [p["step"] for p in doc["curve"]] == [0, 2, 4, 6, 8]
    assert summary["monitor/heldout_loss"] == doc["curve"][-1]["heldout_loss"] > 0
    assert summary["monitor/at_risk_loss"] == doc["curve"][-1]["at_risk_loss"] > 0
    card = (out / "README.md").read_text()
    assert "## Held-out loss during training" in card and f"![held-out loss](./{monitor.CURVE_FILE})" in card
    from sd_memfree import hub

    assert monitor.CURVE_FILE in hub.files_to_upload(out) and monitor.MONITOR_FILE not in hub.files_to_upload(out)
    # `sd-memfree card` (adding the scorer's metrics) keeps the section
    from sd_memfree import cli

    (tmp_path / "metrics.json").write_text(json.dumps({"sim_95pc": 0.4321}))
    cli.main(["card", str(out), "--metrics", str(tmp_path / "metrics.json")])
    assert "## Held-out loss during training" in (out / "README.md").read_text()


def test_monitor_loss_is_the_benchmarks_denoising_loss(tiny_model_dir, tiny_data_dir, tmp_path):
    """--heldout_data_dir: the end point equals memorization_eval.denoising_loss of the saved
    pipeline on the same images (same noise seed, timesteps, posterior means), and an
    evaluation of unchanged weights repeats its number exactly."""
    from train_scripts import memorization_eval as ev

    from sd_memfree.testing.tiny import make_tiny_dataset

    held = make_tiny_dataset(tmp_path / "held", num_images=5, size=32, seed=0, first_index=500)
    out = tmp_path / "run"
    summary = train.main(train.parse_args(base_args(tiny_model_dir, tiny_data_dir, out, f"--heldout_data_dir={held}")))
    imgs, caps, _ = ev.read_imagefolder(held)
    assert summary["monitor/heldout_loss"] == pytest.approx(ev.denoising_loss(out, imgs, caps), rel=1e-5)
    doc = json.loads((out / monitor.MONITOR_FILE).read_text())
    assert doc["sets"]["heldout"]["evaluated"] == 5 and [p["step"] for p in doc["curve"]] == [0, 2, 4]
    assert doc["curve"][0]["heldout_loss"] != doc["curve"][-1]["heldout_loss"]


def test_audit_file_names_the_at_risk_rows(tiny_data_dir, tmp_path):
    """The audit's clusters (the 2 images x3 of the tiny set) are the at-risk rows, by file name."""
    from sd_memfree import audit
    from sd_memfree.data import load_image_caption_dataset

    audit.main(audit.parse_args([f"--train_data_dir={tiny_data_dir}", f"--out={tmp_path / 'a'}", "--no_sscd"]))
    ds, image_col, caption_col = load_image_caption_dataset(train_data_dir=str(tiny_data_dir))
    args = types.SimpleNamespace(heldout_fraction=None, heldout_data_dir=str(tiny_data_dir), monitor_samples=64, seed=0,
                                 audit_file=str(tmp_path / "a" / "audit.json"))
    _, split = monitor.split_heldout(args, ds, image_col, caption_col)
    clusters = json.loads((tmp_path / "a" / "audit.json").read_text())["clusters"]
    assert split.at_risk == sorted(r["index"] for c in clusters for r in c["rows"]) and len(split.at_risk) == 6
    assert split.at_risk_source == "audit clusters (audit.json)"


@pytest.mark.parametrize("flags, message", [
    (["--heldout_fraction=1.5"], "--heldout_fraction=1.5 must be in (0, 1)"),
    (["--heldout_fraction=0.2", "--heldout_data_dir=x"], "pass --heldout_data_dir or --heldout_fraction, not both"),
    (["--heldout_fraction=0.2", "--audit_file=/nonexistent/audit.json"], "--audit_file /nonexistent/audit.json: no such file"),
    (["--audit_file=audit.json"], "--audit_file applies with a held-out set"),
    (["--monitor_samples=0"], "--monitor_samples=0 must be >= 1"),
])
def test_bad_monitor_settings_get_one_line(tiny_model_dir, tiny_data_dir, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        train.cli(base_args(tiny_model_dir, tiny_data_dir, tmp_path / "run", *flags))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run" / "unet").exists()


def test_with_shards_a_checkpoints_point_is_its_published_models_loss(tiny_model_dir, tiny_data_dir, tmp_path):
    """K=2 proxies, 2 steps each per round: checkpoint-2 falls mid-round, when proxy 0 has trained
    2 steps and no merge has happened. Its point is evaluated with the last merge's weights (what
    checkpoint-2/unet holds: still the base), not the live proxy's: it equals step 0's point and
    the benchmark's denoising loss of a pipeline built on checkpoint-2/unet."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from sd_memfree.testing.tiny import make_tiny_dataset
    from train_scripts import memorization_eval as ev

    held = make_tiny_dataset(tmp_path / "held", num_images=4, size=32, seed=0, first_index=600)
    out = tmp_path / "run"
    train.main(train.parse_args(base_args(tiny_model_dir, tiny_data_dir, out, f"--heldout_data_dir={held}",
                                          "--num_shards=2", "--merge_every=2", "--agc_ratio=1.25", steps=8)))
    curve = {p["step"]: p for p in json.loads((out / monitor.MONITOR_FILE).read_text())["curve"]}
    point = curve[2]
    assert sorted(curve) == [0, 2, 4, 6, 8] and point["heldout_loss"] == pytest.approx(curve[0]["heldout_loss"], rel=1e-6)
    assert curve[4]["heldout_loss"] != point["heldout_loss"]
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), unet=UNet2DConditionModel.from_pretrained(str(out / "checkpoint-2"), subfolder="unet"),
                                                   safety_checker=None, requires_safety_checker=False)
    imgs, caps, _ = ev.read_imagefolder(held)
    assert point["heldout_loss"] == pytest.approx(ev.denoising_loss(pipe, imgs, caps), rel=1e-5)


def test_off_without_a_heldout_set(tiny_model_dir, tiny_data_dir, tmp_path):
    """No --heldout_*: no monitor.json, no monitor values, every row trained (drop-in behaviour)."""
    out = tmp_path / "run"
    summary = train.main(train.parse_args(base_args(tiny_model_dir, tiny_data_dir, out, steps=2)))
    assert summary["num_samples"] == 12 and not any(k.startswith("monitor/") for k in summary)
    assert not (out / monitor.MONITOR_FILE).exists() and "Held-out loss" not in (out / "README.md").read_text()


def test_sdxl_recipe_monitors_too(tiny_data_dir, tmp_path, monkeypatch):
    """The SDXL script with --heldout_fraction=0.25: 3 of 12 rows held out, never built into a
    training item (by sample id); both encoders' conditioning; points at 0, 2, 4; the card's table."""
    from sd_memfree.scoring.risk import sample_file_names
    from sd_memfree.testing.tiny import make_tiny_sdxl_model
    from train_scripts import train_sdxl_ietagc as sdxl

    seen: list[str] = []
    original = sdxl.SDXLCaptionDataset.__getitems__

    def recording(self, keys):
        names = sample_file_names(self.base.ds, self.base.image_column)
        seen.extend(names[int(sid)] for sid, _ in keys)
        return original(self, keys)

    monkeypatch.setattr(sdxl.SDXLCaptionDataset, "__getitems__", recording)
    model = make_tiny_sdxl_model(tmp_path / "sdxl", seed=0)
    out = tmp_path / "run"
    summary = sdxl.main(sdxl.parse_args([f"--pretrained_model_name_or_path={model}", f"--train_data_dir={tiny_data_dir}", f"--output_dir={out}",
                                         "--resolution=32", "--train_batch_size=2", "--max_train_steps=4", "--learning_rate=1e-3",
                                         "--lr_warmup_steps=0", "--seed=3", "--report_to=none", "--checkpointing_steps=2", "--heldout_fraction=0.25"]))
    doc = json.loads((out / monitor.MONITOR_FILE).read_text())
    held = doc["sets"]["heldout"]["files"]
    assert len(held) == 3 and json.loads((out / "memfree_state.json").read_text())["num_samples"] == 9
    assert len(seen) == 8 and set(seen).isdisjoint(held)
    assert [p["step"] for p in doc["curve"]] == [0, 2, 4] and all(p["heldout_loss"] > 0 and p["at_risk_loss"] > 0 for p in doc["curve"])
    assert summary["monitor/heldout_loss"] == doc["curve"][-1]["heldout_loss"]
    assert "## Held-out loss during training" in (out / "README.md").read_text()


def test_monitor_does_not_change_training(tiny_model_dir, tiny_data_dir, tmp_path):
    """The same run with a held-out set and a checkpoint every 2 steps (so 4 evaluations) ends
    with bit-identical weights: evaluation draws from its own generator and restores train mode."""
    import torch
    from safetensors.torch import load_file

    from sd_memfree.testing.tiny import make_tiny_dataset

    held = make_tiny_dataset(tmp_path / "held", num_images=3, size=32, seed=0, first_index=700)
    weights = []
    for name, extra in (("plain", ["--checkpointing_steps=1000"]), ("monitored", [f"--heldout_data_dir={held}", "--checkpointing_steps=2"])):
        train.main(train.parse_args(base_args(tiny_model_dir, tiny_data_dir, tmp_path / name, *extra, steps=6)))
        weights.append(load_file(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors"))
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_resumed_run_keeps_the_curve(tiny_model_dir, tiny_data_dir, tmp_path):
    """4 steps (points 0, 2, 4), then --resume_from_checkpoint latest to 6: the curve keeps the
    first run's points up to the checkpoint (no second step-4 point) and adds step 6."""
    from sd_memfree.testing.tiny import make_tiny_dataset

    held = make_tiny_dataset(tmp_path / "held", num_images=3, size=32, seed=0, first_index=800)
    out = tmp_path / "run"
    train.main(train.parse_args(base_args(tiny_model_dir, tiny_data_dir, out, f"--heldout_data_dir={held}", steps=4)))
    first = json.loads((out / monitor.MONITOR_FILE).read_text())["curve"]
    train.main(train.parse_args(base_args(tiny_model_dir, tiny_data_dir, out, f"--heldout_data_dir={held}", "--resume_from_checkpoint=latest", steps=6)))
    curve = json.loads((out / monitor.MONITOR_FILE).read_text())["curve"]
    assert [p["step"] for p in first] == [0, 2, 4] and [p["step"] for p in curve] == [0, 2, 4, 6]
    assert curve[:3] == first


def test_skip_counts_cover_every_row_and_mark_the_heldout_ones(tiny_model_dir, tiny_data_dir, tmp_path):
    """--heldout_fraction=0.25 with AGC: memfree_skip_counts.json lists all 12 rows the user gave
    (so the scorer, given the same folder, joins it), the 3 held-out rows marked with a count of 0;
    the scorer reads them as -1 and its join counts the 9 trained rows only."""
    import numpy as np

    from sd_memfree.data import caption_text, load_image_caption_dataset
    from sd_memfree.run.skipcounts import SKIP_COUNTS_FILE, sample_file_names
    from sd_memfree.scoring.risk import read_skip_counts, risk_table

    out = tmp_path / "run"
    train.main(train.parse_args(base_args(tiny_model_dir, tiny_data_dir, out, "--heldout_fraction=0.25", "--agc_ratio=1.02",
                                          "--agc_ema=0.1", steps=8)))
    doc = json.loads((out / SKIP_COUNTS_FILE).read_text())
    held = json.loads((out / monitor.MONITOR_FILE).read_text())["heldout_rows_of_training_data"]
    assert doc["num_samples"] == 12 and [r["sample_id"] for r in doc["samples"]] == list(range(12))
    assert sorted(r["sample_id"] for r in doc["samples"] if r.get("heldout")) == sorted(held)
    assert all(r["skip_count"] == 0 for r in doc["samples"] if r.get("heldout"))
    full, image_col, caption_col = load_image_caption_dataset(train_data_dir=str(tiny_data_dir))
    counts = read_skip_counts(out / SKIP_COUNTS_FILE, [caption_text(c) for c in full[caption_col]], sample_file_names(full, image_col))
    assert sorted(np.flatnonzero(counts == -1).tolist()) == sorted(held)
    table = risk_table(counts, np.linspace(0, 1, 12), [caption_text(c) for c in full[caption_col]], n=12)
    assert table["num_train"] == 9 and table["num_heldout"] == 3 and all(r["train"] not in held for r in table["most_copied"])
