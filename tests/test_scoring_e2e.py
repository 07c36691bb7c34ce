"""The scorer end to end on the tiny model and tiny data set: generate mode, --generated_dir mode,
the embedding cache across runs, and the HTML report rendered in headless Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import images_loaded_in_chromium, needs_chromium

from sd_memfree.scoring import sscd
from sd_memfree.testing import standin
from sd_memfree.scoring.run import main, parse_args


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("score-weights")
    clip_name, clip_file = standin.make_tiny_clip(root / "clip")
    return {"sscd": standin.make_standin_sscd(root / "sscd.pt"), "clip_name": clip_name, "clip_file": clip_file, "cache": root / "emb-cache"}


@pytest.fixture(scope="module")
def embed_calls():
    """Counts how often the training set is embedded (patched for the whole module)."""
    calls: list[int] = []
    original = sscd.embed_dataset_images
    mp = pytest.MonkeyPatch()

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    mp.setattr(sscd, "embed_dataset_images", counting)
    yield calls
    mp.undo()


@pytest.fixture(scope="module")
def generated_run(tmp_path_factory, tiny_model_dir, tiny_data_dir, weights, embed_calls):
    out = tmp_path_factory.mktemp("score-gen")
    result = main(parse_args([
        "--model", str(tiny_model_dir), "--train_data_dir", str(tiny_data_dir), "--sscd_model", str(weights["sscd"]),
        "--num_prompts", "3", "--num_inference_steps", "2", "--batch_size", "2", "--seed", "42",
        "--clip_model", weights["clip_name"], "--clip_pretrained", str(weights["clip_file"]), "--no_fid",
        "--embedding_cache_dir", str(weights["cache"]), "--num_pairs", "2", "--out", str(out),
    ]))
    return out, result, len(embed_calls)


@pytest.fixture(scope="module")
def copies_run(tmp_path_factory, tiny_data_dir, weights, embed_calls, generated_run):
    """Score 'generations' that are byte-identical copies of training images 0 and 5 (rows of
    metadata.jsonl), through --generated_dir, reusing the cache of the generate-mode run."""
    gen = tmp_path_factory.mktemp("copies")
    rows = [json.loads(line) for line in (tiny_data_dir / "metadata.jsonl").read_text().splitlines()]
    with open(gen / "metadata.jsonl", "w") as f:
        for i in (0, 5):
            shutil.copy(tiny_data_dir / rows[i]["file_name"], gen / f"copy{i}.png")
            f.write(json.dumps({"file_name": f"copy{i}.png", "text": rows[i]["text"]}) + "\n")
    out = tmp_path_factory.mktemp("score-copies")
    before = len(embed_calls)
    result = main(parse_args([
        "--generated_dir", str(gen), "--train_data_dir", str(tiny_data_dir), "--sscd_model", str(weights["sscd"]),
        "--no_clip_score", "--no_fid", "--embedding_cache_dir", str(weights["cache"]), "--out", str(out),
    ]))
    return out, result, len(embed_calls) - before, rows


def test_generate_mode_writes_outputs(generated_run, tiny_data_dir):
    """3 prompts x 1 image: 3 PNGs + metadata; statistics consistent with per_image.jsonl; the
    12-row training set (8 distinct, 2 of them written 3 times) is the background."""
    out, result, _ = generated_run
    for name in ("metrics.json", "report.html", "model_card_snippet.md", "per_image.jsonl"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "generated").glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    meta = [json.loads(line) for line in (out / "generated" / "metadata.jsonl").read_text().splitlines()]
    assert [m["seed"] for m in meta] == [42, 43, 44]
    assert (result["run"]["pipeline"], result["run"]["resolution"]) == ("StableDiffusionPipeline", 32)  # the tiny model's own size
    assert json.loads((out / "metrics.json").read_text())["gen_vs_train"] == result["gen_vs_train"]
    per_image = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    sims = [p["similarity"] for p in per_image]
    assert result["gen_vs_train"]["count"] == 3 and result["gen_vs_train"]["mean"] == pytest.approx(sum(sims) / 3)
    assert result["train_vs_train"]["count"] == 12
    # Duplicated training images have an identical other image: at least 6 of 12 rows score ~1.
    assert result["train_vs_train"]["sim_95pc"] == pytest.approx(1.0, abs=1e-4)
    assert -1.0 <= result["clip_score"] <= 1.0 and result["fid"] is None
    assert result["pixel"]["pixel_distinct_train"] == 8
    assert len(result["top_matches"]) == 2 and result["top_matches"][0]["similarity"] == pytest.approx(max(sims))
    snippet = (out / "model_card_snippet.md").read_text()
    assert "## Memorization" in snippet and f"{result['gen_vs_train']['sim_95pc']:.4f}" in snippet
    # The detection score: one positive number per generation, kept in the generations' metadata
    # (so --generated_dir re-scores keep it) and summarised in metrics.json.
    mags = [p["noise_magnitude"] for p in per_image]
    assert all(m > 0 for m in mags) and [m["noise_magnitude"] for m in meta] == mags
    nm = result["noise_magnitude"]
    assert nm["count"] == 3 and nm["mean"] == pytest.approx(sum(mags) / 3) and nm["max"] == pytest.approx(max(mags))
    assert nm["steps"] == 2  # min(DETECTION_STEPS, the 2 sampling steps)
    assert json.loads((out / "metrics.json").read_text())["noise_magnitude"] == nm
    assert "Detection score" in (out / "report.html").read_text()


def test_generated_dir_copies_score_one_and_reuse_cache(generated_run, copies_run):
    """Copies of training images: similarity 1 (up to float error), nearest training image has the
    same pixels, every copy passes the pixel copy test (d1 = 0 < d2 / 3). The training set was
    embedded once, by the first run; the second run hit the cache."""
    _, first, first_calls = generated_run
    out, result, new_calls, rows = copies_run
    assert first_calls == 1 and first["run"]["embedding_cache_hit"] is False
    assert new_calls == 0 and result["run"]["embedding_cache_hit"] is True
    assert result["gen_vs_train"]["mean"] == pytest.approx(1.0, abs=1e-4)
    assert result["gen_vs_train"]["frac_gt_0.5"] == 1.0
    assert result["pixel"]["pixel_copy_frac"] == 1.0 and result["pixel"]["pixel_ratio_min"] == 0.0
    text_of = {r["text"] for r in rows}
    for m in result["top_matches"]:
        assert rows[m["train"]]["text"] == m["prompt"] and m["prompt"] in text_of


def test_cli_flags_are_checked():
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--generated_dir", "g", "--train_data_dir", "d", "--out", "o"])
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--out", "o"])
    args = parse_args(["--model", "m", "--train_data_dir", "d", "--out", "o"])
    assert (args.num_prompts, args.seed, args.threshold, args.preprocess, args.sscd_model) == (4000, 42, 0.5, "dcr", "sscd_disc_large")


@needs_chromium
def test_report_renders_its_images_in_chromium(copies_run, tmp_path):
    """Chromium shows every image of report.html: 1 histogram + 2 images per pair (then the
    probe's deliberately broken image, which must read 0)."""
    out, result, _, _ = copies_run
    assert images_loaded_in_chromium(out / "report.html", tmp_path) == "1" * (1 + 2 * len(result["top_matches"])) + "0"
