"""The demo's quick path end to end: real training script, real scorer, one report with images."""

from __future__ import annotations

import json
import re

import pytest
from conftest import images_loaded_in_chromium, needs_chromium



@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from train_scripts import demo

    out = tmp_path_factory.mktemp("demo")
    args = demo.parse_args(["--out", str(out / "run"), "--cache", str(out / "cache"), "--quick", "--max_train_steps", "4",
                            "--num_images", "4", "--num_duplicated", "1", "--duplicate_times", "3", "--heldout_images", "4",
                            "--num_inference_steps", "2", "--jobs", "2"])
    return out / "run", demo.main(args)


@pytest.mark.slow
def test_demo_writes_one_report_with_both_runs(demo_run, capsys):
    """4 distinct images, 1 of them duplicated x3 -> 3 + 3 = 6 training rows, so each scorer run
    generates 6 images: 3 for the duplicated caption, 3 for the captions seen once. Both runs
    trained side by side (--jobs 2: one subprocess and one log each) and are in the report."""
    out, result = demo_run
    assert set(result["headline"]) == {"plain", "IET-AGC+"}
    for name, h in result["headline"].items():
        assert h["generations"] == 6
        assert (h["dup_copies"]["n"], h["uniq_copies"]["n"]) == (3, 3)
        assert 0 <= h["dup_copies"]["k"] <= 3 and 0 <= h["uniq_copies"]["k"] <= 3
        assert (h["copy_test_ceiling"]["dup"]["n"], h["copy_test_ceiling"]["uniq"]["n"]) == (3, 3)
    page = (out / "report.html").read_text()
    assert "plain: generated" in page and "IET-AGC+: generated" in page
    # the scorer ran for both: its outputs are on disk
    for sub in ("plain", "ietagc_plus"):
        m = json.loads((out / sub / "score" / "metrics.json").read_text())
        assert m["run"]["num_generated"] == 6 and (out / sub / "model" / "unet").is_dir()
    assert (out / "ietagc_plus" / "model" / "memfree_state.json").exists()
    for sub in ("plain", "ietagc_plus"):
        assert "Steps" in (out / sub / "train.log").read_text(errors="replace")


@pytest.mark.slow
def test_demo_report_leads_with_offline_signal_and_leaves_out_the_standin(demo_run):
    """The table starts with the copy rates (duplicated, then seen-once captions), the distinct
    images copied and the copy test's ceiling, then the held-out denoising loss and the detection
    score (all informative offline); with the stand-in SSCD no SSCD figure is shown and the page
    says why. IET-AGC+ ran AGC, so training's skip counts were joined by the scorer."""
    out, result = demo_run
    for h in result["headline"].values():
        assert h["detection_score_mean"] > 0 and h["heldout_denoising_loss"] > 0
    page = (out / "report.html").read_text()
    rows = re.findall(r'<tr><th title="[^"]*">([a-z_0-9.]+)</th>', page)
    assert rows[:5] == ["dup_copies", "uniq_copies", "distinct_copied", "copy_test_ceiling", "heldout_denoising_loss"]
    assert "detection_score_mean" in rows
    assert not any(r.startswith("sscd_") for r in rows) and not re.search(r"SSCD sim \d", page)
    assert "SSCD similarity left out" in page and "stand-in" in page
    plus = json.loads((out / "ietagc_plus" / "score" / "metrics.json").read_text())
    assert plus["training_risk"]["num_train"] == 6 and plus["noise_magnitude"]["count"] == 6
    assert json.loads((out / "plain" / "score" / "metrics.json").read_text())["training_risk"] is None


@pytest.mark.slow
def test_demo_audits_first_and_draws_plain_checkpoints_against_iet_agc_plus(demo_run):
    """The audit found the 1 duplicated image (a cluster of 3 exact copies) and nothing else;
    plain's curve has the base and 3 checkpoints (4 steps, one every 4 // 3 = 1: steps 0-4), each
    with the held-out loss the run logged there and a copy rate over the 3 generations for the
    duplicated caption; IET-AGC+'s point is its end (step 4)."""
    out, result = demo_run
    assert result["audit"]["clusters"] == 1 and result["audit"]["rows_in_clusters"] == 3 and result["audit"]["shared_captions"] == 0
    plain = result["curve"]["plain"]
    assert [p["step"] for p in plain] == [0, 1, 2, 3, 4]
    logged = {p["step"]: p for p in json.loads((out / "plain" / "model" / "monitor.json").read_text())["curve"]}
    assert all(p["heldout_loss"] == logged[p["step"]]["heldout_loss"] and p["dup_copies"]["n"] == 3 for p in plain)
    assert result["curve"]["IET-AGC+"]["step"] == 4 and result["headline"]["plain"]["heldout_denoising_loss"] == logged[4]["heldout_loss"]
    page = (out / "report.html").read_text()
    assert "Before training: the data audit" in page and "is IET-AGC+ just training less?" in page
    assert (out / "audit" / "report.html").is_file()


@pytest.mark.slow
def test_demo_report_rows_and_image_count(demo_run):
    """One row per distinct caption (4), each with, per run, the generation, the VAE's
    reconstruction of its nearest training image and that image (2 runs x 3 = 6 images), plus 2
    detection-score histograms, the audit's one cluster and the loss/copy curve: 4 * 6 + 2 + 1 + 1
    = 28 embedded images, none external."""
    out, _ = demo_run
    page = (out / "report.html").read_text()
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(srcs) == 28
    assert all(s.startswith("data:image/png;base64,") for s in srcs)


@pytest.mark.slow
@needs_chromium
def test_demo_report_renders_its_images_in_chromium(demo_run, tmp_path):
    """Chromium shows all 28 images of the demo report (then 0 for the probe's broken image)."""
    out, _ = demo_run
    assert images_loaded_in_chromium(out / "report.html", tmp_path) == "1" * 28 + "0"


def test_copy_test_counts_against_reconstructions_per_part():
    """Three distinct training images whose reconstructions are flat grey levels 0, 0.5, 1 (rows
    0, 2, 3; row 1 repeats row 0's caption). Per-pixel squared distances of the generations:
    row 0 at level 0: d1 = 0, a copy of row 0; row 1 at 0.25: d1 = d2 = 0.0625, no copy;
    row 2 at 0.45: d1 = 0.0025 (level 0.5), d2 = 0.2025, ratio 0.012 < 1/3, a copy of row 2;
    row 3 at 0.7: d1 = 0.04 (level 0.5, row 2), d2 = 0.09, ratio 0.44, no copy."""
    import numpy as np

    from train_scripts.demo import copy_test

    flat = lambda v: np.full((4, 4, 3), v, dtype=np.float32)
    recon = np.stack([flat(0.0), flat(0.5), flat(1.0)])
    gens = np.stack([flat(0.0), flat(0.25), flat(0.45), flat(0.7)])
    duplicated = np.array([True, True, False, False])
    r = copy_test(gens, recon, [0, 2, 3], duplicated)
    assert r["copy"].tolist() == [True, False, True, False]
    assert r["nearest"].tolist()[0] == 0 and r["nearest"].tolist()[2:] == [2, 2]
    assert (r["dup"]["k"], r["dup"]["n"], r["uniq"]["k"], r["uniq"]["n"]) == (1, 2, 1, 2)
    assert r["distinct_copied"] == 2
    lo, hi = r["dup"]["interval"]
    assert 0.0 < lo < 0.5 < hi < 1.0


def test_failed_fine_tune_is_one_line_naming_the_run_and_its_log(tmp_path):
    """A training subprocess that fails stops the demo with one line naming the run and its log."""
    from train_scripts.demo import _fine_tune_all

    log = tmp_path / "bad" / "train.log"
    with pytest.raises(SystemExit) as e:
        _fine_tune_all([("bad run", ["--pretrained_model_name_or_path", str(tmp_path / "missing")], log)], 2)
    msg = str(e.value)
    assert msg.startswith("error: fine-tuning bad run failed (exit ") and str(log) in msg and "\n" not in msg
