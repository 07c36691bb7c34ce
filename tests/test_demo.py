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
                            "--num_images", "4", "--duplicate_times", "3", "--num_inference_steps", "2"])
    return out / "run", demo.main(args)


@pytest.mark.slow
def test_demo_writes_one_report_with_both_runs(demo_run, capsys):
    """4 distinct images, int(4 * 0.25) = 1 duplicated x3 -> 3 + 3 = 6 training rows, so each
    scorer run generates 6 images; both runs are in the headline and the report names both."""
    out, result = demo_run
    assert set(result["headline"]) == {"plain", "IET-AGC+"}
    for name, h in result["headline"].items():
        assert h["generations"] == 6
        assert 0.0 <= h["copy_frac"] <= 1.0
    page = (out / "report.html").read_text()
    assert "plain: generated" in page and "IET-AGC+: generated" in page
    # the scorer ran for both: its outputs are on disk
    for sub in ("plain", "ietagc_plus"):
        m = json.loads((out / sub / "score" / "metrics.json").read_text())
        assert m["run"]["num_generated"] == 6 and (out / sub / "model" / "unet").is_dir()
    assert (out / "ietagc_plus" / "model" / "memfree_state.json").exists()


@pytest.mark.slow
def test_demo_report_leads_with_offline_signal_and_leaves_out_the_standin(demo_run):
    """The table starts with the pixel copy rate, then the detection score and the held-out
    denoising loss (all informative offline); with the stand-in SSCD no SSCD figure is shown and
    the page says why. IET-AGC+ ran AGC, so training's skip counts were joined by the scorer."""
    out, result = demo_run
    for h in result["headline"].values():
        assert h["detection_score_mean"] > 0 and h["heldout_denoising_loss"] > 0
    page = (out / "report.html").read_text()
    rows = re.findall(r'<tr><th title="[^"]*">([a-z_0-9.]+)</th>', page)
    assert rows[:3] == ["copy_frac", "distinct_copied", "detection_score_mean"] and "heldout_denoising_loss" in rows
    assert not any(r.startswith("sscd_") for r in rows) and not re.search(r"SSCD sim \d", page)
    assert "SSCD similarity left out" in page and "stand-in" in page
    plus = json.loads((out / "ietagc_plus" / "score" / "metrics.json").read_text())
    assert plus["training_risk"]["num_train"] == 6 and plus["noise_magnitude"]["count"] == 6
    assert json.loads((out / "plain" / "score" / "metrics.json").read_text())["training_risk"] is None


@pytest.mark.slow
def test_demo_report_rows_and_image_count(demo_run):
    """One row per distinct caption (4), each with generated + nearest training image per run
    (2 runs x 2 = 4 images), plus 2 detection-score histograms: 4 * 4 + 2 = 18 embedded images,
    none external."""
    out, _ = demo_run
    page = (out / "report.html").read_text()
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(srcs) == 18
    assert all(s.startswith("data:image/png;base64,") for s in srcs)


@pytest.mark.slow
@needs_chromium
def test_demo_report_renders_its_images_in_chromium(demo_run, tmp_path):
    """Chromium shows all 18 images of the demo report (then 0 for the probe's broken image)."""
    out, _ = demo_run
    assert images_loaded_in_chromium(out / "report.html", tmp_path) == "1" * 18 + "0"
