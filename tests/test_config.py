"""MemFreeConfig: validation, argument group, JSON round trip, resume compatibility."""

import argparse
import json

import pytest

from sd_memfree.config import ARGUMENT_GROUP_TITLE, MemFreeConfig


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--learning_rate", type=float, default=1e-4)  # a script flag, not ours
    MemFreeConfig.add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_turn_everything_off():
    cfg = MemFreeConfig()
    assert not cfg.sharding_enabled
    assert not cfg.agc_enabled
    assert not cfg.redistribution_enabled
    assert not cfg.loss_aware_augmentation


def test_reference_setting_is_valid():
    cfg = MemFreeConfig(
        num_shards=4, merge_every=2000, agc_ratio=1.25, redistribute_fraction=0.25, loss_aware_augmentation=True
    )
    assert cfg.sharding_enabled and cfg.agc_enabled and cfg.redistribution_enabled


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"num_shards": 0}, "--num_shards=0"),
        ({"merge_every": 0}, "--merge_every=0"),
        ({"proxy_optimizer_state": "both"}, "--proxy_optimizer_state='both'"),
        ({"agc_ratio": -1.0}, "--agc_ratio=-1.0"),
        ({"agc_ratio": float("nan")}, "--agc_ratio=nan"),
        ({"agc_ema": 1.0}, "--agc_ema=1.0"),
        ({"agc_ema": -0.1}, "--agc_ema=-0.1"),
        ({"num_shards": 2, "agc_ratio": 1.25, "redistribute_fraction": 1.0}, "--redistribute_fraction=1.0"),
        ({"redistribute_at": "epoch"}, "--redistribute_at='epoch'"),
        ({"augment_max_magnitude": -1}, "--augment_max_magnitude=-1"),
        ({"augment_alpha": 0.0}, "--augment_alpha=0.0"),
        # non-finite and out-of-range values of every numeric flag
        ({"agc_ratio": float("inf")}, "--agc_ratio=inf"),
        ({"agc_ratio": 0.5}, "--agc_ratio=0.5"),  # below 1 skips samples above the mean loss
        ({"agc_ratio": 11.0}, "--agc_ratio=11.0"),  # above 10 skips almost nothing
        ({"agc_ema": float("nan")}, "--agc_ema=nan"),
        ({"num_shards": 2, "agc_ratio": 1.25, "redistribute_fraction": float("nan")}, "--redistribute_fraction=nan"),
        ({"agc_ratio": 1.25, "augment_alpha": float("inf")}, "--augment_alpha=inf"),
        ({"augment_alpha": float("nan")}, "--augment_alpha=nan"),
        ({"augment_max_magnitude": 31}, "--augment_max_magnitude=31"),  # RandAugment has bins 0..30
        ({"num_shards": 2.5}, "--num_shards=2.5"),  # from a hand-edited JSON
        ({"merge_every": True}, "--merge_every=True"),
        ({"agc_ratio": "1.25"}, "--agc_ratio='1.25'"),
        ({"loss_aware_augmentation": "yes"}, "--loss_aware_augmentation='yes'"),
    ],
)
def test_bad_values_raise_one_line_naming_the_flag(kwargs, flag):
    with pytest.raises(ValueError) as err:
        MemFreeConfig(**kwargs)
    assert flag in str(err.value)
    assert "\n" not in str(err.value)


def test_redistribution_needs_shards_and_agc():
    with pytest.raises(ValueError, match="needs --num_shards >= 2"):
        MemFreeConfig(num_shards=1, agc_ratio=1.25, redistribute_fraction=0.25)
    with pytest.raises(ValueError, match="needs --agc_ratio > 0"):
        MemFreeConfig(num_shards=4, agc_ratio=0.0, redistribute_fraction=0.25)


def test_loss_aware_augmentation_needs_agc():
    with pytest.raises(ValueError, match="--loss_aware_augmentation .* needs --agc_ratio > 0"):
        MemFreeConfig(loss_aware_augmentation=True)
    assert MemFreeConfig(agc_ratio=2.0, loss_aware_augmentation=True).loss_aware_augmentation


def test_argument_group_defaults_match_dataclass():
    parser = argparse.ArgumentParser()
    group = MemFreeConfig.add_arguments(parser)
    assert group.title == ARGUMENT_GROUP_TITLE
    assert MemFreeConfig.from_args(parser.parse_args([])) == MemFreeConfig()
    # every flag has help text
    assert all(a.help for a in group._group_actions)


def test_flags_are_parsed_with_field_types_and_other_flags_ignored():
    ns = _parse(
        [
            "--num_shards=4",
            "--merge_every=1000",
            "--agc_ratio=1.25",
            "--agc_ema=0.9",
            "--redistribute_fraction=0.25",
            "--redistribute_at=merge",
            "--proxy_optimizer_state=shared",
            "--loss_aware_augmentation",
            "--augment_max_magnitude=7",
            "--augment_alpha=3",
            "--learning_rate=1e-5",
        ]
    )
    cfg = MemFreeConfig.from_args(ns)
    assert cfg == MemFreeConfig(
        num_shards=4,
        merge_every=1000,
        agc_ratio=1.25,
        agc_ema=0.9,
        redistribute_fraction=0.25,
        redistribute_at="merge",
        proxy_optimizer_state="shared",
        loss_aware_augmentation=True,
        augment_max_magnitude=7,
        augment_alpha=3.0,
    )
    assert isinstance(cfg.num_shards, int) and isinstance(cfg.augment_alpha, float)


def test_choices_are_enforced_by_the_parser():
    with pytest.raises(SystemExit):
        _parse(["--redistribute_at=epoch"])


def test_from_args_validates():
    with pytest.raises(ValueError, match="--loss_aware_augmentation"):
        MemFreeConfig.from_args(_parse(["--loss_aware_augmentation"]))


def test_json_round_trip_is_atomic(tmp_path):
    cfg = MemFreeConfig(num_shards=4, agc_ratio=1.25, redistribute_fraction=0.25)
    path = tmp_path / "memfree_config.json"
    cfg.save_json(path)
    assert MemFreeConfig.load_json(path) == cfg
    assert json.loads(path.read_text())["num_shards"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["memfree_config.json"]  # no temp file left


def test_load_json_rejects_unknown_keys(tmp_path):
    path = tmp_path / "memfree_config.json"
    path.write_text(json.dumps({**MemFreeConfig().to_dict(), "exchange_every": 3}))
    with pytest.raises(ValueError, match="exchange_every"):
        MemFreeConfig.load_json(path)


def test_check_compatible_names_structural_differences_only():
    old = MemFreeConfig(num_shards=4, agc_ratio=1.25)
    # AGC settings may change between runs: no structural difference
    old.check_compatible(MemFreeConfig(num_shards=4, agc_ratio=2.0, merge_every=10))
    with pytest.raises(ValueError) as err:
        MemFreeConfig(num_shards=2).check_compatible(old)
    assert str(err.value) == (
        "checkpoint was written with --num_shards=4 but this run uses --num_shards=2; "
        "resume with the same value or start a new --output_dir"
    )
    with pytest.raises(ValueError, match="--proxy_optimizer_state=per_proxy but this run uses"):
        MemFreeConfig(num_shards=4, proxy_optimizer_state="shared").check_compatible(old)


@pytest.mark.parametrize("flag", ["--agc_ratio=inf", "--agc_ratio=nan", "--agc_ema=inf", "--augment_alpha=-inf"])
def test_non_finite_flags_are_rejected_from_the_command_line(flag):
    """argparse's float() accepts 'inf' and 'nan'; the config must not."""
    with pytest.raises(ValueError, match="must be a finite number"):
        MemFreeConfig.from_args(_parse([flag]))


def test_range_edges_are_accepted():
    """The documented ranges are closed where the text says so: ratio 1 and 10, magnitude 0 and 30."""
    for ratio in (1.0, 10.0):
        assert MemFreeConfig(agc_ratio=ratio).agc_ratio == ratio
    for magnitude in (0, 30):
        assert MemFreeConfig(augment_max_magnitude=magnitude).augment_max_magnitude == magnitude


def test_saved_json_is_strict_json(tmp_path):
    """Even a config that bypassed validation is never written as non-JSON (``Infinity``)."""
    cfg = MemFreeConfig(agc_ratio=1.25)
    object.__setattr__(cfg, "agc_ratio", float("inf"))
    with pytest.raises(ValueError, match="Out of range float"):
        cfg.save_json(tmp_path / "memfree_config.json")
    assert list(tmp_path.iterdir()) == []  # no partial file either
    good = tmp_path / "good.json"
    MemFreeConfig(agc_ratio=1.25).save_json(good)
    json.loads(good.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_load_json_rejects_infinity(tmp_path):
    path = tmp_path / "memfree_config.json"
    path.write_text(json.dumps({**MemFreeConfig().to_dict(), "agc_ratio": float("inf")}))  # Python writes 'Infinity'
    with pytest.raises(ValueError, match="--agc_ratio=inf must be a finite number"):
        MemFreeConfig.load_json(path)
