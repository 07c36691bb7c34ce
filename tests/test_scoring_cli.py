"""The scorer's command line on bad input: one line, exit status 2, no traceback, before any
expensive work (issue 9); and training's skip counts joined to the copies (issue 12)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import cli_error
from sd_memfree.scoring import generate, risk, run
from sd_memfree.testing import standin


@pytest.fixture(scope="module")
def sscd_file(tmp_path_factory):
    return standin.make_standin_sscd(tmp_path_factory.mktemp("cli-sscd") / "standin.pt")


@pytest.fixture
def no_generation(monkeypatch):
    """Bad input must be found before the pipeline loads: loading it fails the test."""
    def refuse(*a, **k):
        raise AssertionError("the pipeline was loaded before the input was checked")

    monkeypatch.setattr(generate, "load_pipeline", refuse)


def test_generated_dir_missing_or_empty(tmp_path, tiny_data_dir, sscd_file, capsys):
    common = ["--train_data_dir", str(tiny_data_dir), "--sscd_model", str(sscd_file), "--no_clip_score", "--no_fid", "--out", str(tmp_path / "o")]
    err = cli_error(capsys, run.cli, ["--generated_dir", str(tmp_path / "nope"), *common])
    assert f"--generated_dir {tmp_path / 'nope'} is not a folder" in err
    (tmp_path / "empty").mkdir()
    err = cli_error(capsys, run.cli, ["--generated_dir", str(tmp_path / "empty"), *common])
    assert "metadata.jsonl not found" in err
    (tmp_path / "empty" / "metadata.jsonl").write_text("\n")
    assert "lists no images" in cli_error(capsys, run.cli, ["--generated_dir", str(tmp_path / "empty"), *common])
    assert not (tmp_path / "o").exists()  # nothing written for a run that could not start


def test_training_folder_without_images(tmp_path, tiny_model_dir, sscd_file, capsys, no_generation):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "metadata.jsonl").write_text("")
    err = cli_error(capsys, run.cli, ["--model", str(tiny_model_dir), "--train_data_dir", str(tmp_path / "data"), "--sscd_model", str(sscd_file),
                               "--no_clip_score", "--no_fid", "--out", str(tmp_path / "o")])
    assert "no images" in err and str(tmp_path / "data") in err


def test_missing_weights_and_explicit_path(tmp_path, tiny_model_dir, tiny_data_dir, capsys, monkeypatch, no_generation):
    """A known name offline and not cached: what to download, where. An explicit path that does
    not exist: a message about that path, not about the cache."""
    monkeypatch.setenv("SD_MEMFREE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = ["--model", str(tiny_model_dir), "--train_data_dir", str(tiny_data_dir), "--no_clip_score", "--no_fid", "--out", str(tmp_path / "o")]
    err = cli_error(capsys, run.cli, [*common, "--sscd_model", "sscd_disc_large"])
    assert "sscd_disc_large.torchscript.pt" in err and str(tmp_path / "cache" / "sscd") in err
    missing = tmp_path / "some" / "path.pt"
    err = cli_error(capsys, run.cli, [*common, "--sscd_model", str(missing)])
    assert f"--sscd_model {missing}: no such file" in err and "cache" not in err
    err = cli_error(capsys, run.cli, [*common, "--sscd_model", str(tmp_path / "x.pt"), "--fid_weights", str(tmp_path / "inc.pth")])
    assert "x.pt" in err
    assert "--model" in cli_error(capsys, run.cli, ["--model", str(tmp_path / "no-model"), "--train_data_dir", str(tiny_data_dir), "--out", str(tmp_path / "o")])


def test_sscd_file_returning_nan_stops_the_run(tmp_path, tiny_model_dir, tiny_data_dir, capsys, no_generation):
    """Today's failure mode: NaN embeddings gave exit 0 and frac_gt_0.5 = 0 ("no memorization")."""
    import torch

    class NaNModel(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3)).repeat(1, 4) * float("nan")

    path = tmp_path / "nan.pt"
    torch.jit.script(NaNModel()).save(str(path))
    err = cli_error(capsys, run.cli, ["--model", str(tiny_model_dir), "--train_data_dir", str(tiny_data_dir), "--sscd_model", str(path),
                               "--no_clip_score", "--no_fid", "--out", str(tmp_path / "o")])
    assert str(path) in err and "NaN" in err


def test_skip_counts_from_model_folder_join_the_copies(tmp_path, tiny_model_dir, tiny_data_dir, sscd_file):
    """A model folder holding training's skip counts: the scorer finds the file itself and reports,
    for the most copied training images, their skip counts (row r was given count 10 * r)."""
    rows = [json.loads(line) for line in (tiny_data_dir / "metadata.jsonl").read_text().splitlines()]
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    risk.write_skip_counts(model / risk.SKIP_COUNTS_FILE, [10 * r for r in range(len(rows))], [r["text"] for r in rows], [r["file_name"] for r in rows])
    result = run.main(run.parse_args([
        "--model", str(model), "--train_data_dir", str(tiny_data_dir), "--sscd_model", str(sscd_file), "--num_prompts", "2",
        "--num_inference_steps", "2", "--batch_size", "2", "--no_clip_score", "--no_fid", "--num_pairs", "3",
        "--embedding_cache_dir", str(tmp_path / "emb"), "--out", str(tmp_path / "out"),
    ]))
    tr = result["training_risk"]
    assert tr["skip_counts_file"] == str(model / risk.SKIP_COUNTS_FILE) and tr["num_train"] == len(rows)
    assert tr["total_skips"] == 10 * sum(range(len(rows))) and len(tr["most_copied"]) == 3
    sims = [r["similarity"] for r in tr["most_copied"]]
    assert sims == sorted(sims, reverse=True)
    for r in tr["most_copied"]:
        assert r["skip_count"] == 10 * r["train"] and r["text"] == rows[r["train"]]["text"] and r["pixel_distance"] >= 0
    assert tr["spearman_skip_vs_similarity"] is None or -1 <= tr["spearman_skip_vs_similarity"] <= 1
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Training-time risk" in html and risk.SKIP_COUNTS_FILE in html
