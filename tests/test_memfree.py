"""``MemFree`` on a toy model: off means plain mean, the round events, exact resume, bad input.

(Bit-identity with the SD script on the tiny model: tests/test_plugin_doc.py.)
"""

from __future__ import annotations

import pytest
import torch

from sd_memfree import MemFree, MemFreeConfig
from sd_memfree.run.state import load_process_state, save_process_state

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


def toy_step(model, optimizer, lr_scheduler, memfree, x, ids):
    """One optimizer step of the toy loop on samples ``ids``; returns ``memfree.step()``'s events."""
    t = torch.randint(0, 4, (len(ids),), generator=memfree.generator)
    losses = (model(x[ids]).squeeze(1) - t.float()) ** 2
    loss = memfree.reduce(losses, t, ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    lr_scheduler.step()
    return memfree.step()


def run(model, optimizer, lr_scheduler, memfree, steps: int, seen: list | None = None):
    """A loop shaped as docs/plugin.md's: batches from the sampler, noise from the proxy stream;
    the iterator is rebuilt when ``events.reload_data`` says so. ``seen`` collects each step's ids."""
    x = features()
    batches = iter(memfree.batch_sampler(2))
    happened = []
    for _ in range(steps):
        ids = torch.tensor([i for i, _ in next(batches)])
        if seen is not None:
            seen.append(ids.tolist())
        events = toy_step(model, optimizer, lr_scheduler, memfree, x, ids)
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
    assert memfree.finish() == {} and memfree.proxies is None and memfree.data_world == 1
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


# ---- the loop-facing API: prepare, loaders that follow the shards, logs, end_training, loading ----

class Keys(torch.utils.data.Dataset):
    """A dataset whose item for a sampler key ``(sample_id, aug_seed)`` is the key itself."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, key):
        return key


def ids_seen(memfree, steps: int, follow: bool = True) -> list[list[int]]:
    """The sample ids of each step's batch from one iterator kept for the whole run (as the
    scripts keep it); ``follow=False`` uses a plain DataLoader over the same sampler instead."""
    from torch.utils.data import DataLoader

    model, optimizer, lr_scheduler = memfree.toy
    x = features()
    loader = memfree.dataloader(Keys(), 2, collate_fn=lambda keys: torch.tensor([i for i, _ in keys]))
    if not follow:
        loader = DataLoader(Keys(), batch_sampler=memfree.sampler, collate_fn=loader.collate_fn)
    batches, seen = iter(loader), []
    for _ in range(steps):
        ids = next(batches)
        seen.append(ids.tolist())
        toy_step(model, optimizer, lr_scheduler, memfree, x, ids)
    return seen


def toy_memfree(config=FULL, steps=12):
    model, optimizer, lr_scheduler, memfree = toy(config, steps)
    memfree.toy = (model, optimizer, lr_scheduler)
    return memfree


def test_loader_iterator_follows_a_redistribution_without_being_rebuilt():
    """FULL redistributes after step 2 (then 6, 10): the kept iterator's batches from step 3 on
    are those of the new shards, i.e. the batches of run(), which rebuilds its iterator on
    ``events.reload_data``; a plain DataLoader iterator kept over the same sampler goes on with
    the old shards' stream."""
    expected = []
    run(*toy(FULL), 8, seen=expected)
    assert ids_seen(toy_memfree(), 8) == expected
    stale = ids_seen(toy_memfree(), 8, follow=False)
    assert stale[:2] == expected[:2] and stale[2:] != expected[2:]


def test_loading_needs_no_call_after_it(tmp_path):
    """Saved after 5 steps (mid-round, proxy 0 paused) and loaded into a fresh object whose loader
    was made before the load: without on_state_loaded(), the batches and weights of steps 6..12
    are those of the straight run."""
    straight = toy_memfree()
    ids_straight = ids_seen(straight, 12)
    first = toy_memfree()
    ids_seen(first, 5)
    model, optimizer, lr_scheduler = first.toy
    save_process_state(tmp_path, 0, 1, {"model": model, "optimizer": optimizer, "lr_scheduler": lr_scheduler,
                                        **first.stateful_objects()})
    resumed = toy_memfree()
    model, optimizer, lr_scheduler = resumed.toy
    load_process_state(tmp_path, 0, 1, {"model": model, "optimizer": optimizer, "lr_scheduler": lr_scheduler,
                                        **resumed.stateful_objects()})
    assert ids_seen(resumed, 7) == ids_straight[5:]
    for a, b in zip(straight.toy[0].parameters(), resumed.toy[0].parameters()):
        assert torch.equal(a, b)


def test_loading_switches_the_live_proxy_before_training_goes_on():
    """A state whose counters say proxy 1's turn while proxy 0 is live (as after another script's
    bookkeeping): the next reduce makes proxy 1 live, with its own optimizer state; reading the
    generator changes nothing (it is proxy 1's stream already)."""
    memfree = toy_memfree()
    assert memfree.proxies.live == 0
    state = memfree.state_dict()
    state["counters"] = dict(state["counters"], global_step=1, micro_step=1)  # step 1 of round 0 is proxy 1's
    memfree.load_state_dict({**state, "proxies": state["proxies"]})
    assert memfree.proxies.live == 1
    other = toy_memfree()
    other.stateful_objects()["counters"].load_state_dict(state["counters"])
    assert other.proxies.live == 0  # not yet: the rest of a checkpoint may still be loading
    assert other.generator is other.rng[1] and other.proxies.live == 0
    other.reduce(torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0]))
    assert other.proxies.live == 1


def test_logs_hold_each_event_at_its_step_and_skip_rates_at_the_current_one():
    """FULL, 4 steps: a redistribution after step 2, a merge after step 4; logs() then holds them
    at steps 2 and 4, with the skip rates and augmentation strength at step 4; a second call holds
    only the strength (no sample seen since)."""
    memfree = toy_memfree()
    ids_seen(memfree, 4)
    logs = memfree.logs()
    assert list(logs) == [2, 4]
    assert set(logs[2]) == {"redistribution/moved", "shards/size_0", "shards/size_1"}
    assert logs[4]["merge/index"] == 1 and "agc/skip_rate" in logs[4] and "augment/mean_strength" in logs[4]
    assert list(memfree.logs()) == [4] and set(memfree.logs()[4]) == {"augment/mean_strength"}
    off = toy_memfree(MemFreeConfig())
    ids_seen(off, 3)
    assert off.logs() == {}


def test_end_training_merges_once_and_reports_the_run():
    """Stopped after 5 of 12 steps (mid-round): end_training merges (the run's 2nd merge) and
    reports the whole-run summary and skip counts; reading them again changes nothing."""
    memfree = toy_memfree()
    ids_seen(memfree, 5)
    report = memfree.end_training()
    assert report.merge_logs["merge/index"] == 2 and report.summary["num_merges"] == 2
    assert report.summary["agc/skip_rate"] == 0.0  # 5 steps x 2 samples seen, none low enough to skip
    assert torch.equal(report.skip_counts, memfree.assignment.total_skip_counts)
    again = memfree.end_training()
    assert again.merge_logs == {} and again.summary == report.summary  # the whole-run rates are still there


def test_prepare_keeps_the_loader_options_and_wraps_the_model_only_without_shards():
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    accelerator = Accelerator(cpu=True)

    def collate(keys):
        return torch.tensor([i for i, _ in keys])

    for config, one_shard in ((FULL, False), (MemFreeConfig(agc_ratio=1.5), True)):
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        memfree = MemFree(config, num_samples=N, num_train_timesteps=4, max_train_steps=12, accelerator=accelerator)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        user_loader = DataLoader(Keys(), batch_size=3, shuffle=True, collate_fn=collate)
        prepared, optimizer, scheduler, loader = memfree.prepare(model, optimizer, lr_scheduler, user_loader)
        assert prepared is model and scheduler is lr_scheduler and (memfree.proxies is None) is one_shard
        assert loader.collate_fn is collate and loader.batch_sampler is memfree.sampler
        first = next(iter(loader))
        assert len(first) == 3 and set(first.tolist()) <= set(memfree.assignment.members(memfree.current_proxy))
    with pytest.raises(ValueError, match="needs the accelerator"):
        toy_memfree().prepare(torch.nn.Linear(1, 1), torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1))
