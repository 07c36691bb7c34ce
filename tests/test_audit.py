"""``sd-memfree audit``: duplicates found per kind on generated data with known truth, the exact
chunked search, the deduplicated copy (which the training script trains on), one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_memfree import audit, deduplicate, duplicates
from sd_memfree.testing.duplicated import DUPLICATE_KINDS, LOOKALIKE_KINDS, make_duplicated_dataset, pair_scores


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """64 originals at 128 px, 8 duplicates of each kind, 8 lookalike pairs of each kind."""
    root = tmp_path_factory.mktemp("audit")
    truth = make_duplicated_dataset(root / "data", num_originals=64, per_kind=8, size=128)
    return root, truth


def run_audit(data: Path, out: Path, *extra: str) -> dict:
    return audit.main(audit.parse_args([f"--train_data_dir={data}", f"--out={out}", *extra]))


def test_threshold_pairs_is_exact_for_any_chunk():
    """Against the dense all-pairs matrix: same pairs (i < j, each once), same scores, for chunk
    sizes that do and do not divide N, for cosine (>=) and squared L2 (<=)."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    x[30] = x[3]  # planted copies
    x[41] = x[3]
    dense = x @ x.T
    want = {(i, j) for i in range(50) for j in range(i + 1, 50) if dense[i, j] >= 0.6}
    d2 = torch.cdist(x, x).square()
    want_l2 = {(i, j) for i in range(50) for j in range(i + 1, 50) if d2[i, j] <= 0.5}
    for chunk in (1, 7, 16, 50, 64):
        got = [(int(a), int(b), float(s)) for i, j, s in duplicates.threshold_pairs(x, 0.6, chunk=chunk) for a, b, s in zip(i, j, s)]
        assert {(a, b) for a, b, _ in got} == want and len(got) == len(want)
        assert all(abs(s - float(dense[a, b])) < 1e-5 for a, b, s in got)
        got_l2 = {(int(a), int(b)) for i, j, _ in duplicates.threshold_pairs(x, 0.5, metric="sq_l2", chunk=chunk) for a, b in zip(i, j)}
        assert got_l2 == want_l2
    assert {(3, 30), (3, 41), (30, 41)} <= want


def test_clusters_are_connected_components_largest_first():
    """Links 0-1, 1-2 (chain), 5-7, 9-9 (a self link adds nothing): clusters [0,1,2], [5,7]."""
    c = duplicates.Clusters(10)
    c.link(np.array([1, 5]), np.array([2, 7]), "near", thumb=np.array([0.01, 0.02], np.float32), hash_distance=np.array([3, 4]))
    c.link(np.array([0, 9]), np.array([1, 9]), "sscd", sscd=np.array([0.9, 1.0], np.float32))
    assert c.groups() == [[0, 1, 2], [5, 7]]
    assert c.best_hash[1] == 3 and c.best_sscd[1] == pytest.approx(0.9) and c.kinds[1] == {"near", "sscd"}


def test_caption_key_ignores_case_and_spacing():
    assert duplicates.caption_key("  A  red Circle ") == duplicates.caption_key("a red circle")
    assert duplicates.group_equal(["a", "b", "a", "c", "b", "a"]) == [[0, 2, 5], [1, 4]]


def test_hash_pass_precision_and_recall_per_kind(known, tmp_path, capsys):
    """The cheap pass alone (--no_sscd): every exact, JPEG, resized and cropped copy found, no
    lookalike pair linked, every linked pair a true duplicate (measured: recall 1.0 per kind,
    precision 1.0; benchmarks/audit_quality.py prints the margins)."""
    root, truth = known
    result = run_audit(root / "data", tmp_path / "a", "--no_sscd")
    scores = pair_scores(truth, result["clusters"])
    print(json.dumps(scores))
    for kind in DUPLICATE_KINDS:
        assert scores[kind] == {"pairs": 8, "found": 8, "recall": 1.0}, kind
    for kind in LOOKALIKE_KINDS:
        assert scores[kind]["false_links"] == 0, kind
    assert scores["precision"] == 1.0 and scores["linked_pairs"] == 32
    assert result["counts"]["clusters"] == 32 and result["counts"]["exact_clusters"] == 8
    assert result["passes"]["sscd"] is None and "--no_sscd" in result["passes"]["sscd_skipped"]
    assert "[--no_sscd: hash pass only]" in capsys.readouterr().out
    on_disk = json.loads((tmp_path / "a" / "audit.json").read_text())
    first = on_disk["clusters"][0]
    assert first["size"] == 2 and {"index", "file_name", "caption"} <= set(first["rows"][0])
    assert on_disk["clusters"][0]["rows"][0]["file_name"].startswith("orig_")
    report = (tmp_path / "a" / "report.html").read_text()
    assert report.count("<figure>") == 64 and "src=\"http" not in report and "data:image/png;base64," in report
    assert "--no_sscd" in report


def test_sscd_pass_uses_the_scorers_model_and_cache(known, tmp_path):
    """The semantic pass alone (near pass off) with the thumbnail copy-detector stand-in: every duplicate
    kind found at 0.95; its embeddings land in the scorer's cache under the scorer's key."""
    from sd_memfree.data import load_image_caption_dataset
    from sd_memfree.scoring import cache as cache_lib
    from sd_memfree.scoring import sscd
    from sd_memfree.testing.standin import make_copy_detector_sscd

    root, truth = known
    model = make_copy_detector_sscd(tmp_path / "pooled.pt")
    result = run_audit(root / "data", tmp_path / "a", f"--sscd_model={model}", "--thumb_rms=0", "--hash_distance=0",
                       "--threshold=0.95", f"--embedding_cache_dir={tmp_path / 'cache'}")
    scores = pair_scores(truth, result["clusters"])
    for kind in DUPLICATE_KINDS:
        assert scores[kind]["recall"] == 1.0, kind
    assert result["passes"]["sscd"]["threshold"] == 0.95 and result["passes"]["sscd"]["cache_hit"] is False
    assert any("sscd" in c["links"] and "similarity" in c["rows"][0] for c in result["clusters"])
    ds, image_col, _ = load_image_caption_dataset(train_data_dir=str(root / "data"))
    key = cache_lib.cache_key(sscd.file_sha256(model), "dcr", cache_lib.dataset_fingerprint(ds), image_col, len(ds))
    assert (tmp_path / "cache" / f"{key}.pt").is_file()
    again = run_audit(root / "data", tmp_path / "b", f"--sscd_model={model}", "--threshold=0.95", f"--embedding_cache_dir={tmp_path / 'cache'}")
    assert again["passes"]["sscd"]["cache_hit"] is True


def test_default_threshold_is_the_scorers_copy_threshold():
    from sd_memfree.scoring import run

    assert audit.COPY_THRESHOLD == run.parse_args(["--generated_dir", "g", "--train_data_dir", "t", "--out", "o"]).threshold
    assert audit.parse_args(["--train_data_dir", "t", "--out", "o"]).threshold == audit.COPY_THRESHOLD


def test_shared_captions_and_images_under_several_captions(tmp_path):
    """Rows 0,1: one caption on two distinct images; rows 2,3: one image under two captions."""
    from sd_memfree.testing.tiny import make_tiny_image

    d = tmp_path / "data"
    d.mkdir()
    imgs = [make_tiny_image(i, size=64)[0] for i in range(3)]
    rows = [("a.png", imgs[0], "a cat"), ("b.png", imgs[1], "A cat "), ("c.png", imgs[2], "a dog"), ("c2.png", imgs[2], "a puppy")]
    for name, im, _ in rows:
        im.save(d / name)
    (d / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, _, t in rows))
    r = run_audit(d, tmp_path / "a", "--no_sscd")
    assert [c["rows"][0]["index"] for c in r["clusters"]] == [2] and r["clusters"][0]["num_captions"] == 2
    assert r["images_with_several_captions"] == [{"cluster": 0, "size": 2, "captions": ["a dog", "a puppy"]}]
    assert len(r["shared_captions"]) == 1 and r["shared_captions"][0]["num_images"] == 2
    assert [x["index"] for x in r["shared_captions"][0]["rows"]] == [0, 1]


def test_deduplicated_copy_keeps_max_copies_and_trains(known, tmp_path, tiny_model_dir):
    """--max_copies 1: one row per cluster (64 originals + 16 lookalike pairs = 96 rows), files
    hard-linked (same inode), metadata.jsonl rows {file_name, text}; the SD training script
    trains 2 steps on it as on any imagefolder. --max_copies 2 keeps every row here."""
    from train_scripts import train_sd_ietagc as train

    root, truth = known
    out = tmp_path / "dedup"
    r = run_audit(root / "data", tmp_path / "a", "--no_sscd", f"--write_deduplicated={out}", "--max_copies=1")
    assert r["deduplicated"]["rows_kept"] == 96 and r["deduplicated"]["rows_dropped"] == 32
    meta = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 96 and set(meta[0]) == {"file_name", "text"}
    assert not any(m["file_name"].startswith("dup_") for m in meta)
    assert os.stat(out / meta[0]["file_name"]).st_ino == os.stat(root / "data" / meta[0]["file_name"]).st_ino
    assert r["deduplicated"]["hard_links"] == 96
    summary = train.main(train.parse_args([
        f"--pretrained_model_name_or_path={tiny_model_dir}", f"--train_data_dir={out}", f"--output_dir={tmp_path / 'run'}",
        "--resolution=32", "--train_batch_size=2", "--max_train_steps=2", "--lr_warmup_steps=0", "--seed=0",
        "--report_to=none", "--checkpointing_steps=1000"]))
    assert summary["global_step"] == 2 and summary["num_samples"] == 96
    r2 = run_audit(root / "data", tmp_path / "a2", "--no_sscd", f"--write_deduplicated={tmp_path / 'dedup2'}", "--max_copies=2")
    assert r2["deduplicated"]["rows_kept"] == len(truth["rows"])


def test_kept_rows_is_first_rows_of_each_cluster():
    clusters = [{"rows": [{"index": 5}, {"index": 1}, {"index": 3}]}, {"rows": [{"index": 7}, {"index": 8}]}]
    assert deduplicate.kept_rows(10, clusters, 1) == [0, 1, 2, 4, 6, 7, 9]
    assert deduplicate.kept_rows(10, clusters, 2) == [0, 1, 2, 3, 4, 6, 7, 8, 9]


def one_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        audit.cli(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_bad_input_gets_one_line(known, tmp_path, capsys):
    root, _ = known
    data = f"--train_data_dir={root / 'data'}"
    out = f"--out={tmp_path / 'a'}"
    assert "does not exist" in one_line(capsys, [f"--train_data_dir={tmp_path / 'nope'}", out, "--no_sscd"])
    assert "no training data given" in one_line(capsys, [out])
    assert "--max_copies applies to --write_deduplicated" in one_line(capsys, [data, out, "--max_copies=2"])
    assert "--threshold=1.5 must be a similarity" in one_line(capsys, [data, out, "--threshold=1.5"])
    assert "--sscd_model" in one_line(capsys, [data, out, f"--sscd_model={tmp_path / 'missing.pt'}"])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert "already exists and is not an empty folder" in one_line(capsys, [data, out, "--no_sscd", f"--write_deduplicated={busy}"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (bad / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    line = one_line(capsys, [f"--train_data_dir={bad}", out, "--no_sscd"])
    assert line.startswith("error: 1 of 1 training samples cannot be used") and "a.png" in line
    (bad / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    assert "gone.png" in one_line(capsys, [f"--train_data_dir={bad}", out, "--no_sscd"])


def test_faiss_recall_is_measured_against_exact(tmp_path):
    """FAISS's pairs on planted near-copies, compared with the exact search: the audit's sampled
    recall estimate equals the recall over all pairs when every row is sampled."""
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(3000, 64, generator=g), dim=1)
    x[2900:] = torch.nn.functional.normalize(x[:100] + 0.3 * torch.randn(100, 64, generator=g) / 8, dim=1)
    exact = {(int(a), int(b)) for i, j, _ in duplicates.threshold_pairs(x, 0.5) for a, b in zip(i, j)}
    linked: dict[int, set[int]] = {}
    for i, j, _ in audit._faiss_pairs(x, 0.5):
        for a, b in zip(i.tolist(), j.tolist()):
            linked.setdefault(a, set()).add(b)
            linked.setdefault(b, set()).add(a)
    found = {(a, b) for a, b in exact if b in linked.get(a, set())}
    recall, rows = audit.faiss_recall(x, 0.5, linked, sample=3000)
    assert rows == 3000 and len(exact) >= 100
    assert recall == pytest.approx(len(found) / len(exact)) and recall >= 0.95


def test_console_command_runs_the_audit(known, tmp_path, capsys):
    from sd_memfree import cli

    root, _ = known
    cli.main(["audit", f"--train_data_dir={root / 'data'}", f"--out={tmp_path / 'a'}", "--no_sscd"])
    assert "audit: 32 duplicate cluster(s)" in capsys.readouterr().out and (tmp_path / "a" / "report.html").is_file()


@pytest.mark.multiprocess
def test_two_processes_embed_their_slices_and_find_what_one_finds(known, tmp_path):
    """torchrun with 2 processes: each embeds its half of the rows, the halves are gathered in
    row order, and the main process writes the audit one process writes (same clusters, same
    SSCD similarities); the gathered embeddings land in the cache under the scorer's key."""
    import json
    import os
    import subprocess
    import sys

    from sd_memfree.testing.standin import make_copy_detector_sscd

    root, _ = known
    model = make_copy_detector_sscd(tmp_path / "detector.pt")
    argv = [f"--train_data_dir={root / 'data'}", f"--sscd_model={model}", "--thumb_rms=0", "--hash_distance=0", "--threshold=0.95"]
    one = run_audit(root / "data", tmp_path / "one", *argv[1:], f"--embedding_cache_dir={tmp_path / 'cache1'}")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sd_memfree.audit",
                           *argv, f"--out={tmp_path / 'two'}", f"--embedding_cache_dir={tmp_path / 'cache2'}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "audit.json").read_text())
    assert two["passes"]["sscd"]["processes"] == 2 and one["passes"]["sscd"]["processes"] == 1
    assert two["clusters"] == one["clusters"] and two["counts"] == one["counts"] and one["counts"]["clusters"] > 0
    assert len(list((tmp_path / "cache2").glob("*.pt"))) == 1
