"""The model-only detection score (Wen et al., ICLR 2024) recorded during generation, and the rank
statistics that validate it (ROC AUC) and join training skip counts to copies (Spearman)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import noise_magnitude_probe
from sd_memfree.scoring import generate, risk


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return generate.load_pipeline(str(tiny_model_dir), None, torch.device("cpu"))


def test_probe_equals_hand_computed_first_step_with_and_without_guidance(pipe):
    """First step, same x_T: ||unet(x_T, t0, prompt) - unet(x_T, t0, "")|| per generation. With
    guidance (CFG batch [uncond; text], no extra call) and without (one extra call) it is the same
    number, and equals the two UNet calls made here by hand."""
    prompts = ["a red circle at the top left", "a blue square"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with_cfg = noise_magnitude_probe(pipe, prompts, latents, 7.5)
    without = noise_magnitude_probe(pipe, prompts, latents, 1.0)
    pipe.scheduler.set_timesteps(3)
    t0 = pipe.scheduler.timesteps[0]
    with torch.no_grad():
        text = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
        empty = pipe.encode_prompt("", "cpu", 1, False)[0].expand(2, -1, -1)
        x = pipe.scheduler.scale_model_input(latents * pipe.scheduler.init_noise_sigma, t0)
        want = (pipe.unet(x, t0, text).sample - pipe.unet(x, t0, empty).sample).flatten(1).norm(dim=1)
    torch.testing.assert_close(with_cfg, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(without, want, rtol=1e-4, atol=1e-6)
    assert with_cfg[0] != pytest.approx(float(with_cfg[1]), rel=1e-3)  # per prompt, not per batch


def test_probe_averages_the_first_steps_only(pipe):
    """steps=2 of a 3-step run: the mean of exactly two per-step values; the extra UNet calls of
    the no-guidance path are not themselves recorded."""
    prompts = ["stripes"]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        with generate.NoiseMagnitudeProbe(pipe, 2) as probe:
            probe.begin(1)
            pipe(prompt=prompts, latents=latents.clone(), num_inference_steps=3, guidance_scale=1.0, output_type="latent")
            assert len(probe._values) == 2
            torch.testing.assert_close(probe.result(), (probe._values[0] + probe._values[1]) / 2)
    finally:
        handle.remove()
    assert len(calls) == 3 + 2  # 3 sampling steps + one unconditional call in each of the first 2


def test_average_ranks_spearman_and_auc_hand_computed():
    """ranks([10, 20, 20, 5]) = [2, 3.5, 3.5, 1]. Spearman of (1,2,3,4) with (10,20,30,40) is 1,
    with the reverse -1, with a constant None. AUC: positives {0.9, 0.5}, negatives {0.5, 0.1}:
    pairs (0.9>0.5), (0.9>0.1), (0.5=0.5 -> 1/2), (0.5>0.1) -> 3.5 / 4 = 0.875."""
    assert risk.average_ranks(np.array([10, 20, 20, 5])).tolist() == [2, 3.5, 3.5, 1]
    assert risk.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert risk.spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert risk.spearman([1, 2, 3, 4], [7, 7, 7, 7]) is None
    assert risk.roc_auc([0.9, 0.5, 0.5, 0.1], [True, True, False, False]) == pytest.approx(0.875)
    assert risk.roc_auc([0.3, 0.2], [True, True]) is None


def test_skip_counts_file_round_trip_and_refuses_other_data(tmp_path):
    path = risk.write_skip_counts(tmp_path / risk.SKIP_COUNTS_FILE, [3, 0, 5], ["a", "b", "c"], ["0.png", "1.png", None])
    assert risk.read_skip_counts(path, ["a", "b", "c"], ["0.png", "1.png", "2.png"]).tolist() == [3, 0, 5]
    with pytest.raises(risk.SkipCountsError, match="covers 3 samples but the training set has 2"):
        risk.read_skip_counts(path, ["a", "b"], [None, None])
    with pytest.raises(risk.SkipCountsError, match="row 1"):
        risk.read_skip_counts(path, ["a", "B", "c"], [None, None, None])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(risk.SkipCountsError, match="not a skip-counts file"):
        risk.read_skip_counts(tmp_path / "bad.json", ["a"], [None])


def test_risk_table_orders_by_copy_similarity():
    """Rows sorted by similarity (most copied first) carry their own skip counts; rank 1 = most skipped.
    Spearman: skip ranks [1, 3.5, 2, 3.5] -> centred [-1.5, 1, -0.5, 1]; similarity ranks [1, 4, 3, 2]
    -> [-1.5, 1.5, 0.5, -0.5]; 3.0 / sqrt(4.5 * 5) = 0.6325."""
    got = risk.risk_table(np.array([0, 7, 2, 7]), np.array([0.1, 0.9, 0.5, 0.2]), ["a", "b", "c", "d"], n=2)
    assert [r["train"] for r in got["most_copied"]] == [1, 2]
    assert [r["skip_count"] for r in got["most_copied"]] == [7, 2]
    assert got["most_copied"][0]["skip_rank"] == 1.5 and got["most_copied"][1]["skip_rank"] == 3
    assert got["total_skips"] == 16 and got["samples_ever_skipped"] == 3
    assert got["spearman_skip_vs_similarity"] == pytest.approx(3.0 / 22.5**0.5)


def test_detection_auc_table_over_benchmark_runs(tmp_path, capsys):
    """Two seeds of one model: seed 0 scores its copy highest (AUC 1), seed 1 lowest (AUC 0);
    pooled, copies {5, 1} vs others {2, 3, 4, 6}: pairs won 3 (5 beats 2, 3, 4) + 0 = 3 of 8 -> 0.375."""
    from benchmarks import detection_auc

    for seed, rows in ((0, [(5, True), (2, False), (3, False)]), (1, [(1, True), (4, False), (6, False)])):
        d = tmp_path / f"seed{seed}" / "plain-800" / "score"
        d.mkdir(parents=True)
        (d / "per_image.jsonl").write_text("".join(json.dumps({"noise_magnitude": s, "pixel_copy": c}) + "\n" for s, c in rows))
    got = detection_auc.main([str(tmp_path)])["models"]
    assert len(got) == 1 and got[0]["method"] == "plain" and got[0]["steps"] == 800 and got[0]["copies"] == 2
    assert got[0]["auc_per_seed"] == {0: 1.0, 1: 0.0} and got[0]["auc_pooled"] == pytest.approx(0.375)
    assert "| plain | 800 | 6 | 2 | 1.000, 0.000 | 0.375 |" in capsys.readouterr().out
