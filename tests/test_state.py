"""Checkpoint state files: safetensors + tagged JSON, round-trip exactly, never unpickled."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from sd_memfree.run.state import load_process_state, read_process_state, save_process_state, state_files


class Holder:
    """A stateful object whose state is whatever the test puts in it."""

    def __init__(self, state=None):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


class Hostile:
    """Unpickling this calls ``open(marker, "w")``: the file appears iff the pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip_keeps_types_values_and_rng(tmp_path):
    """An AdamW state (int keys, tuple betas, 0-dim step tensors), two views of one buffer, inf,
    a uint32 NumPy array, a bool tensor and a dict key that looks like a tag come back equal and
    with the same types; the RNG draw after load equals the draw after save."""
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.01)
    layer(torch.randn(4, 3)).sum().backward()
    opt.step()
    buf = torch.arange(10.0)
    state = {"opt": opt.state_dict(), "views": [buf[:5], buf[5:]], "t": (1, 2.5, float("inf"), None),
             "np": np.arange(3, dtype=np.uint32), "mask": torch.tensor([True, False]), "__tensor__": "not a tag"}
    random.seed(1)
    torch.manual_seed(1)
    save_process_state(tmp_path, 0, 1, {"h": Holder(state), "absent": None}, extra={"a": 1})
    expected = (random.random(), torch.rand(1).item(), np.random.rand())
    random.random(), torch.rand(5), np.random.rand()  # move every stream on

    got = Holder()
    assert load_process_state(tmp_path, 0, 1, {"h": got}) == {"a": 1}
    assert (random.random(), torch.rand(1).item(), np.random.rand()) == expected
    s = got.state
    assert s["t"] == (1, 2.5, float("inf"), None) and isinstance(s["t"], tuple)
    assert s["np"].dtype == np.uint32 and s["np"].tolist() == [0, 1, 2]
    assert torch.equal(s["views"][0], torch.arange(5.0)) and torch.equal(s["views"][1], torch.arange(5.0, 10.0))
    assert s["mask"].dtype == torch.bool and s["mask"].tolist() == [True, False]
    assert s["__tensor__"] == "not a tag"
    assert set(s["opt"]["state"]) == {0, 1} and s["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    for i in (0, 1):
        for key, value in opt.state_dict()["state"][i].items():
            assert torch.equal(s["opt"]["state"][i][key], value)
    fresh = torch.optim.AdamW(layer.parameters(), lr=0.01)
    fresh.load_state_dict(s["opt"])  # torch accepts it as its own
    # only JSON and safetensors on disk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state_rank0.json", "state_rank0.safetensors"]
    json.loads(state_files(tmp_path, 0)[0].read_text())


def test_state_that_is_not_plain_data_is_refused_at_save(tmp_path):
    with pytest.raises(TypeError, match=r"cannot checkpoint a Holder at h\.inner"):
        save_process_state(tmp_path, 0, 1, {"h": Holder({"inner": Holder()})})


def test_crafted_pickle_state_is_never_loaded(tmp_path):
    """A state_rank0.pt that runs code when unpickled (today's loader: torch.load(weights_only=False))
    -> one-line ValueError naming the file; the code did not run."""
    marker = tmp_path / "pwned"
    torch.save({"world_size": 1, "objects": Hostile(marker)}, tmp_path / "state_rank0.pt")
    torch.load(tmp_path / "state_rank0.pt", weights_only=False)  # the file is really hostile
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match=r"state_rank0\.pt.*pickle.*never loaded") as e:
        load_process_state(tmp_path, 0, 1, {"h": Holder()})
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_damaged_state_is_one_line(tmp_path):
    save_process_state(tmp_path, 0, 1, {"h": Holder({"w": torch.ones(2)})})
    json_path, tensor_path = state_files(tmp_path, 0)
    payload = json.loads(json_path.read_text())
    payload["objects"]["h"]["w"] = {"__tensor__": "999"}
    json_path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"state_rank0\.json is damaged .*999"):
        read_process_state(tmp_path, 0)
    tensor_path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="damaged"):
        read_process_state(tmp_path, 0)


def test_other_process_count_is_refused(tmp_path):
    save_process_state(tmp_path, 0, 2, {})
    with pytest.raises(ValueError, match="written by 2 processes but this run has 1"):
        load_process_state(tmp_path, 0, 1, {})
    with pytest.raises(ValueError, match="state_rank1.json is missing"):
        load_process_state(tmp_path, 1, 2, {})
