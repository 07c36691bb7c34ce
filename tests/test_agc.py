"""LossBank (vectorised AGC bank) against a plain-Python sequential reference, and SkipStats."""

import math

import pytest
import torch

from sd_memfree.method.agc import LossBank, SkipStats


def reference_update(bank: list[float], losses: list[float], timesteps: list[int], ema: float) -> list[float]:
    """The reference code's update: one sample at a time, in batch order, finite losses only."""
    bank = list(bank)
    for loss, t in zip(losses, timesteps):
        if math.isfinite(loss):
            bank[t] = ema * bank[t] + (1 - ema) * loss
    return bank


def reference_keep(bank: list[float], losses: list[float], timesteps: list[int], ratio: float) -> list[bool]:
    return [math.isfinite(l) and (bank[t] == 0 or ratio * l >= bank[t]) for l, t in zip(losses, timesteps)]


def test_duplicate_timesteps_follow_batch_order():
    """Bank 0, ema 0.8, two samples at t=5 with l=1 then l=2:
    after the first 0.8*0 + 0.2*1 = 0.2; after the second 0.8*0.2 + 0.2*2 = 0.56.
    (The opposite order would give 0.8*0.4 + 0.2*1 = 0.52.) t=3 with l=10: 0.2*10 = 2."""
    bank = LossBank(num_timesteps=10, ratio=1.25, ema=0.8)
    bank.update(torch.tensor([1.0, 10.0, 2.0]), torch.tensor([5, 3, 5]))
    expected = torch.zeros(10)
    expected[5], expected[3] = 0.56, 2.0
    torch.testing.assert_close(bank.bank, expected)


def test_three_duplicates_on_a_nonzero_bank():
    """M[2] = 1, ema 0.5, losses 4, 8, 2 at t=2:
    1 -> 0.5 + 2 = 2.5 -> 1.25 + 4 = 5.25 -> 2.625 + 1 = 3.625."""
    bank = LossBank(num_timesteps=4, ema=0.5)
    bank.bank[2] = 1.0
    bank.update(torch.tensor([4.0, 8.0, 2.0]), torch.tensor([2, 2, 2]))
    torch.testing.assert_close(bank.bank, torch.tensor([0.0, 0.0, 3.625, 0.0]))


def test_bank_at_zero_keeps_everything():
    """While M[t] = 0 every sample at t is kept, even a loss of 0."""
    bank = LossBank(num_timesteps=10, ratio=1.25)
    keep = bank.keep_mask(torch.tensor([0.0, 1e-9, 5.0]), torch.tensor([1, 2, 3]))
    assert keep.tolist() == [True, True, True]


def test_keep_rule_at_and_below_threshold():
    """M[4] = 2.5, ratio 1.25: l=2 -> 2.5 >= 2.5 kept; l=1.99 -> 2.4875 < 2.5 skipped;
    l=3 -> 3.75 kept. M[0] = 0 still keeps l=0."""
    bank = LossBank(num_timesteps=10, ratio=1.25)
    bank.bank[4] = 2.5
    keep = bank.keep_mask(torch.tensor([2.0, 1.99, 3.0, 0.0]), torch.tensor([4, 4, 4, 0]))
    assert keep.tolist() == [True, False, True, True]


def test_all_skipped_batch_still_updates_bank():
    """M[1] = 10, ratio 1.25, losses 1 and 2: 1.25, 2.5 < 10 -> both skipped;
    bank still updated: 10 -> 8 + 0.2 = 8.2 -> 6.56 + 0.4 = 6.96."""
    bank = LossBank(num_timesteps=3, ratio=1.25, ema=0.8)
    bank.bank[1] = 10.0
    losses, t = torch.tensor([1.0, 2.0]), torch.tensor([1, 1])
    assert bank.keep_mask(losses, t).tolist() == [False, False]
    bank.update(losses, t)
    torch.testing.assert_close(bank.bank, torch.tensor([0.0, 6.96, 0.0]))


def test_non_finite_losses_never_kept_never_in_bank():
    """NaN/inf at t=1 are skipped and leave the bank alone; l=1 at t=1 then gives 0.2*1 = 0.2
    (it is the only valid sample at t=1, so it is folded in as if first)."""
    bank = LossBank(num_timesteps=3, ratio=1.25, ema=0.8)
    losses = torch.tensor([float("nan"), 1.0, float("inf"), -float("inf")])
    t = torch.tensor([1, 1, 1, 2])
    assert bank.keep_mask(losses, t).tolist() == [False, True, False, False]
    bank.update(losses, t)
    torch.testing.assert_close(bank.bank, torch.tensor([0.0, 0.2, 0.0]))
    assert torch.isfinite(bank.bank).all()


@pytest.mark.parametrize("ema", [0.8, 0.0, 0.99])
def test_random_batches_match_sequential_reference(ema):
    """30 batches of 16 samples over 8 timesteps (many duplicates), some NaN, vs the Python loop."""
    g = torch.Generator().manual_seed(0)
    bank = LossBank(num_timesteps=8, ratio=1.25, ema=ema)
    ref = [0.0] * 8
    for _ in range(30):
        losses = torch.rand(16, generator=g) * 2
        losses[torch.rand(16, generator=g) < 0.1] = float("nan")
        t = torch.randint(0, 8, (16,), generator=g)
        keep = bank.keep_mask(losses, t)
        assert keep.tolist() == reference_keep(ref, losses.tolist(), t.tolist(), 1.25)
        bank.update(losses, t)
        ref = reference_update(ref, losses.tolist(), t.tolist(), ema)
        assert torch.allclose(bank.bank, torch.tensor(ref), atol=1e-6)


def test_update_detaches_and_keeps_float32():
    bank = LossBank(num_timesteps=4)
    losses = torch.tensor([1.0, 2.0], dtype=torch.bfloat16, requires_grad=True)
    bank.update(losses, torch.tensor([0, 1]))
    assert bank.bank.dtype == torch.float32 and not bank.bank.requires_grad


@pytest.fixture
def no_host_reads(monkeypatch):
    """Make every way of reading a tensor value on the host raise while the fixture is active."""

    def _raise(*args, **kwargs):
        raise AssertionError("host-device sync")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, _raise)
    yield
    monkeypatch.undo()


def test_keep_mask_update_and_stats_do_not_sync(no_host_reads):
    bank = LossBank(num_timesteps=10)
    stats = SkipStats(num_timesteps=10, num_buckets=2, num_proxies=2)
    losses, t = torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([5, 5, 2])
    keep = bank.keep_mask(losses, t)
    bank.update(losses, t)
    stats.update(keep, t, proxy=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_sync_on_cuda():
    """On a GPU, CUDA's own sync detector must stay silent during a step's AGC work."""
    device = torch.device("cuda")
    bank = LossBank(num_timesteps=1000, device=device)
    stats = SkipStats(num_timesteps=1000, num_proxies=2, device=device)
    losses = torch.rand(8, device=device)
    t = torch.randint(0, 1000, (8,), device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            keep = bank.keep_mask(losses, t)
            bank.update(losses, t)
            stats.update(keep, t, proxy=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = reference_update([0.0] * 1000, losses.tolist() * 3, t.tolist() * 3, 0.8)
    assert torch.allclose(bank.bank.cpu(), torch.tensor(ref), atol=1e-6)


def test_the_no_sync_guard_catches_a_sync(no_host_reads):
    """The guard itself must fail on code that reads a value on the host."""
    with pytest.raises(AssertionError, match="host-device sync"):
        if torch.tensor([1.0]).sum() > 0:
            pass


def test_state_dict_round_trip_keeps_this_runs_ratio():
    bank = LossBank(num_timesteps=4, ratio=1.25, ema=0.8)
    bank.update(torch.tensor([1.0]), torch.tensor([2]))
    state = bank.state_dict()
    assert state["ratio"] == 1.25 and state["ema"] == 0.8
    resumed = LossBank(num_timesteps=4, ratio=2.0, ema=0.8)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.bank, torch.tensor([0.0, 0.0, 0.2, 0.0]))
    assert resumed.ratio == 2.0
    bank.update(torch.tensor([1.0]), torch.tensor([2]))  # the state is a copy, not a view
    assert state["bank"][2] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="4 timesteps but the scheduler has 8"):
        LossBank(num_timesteps=8).load_state_dict(state)


def test_skip_stats_rates_per_proxy_and_bucket():
    """1000 timesteps, 10 buckets. Proxy 0: t=5 kept, t=50 skipped, t=150 skipped;
    proxy 1: t=999 kept. Overall 2/4 = 0.5; proxy 0: 2/3, proxy 1: 0/1;
    bucket t0-99: 1 skipped of 2; t100-199: 1/1; t900-999: 0/1; other buckets saw nothing."""
    stats = SkipStats(num_timesteps=1000, num_buckets=10, num_proxies=2)
    stats.update(torch.tensor([True, False, False]), torch.tensor([5, 50, 150]), proxy=0)
    stats.update(torch.tensor([True]), torch.tensor([999]), proxy=1)
    summary = stats.summary()
    assert summary == pytest.approx(
        {
            "agc/skip_rate": 0.5,
            "agc/skip_rate_proxy_0": 2 / 3,
            "agc/skip_rate_proxy_1": 0.0,
            "agc/skip_rate_t0-99": 0.5,
            "agc/skip_rate_t100-199": 1.0,
            "agc/skip_rate_t900-999": 0.0,
        }
    )
    assert stats.summary() == {}  # reset after reading
    with pytest.raises(ValueError, match="proxy=2"):
        stats.update(torch.tensor([True]), torch.tensor([1]), proxy=2)


def test_skip_stats_bucket_bounds_when_not_divisible():
    """10 timesteps, 3 buckets: bucket = t*3//10 -> t 0-3 in 0, 4-6 in 1, 7-9 in 2."""
    stats = SkipStats(num_timesteps=10, num_buckets=3)
    stats.update(torch.tensor([False, True, True, False]), torch.tensor([3, 4, 6, 7]), proxy=0)
    assert stats.summary() == {
        "agc/skip_rate": 0.5,
        "agc/skip_rate_proxy_0": 0.5,
        "agc/skip_rate_t0-3": 1.0,
        "agc/skip_rate_t4-6": 0.0,
        "agc/skip_rate_t7-9": 1.0,
    }
