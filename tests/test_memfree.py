"""``MemFree`` on a toy model: off means plain mean, the round events, exact resume, bad input.

(Bit-identity with the SD script on the tiny model: tests/test_plugin_doc.py.)
"""

from __future__ import annotations

import pytest
import torch

from sd_memfree import MemFree, MemFreeConfig
from sd_memfree.state import load_process_state, save_process_state

N = 12  # samples


def toy(config: MemFreeConfig, steps: int = 12, seed: int = 0):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.1)
    memfree = MemFree(config, num_samples=N, num_train_timesteps=4, max_train_steps=steps, seed=seed)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    memfree.attach(params, optimizer, lr_scheduler)
    return model, optimizer, lr_scheduler, memfree


def features() -> torch.Tensor:
    return torch.linspace(-1, 1, N * 3).view(N, 3)


def run(model, optimizer, lr_scheduler, memfree, steps: int):
    """A loop shaped as docs/plugin.md's: batches from the sampler, noise from the proxy stream."""
    x = features()
    batches = iter(memfree.batch_sampler(2))
    happened = []
    for _ in range(steps):
        ids = torch.tensor([i for i, _ in next(batches)])
        t = torch.randint(0, 4, (len(ids),), generator=memfree.generator)
        losses = (model(x[ids]).squeeze(1) - t.float()) ** 2
        loss = memfree.reduce(losses, t, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        lr_scheduler.step()
        events = memfree.step()
        happened.append(events)
        if events.reload_data:
            batches = iter(memfree.sampler)
    return happened


FULL = MemFreeConfig(num_shards=2, merge_every=2, agc_ratio=1.5, agc_ema=0.5, redistribute_fraction=0.5, loss_aware_augmentation=True)


def test_off_is_the_plain_weighted_mean_and_steps_do_nothing():
    _, _, _, memfree = toy(MemFreeConfig())
    losses, weights = torch.tensor([1.0, 2.0, 6.0]), torch.tensor([1.0, 0.5, 0.5])
    assert memfree.reduce(losses, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])).item() == 3.0
    assert memfree.reduce(losses, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), weights).item() == pytest.approx((1 + 1 + 3) / 3)
    events = memfree.step()
    assert (events.logs, events.merged, events.reload_data) == ({}, False, False)
    assert memfree.finish() == {} and memfree.proxies is None and memfree.data_parallel
    assert memfree.counters.micro_step == 2 and memfree.counters.global_step == 1
    assert memfree.lr_schedule_steps == memfree.local_steps == 12


def test_agc_skips_a_low_loss_and_counts_it():
    """Bank of timestep 0 holds 2.0 after the first batch (ema 0.5: 0.5 * 0 + 0.5 * 4.0); a loss of
    1.0 then has 1.5 * 1.0 < 2.0: skipped; the kept mean is the other sample's 3.0."""
    _, _, _, memfree = toy(MemFreeConfig(agc_ratio=1.5, agc_ema=0.5))
    memfree.reduce(torch.tensor([4.0]), torch.tensor([0]), torch.tensor([5]))
    loss = memfree.reduce(torch.tensor([1.0, 3.0]), torch.tensor([0, 1]), torch.tensor([7, 8]))
    assert loss.item() == 3.0
    assert memfree.assignment.total_skip_counts.tolist()[7] == 1 and memfree.assignment.total_skip_counts.sum() == 1
    assert memfree.log_values()["agc/skip_rate"] == pytest.approx(1 / 3)


def test_rounds_merge_redistribute_and_finish():
    model, optimizer, lr_scheduler, memfree = toy(FULL, steps=12)
    assert memfree.lr_schedule_steps == 6  # each of the 2 proxies takes 6 of the 12 steps
    events = run(model, optimizer, lr_scheduler, memfree, 12)
    assert memfree.proxies.num_merges == 3  # 12 steps / (2 proxies x 2 steps)
    assert memfree.counters.redistributions == 3  # mid-round, in each of the 3 rounds
    # Each round: proxy 0 step 1, proxy 1 step 1, redistribution, proxy 0 step 2, proxy 1 step 2, merge.
    assert [i for i, e in enumerate(events) if e.merged] == [3, 7, 11]
    assert [i for i, e in enumerate(events) if e.redistributed] == [1, 5, 9]
    assert all(e.reload_data == e.redistributed for e in events)
    assert set(events[1].logs) == {"redistribution/moved", "shards/size_0", "shards/size_1"}
    assert events[3].logs["merge/index"] == 1 and sum(events[3].logs[f"shards/size_{k}"] for k in range(2)) == N
    assert memfree.finish() == {}  # the budget ended with a merge
    merged = torch.cat(memfree.merged_weights())
    assert torch.equal(merged, torch.cat([p.detach().flatten() for p in model.parameters()]))


def test_finish_merges_a_run_stopped_mid_round():
    model, optimizer, lr_scheduler, memfree = toy(FULL, steps=12)
    run(model, optimizer, lr_scheduler, memfree, 5)  # round 1 (4 steps per round): proxy 0 has taken 1 step
    assert memfree.finish()["merge/index"] == 2
    assert memfree.finish() == {}  # once


def test_resume_from_state_equals_straight_run(tmp_path):
    straight = toy(FULL)
    run(*straight, 12)
    first = toy(FULL)
    run(*first, 5)  # mid-round: proxy 0 is paused after its first half of round 1
    model, optimizer, lr_scheduler, memfree = first
    objects = {"model": model, "optimizer": optimizer, "lr_scheduler": lr_scheduler, **memfree.stateful_objects()}
    save_process_state(tmp_path, 0, 1, objects)
    resumed = toy(FULL)
    model, optimizer, lr_scheduler, memfree = resumed
    load_process_state(tmp_path, 0, 1, {"model": model, "optimizer": optimizer, "lr_scheduler": lr_scheduler,
                                        **memfree.stateful_objects()})
    memfree.on_state_loaded()
    run(*resumed, 7)
    for a, b in zip(straight[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)
    def method_state(m):  # whole-*run* skip rates restart with a run, as in the SD script
        return {k: v for k, v in m.summary().items() if not k.startswith("agc/")}

    assert method_state(straight[3]) == method_state(resumed[3])
    assert torch.equal(straight[3].total_skip_counts(), resumed[3].total_skip_counts())


def test_state_dict_round_trip():
    a = toy(FULL)
    run(*a, 3)
    b = toy(FULL)
    b[3].load_state_dict(a[3].state_dict())
    assert b[3].counters.global_step == 3 and torch.equal(b[3].banks[0].bank, a[3].banks[0].bank)
    with pytest.raises(ValueError, match="another configuration"):
        toy(MemFreeConfig(num_shards=2, merge_every=2, agc_ratio=1.5))[3].load_state_dict({"counters": {}, "rng": a[3].rng.state_dict(),
                                                                                          "assignment": a[3].assignment.state_dict()})


def test_bad_input_one_liners():
    with pytest.raises(TypeError, match="MemFreeConfig"):
        MemFree({"num_shards": 2}, num_samples=4, num_train_timesteps=4, max_train_steps=4)
    with pytest.raises(ValueError, match="more than the 3 training samples"):
        MemFree(MemFreeConfig(num_shards=4), num_samples=3, num_train_timesteps=4, max_train_steps=8)
    with pytest.raises(ValueError, match="cannot be spread over 3 processes"):
        MemFree(MemFreeConfig(num_shards=2), num_samples=4, num_train_timesteps=4, max_train_steps=8, rank=0, world_size=3)
    unattached = MemFree(MemFreeConfig(num_shards=2, merge_every=1), num_samples=4, num_train_timesteps=4, max_train_steps=4)
    with pytest.raises(RuntimeError, match="attach"):
        unattached.step()
