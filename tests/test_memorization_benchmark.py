"""The memorization benchmark: its schedule, its statistics and verdicts by hand, and --quick end to end."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memorization as bench  # noqa: E402


def test_scored_steps_are_the_checkpoints_and_the_end():
    """B = 3000, runs to 2B = 6000: plain every 0.1B = 300 -> 300, 600, ..., 6000 (20 points);
    the methods every 0.5B = 1500 -> 1500, 3000, 4500, 6000 (0.5x, 1x, 1.5x, 2x)."""
    s = bench.Setting()
    assert bench.scored_steps(s, "plain") == list(range(300, 6001, 300))
    assert bench.scored_steps(s, "ietagc+") == [1500, 3000, 4500, 6000]


def test_method_checkpoints_must_fall_on_round_boundaries():
    """4 shards x merge_every 25 = rounds of 100 steps; method_every 0.5 x 150 = 75 is mid-round."""
    with pytest.raises(SystemExit, match="not a multiple of a round"):
        bench.check_setting(bench.Setting(budget=150), ["plain", "ietagc+"])
    bench.check_setting(bench.Setting(budget=150), ["plain", "agc"])  # one shard: no rounds


def test_plan_tasks_priority_by_hand():
    """Seeds 0 1 2, all methods, B = 3000, 2B = 6000: first plain/IET-AGC+ at B for every seed (6),
    then the 3 components at B on seed 0, then the main pair at 4500 (6) and 6000 (6), then the
    components at B on seeds 1 and 2 (6), then the components at 4500 and 6000 (18): 45 tasks."""
    tasks = bench.plan_tasks(list(bench.DEFAULT_METHODS), [0, 1, 2], bench.Setting())
    assert tasks[:6] == [("plain", 0, 3000), ("ietagc+", 0, 3000), ("plain", 1, 3000), ("ietagc+", 1, 3000), ("plain", 2, 3000), ("ietagc+", 2, 3000)]
    assert tasks[6:9] == [("ietagc", 0, 3000), ("agc", 0, 3000), ("iet", 0, 3000)]
    assert tasks[9] == ("plain", 0, 4500) and tasks[15] == ("plain", 0, 6000)
    assert tasks[21:27] == [(m, sd, 3000) for sd in (1, 2) for m in ("ietagc", "agc", "iet")]
    assert len(tasks) == 45 and tasks[-1] == ("iet", 2, 6000)


def test_allowed_targets_by_hand():
    """Tasks p@B, q@B, p@2B, q@2B. Nothing reached: jobs=2 -> both to B; jobs=1 -> p only.
    p reached B: jobs=1 -> q (p is paused: its next task comes after q@B); jobs=2 -> q to B, p to 2B.
    q failed (ended): jobs=1 -> p to 2B."""
    t = [("p", 0, 10), ("q", 0, 10), ("p", 0, 20), ("q", 0, 20)]
    assert bench.allowed_targets(t, {}, set(), 2) == {("p", 0): 10, ("q", 0): 10}
    assert bench.allowed_targets(t, {}, set(), 1) == {("p", 0): 10}
    assert bench.allowed_targets(t, {("p", 0): 10}, set(), 1) == {("q", 0): 10}
    assert bench.allowed_targets(t, {("p", 0): 12}, set(), 2) == {("q", 0): 10, ("p", 0): 20}
    assert bench.allowed_targets(t, {("p", 0): 10}, {("q", 0)}, 1) == {("p", 0): 20}


def test_wilson_interval_by_hand():
    """z = 1.96. 5/10: centre 0.5, half 1.96/1.38416 * sqrt(0.025 + 0.009604) = 0.2634.
    0/10: centre = half = 0.19208/1.38416 = 0.1388 -> (0, 0.2775). n = 0: (0, 1)."""
    from train_scripts.memorization_eval import wilson_interval

    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def _point(method, seed, steps, dup_copies, loss, n=8):
    part = lambda k: {"n": n, "copies": k, "copies_of_own_image": k, "distinct_copied": min(k, 2)}
    stats = {"dup": part(dup_copies), "uniq": part(0), "ratio": []}
    return {"method": method, "seed": seed, "steps": steps, "fraction": steps / 10, "copies_recon": stats, "copies_raw": stats,
            "heldout_loss": loss, "fit_loss_dup": 0.1, "fit_loss_uniq": 0.1, "frechet_heldout": 1.0}


def test_summarize_pools_seeds_and_adds_the_base_to_plain():
    """Copies 2/8 and 4/8 over two seeds -> 6/16 = 0.375 pooled, per-seed std 0.125; losses 0.1 and
    0.3 -> mean 0.2, std 0.1. The base (seed None) becomes plain@0 of both seeds."""
    pts = [_point("base", None, 0, 0, 0.5), _point("plain", 0, 10, 2, 0.1), _point("plain", 1, 10, 4, 0.3)]
    out = bench.summarize(pts)
    assert set(out) == {"plain@0", "plain@10"}
    assert out["plain@0"]["seeds"] == [0, 1] and out["plain@0"]["dup"]["n"] == 16
    r = out["plain@10"]
    assert r["dup"]["copies"] == 6 and r["dup"]["n"] == 16 and r["dup"]["rate"] == pytest.approx(0.375)
    assert r["dup"]["seed_std"] == pytest.approx(0.125)
    assert r["heldout_loss"] == pytest.approx(0.2) and r["heldout_loss_std"] == pytest.approx(0.1)


def test_verdict_and_moonshot_by_hand():
    """One seed (std 0), n = 100 generations per point.
    plain@0: loss 0.20, 0 copies; plain@10: 0.10, 10; plain@20: 0.09, 40. Method m@10: 0.095, 5.
    Dominating m@10 needs loss <= 0.095 and fewer than 5 copies: plain@20 has 40 -> none -> met;
    plain's fewest copies at that loss or better: 40%.
    Method m@20: 0.12, 30 copies: plain@10 (0.10 <= 0.12, 10 < 30; Wilson upper of 10/100 = 0.174
    < lower of 30/100 = 0.219) dominates beyond noise; plain@0 is too lossy -> not met; plain's
    fewest copies at loss <= 0.12: 10%.
    Moonshot: at plain@10's loss 0.10 plain needs 10% (plain@10) and m 5% (m@10); at plain@20's
    0.09 m never gets there. AGC at (0.20, 0 copies): the base reaches that loss with 0 copies too -> tie."""
    n = 100
    pts = [_point("base", None, 0, 0, 0.20, n), _point("plain", 0, 10, 10, 0.10, n), _point("plain", 0, 20, 40, 0.09, n),
           _point("ietagc+", 0, 10, 5, 0.095, n), _point("ietagc+", 0, 20, 30, 0.12, n), _point("agc", 0, 10, 0, 0.20, n)]
    s = bench.summarize(pts)
    v = bench.verdict(s)
    assert v["ietagc+@10"] == {"verdict": "met", "on_means": [], "beyond_noise": [], "plain_fewest_copies_at_this_loss": pytest.approx(0.40)}
    assert v["ietagc+@20"] == {"verdict": "not met", "on_means": ["plain@10"], "beyond_noise": ["plain@10"],
                              "plain_fewest_copies_at_this_loss": pytest.approx(0.10)}
    assert v["agc@10"]["verdict"] == "tie (on plain's frontier)"
    moon = {r["plain_point"]: r for r in bench.moonshot(s, "ietagc+")}
    assert moon["plain@10"]["plain_copies"] == pytest.approx(0.10) and moon["plain@10"]["method_copies"] == pytest.approx(0.05)
    assert moon["plain@20"]["method_copies"] is None
    assert moon["plain@0"]["plain_copies"] == 0 and moon["plain@0"]["method_copies"] == pytest.approx(0.05)


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    """--quick, one training run at a time: plain and IET-AGC+ to 2 x 8 steps. The scheduler runs
    plain to 8, pauses it, runs IET-AGC+ to 8, then both on. Points: the base, plain and IET-AGC+
    at 4, 8, 12 (checkpoints, exported by the script) and 16 (the final model); the copy test's
    ceiling (duplicated captions, against the VAE's reconstructions) is a full house; the analysis
    reads the tar and gives a verdict for every method point; plot and grids are written."""
    out, tar = tmp_path / "mem", tmp_path / "mem.tar.gz"
    summary = bench.main(bench.parse_args(["--quick", "--out", str(out), "--cache", str(tmp_path / "c"), "--tar", str(tar)]))
    assert summary["errors"] == [] and summary["unscored_at_deadline"] == []
    names = {p.stem for p in (out / "points").glob("*.json")}
    assert names == {"base-0"} | {f"{m}-s0-{k}" for m in ("plain", "ietagcplus") for k in (4, 8, 12, 16)}
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert {r["status"] for r in runs.values()} == {"finished"} and runs["plain-s0"]["steps_seen"] == [4, 8, 12, 16]
    base = json.loads((out / "points" / "base-0.json").read_text())
    g = bench.Setting(**bench.QUICK).gens_per_duplicated
    assert base["ceiling"]["copies_recon"]["dup"] == {"n": 2 * g, "copies": 2 * g, "copies_of_own_image": 2 * g, "distinct_copied": 2}
    with tarfile.open(tar) as t:
        members = t.getnames()
    assert "mem/points/plain-s0-8.json" in members and not any("/work" in m for m in members)
    res = bench.analyse(bench.parse_args(["--analyse", str(tar), "--plot", str(tmp_path / "f.png"), "--grids", str(tmp_path / "g")]))
    assert set(res["verdict"]) == {f"ietagc+@{k}" for k in (4, 8, 12, 16)}
    assert res["summary"]["plain@0"]["dup"]["copies"] == 0  # the base never saw a landscape caption
    assert (tmp_path / "f.png").stat().st_size > 1000 and len(list((tmp_path / "g").glob("*.png"))) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("method", ["plain", "ietagc+"])
def test_exported_checkpoint_is_the_shorter_run(tmp_path, method, tiny_model_dir):
    """The premise of scoring checkpoints: a checkpoint of a constant-LR run, turned into a model
    the way the benchmark does it (resume with --max_train_steps = its step), has the same UNet
    as a run trained to that step. IET-AGC+ with 2 shards x merge_every 1: step 2 ends a round."""
    import torch
    from safetensors.torch import load_file

    from sd_memfree.testing.tiny import make_tiny_dataset
    from train_scripts import train_sd_ietagc as train

    data = make_tiny_dataset(tmp_path / "data", 8, 32, 0.25, 3, kind="landscapes")
    s = bench.Setting(**{**bench.QUICK, "num_shards": 2, "merge_every": 1})
    job = {"setting": bench.asdict(s), "base": str(tiny_model_dir), "data": str(data), "size": 32, "seed": 0, "method": method,
           "hf_cache": str(tmp_path / "hf")}
    train.main(train.parse_args(bench.train_flags(job, 4, tmp_path / "long") + ["--checkpointing_steps=2"]))
    train.main(train.parse_args(bench.train_flags(job, 2, tmp_path / "short")))
    train.main(train.parse_args(bench.train_flags(job, 2, tmp_path / "export")
                                + [f"--resume_from_checkpoint={tmp_path / 'long' / 'checkpoint-2'}", f"--checkpointing_steps={10**9}"]))
    weights = lambda d: load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors"))
    short, export, long = weights(tmp_path / "short"), weights(tmp_path / "export"), weights(tmp_path / "long")
    assert short.keys() == export.keys()
    for k in short:
        torch.testing.assert_close(export[k], short[k], rtol=0, atol=1e-6)
    assert any(not torch.equal(long[k], short[k]) for k in short)  # steps 3-4 did train: the comparison can fail


def test_score_from_scores_only_the_extension():
    """An extension of the 2B grid to 4B (B = 3000) scores from 2B on: plain every 300 from 6000
    to 12000 (21 points, 6000 again as the check that the runs are the same), the methods at
    6000, 7500, 9000, 10500, 12000."""
    s = bench.Setting(longest=4.0, score_from=2.0)
    assert bench.scored_steps(s, "plain") == list(range(6000, 12001, 300))
    assert bench.scored_steps(s, "ietagc+") == [6000, 7500, 9000, 10500, 12000]
    with pytest.raises(SystemExit, match="--score_from"):
        bench.check_setting(bench.Setting(score_from=3.0), ["plain"])
    with pytest.raises(SystemExit, match="--domain"):
        bench.check_setting(bench.Setting(domain="shapes"), ["plain"])


def test_plain_best_is_the_lowest_mean_of_three_neighbours_and_the_goal():
    """Plain losses at steps 10..60: 0.10, 0.09, 0.07, 0.095, 0.085, 0.088 (one seed). Windows of 3:
    (10-30) 0.08667, (20-40) 0.085, (30-50) 0.08333, (40-60) 0.08933 -> best 0.08333 at steps 30, 40,
    50 (centre 40), not the single lowest point 0.07 at 30. Copies there 1, 3, 5 of 10 -> 0.3.
    Method points: m@30 loss 0.083, 1/10 copies -> reached (gap -0.00033, 10% <= 10%);
    m@60 loss 0.080, 2/10 -> copies over; m@20 loss 0.090, 0/10 -> loss above."""
    losses = {10: 0.10, 20: 0.09, 30: 0.07, 40: 0.095, 50: 0.085, 60: 0.088}
    copies = {10: 0, 20: 0, 30: 1, 40: 3, 50: 5, 60: 6}
    pts = [_point("plain", 0, k, copies[k], v, n=10) for k, v in losses.items()]
    pts += [_point("ietagc+", 0, 30, 1, 0.083, n=10), _point("ietagc+", 0, 60, 2, 0.080, n=10), _point("ietagc+", 0, 20, 0, 0.090, n=10)]
    s = bench.summarize(pts)
    best = bench.plain_best(s)
    assert best["loss"] == pytest.approx(0.25 / 3) and best["steps"] == 40 and best["window"] == [30, 40, 50]
    assert best["dup_rate"] == pytest.approx(0.3)
    g = bench.goal(s, best)
    assert g["ietagc+@30"] == {"loss_gap": pytest.approx(0.083 - 0.25 / 3), "copies_ok": True, "reached": True}
    assert g["ietagc+@60"]["reached"] is False and g["ietagc+@60"]["copies_ok"] is False
    assert g["ietagc+@20"]["reached"] is False and g["ietagc+@20"]["loss_gap"] > 0
    assert bench.plain_best(bench.summarize(pts[:2])) is None  # fewer than 3 checkpoints: no best
    # Step 40 missing and a step 70 at 0.09: windows straddling the hole, (20, 30, 50) 0.08167 and
    # (30, 50, 60) 0.081, would win but are not consecutive; of the whole ones, (10-30) 0.08667 beats
    # (50-70) 0.08767. A checkpoint only seed 1 reached (80, loss 0.01) is left out, else (60-80) 0.0627 would win.
    holed = [p for p in pts if p["steps"] != 40 and p["method"] == "plain"] + [_point("plain", 0, 70, 0, 0.09, n=10)]
    holed += [_point("plain", 1, k, 0, losses.get(k, 0.09), n=10) for k in (10, 20, 30, 50, 60, 70)] + [_point("plain", 1, 80, 0, 0.01, n=10)]
    hb = bench.plain_best(bench.summarize(holed))
    assert hb["window"] == [10, 20, 30] and hb["loss"] == pytest.approx(0.26 / 3)


def _write_folder(folder, points, **setting):
    (folder / "points").mkdir(parents=True)
    (folder / "runs").mkdir()
    st = {"setting": {**bench.asdict(bench.Setting()), **setting}, "seeds": sorted({p["seed"] for p in points if p["seed"] is not None}),
          "methods": sorted({p["method"] for p in points if p["method"] != "base"})}
    (folder / "setting.json").write_text(json.dumps(st))
    for p in points:
        (folder / "points" / f"{p['method']}-{p['seed']}-{p['steps']}.json").write_text(json.dumps(p))
    return folder


def test_an_extension_merges_with_its_grid_and_rerun_points_are_compared(tmp_path):
    """Grid to 2B (plain@10, @20 of seed 0) + extension from 2B (plain@20 re-measured 0.001 higher
    with 1 more copy, plain@30): 3 plain points, the later plain@20 kept, the re-measurement
    reported; --analyse_seeds keeps only the named seeds; another setting is refused."""
    a = _write_folder(tmp_path / "grid", [_point("plain", 0, 10, 1, 0.10), _point("plain", 0, 20, 2, 0.09), _point("plain", 1, 10, 1, 0.2)])
    b = _write_folder(tmp_path / "ext", [_point("plain", 0, 20, 3, 0.091), _point("plain", 0, 30, 4, 0.08)], longest=4.0, score_from=2.0)
    setting, points, _, rerun = bench.merge_results([bench.load_results(a), bench.load_results(b)])
    assert sorted((p["seed"], p["steps"]) for p in points) == [(0, 10), (0, 20), (0, 30), (1, 10)]
    assert next(p for p in points if p["steps"] == 20)["heldout_loss"] == 0.091
    assert rerun == {"points": 1, "max_abs_heldout_loss": pytest.approx(0.001), "copies_differ": 1}
    assert setting["setting"]["longest"] == 4.0 and setting["seeds"] == [0, 1]
    res = bench.analyse(bench.parse_args(["--analyse", str(a), str(b), "--analyse_seeds", "0"]))
    assert set(res["summary"]) == {"plain@10", "plain@20", "plain@30"} and res["plain_best"]["loss"] == pytest.approx((0.1 + 0.091 + 0.08) / 3)
    c = _write_folder(tmp_path / "other", [_point("plain", 0, 10, 1, 0.1)], agc_ratio=1.5)
    with pytest.raises(SystemExit, match="agc_ratio"):
        bench.merge_results([bench.load_results(a), bench.load_results(c)])


def test_variants_are_the_papers_method_with_one_change():
    """IET-AGC+ is --num_shards=4 --merge_every=25 --agc_ratio=1.25 --redistribute_fraction=0.25
    --loss_aware_augmentation; the shared-optimizer variant adds one flag, the K=2 variant halves
    the shards and doubles merge_every (rounds stay 100 steps, so the 1500-step checkpoints stay
    on merges). The default grid runs the five of the papers' ablation, not the variants."""
    s = bench.Setting()
    papers = ["--num_shards=4", "--merge_every=25", "--agc_ratio=1.25", "--redistribute_fraction=0.25", "--loss_aware_augmentation"]
    assert bench.method_flags("ietagc+", s) == papers
    assert bench.method_flags("ietagc+shared", s) == papers + ["--proxy_optimizer_state=shared"]
    assert bench.method_flags("ietagc+k2", s) == ["--num_shards=2", "--merge_every=50"] + papers[2:]
    bench.check_setting(s, list(bench.ALL_METHODS))
    with pytest.raises(SystemExit, match="ietagc\\+k2 checkpoint interval 75 is not a multiple of a round \\(num_shards x merge_every = 100\\)"):
        bench.check_setting(bench.Setting(budget=150), ["ietagc+k2"])
    quick = bench.Setting(**bench.QUICK)  # 2 shards x 2 steps would become 1 shard x 4: no longer IET
    assert bench.method_flags("ietagc+k2", quick)[:2] == ["--num_shards=1", "--merge_every=4"]
    with pytest.raises(SystemExit, match="ietagc\\+k2 variant of this setting has 1 shard"):
        bench.check_setting(quick, ["ietagc+k2"])
    assert bench.parse_args([]).methods is None and "ietagc+k2" not in bench.DEFAULT_METHODS
