"""``RoundSchedule``: the one source of truth for "where are we" in IET rounds (method.md, 1 and 3).

A pure function of the optimizer step: which proxy trains, whether its turn ends, whether a merge
or a redistribution is due. The data sampler (which shard feeds micro-step m) and the training
loop (turns, merges, redistributions) both read it, so they cannot disagree, and a resumed run
finds its place from the step count alone.

The schedule of one process, which trains its ``local_proxies`` (L of the K proxies; the other
processes train the rest concurrently, in lockstep):

- A round: every local proxy takes ``h`` optimizer steps from the merged weights, then a merge.
  ``h`` is ``merge_every`` (H), except in a shortened last round (below).
- Turns: in one process the local proxies take turns in ``local_proxies`` order. With
  ``redistribute_at="mid_round"`` each proxy's ``h`` steps are split into two turns: all local
  proxies take their first ``h // 2`` steps, then the redistribution, then all take their
  remaining ``h - h // 2`` steps; a proxy's weights persist between its two turns
  (``ProxySet.pause_turn``). Every proxy thus trains its first half on the old shards and its
  second half on the new ones, exactly as when each proxy has its own process (the reference),
  so the result does not depend on the number of processes. Otherwise a proxy takes its ``h``
  steps in one turn.
- Redistribution: ``"mid_round"`` after every proxy's first half of each round (when ``h == 1``
  the first half is empty, so it comes right after the previous merge); ``"merge"`` right after
  each merge; never before the first step or after the last merge.
- Budget: ``max_train_steps`` counts optimizer steps summed over all proxies (and processes). So
  that every shard weighs the same in the final model whatever the budget, every proxy takes the
  same number of steps: with F whole rounds (K x H steps each) and R steps left, the last round
  is shortened to ``R // K`` steps per proxy and the ``R % K`` steps that cannot be shared
  equally are dropped (``dropped_steps``; the training script logs it once). With K = 1 there
  are no rounds and the budget is taken as given.

Step indices are 0-based and count *this process's* optimizer steps (micro-steps for
``proxy_at_micro``); ``local_steps`` is this process's budget.

Invariants:
- Every local proxy takes exactly ``steps_per_proxy`` steps in total and the same number in
  every round; the last step of the budget is the last step of a round, so the last event is a
  merge.
- ``proxy_at(s)`` is defined for every ``s >= 0`` (past the budget the pattern of whole rounds
  continues, for a data loader that prefetches beyond the end).
"""

from __future__ import annotations

from dataclasses import dataclass

REDISTRIBUTE_AT = ("mid_round", "merge")


@dataclass(frozen=True)
class Position:
    """Where local optimizer step ``s`` (0-based) falls.

    Attributes:
        proxy: the proxy that takes step ``s``.
        round: 0-based round index.
        turn: 0 or 1, the proxy's turn in this round (1 only for the second half of a split round).
        step_in_turn: steps the proxy has taken in this turn before ``s``.
        turn_length: steps in this turn.
        steps_in_round: steps the proxy has taken in this round before ``s`` (both turns).
    """

    proxy: int
    round: int
    turn: int
    step_in_turn: int
    turn_length: int
    steps_in_round: int


@dataclass(frozen=True)
class Event:
    """What is due once local optimizer step ``s`` has been taken (in this order).

    Attributes:
        proxy: the proxy that took step ``s``.
        turn_ends: its turn ends now.
        round_done_for_proxy: ...and it was its last turn of the round: fold its weights
            (``ProxySet.end_turn(steps_in_round)``); otherwise keep them (``pause_turn``).
        steps_in_round: steps the proxy has taken in this round, step ``s`` included.
        merge: every local proxy has finished the round: merge.
        redistribute: a redistribution is due (after the merge, if both).
        next_proxy: the proxy of step ``s + 1``; None when the budget is spent.
    """

    proxy: int
    turn_ends: bool
    round_done_for_proxy: bool
    steps_in_round: int
    merge: bool
    redistribute: bool
    next_proxy: int | None


class RoundSchedule:
    """The round schedule of one process.

    Args:
        num_proxies: K (1: no rounds, proxy 0 always trains, nothing is ever due).
        merge_every: H, steps each proxy takes per whole round.
        local_proxies: the proxies this process trains, in turn order (all K in one process;
            ``k % W == p`` on process p of W).
        max_train_steps: the requested budget, optimizer steps summed over proxies and processes.
        redistribute_at: ``"mid_round"``, ``"merge"``, or None when redistribution is off.
        gradient_accumulation_steps: micro-steps per optimizer step (for ``proxy_at_micro``).
    """

    def __init__(self, num_proxies: int, merge_every: int, local_proxies: list[int], max_train_steps: int,
                 redistribute_at: str | None = None, gradient_accumulation_steps: int = 1) -> None:
        if num_proxies < 1 or merge_every < 1 or gradient_accumulation_steps < 1:
            raise ValueError(
                f"RoundSchedule needs num_proxies, merge_every and gradient_accumulation_steps >= 1, "
                f"got {num_proxies}, {merge_every}, {gradient_accumulation_steps}."
            )
        if not local_proxies or num_proxies % len(local_proxies) or any(not 0 <= k < num_proxies for k in local_proxies):
            raise ValueError(f"local_proxies {list(local_proxies)} must be an equal share of the {num_proxies} proxies.")
        if redistribute_at not in (None, *REDISTRIBUTE_AT):
            raise ValueError(f"redistribute_at must be one of {REDISTRIBUTE_AT} or None, got {redistribute_at!r}.")
        self.num_proxies = num_proxies
        self.merge_every = merge_every
        self.local_proxies = list(local_proxies)
        self.redistribute_at = redistribute_at
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.requested_steps = max_train_steps
        K, H = num_proxies, merge_every
        if K == 1:
            self.whole_rounds, self.last_round_steps, self.dropped_steps = 0, 0, 0
            self.total_steps = self.steps_per_proxy = max(0, max_train_steps)
        else:
            self.whole_rounds, rest = divmod(max(0, max_train_steps), K * H)
            self.last_round_steps, self.dropped_steps = divmod(rest, K)
            self.steps_per_proxy = self.whole_rounds * H + self.last_round_steps
            self.total_steps = self.steps_per_proxy * K
        if self.total_steps < 1:
            raise ValueError(
                f"--max_train_steps={max_train_steps} gives no step: every one of the {K} proxies must "
                f"take the same number of steps, so pass at least {K} (--num_shards={K})."
            )

    # -- sizes ----------------------------------------------------------------------------------

    @property
    def num_rounds(self) -> int:
        """Rounds in the budget (a shortened last round counts); 0 with K = 1."""
        return self.whole_rounds + (1 if self.last_round_steps else 0)

    @property
    def local_steps(self) -> int:
        """This process's optimizer steps: ``steps_per_proxy`` for each local proxy."""
        return self.steps_per_proxy * len(self.local_proxies)

    def round_length(self, round_index: int) -> int:
        """h, steps per proxy in round ``round_index`` (H, or the shortened last round's)."""
        if round_index == self.whole_rounds and self.last_round_steps:
            return self.last_round_steps
        return self.merge_every

    def _first_half(self, h: int) -> int:
        """Steps of the first turn of a round of h steps per proxy (0: one turn)."""
        return h // 2 if self.redistribute_at == "mid_round" else 0

    # -- where are we ---------------------------------------------------------------------------

    def position(self, step: int) -> Position:
        """Where local optimizer step ``step`` (0-based) falls."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        L, H = len(self.local_proxies), self.merge_every
        if self.num_proxies == 1:
            return Position(self.local_proxies[0], 0, 0, step, self.local_steps, step)
        whole = self.whole_rounds * H * L
        if step < whole:
            round_index, within = divmod(step, H * L)
            h = H
        elif step < self.local_steps:  # the shortened last round
            round_index, within, h = self.whole_rounds, step - whole, self.last_round_steps
        else:  # past the budget: whole rounds continue (only a prefetching loader looks here)
            extra, within = divmod(step - self.local_steps, H * L)
            round_index, h = self.num_rounds + extra, H
        a = self._first_half(h)
        if within < a * L:
            i, step_in_turn = divmod(within, a)
            return Position(self.local_proxies[i], round_index, 0, step_in_turn, a, step_in_turn)
        i, step_in_turn = divmod(within - a * L, h - a)
        return Position(self.local_proxies[i], round_index, 1 if a else 0, step_in_turn, h - a, a + step_in_turn)

    def proxy_at(self, step: int) -> int:
        """The proxy that takes local optimizer step ``step``."""
        return self.position(step).proxy

    def proxy_at_micro(self, micro_step: int) -> int:
        """The proxy (= shard) whose data feeds micro-step ``micro_step``."""
        return self.proxy_at(micro_step // self.gradient_accumulation_steps)

    def after_step(self, step: int) -> Event:
        """What is due once local optimizer step ``step`` (0-based) has been taken."""
        pos = self.position(step)
        last = step + 1 >= self.local_steps
        next_proxy = None if last else self.proxy_at(step + 1)
        if self.num_proxies == 1:
            return Event(pos.proxy, False, False, pos.steps_in_round + 1, False, False, next_proxy)
        turn_ends = pos.step_in_turn + 1 == pos.turn_length
        h = self.round_length(pos.round)
        round_done_for_proxy = turn_ends and pos.steps_in_round + 1 == h
        last_of_phase = turn_ends and pos.proxy == self.local_proxies[-1]
        merge = last_of_phase and round_done_for_proxy
        redistribute = False
        if self.redistribute_at == "merge":
            redistribute = merge and not last
        elif self.redistribute_at == "mid_round":
            if last_of_phase and not round_done_for_proxy:  # every proxy has taken its first half
                redistribute = True
            elif merge and not last and self._first_half(self.round_length(pos.round + 1)) == 0:
                redistribute = True  # h == 1 next round: its "half-way" is right after this merge
        return Event(pos.proxy, turn_ends, round_done_for_proxy, pos.steps_in_round + 1, merge, redistribute, next_proxy)

    def steps_in_round(self, steps_taken: int) -> dict[int, int]:
        """Steps each local proxy has taken in the current round after ``steps_taken`` local steps
        (for a final merge when training stops in the middle of a round); {} at a round's end."""
        if self.num_proxies == 1 or steps_taken == 0 or self.after_step(steps_taken - 1).merge:
            return {}
        current = self.position(steps_taken - 1).round
        taken = dict.fromkeys(self.local_proxies, 0)
        s = steps_taken - 1
        while s >= 0 and self.position(s).round == current:
            taken[self.proxy_at(s)] += 1
            s -= 1
        return taken
