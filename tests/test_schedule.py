"""RoundSchedule: which proxy trains, turn ends, merges and redistributions, hand-computed."""

from __future__ import annotations

import pytest

from sd_memfree.method.schedule import RoundSchedule


def proxies(s: RoundSchedule) -> str:
    return "".join(str(s.proxy_at(i)) for i in range(s.local_steps))


def steps_where(s: RoundSchedule, what: str) -> list[int]:
    return [i for i in range(s.local_steps) if getattr(s.after_step(i), what)]


def test_whole_rounds_one_process():
    """K=2, H=3, 12 steps: 2 rounds of 0 0 0 1 1 1; merges after steps 5 and 11; with 'merge'
    redistribution after the first merge only (never after the last)."""
    s = RoundSchedule(2, 3, [0, 1], 12, redistribute_at="merge")
    assert (s.total_steps, s.local_steps, s.steps_per_proxy, s.num_rounds, s.dropped_steps) == (12, 12, 6, 2, 0)
    assert proxies(s) == "000111000111"
    assert steps_where(s, "merge") == [5, 11]
    assert steps_where(s, "turn_ends") == [2, 5, 8, 11]
    assert steps_where(s, "redistribute") == [5]
    assert s.after_step(2).next_proxy == 1 and s.after_step(11).next_proxy is None
    assert s.after_step(2).steps_in_round == 3 and s.after_step(2).round_done_for_proxy


def test_two_and_a_half_rounds_shorten_the_last_round_equally():
    """K=2, H=2, 10 steps = 2.5 rounds: the last round gives each proxy 10 - 8 = 2 // 2 = 1 step
    (not 2 steps to proxy 0 and none to proxy 1): 00 11 00 11 0 1, merges after 3, 7, 9."""
    s = RoundSchedule(2, 2, [0, 1], 10)
    assert (s.total_steps, s.steps_per_proxy, s.num_rounds, s.last_round_steps, s.dropped_steps) == (10, 5, 3, 1, 0)
    assert proxies(s) == "0011001101"
    assert steps_where(s, "merge") == [3, 7, 9]
    assert [s.after_step(i).steps_in_round for i in (8, 9)] == [1, 1]
    assert steps_where(s, "redistribute") == []


@pytest.mark.parametrize(("budget", "total", "last", "dropped"), [(11, 10, 1, 1), (21, 20, 1, 1), (23, 20, 1, 3), (24, 24, 0, 0)])
def test_steps_that_cannot_be_shared_equally_are_dropped(budget, total, last, dropped):
    """K=4, H=2 (8 steps per round) for 21..24; K=2, H=2 for 11. 21 = 2 x 8 + 5: 5 // 4 = 1 step
    each, 1 dropped; 23: 7 // 4 = 1, 3 dropped; 24 = 3 whole rounds, none dropped."""
    K = 2 if budget == 11 else 4
    s = RoundSchedule(K, 2, list(range(K)), budget)
    assert (s.total_steps, s.last_round_steps, s.dropped_steps) == (total, last, dropped)
    counts = [proxies(s).count(str(k)) for k in range(K)]
    assert counts == [total // K] * K


def test_budget_below_one_step_per_proxy_is_refused():
    with pytest.raises(ValueError, match=r"--max_train_steps=3 gives no step.*at least 4 \(--num_shards=4\)"):
        RoundSchedule(4, 2, [0, 1, 2, 3], 3)


def test_one_proxy_per_process():
    """K=2 over 2 processes, process 1 trains proxy 1: 5 local steps, merges after 1, 3 and 4."""
    s = RoundSchedule(2, 2, [1], 10)
    assert s.local_steps == 5 and proxies(s) == "11111"
    assert steps_where(s, "merge") == [1, 3, 4]


def test_mid_round_splits_each_turn_in_two_halves():
    """K=2, H=4, 20 steps (2.5 rounds: 8 + 8 + 4). One process: first halves 00 11, redistribution,
    second halves 00 11, merge; the last round (2 each): 0 1, redistribution, 0 1, merge.
    Process 0 of 2 (proxy 0 only): 00, redistribution, 00, merge; last round 0, redist., 0."""
    s = RoundSchedule(2, 4, [0, 1], 20, redistribute_at="mid_round")
    assert proxies(s) == "00110011" * 2 + "0101"
    assert steps_where(s, "redistribute") == [3, 11, 17]
    assert steps_where(s, "merge") == [7, 15, 19]
    assert steps_where(s, "turn_ends") == [1, 3, 5, 7, 9, 11, 13, 15, 16, 17, 18, 19]
    first = s.after_step(1)
    assert first.turn_ends and not first.round_done_for_proxy and first.steps_in_round == 2 and first.next_proxy == 1
    second = s.after_step(5)
    assert second.turn_ends and second.round_done_for_proxy and second.steps_in_round == 4
    p0 = RoundSchedule(2, 4, [0], 20, redistribute_at="mid_round")
    assert proxies(p0) == "0" * 10
    assert steps_where(p0, "redistribute") == [1, 5, 8] and steps_where(p0, "merge") == [3, 7, 9]


def test_mid_round_with_one_step_rounds_redistributes_after_each_merge():
    """H=1: a first half of 1 // 2 = 0 steps, so 'half-way' is right after the previous merge
    (never before the first step, never after the last merge)."""
    s = RoundSchedule(2, 1, [0, 1], 6, redistribute_at="mid_round")
    assert proxies(s) == "010101"
    assert steps_where(s, "merge") == [1, 3, 5] and steps_where(s, "redistribute") == [1, 3]


@pytest.mark.parametrize("redistribute_at", [None, "merge", "mid_round"])
@pytest.mark.parametrize(("merge_every", "budget"), [(4, 40), (4, 44), (3, 30), (1, 9), (5, 47)])
def test_every_proxy_sees_the_same_schedule_whatever_the_process_count(redistribute_at, merge_every, budget):
    """K=4 over 1, 2 or 4 processes: for every proxy the sequence of (round, steps taken in the
    round, redistributions so far) over its steps is the same, and merges and redistributions
    come in the same number; i.e. the process count changes only who runs concurrently."""

    def trace(world):
        per_proxy, merges, redists = {k: [] for k in range(4)}, [], []
        for p in range(world):
            s = RoundSchedule(4, merge_every, [k for k in range(4) if k % world == p], budget, redistribute_at)
            done = 0
            for i in range(s.local_steps):
                pos, ev = s.position(i), s.after_step(i)
                per_proxy[pos.proxy].append((pos.round, pos.steps_in_round, done))
                done += ev.redistribute
            merges.append(sum(s.after_step(i).merge for i in range(s.local_steps)))
            redists.append(done)
        return per_proxy, set(merges), set(redists)

    one = trace(1)
    assert trace(2) == one and trace(4) == one
    assert len(one[1]) == 1 and len(one[2]) == 1


def test_proxy_at_micro_and_past_the_budget():
    """gas=2: micro-steps 0-1 are step 0. Past the budget (a prefetching loader) whole rounds go on."""
    s = RoundSchedule(2, 2, [0, 1], 10, gradient_accumulation_steps=2)
    assert [s.proxy_at_micro(m) for m in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert "".join(str(s.proxy_at(i)) for i in range(10, 18)) == "00110011"


def test_steps_in_round_for_a_stop_mid_round():
    """K=2, H=3, 12 steps, stopped after 4 steps (0 0 0 1): proxy 0 took 3, proxy 1 took 1.
    mid_round, H=4: after 0 0 1 -> {0: 2, 1: 1}; after 0 0 1 1 0 -> {0: 3, 1: 2}. At a merge: {}."""
    assert RoundSchedule(2, 3, [0, 1], 12).steps_in_round(4) == {0: 3, 1: 1}
    mid = RoundSchedule(2, 4, [0, 1], 16, redistribute_at="mid_round")
    assert mid.steps_in_round(3) == {0: 2, 1: 1}
    assert mid.steps_in_round(5) == {0: 3, 1: 2}
    assert mid.steps_in_round(8) == {}


def test_one_proxy_has_no_rounds():
    s = RoundSchedule(1, 2, [0], 7)
    assert (s.total_steps, s.local_steps, s.num_rounds) == (7, 7, 0)
    assert proxies(s) == "0" * 7
    assert not any(s.after_step(i).merge or s.after_step(i).turn_ends for i in range(7))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="equal share"):
        RoundSchedule(4, 2, [0, 1, 2], 8)
    with pytest.raises(ValueError, match="redistribute_at"):
        RoundSchedule(2, 2, [0, 1], 8, redistribute_at="epoch")
