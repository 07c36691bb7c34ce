"""ProxySet on toy modules: exact merges, turn-taking, per-proxy optimizer states, resume, memory."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from sd_memfree.method.merging import weighted_average
from sd_memfree.method.proxies import ProxySet


def _linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def _set(layer: nn.Linear, weight: list[list[float]], bias: list[float]) -> None:
    """Stands in for a proxy's training: its weights end the turn at these values."""
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))


def _values(layer: nn.Linear) -> tuple[list[list[float]], list[float]]:
    return layer.weight.detach().tolist(), layer.bias.detach().tolist()


def _batch(k: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic toy regression data for proxy k: y = x @ [k+1, -1] + k."""
    gen = torch.Generator().manual_seed(100 * k + step)
    x = torch.randn(4, 2, generator=gen)
    return x, x @ torch.tensor([[k + 1.0], [-1.0]]) + k


def _train(layer: nn.Linear, optimizer, scheduler, k: int, steps: int, first_step: int = 0) -> None:
    for s in range(first_step, first_step + steps):
        x, y = _batch(k, s)
        optimizer.zero_grad()
        nn.functional.mse_loss(layer(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _halving_schedule(optimizer):
    """LR 0.1, 0.05, 0.025, ...: positions are visible in the LR."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)


# -- merge arithmetic ------------------------------------------------------------------------


def test_round_of_two_gives_shard_weighted_mean_exactly():
    """Shard sizes [3, 1], both proxies take 2 steps: weights 6 and 2, i.e. 0.75 and 0.25.

    w0 = [[1, 2]], b0 = [4];  w1 = [[5, -2]], b1 = [0]
    merged weight = 0.75 * [1, 2] + 0.25 * [5, -2] = [0.75 + 1.25, 1.5 - 0.5] = [2, 1]
    merged bias   = 0.75 * 4 + 0.25 * 0 = 3
    """
    layer = _linear([[0.0, 0.0]], [0.0])
    proxies = ProxySet(list(layer.parameters()), 2, [3, 1])
    _set(layer, [[1.0, 2.0]], [4.0])
    proxies.end_turn(2)
    proxies.begin_turn(1)
    _set(layer, [[5.0, -2.0]], [0.0])
    proxies.end_turn(2)
    logs = proxies.merge()
    assert _values(layer) == ([[2.0, 1.0]], [3.0])
    assert logs == {"merge/index": 1, "merge/total_weight": 8.0}
    assert proxies.num_merges == 1


def test_every_proxy_starts_from_merged():
    """After end_turn the params are back at merged; after merge, the next round starts from it.

    Round 0 starts from [[1, 1]], [1]. Proxy 0 ends at [[3, 3]], [3]; params -> [[1, 1]], [1].
    Proxy 1 ends at [[5, 5]], [5]. Equal shards: merged = [[4, 4]], [4]. Proxy 0 ends round 1 at
    [[0, 0]], [0]; params -> [[4, 4]], [4].
    """
    layer = _linear([[1.0, 1.0]], [1.0])
    proxies = ProxySet(list(layer.parameters()), 2, [5, 5])
    _set(layer, [[3.0, 3.0]], [3.0])
    proxies.end_turn(1)
    assert _values(layer) == ([[1.0, 1.0]], [1.0])
    proxies.begin_turn(1)
    assert _values(layer) == ([[1.0, 1.0]], [1.0])  # begin_turn does not touch params
    _set(layer, [[5.0, 5.0]], [5.0])
    proxies.end_turn(1)
    assert _values(layer) == ([[1.0, 1.0]], [1.0])
    proxies.merge()
    assert _values(layer) == ([[4.0, 4.0]], [4.0])
    proxies.begin_turn(0)
    _set(layer, [[0.0, 0.0]], [0.0])
    proxies.end_turn(1)
    assert _values(layer) == ([[4.0, 4.0]], [4.0])


def test_incomplete_round_ignores_proxy_without_steps():
    """Shard sizes [2, 2, 4], steps [1, 0, -]: weights [2, 0, 0] -> merged = proxy 0's weights.

    Proxy 1 ends with NaN weights but took 0 steps, so nothing of it enters the sum; proxy 2 never
    had its turn this round.
    """
    layer = _linear([[0.0, 0.0]], [0.0])
    proxies = ProxySet(list(layer.parameters()), 3, [2, 2, 4])
    _set(layer, [[7.0, -3.0]], [0.5])
    proxies.end_turn(1)
    proxies.begin_turn(1)
    _set(layer, [[float("nan"), 0.0]], [0.0])
    proxies.end_turn(0)
    assert proxies.merge()["merge/total_weight"] == 2.0
    assert _values(layer) == ([[7.0, -3.0]], [0.5])


def test_no_steps_keeps_weights():
    """No proxy took a step: total weight 0, merged and params stay at [[1, 2]], [3]."""
    layer = _linear([[1.0, 2.0]], [3.0])
    proxies = ProxySet(list(layer.parameters()), 2, [1, 1])
    proxies.end_turn(0)
    proxies.begin_turn(1)
    proxies.end_turn(0)
    assert proxies.merge() == {"merge/index": 1, "merge/total_weight": 0.0}
    assert _values(layer) == ([[1.0, 2.0]], [3.0])
    assert torch.equal(proxies.state_dict()["merged"], torch.tensor([1.0, 2.0, 3.0]))


def test_shard_sizes_are_taken_when_the_turn_ends():
    """Sizes [1, 1] for proxy 0's turn, then [3, 1] (a redistribution) before proxy 1's.

    Weights 1 * 1 = 1 for proxy 0 ([[4, 0]], [0]) and 1 * 1 = 1 for proxy 1 ([[0, 4]], [8]):
    merged = ([[4, 0]] + [[0, 4]]) / 2 = [[2, 2]], bias 8 / 2 = 4.
    """
    layer = _linear([[0.0, 0.0]], [0.0])
    proxies = ProxySet(list(layer.parameters()), 2, [1, 1])
    _set(layer, [[4.0, 0.0]], [0.0])
    proxies.end_turn(1)
    proxies.shard_sizes = [3, 1]
    proxies.begin_turn(1)
    _set(layer, [[0.0, 4.0]], [8.0])
    proxies.end_turn(1)
    proxies.merge()
    assert _values(layer) == ([[2.0, 2.0]], [4.0])


def test_second_turn_in_a_round_is_refused():
    layer = _linear([[0.0, 0.0]], [0.0])
    proxies = ProxySet(list(layer.parameters()), 2, [1, 1])
    proxies.end_turn(1)
    with pytest.raises(RuntimeError, match="proxy 0 already ended its turn"):
        proxies.end_turn(1)
    proxies.merge()
    proxies.end_turn(1)  # a new round: allowed again


# -- optimizer states ------------------------------------------------------------------------


def _reference_two_rounds(sizes: list[int], steps: int):
    """Two rounds with one Adam + one LambdaLR per proxy and merges by weighted_average."""
    layer = _linear([[0.5, -0.5]], [0.0])
    params = list(layer.parameters())
    optimizers = [torch.optim.Adam(params, lr=0.1) for _ in sizes]
    schedulers = [_halving_schedule(o) for o in optimizers]
    for round_index in range(2):
        start = [p.detach().clone() for p in params]
        ends = []
        for k in range(len(sizes)):
            with torch.no_grad():
                for p, s in zip(params, start):
                    p.copy_(s)
            _train(layer, optimizers[k], schedulers[k], k, steps, first_step=round_index * steps)
            ends.append([p.detach().clone() for p in params])
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(weighted_average([e[i] for e in ends], [n * steps for n in sizes]))
    return layer, optimizers, schedulers


def _proxyset_two_rounds(sizes: list[int], steps: int, mode: str, storage_device: str = "cpu"):
    layer = _linear([[0.5, -0.5]], [0.0])
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    scheduler = _halving_schedule(optimizer)
    proxies = ProxySet(
        list(layer.parameters()), len(sizes), sizes, optimizer=optimizer, lr_scheduler=scheduler,
        optimizer_state=mode, storage_device=storage_device,
    )
    for round_index in range(2):
        for k in range(len(sizes)):
            proxies.begin_turn(k)
            _train(layer, optimizer, scheduler, k, steps, first_step=round_index * steps)
            proxies.end_turn(steps)
        proxies.merge()
    return layer, optimizer, scheduler, proxies


def test_per_proxy_optimizer_states_match_separate_optimizers():
    """Adam + halving LR, K=2, 2 steps per turn, 2 rounds; reference: one Adam/LambdaLR per proxy.

    After round 2 each proxy's Adam ``step`` is 4 (2 + 2, its own count, not 8), its LR is
    0.1 * 0.5**4 = 0.00625, and weights, exp_avg and exp_avg_sq are bit-identical to the reference.
    """
    ref_layer, ref_optimizers, ref_schedulers = _reference_two_rounds([3, 1], steps=2)
    layer, optimizer, scheduler, proxies = _proxyset_two_rounds([3, 1], steps=2, mode="per_proxy")
    assert torch.equal(layer.weight, ref_layer.weight) and torch.equal(layer.bias, ref_layer.bias)
    # Proxy 1 is live: its state is in the optimizer; proxy 0's is stashed. Bring 0 back to compare.
    for k in (1, 0):
        proxies.begin_turn(k)
        ref_state = ref_optimizers[k].state[ref_layer.weight]
        state = optimizer.state[layer.weight]
        assert state["step"].item() == 4.0 == ref_state["step"].item()
        assert torch.equal(state["exp_avg"], ref_state["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], ref_state["exp_avg_sq"])
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4) == ref_schedulers[k].get_last_lr()[0]
        assert scheduler.last_epoch == 4


def test_new_proxy_starts_with_empty_optimizer_state_and_initial_schedule():
    """Proxy 0 takes 2 steps (LR 0.1 -> 0.025); proxy 1 then starts empty at LR 0.1, position 0."""
    layer = _linear([[0.5, -0.5]], [0.0])
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    scheduler = _halving_schedule(optimizer)
    proxies = ProxySet(list(layer.parameters()), 2, [1, 1], optimizer=optimizer, lr_scheduler=scheduler)
    _train(layer, optimizer, scheduler, 0, 2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    proxies.end_turn(2)
    proxies.begin_turn(1)
    assert len(optimizer.state) == 0
    assert scheduler.last_epoch == 0 and optimizer.param_groups[0]["lr"] == 0.1


def test_shared_optimizer_state_is_shared():
    """'shared': one Adam state and one schedule for both proxies: step 2 + 2 + 2 + 2 = 8."""
    _, optimizer, scheduler, proxies = _proxyset_two_rounds([3, 1], steps=2, mode="shared")
    assert optimizer.state[proxies.params[0]]["step"].item() == 8.0
    assert scheduler.last_epoch == 8
    assert proxies.state_dict()["stashed_optimizer"] == {}


def test_stashed_optimizer_states_live_on_storage_device():
    """A stash is moved to storage_device ('meta' here: the only non-CPU device a CPU test has;
    only placement is checked, values on meta are not readable). Adam's 0-dim ``step`` stays put."""
    layer = _linear([[0.5, -0.5]], [0.0])
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    proxies = ProxySet(list(layer.parameters()), 2, [1, 1], optimizer=optimizer, storage_device="meta")
    _train(layer, optimizer, None, 0, 1)
    proxies.begin_turn(1)
    stash = proxies.state_dict()["stashed_optimizer"][0]
    assert sorted(stash) == [0, 1]  # weight and bias, by the optimizer's parameter index
    for state in stash.values():
        assert state["exp_avg"].device.type == "meta" and state["exp_avg_sq"].device.type == "meta"
        assert state["step"].device.type == "cpu"
    assert proxies.state_dict()["merged"].device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_params_with_cpu_storage_match_cpu_run():
    """Full fine-tuning layout (params on the GPU, merged/sum/stashes in CPU memory) reproduces
    the CPU run of test_per_proxy_optimizer_states_match_separate_optimizers (to float tolerance:
    CUDA and CPU kernels round differently)."""
    ref_layer, _, _, _ = _proxyset_two_rounds([3, 1], steps=2, mode="per_proxy")
    layer = _linear([[0.5, -0.5]], [0.0]).cuda()
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    scheduler = _halving_schedule(optimizer)
    proxies = ProxySet(list(layer.parameters()), 2, [3, 1], optimizer=optimizer, lr_scheduler=scheduler)
    for round_index in range(2):
        for k in range(2):
            proxies.begin_turn(k)
            for s in range(round_index * 2, round_index * 2 + 2):
                x, y = (t.cuda() for t in _batch(k, s))
                optimizer.zero_grad()
                nn.functional.mse_loss(layer(x), y).backward()
                optimizer.step()
                scheduler.step()
            proxies.end_turn(2)
        proxies.merge()
    assert all(s["exp_avg"].device.type == "cpu" for s in proxies.state_dict()["stashed_optimizer"][0].values())
    assert proxies.state_dict()["merged"].device.type == "cpu"
    torch.testing.assert_close(layer.weight.cpu(), ref_layer.weight.detach(), rtol=1e-5, atol=1e-6)


# -- checkpointing ---------------------------------------------------------------------------


def _resumable_run(interrupt: bool):
    """K=2, sizes [3, 1], Adam + halving LR, per-proxy states; 2 rounds of 2 steps per proxy.

    With ``interrupt``, everything is saved after proxy 1's first step of round 0 and loaded into
    fresh objects (as accelerate would: model, optimizer, scheduler, then ProxySet).
    """
    def build():
        layer = _linear([[0.5, -0.5]], [0.0])
        optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
        scheduler = _halving_schedule(optimizer)
        proxies = ProxySet(list(layer.parameters()), 2, [3, 1], optimizer=optimizer, lr_scheduler=scheduler)
        return layer, optimizer, scheduler, proxies

    layer, optimizer, scheduler, proxies = build()
    _train(layer, optimizer, scheduler, 0, 2)
    proxies.end_turn(2)
    proxies.begin_turn(1)
    _train(layer, optimizer, scheduler, 1, 1)
    if interrupt:
        buffer = io.BytesIO()
        torch.save([o.state_dict() for o in (layer, optimizer, scheduler, proxies)], buffer)
        buffer.seek(0)
        states = torch.load(buffer, weights_only=False)
        layer, optimizer, scheduler, proxies = build()
        for obj, state in zip((layer, optimizer, scheduler, proxies), states):
            obj.load_state_dict(state)
        assert proxies.live == 1
    _train(layer, optimizer, scheduler, 1, 1, first_step=1)
    proxies.end_turn(2)
    proxies.merge()
    for k in (0, 1):
        proxies.begin_turn(k)
        _train(layer, optimizer, scheduler, k, 2, first_step=2)
        proxies.end_turn(2)
    proxies.merge()
    proxies.begin_turn(0)
    return layer, optimizer


def test_state_dict_round_trip_mid_round_continues_identically():
    """Resuming mid-turn of proxy 1 gives bit-identical weights and proxy 0's Adam state (step 4)."""
    layer_a, optimizer_a = _resumable_run(interrupt=False)
    layer_b, optimizer_b = _resumable_run(interrupt=True)
    assert torch.equal(layer_a.weight, layer_b.weight) and torch.equal(layer_a.bias, layer_b.bias)
    state_a, state_b = optimizer_a.state[layer_a.weight], optimizer_b.state[layer_b.weight]
    assert state_a["step"].item() == state_b["step"].item() == 4.0
    assert torch.equal(state_a["exp_avg"], state_b["exp_avg"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_proxies": 3, "shard_sizes": [1, 1, 1]}, "num_proxies=2 but this run has num_proxies=3"),
     ({"optimizer_state": "shared"}, "optimizer_state='per_proxy' but this run has optimizer_state='shared'")],
)
def test_load_state_dict_rejects_mismatched_settings(kwargs, match):
    layer = _linear([[0.0, 0.0]], [0.0])
    optimizer = torch.optim.Adam(layer.parameters())
    state = ProxySet(list(layer.parameters()), 2, [1, 1], optimizer=optimizer).state_dict()
    settings = {"num_proxies": 2, "shard_sizes": [1, 1], "optimizer_state": "per_proxy"} | kwargs
    other = ProxySet(
        list(layer.parameters()), settings["num_proxies"], settings["shard_sizes"],
        optimizer=optimizer, optimizer_state=settings["optimizer_state"],
    )
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(state)


# -- memory ----------------------------------------------------------------------------------


def _owned_tensor_bytes(proxies: ProxySet) -> int:
    """Bytes of the distinct storages ProxySet holds, excluding the live module's params, the
    optimizer and the stashed optimizer states (those are per proxy by design)."""
    excluded = {"params", "optimizer", "lr_scheduler", "_opt_params", "_stashed_optimizer"}
    storages = {}

    def walk(value):
        if isinstance(value, torch.Tensor):
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    for name, value in vars(proxies).items():
        if name not in excluded:
            walk(value)
    return sum(storages.values())


@pytest.mark.parametrize("num_proxies", [2, 8])
def test_weight_memory_does_not_grow_with_k(num_proxies):
    """nn.Linear(4, 3) has 12 + 3 = 15 values. ProxySet holds merged (15 float32 = 60 bytes) and
    the running sum plus one total-weight slot (16 float32 = 64 bytes): 124 bytes for any K,
    after a full round in which all K proxies trained (and stashed their Adam states)."""
    layer = nn.Linear(4, 3)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.01)
    proxies = ProxySet(list(layer.parameters()), num_proxies, [1] * num_proxies, optimizer=optimizer)
    for k in range(num_proxies):
        proxies.begin_turn(k)
        optimizer.zero_grad()
        layer(torch.ones(1, 4)).sum().backward()
        optimizer.step()
        proxies.end_turn(1)
    assert len(proxies.state_dict()["stashed_optimizer"]) == num_proxies - 1
    assert _owned_tensor_bytes(proxies) == 124
    proxies.merge()
    assert _owned_tensor_bytes(proxies) == 124


# -- placement and schedule ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_proxies", "world_size", "message"),
    [(3, 2, "--num_shards=3 cannot be spread over 2 processes: launch a number of processes that divides 3 or is a "
            "multiple of it (1, 3, 6, 9, 12, ...), or use --num_shards=2"),
     (4, 6, "--num_shards=4 cannot be spread over 6 processes: launch a number of processes that divides 4 or is a "
            "multiple of it (1, 2, 4, 8, 12, 16, ...), or use --num_shards=6")],
)
def test_bad_spread_over_processes_names_valid_combinations(num_proxies, world_size, message):
    layer = nn.Linear(2, 1)
    with pytest.raises(ValueError) as error:
        ProxySet(list(layer.parameters()), num_proxies, [1] * num_proxies, world_size=world_size)
    assert str(error.value) == message


def test_single_process_owns_every_proxy_and_refuses_others():
    proxies = ProxySet(list(nn.Linear(2, 1).parameters()), 4, [1, 1, 1, 1])
    assert proxies.local_proxies == [0, 1, 2, 3] and proxies.live == 0
    with pytest.raises(ValueError, match="proxy 4 is not trained by process 0"):
        proxies.begin_turn(4)


# -- rounds split into two turns per proxy (mid-round redistribution) -------------------------


def _split_round_run(split: bool, save_while_paused: bool = False):
    """K=2, sizes [3, 1], Adam + halving LR, 4 steps per proxy per round, 2 rounds.

    ``split``: each round is 0 0 | 1 1 | 0 0 | 1 1 (two turns per proxy, pause in between) instead
    of 0 0 0 0 | 1 1 1 1. Each proxy sees the same data at the same local step either way. With
    ``save_while_paused`` everything is saved and loaded into fresh objects while proxy 0 is paused.
    """
    def build():
        layer = _linear([[0.5, -0.5]], [0.0])
        optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
        scheduler = _halving_schedule(optimizer)
        proxies = ProxySet(list(layer.parameters()), 2, [3, 1], optimizer=optimizer, lr_scheduler=scheduler)
        return layer, optimizer, scheduler, proxies

    layer, optimizer, scheduler, proxies = build()
    for round_index in range(2):
        first = 4 * round_index
        if not split:
            for k in (0, 1):
                proxies.begin_turn(k)
                _train(layer, optimizer, scheduler, k, 4, first_step=first)
                proxies.end_turn(4)
        else:
            for k in (0, 1):
                proxies.begin_turn(k)
                _train(layer, optimizer, scheduler, k, 2, first_step=first)
                proxies.pause_turn()
                torch.testing.assert_close(layer.weight, proxies._merged[0], rtol=0, atol=0)  # back at merged
                if save_while_paused and round_index == 1 and k == 1:
                    buffer = io.BytesIO()
                    torch.save([o.state_dict() for o in (layer, optimizer, scheduler, proxies)], buffer)
                    buffer.seek(0)
                    states = torch.load(buffer, weights_only=False)
                    layer, optimizer, scheduler, proxies = build()
                    for obj, state in zip((layer, optimizer, scheduler, proxies), states):
                        obj.load_state_dict(state)
            for k in (0, 1):
                proxies.begin_turn(k)
                _train(layer, optimizer, scheduler, k, 2, first_step=first + 2)
                proxies.end_turn(4)
        proxies.merge()
    return layer


@pytest.mark.parametrize("save_while_paused", [False, True])
def test_round_split_in_two_turns_equals_one_turn_exactly(save_while_paused):
    """The paused proxy's float32 weights are stored and restored unchanged, and its optimizer state
    and LR position travel as in any turn swap, so 2+2 steps == 4 steps, bit for bit (also across a
    save/load while both proxies are paused)."""
    whole = _split_round_run(split=False)
    split = _split_round_run(split=True, save_while_paused=save_while_paused)
    assert torch.equal(whole.weight, split.weight) and torch.equal(whole.bias, split.bias)
    assert not torch.equal(whole.weight, _linear([[0.5, -0.5]], [0.0]).weight)  # it trained


def test_paused_proxy_cannot_be_lost():
    """A paused proxy's weights live only in its pause slot: merge and end_turn refuse until it resumes."""
    layer = _linear([[1.0, 2.0]], [0.0])
    proxies = ProxySet(list(layer.parameters()), 2, [1, 1])
    _set(layer, [[3.0, 3.0]], [1.0])
    proxies.pause_turn()
    assert _values(layer) == ([[1.0, 2.0]], [0.0])
    with pytest.raises(RuntimeError, match="proxy 0 is paused"):
        proxies.end_turn(1)
    with pytest.raises(RuntimeError, match=r"proxies \[0\] are paused"):
        proxies.merge()
    proxies.begin_turn(0)
    assert _values(layer) == ([[3.0, 3.0]], [1.0])
    proxies.end_turn(2)
    proxies.begin_turn(1)
    proxies.end_turn(2)  # proxy 1 kept the merged weights [1, 2], 0
    proxies.merge()
    assert _values(layer) == ([[2.0, 2.5]], [0.5])


def test_pause_memory_is_one_copy_per_paused_proxy_and_reused():
    """K=3 in one process, 5 trainable values: after every proxy paused once, 3 slots of 5; a second
    round reuses them (no new allocation)."""
    layer = _linear([[1.0, 2.0, 3.0, 4.0]], [0.0])
    proxies = ProxySet(list(layer.parameters()), 3, [1, 1, 1])
    for _ in range(2):
        for k in range(3):
            proxies.begin_turn(k)
            proxies.pause_turn()
        slots = {k: t.data_ptr() for k, t in proxies._paused.items()}
        for k in range(3):
            proxies.begin_turn(k)
            proxies.end_turn(1)
        proxies.merge()
        assert sorted(slots) == [0, 1, 2] and all(t.numel() == 5 for t in proxies._paused.values())
    assert {k: t.data_ptr() for k, t in proxies._paused.items()} == slots


def test_end_round_folds_live_and_paused_proxies_for_a_stop_mid_round():
    """K=3, equal sizes. Proxy 0 paused after 2 steps at [[3, 3]], 1; proxy 1 live after 1 step at
    [[6, 0]], 4; proxy 2 never trained. end_round({0: 2, 1: 1}) folds 2 x theta0 + 1 x theta1:
    weight ([6, 6] + [6, 0]) / 3 = [4, 2], bias (2 + 4) / 3 = 2."""
    layer = _linear([[1.0, 2.0]], [0.0])
    proxies = ProxySet(list(layer.parameters()), 3, [1, 1, 1])
    _set(layer, [[3.0, 3.0]], [1.0])
    proxies.pause_turn()
    proxies.begin_turn(1)
    _set(layer, [[6.0, 0.0]], [4.0])
    proxies.end_round({0: 2, 1: 1, 2: 0})
    proxies.merge()
    assert _values(layer) == ([[4.0, 2.0]], [2.0])


def test_host_buffers_are_pageable_when_params_are_not_on_cuda():
    """Pinning needs the CUDA driver and only speeds up copies to a CUDA device: CPU params keep
    ordinary memory (on a GPU machine too)."""
    layer = _linear([[1.0, 2.0]], [0.0])
    proxies = ProxySet(list(layer.parameters()), 2, [1, 1])
    proxies.pause_turn()
    assert not proxies.state_dict()["merged"].is_pinned() and not proxies._paused[0].is_pinned()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_params_with_cpu_storage_use_pinned_merged_and_pause_slots():
    """Full fine-tuning layout: ``merged`` and pause slots (copied to the GPU at turn boundaries)
    are pinned, the host-only running sum is not; the asynchronous copies out of pinned ``merged``
    still give the exact weights: mean of [[3, 3]], 1 (paused, resumed, 1 step) and the merged
    start [[1, 2]], 0 (1 step), sizes [1, 1] -> [[2, 2.5]], 0.5; a second round from there."""
    layer = _linear([[1.0, 2.0]], [0.0]).cuda()
    proxies = ProxySet(list(layer.parameters()), 2, [1, 1], storage_device="cpu")
    assert proxies.state_dict()["merged"].is_pinned() and not proxies._buffer.is_pinned()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 3.0]]))
        layer.bias.fill_(1.0)
    proxies.pause_turn()
    assert proxies._paused[0].is_pinned()
    proxies.begin_turn(0)
    proxies.end_turn(1)
    proxies.begin_turn(1)
    proxies.end_turn(1)
    proxies.merge()
    assert layer.weight.tolist() == [[2.0, 2.5]] and layer.bias.tolist() == [0.5]
    proxies.begin_turn(0)
    proxies.end_turn(1)
    proxies.merge()
    assert layer.weight.tolist() == [[2.0, 2.5]] and layer.bias.tolist() == [0.5]
