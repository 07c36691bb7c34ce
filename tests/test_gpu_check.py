"""benchmarks/gpu_check.py: its CPU dry run (so the GPU script never rots), its arithmetic and
its early errors. The GPU figures themselves need a GPU machine (docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import gpu_check  # noqa: E402

METHODS = ("iet_agc", "iet_agc_plus")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run; on a GPU machine run the real check")
def test_dry_run_trains_every_configuration_and_prints_the_json_last(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry_run", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["complete"] is True and printed["errors"] == []

    # Every configuration ran except fp16 full fine-tuning, which accelerate cannot do on a CPU.
    expected = {f"{p}/{m}/{n}" for p in ("bf16", "fp16") for m in ("full", "lora") for n in ("plain", *METHODS)}
    cpu_only = {f"fp16/full/{n}" for n in ("plain", *METHODS)}
    assert set(printed["runs"]) == expected - cpu_only
    assert sorted(s.split(" ")[0] for s in printed["skipped"]) == sorted(cpu_only)
    for key, run in printed["runs"].items():
        assert run["steps_per_s"] > 0 and run["steps"] == 2, key
        if key.endswith("plain"):
            assert "merge_s" not in run
            continue
        # A round of K=4 proxies (4 turn ends, 3 swaps, 1 merge), then 2 turns of the next round.
        assert len(run["end_turn_s"]) == 5 and len(run["begin_turn_first_s"]) == 4, key
        assert run["num_merges"] == 1 and run["begin_turn_full_swap_s"] >= 0, key
        assert (run["redistribute_s"] is not None) == key.endswith("plus"), key
        assert 0.0 <= run["skip_rate"] <= 1.0, key  # AGC ran and counted
    # Ratios are to the plain run of the same precision and mode.
    for key, ratio in printed["ratios"].items():
        p, m, _ = key.split("/")
        want = printed["runs"][key]["steps_per_s"] / printed["runs"][f"{p}/{m}/plain"]["steps_per_s"]
        assert ratio["time"] == pytest.approx(want, abs=1e-4)
    assert set(printed["ratios"]) == {f"{p}/{m}/{n}" for p in ("bf16", "fp16") for m in ("full", "lora") for n in METHODS} - cpu_only
    # ProxySet alone (the --proxyset_only figures, tiny here): a round, a merge, two more turns.
    probe = printed["proxyset_probe"]
    assert len(probe["end_turn_s"]) == 5 and len(probe["begin_turn_first_s"]) == 4 and probe["merge_s"] >= 0
    # The CUDA-only tests ran and were skipped here (no CUDA), and their summary was captured.
    assert printed["tests"]["rc"] == 0 and "4 skipped" in printed["tests"]["summary"]
    # No GPU memory on a CPU: time goals only.
    assert {g["goal"].split(":")[0] for g in printed["goals"]} == {"bf16/full/iet_agc", "bf16/full/iet_agc_plus"}
    assert "PASS" in (tmp_path / "gpu.log").read_text() or "FAIL" in (tmp_path / "gpu.log").read_text()


def test_ratios_and_goals_against_hand_computed_figures():
    """plain 10 steps/s, 0.1 s/step, peak 100; IET-AGC 9.6 steps/s, peak 112, one round costing
    4 x (1 + 1) + 2 = 10 s spread over 4 x 2000 steps -> amortised step 1/9.6 + 10/8000.
    time 0.96 (< 0.97: FAIL), memory 1.12 (> 1.10: FAIL), amortised 0.1 / 0.1054167 = 0.9486 (FAIL);
    merge 2 s = 20 plain steps; a turn change 1 + 1 s = 20 plain steps."""
    amortised = {H: 1 / 9.6 + 10 / (4 * H) for H in gpu_check.AMORTISE_MERGE_EVERY}
    runs = {
        "bf16/full/plain": {"steps_per_s": 10.0, "step_s": 0.1, "peak_bytes": 100},
        "bf16/full/iet_agc": {"steps_per_s": 9.6, "step_s": 1 / 9.6, "peak_bytes": 112, "end_turn_s": [1.0] * 4,
                              "begin_turn_full_swap_s": 1.0, "merge_s": 2.0,
                              **{f"step_s_amortised_merge_every_{H}": v for H, v in amortised.items()}},
        "bf16/lora/plain": {"steps_per_s": 10.0, "step_s": 0.1},
        "bf16/lora/iet_agc": {"steps_per_s": 9.9, "step_s": 1 / 9.9},
        "fp16/full/iet_agc": {"steps_per_s": 9.9, "step_s": 1 / 9.9},  # no plain run of its own: no ratio
    }
    ratios, goals = gpu_check.ratios_and_goals(runs)
    assert set(ratios) == {"bf16/full/iet_agc", "bf16/lora/iet_agc"}
    r = ratios["bf16/full/iet_agc"]
    assert r["time"] == 0.96 and r["memory"] == 1.12
    assert r["time_amortised_merge_every_2000"] == round(0.1 / (1 / 9.6 + 10 / 8000), 4) == 0.9486
    assert r["merge_over_plain_step"] == 20.0 and r["turn_change_over_plain_step"] == 20.0
    assert ratios["bf16/lora/iet_agc"] == {"time": 0.99}
    # Goals are about full fine-tuning only, and these figures miss all three.
    assert [(g["goal"], g["pass"]) for g in goals] == [
        ("bf16/full/iet_agc: steps/s ratio, steady state", False),
        ("bf16/full/iet_agc: steps/s ratio incl. turn changes and merges, --merge_every 2000", False),
        ("bf16/full/iet_agc: peak GPU memory ratio", False),
    ]
    runs["bf16/full/iet_agc"].update(steps_per_s=9.8, peak_bytes=110)
    assert [g["pass"] for g in gpu_check.ratios_and_goals(runs)[1]] == [True, False, True]


def test_missing_dependency_stops_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now fails, as on a machine without it
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--dry_run", "--out", str(out), "--no_tests"]) == 2
    written = json.loads(out.read_text())
    assert "runs" not in written and written["complete"] is False
    assert written["errors"][0].startswith("missing or broken dependencies: peft (")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_without_a_gpu_the_real_check_refuses_and_names_the_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--out", str(out), "--no_tests"]) == 2
    error = json.loads(out.read_text())["errors"][0]
    assert error.startswith("no CUDA device") and "--dry_run" in error


def test_budget_skips_configurations_that_do_not_fit_and_says_so(tmp_path):
    out = tmp_path / "gpu.json"
    rc = gpu_check.main(["--dry_run", "--device", "cpu", "--out", str(out), "--no_tests", "--max_seconds", "0",
                         "--modes", "lora", "--precisions", "bf16"])
    written = json.loads(out.read_text())
    assert rc == 0 and written["runs"] == {} and written["complete"] is False
    assert written["skipped"] == ["bf16/lora/plain", "bf16/lora/iet_agc", "bf16/lora/iet_agc_plus"]


def test_bad_lists_are_one_line_errors():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--modes", "full,qlora"])


def test_wheel_requirements_pin_what_is_installed_and_leave_torch_out():
    import importlib.metadata as md

    reqs = dict(r.split("==") for r in gpu_check.wheel_requirements())
    assert reqs["diffusers"] == md.version("diffusers") and reqs["peft"] == md.version("peft")
    assert {"transformers", "accelerate", "pytest", "pytest-timeout", "huggingface-hub", "safetensors"} <= set(reqs)
    assert not {"torch", "torchvision", "numpy"} & set(reqs) and not any(r.startswith("nvidia-") for r in reqs)
