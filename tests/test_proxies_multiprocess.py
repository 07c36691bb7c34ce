"""ProxySet over 2 processes (gloo on CPU) equals the single-process turn-taking run.

K=4 proxies, shard sizes [3, 1, 2, 2], Adam per proxy, 3 steps per turn, 2 rounds; in round 1
proxy 1 stops after 1 step (an incomplete final round), so the last merge uses weights
[3*3, 1*1, 2*3, 2*3] = [9, 1, 6, 6]. Process 0 trains proxies 0 and 2, process 1 trains 1 and 3.

Tolerance atol=1e-6: the merged weights are sums of the same float32 products, but the
all-reduce adds the two processes' partial sums ((w0 + w2) + (w1 + w3)) while one process adds
them in proxy order (((w0 + w1) + w2) + w3), so the last bits can differ.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sd_memfree.method.proxies import ProxySet

SHARD_SIZES = [3, 1, 2, 2]
STEPS_PER_TURN = 3
ROUNDS = 2


def _batch(k: int, round_index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Proxy k's data: y = x @ [k + 1, -k] + 0.5 k, seeded by (k, round, step)."""
    gen = torch.Generator().manual_seed(1000 * k + 10 * round_index + step)
    x = torch.randn(8, 2, generator=gen)
    return x, x @ torch.tensor([[k + 1.0], [-float(k)]]) + 0.5 * k


def _run(rank: int, world_size: int) -> tuple[list[torch.Tensor], list[float]]:
    """Trains this process's proxies for ROUNDS rounds; returns final params and the merge logs."""
    torch.manual_seed(0)
    layer = nn.Linear(2, 1)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    proxies = ProxySet(
        list(layer.parameters()), len(SHARD_SIZES), SHARD_SIZES,
        optimizer=optimizer, rank=rank, world_size=world_size,
    )
    total_weights = []
    for round_index in range(ROUNDS):
        for k in proxies.local_proxies:
            proxies.begin_turn(k)
            steps = 1 if (round_index == ROUNDS - 1 and k == 1) else STEPS_PER_TURN
            for step in range(steps):
                x, y = _batch(k, round_index, step)
                optimizer.zero_grad()
                nn.functional.mse_loss(layer(x), y).backward()
                optimizer.step()
            proxies.end_turn(steps)
        total_weights.append(proxies.merge()["merge/total_weight"])
    return [p.detach().clone() for p in layer.parameters()], total_weights


def _worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    calls = []
    original = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls.append(args[0].numel())
        return original(*args, **kwargs)

    dist.all_reduce = counting_all_reduce  # ProxySet looks it up on the module at call time
    try:
        params, total_weights = _run(rank, world_size)
    finally:
        dist.all_reduce = original
    result = {"params": params, "total_weights": total_weights, "all_reduce_calls": calls}
    torch.save(result, f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_processes_match_single_process_turn_taking(tmp_path):
    """Round 0 weights: 3*3 + 1*3 + 2*3 + 2*3 = 24; round 1: 9 + 1 + 6 + 6 = 22.

    One all-reduce per merge, of a buffer of 2 + 1 trainable values + 1 total-weight slot = 4.
    """
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    expected_params, expected_weights = _run(rank=0, world_size=1)
    assert expected_weights == [24.0, 22.0]
    for rank in (0, 1):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert result["all_reduce_calls"] == [4] * ROUNDS
        assert result["total_weights"] == expected_weights
        for got, want in zip(result["params"], expected_params):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    rank0, rank1 = (torch.load(tmp_path / f"{r}.pt")["params"] for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1))  # every process holds the same merge
