"""The memorization benchmark's quick mode runs the real script and scorer and reports its JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memorization as bench  # noqa: E402


def test_dominators_by_hand():
    """IET-AGC+ at (loss 1.0 +- 0.01, copies 0.30 +- 0.02).
    plain@0.1 (0.9 +- 0.01, 0.10 +- 0.02): better on both by 0.1 > 0.02 and 0.2 > 0.04 -> beyond spread.
    plain@0.5 (0.99 +- 0.01, 0.29 +- 0.02): better on both means, but 0.01 < 0.02 -> on means only.
    plain@1 (1.1, 0.8): worse -> neither."""
    row = lambda m, f, l, c: {"method": m, "fraction": f, "heldout_loss": l, "heldout_loss_std": 0.01, "copy_frac": c, "copy_frac_std": 0.02}
    s = {"plain@0.1": row("plain", 0.1, 0.9, 0.10), "plain@0.5": row("plain", 0.5, 0.99, 0.29), "plain@1": row("plain", 1.0, 1.1, 0.8),
         "ietagc+@1": row("ietagc+", 1.0, 1.0, 0.30)}
    assert bench.dominators(s, "ietagc+") == {"on_means": ["plain@0.1", "plain@0.5"], "beyond_spread": ["plain@0.1"]}


def test_summarize_mean_and_std():
    """Two seeds with copy_frac 0.2 and 0.4 -> mean 0.3, population std 0.1."""
    rows = [{"method": "plain", "fraction": 1.0, "steps": 10, "seed": s, "copy_frac": c, "distinct_copied": 1, "sim_95pc": 0.5,
             "frac_gt_0.5": 0.5, "heldout_loss": 0.1, "fit_loss": 0.1, "frechet_heldout": 1.0} for s, c in ((0, 0.2), (1, 0.4))]
    out = bench.summarize(rows)["plain@1"]
    assert out["copy_frac"] == pytest.approx(0.3) and out["copy_frac_std"] == pytest.approx(0.1) and out["seeds"] == 2


@pytest.mark.slow
def test_quick_mode_runs_and_last_line_is_json(tmp_path, capsys):
    """--quick with a 4-step budget: plain at 0% (the base, 0 steps), 25% (round(0.25 * 4) = 1
    step) and 100%, IET-AGC and IET-AGC+ at 100% -> 5 jobs; the last printed line is the JSON
    result with those 5 rows and the floors. Two images per training row: 2 * rows generations."""
    args = bench.parse_args(["--quick", "--steps", "4", "--jobs", "1", "--work", str(tmp_path / "w"), "--cache", str(tmp_path / "c"),
                             "--plot", str(tmp_path / "p.png")])
    bench.main(args)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert set(result["summary"]) == {"plain@0", "plain@0.25", "plain@1", "ietagc@1", "ietagc+@1"}
    assert result["summary"]["plain@0"]["steps"] == 0
    assert result["summary"]["plain@0.25"]["steps"] == 1 and result["summary"]["ietagc+@1"]["steps"] == 4
    rows = sum(1 for _ in open(tmp_path / "w" / "data-12-0.5-4" / "metadata.jsonl"))
    assert rows == 6 * 4 + 6  # 12 distinct, half of them x4
    gens = sum(1 for _ in open(tmp_path / "w" / "seed0" / "plain-4" / "score" / "generated" / "metadata.jsonl"))
    assert gens == 2 * rows
    assert set(result["floors"]) >= {"plain_copies_ge_30pc", "ietagc_plus_reduction_ge_50pc"}
    assert (tmp_path / "p.png").stat().st_size > 1000
