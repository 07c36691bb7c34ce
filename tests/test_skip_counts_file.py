"""Training writes whole-run per-sample AGC skip counts (memfree_skip_counts.json, local only) that
the scorer can join to its training set; redistribution does not reset them."""

from __future__ import annotations

import json

import torch

from helpers import train_argv
from sd_memfree.scoring import risk
from sd_memfree.method.shards import ShardAssignment
from train_scripts import train_sd_ietagc as train


def test_total_skip_counts_survive_redistribution_and_checkpoints():
    """skip_counts reset at each redistribution; total_skip_counts keep the whole run:
    skips of ids [0, 0, 1] then [1] -> totals [2, 2, 0, 0] after a redistribution in between."""
    a = ShardAssignment(4, 2, seed=0)
    a.record_skips(torch.tensor([0, 0, 1]), torch.tensor([False, False, False]))
    a.redistribute(0.5, step=1)
    a.record_skips(torch.tensor([1, 2]), torch.tensor([False, True]))
    assert a.skip_counts.tolist() == [0, 1, 0, 0] and a.total_skip_counts.tolist() == [2, 2, 0, 0]
    b = ShardAssignment(4, 2, seed=0)
    b.load_state_dict(a.state_dict())
    assert b.total_skip_counts.tolist() == [2, 2, 0, 0]
    old = {k: v for k, v in a.state_dict().items() if k != "total_skip_counts"}  # a checkpoint of older code
    b.load_state_dict(old)
    assert b.total_skip_counts.tolist() == [0, 1, 0, 0]


def test_training_writes_whole_run_skip_counts(model20, tiny_data_dir, tmp_path):
    """16 steps x batch 4 = 64 samples; the file's counts sum to the whole-run skip rate x 64 even
    though redistribution reset the per-round counts, and each row names its image and caption
    (so the scorer can check it joins the right images)."""
    out = tmp_path / "run"
    summary = train.main(train.parse_args(train_argv(model20, tiny_data_dir, out, "--num_shards=2", "--merge_every=2", "--agc_ratio=1.02",
                                                     "--agc_ema=0.1", "--redistribute_fraction=0.5", steps=16, train_batch_size=4, seed=3)))
    data = json.loads((out / risk.SKIP_COUNTS_FILE).read_text())
    rows = [json.loads(line) for line in (tiny_data_dir / "metadata.jsonl").read_text().splitlines()]
    assert data["num_samples"] == len(rows) == 12
    assert [(s["sample_id"], s["file_name"], s["text"]) for s in data["samples"]] == [(i, r["file_name"], r["text"]) for i, r in enumerate(rows)]
    total = sum(s["skip_count"] for s in data["samples"])
    assert total == round(summary["agc/skip_rate"] * 64) and total > 0
    assert json.loads((out / "memfree_state.json").read_text())["moves"], "no redistribution happened: the test would not test the reset"
    counts = risk.read_skip_counts(out / risk.SKIP_COUNTS_FILE, [r["text"] for r in rows], [r["file_name"] for r in rows])
    assert counts.sum() == total
