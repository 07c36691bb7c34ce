"""ShardAssignment: seeded split, skip counts and redistribution on hand-made cases."""

import json

import pytest
import torch

from sd_memfree.method.shards import ShardAssignment


def _assignment(shards: list[list[int]]) -> ShardAssignment:
    """An assignment with a hand-written split (the seeded split is tested separately)."""
    n = sum(len(s) for s in shards)
    a = ShardAssignment(n, len(shards), seed=0)
    for k, ids in enumerate(shards):
        a.shard_of[ids] = k
    return a


def test_split_sizes_cover_everything_disjointly():
    """N=10, K=4: 10 = 4*2 + 2, so the first 2 shards get 3 and the others 2: [3, 3, 2, 2]."""
    a = ShardAssignment(10, 4, seed=0)
    assert a.sizes() == [3, 3, 2, 2]
    members = [a.members(k) for k in range(4)]
    assert sorted(i for m in members for i in m) == list(range(10))
    assert all(m == sorted(m) for m in members)
    for k, m in enumerate(members):
        assert all(a.shard_of[i] == k for i in m)


def test_split_is_deterministic_per_seed_and_shuffled():
    same = ShardAssignment(100, 4, seed=3)
    assert torch.equal(ShardAssignment(100, 4, seed=3).shard_of, same.shard_of)
    assert not torch.equal(ShardAssignment(100, 4, seed=4).shard_of, same.shard_of)
    # shuffled: not the contiguous blocks 0..24, 25..49, ...
    assert same.members(0) != list(range(25))


def test_one_shard_holds_everything():
    assert ShardAssignment(5, 1, seed=0).members(0) == [0, 1, 2, 3, 4]


def test_bad_shard_counts_raise():
    with pytest.raises(ValueError, match="--num_shards=8 is more than the 5 training samples; use at most 5"):
        ShardAssignment(5, 8, seed=0)
    with pytest.raises(ValueError, match="--num_shards=0"):
        ShardAssignment(5, 0, seed=0)


def test_record_skips_counts_every_occurrence():
    """ids (1, 3, 1, 1, 2), keep (F, F, F, T, T): sample 1 skipped twice, sample 3 once,
    the kept occurrence of 1 and sample 2 add nothing."""
    a = ShardAssignment(5, 2, seed=0)
    a.record_skips(torch.tensor([1, 3, 1, 1, 2]), torch.tensor([False, False, False, True, True]))
    assert a.skip_counts.tolist() == [0, 2, 0, 1, 0]


def test_record_skips_does_not_sync(monkeypatch):
    a = ShardAssignment(5, 2, seed=0)

    def _raise(*args, **kwargs):
        raise AssertionError("host-device sync")

    for name in ("item", "tolist", "__bool__", "__int__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, _raise)
    a.record_skips(torch.tensor([1, 1]), torch.tensor([False, True]))
    monkeypatch.undo()
    assert a.skip_counts.tolist() == [0, 1, 0, 0, 0]


def test_redistribute_top_fraction_with_ties_and_log():
    """Shard 0 = {0..7} (8 members, fraction 0.25 -> floor(2) = 2 moves); counts:
    id 2 -> 5, ids 4 and 6 -> 3 (tie), id 7 -> 1. Top 2: id 2 (count 5), then the tie 4 vs 6
    goes to the lower id 4. Shard 1 = {8..11} (4 members -> 1 move): only id 9 (count 1) is a
    candidate, moves to shard (1+1) % 2 = 0. Both decide before either moves."""
    a = _assignment([[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11]])
    counts = torch.zeros(12, dtype=torch.long)
    counts[[2, 4, 6, 7, 9]] = torch.tensor([5, 3, 3, 1, 1])
    a.skip_counts.copy_(counts)
    records = a.redistribute(0.25, step=1000)
    assert records == [
        {"step": 1000, "from": 0, "to": 1, "sample_ids": [2, 4]},
        {"step": 1000, "from": 1, "to": 0, "sample_ids": [9]},
    ]
    assert a.members(0) == [0, 1, 3, 5, 6, 7, 9]
    assert a.members(1) == [2, 4, 8, 10, 11]
    assert a.moves == records
    assert a.skip_counts.tolist() == [0] * 12  # reset


def test_redistribute_fewer_skipped_than_fraction_allows():
    """Shard 0 = {0..3}, fraction 0.5 -> up to 2, but only id 3 was skipped: moves [3].
    Shard 1 = {4, 5}: nothing skipped -> no record. Samples never skipped never move."""
    a = _assignment([[0, 1, 2, 3], [4, 5]])
    a.record_skips(torch.tensor([3]), torch.tensor([False]))
    assert a.redistribute(0.5, step=7) == [{"step": 7, "from": 0, "to": 1, "sample_ids": [3]}]
    assert a.sizes() == [3, 3]


def test_redistribute_never_empties_a_shard():
    """Shard 1 = {2} alone, skipped: floor(0.9 * 1) = 0 moves and it could not leave anyway.
    Shard 0 = {0, 1}, both skipped: floor(0.9 * 2) = 1 -> moves one (id 0, higher count),
    keeping 1 member; it receives nothing from shard 1, so the last-member rule counts only
    outgoing moves."""
    a = _assignment([[0, 1], [2]])
    a.skip_counts.copy_(torch.tensor([4, 2, 9]))
    assert a.redistribute(0.9, step=1) == [{"step": 1, "from": 0, "to": 1, "sample_ids": [0]}]
    assert a.members(0) == [1] and a.members(1) == [0, 2]


def test_redistribute_uses_given_counts_and_is_deterministic():
    """counts passed in (all-reduced) override the local ones; two processes agree."""
    a, b = ShardAssignment(20, 4, seed=1), ShardAssignment(20, 4, seed=1)
    counts = torch.arange(20) % 3
    a.record_skips(torch.tensor([0]), torch.tensor([False]))  # local count ignored below
    assert a.redistribute(0.25, 5, counts=counts) == b.redistribute(0.25, 5, counts=counts)
    assert torch.equal(a.shard_of, b.shard_of)
    assert a.skip_counts.tolist() == [0] * 20
    with pytest.raises(ValueError, match="expected \\(20,\\)"):
        a.redistribute(0.25, 6, counts=torch.zeros(19, dtype=torch.long))


def test_sizes_stay_near_n_over_k_after_symmetric_moves():
    """Every shard skips everything: each of the 4 shards of 5 sends floor(0.25*5) = 1 and
    receives 1, so sizes stay [5, 5, 5, 5]."""
    a = ShardAssignment(20, 4, seed=0)
    a.skip_counts.fill_(1)
    records = a.redistribute(0.25, step=0)
    assert [len(r["sample_ids"]) for r in records] == [1, 1, 1, 1]
    assert a.sizes() == [5, 5, 5, 5]


def test_state_dict_round_trip_and_mismatch():
    a = _assignment([[0, 1, 2], [3, 4, 5]])
    a.record_skips(torch.tensor([1, 4]), torch.tensor([False, False]))
    a.redistribute(0.5, step=3)
    a.record_skips(torch.tensor([0]), torch.tensor([False]))
    state = a.state_dict()
    b = ShardAssignment(6, 2, seed=99)
    b.load_state_dict(state)
    assert torch.equal(b.shard_of, a.shard_of)
    assert b.skip_counts.tolist() == [1, 0, 0, 0, 0, 0]
    assert b.moves == a.moves and b.seed == 0
    with pytest.raises(ValueError, match="--num_shards=2 but this run uses --num_shards=3"):
        ShardAssignment(6, 3, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="covers 6 samples but the training set has 7"):
        ShardAssignment(7, 2, seed=0).load_state_dict(state)


def test_state_dict_survives_weights_only_torch_load(tmp_path):
    """accelerate's checkpointing pickles the state dict with torch.save."""
    a = ShardAssignment(6, 2, seed=0)
    a.skip_counts.fill_(1)
    a.redistribute(0.5, step=1)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = ShardAssignment(6, 2, seed=0)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert b.moves == a.moves and torch.equal(b.shard_of, a.shard_of)


def test_summary_is_json_able():
    a = _assignment([[0, 1], [2, 3]])
    a.skip_counts.copy_(torch.tensor([1, 0, 0, 2]))
    a.redistribute(0.5, step=10)
    summary = json.loads(json.dumps(a.summary()))
    assert summary["shard_sizes"] == [2, 2]
    assert summary["num_redistributed_samples"] == 2
    assert summary["moves"] == [
        {"step": 10, "from": 0, "to": 1, "sample_ids": [0]},
        {"step": 10, "from": 1, "to": 0, "sample_ids": [3]},
    ]
    assert summary["shard_of"] == [1, 0, 1, 0]
