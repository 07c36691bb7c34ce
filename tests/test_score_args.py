"""The scorer's command line rejects values that would turn a measurement into garbage, with one
argparse line, before anything loads."""

from __future__ import annotations

import pytest

from sd_memfree.scoring import run

BASE = ["--generated_dir", "g", "--train_data_dir", "t", "--out", "o"]


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--threshold=2", "--threshold=2.0 must be a similarity in [0, 1)"),  # no similarity exceeds 1: always 'clean'
        ("--threshold=1", "--threshold=1.0 must be a similarity in [0, 1)"),
        ("--threshold=-1", "--threshold=-1.0 must be a similarity in [0, 1)"),  # every generation counts
        ("--threshold=nan", "--threshold=nan must be a similarity in [0, 1)"),
        ("--threshold=inf", "--threshold=inf must be a similarity in [0, 1)"),
        ("--guidance_scale=nan", "--guidance_scale=nan must be a finite number >= 0"),
        ("--guidance_scale=-1", "--guidance_scale=-1.0 must be a finite number >= 0"),
        ("--num_prompts=0", "--num_prompts=0 must be >= 1"),
        ("--resolution=0", "--resolution=0 must be >= 8"),
    ],
)
def test_bad_values_stop_with_one_line(flag, message, capsys):
    with pytest.raises(SystemExit) as exc:
        run.parse_args([*BASE, flag])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last


@pytest.mark.parametrize("threshold", ["0", "0.5", "0.75", "0.999"])
def test_sensible_thresholds_are_accepted(threshold):
    assert run.parse_args([*BASE, f"--threshold={threshold}"]).threshold == float(threshold)
