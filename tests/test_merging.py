"""Hand-computed tests of the pure merge math in sd_memfree.method.merging."""

from __future__ import annotations

import pytest
import torch

from sd_memfree.method.merging import accumulate_, merge_weight, weighted_average


def test_weighted_average_hand_computed():
    """(3 * [1, 2] + 1 * [5, -2]) / 4 = ([3, 6] + [5, -2]) / 4 = [8, 4] / 4 = [2, 1]."""
    out = weighted_average([torch.tensor([1.0, 2.0]), torch.tensor([5.0, -2.0])], [3, 1])
    assert torch.equal(out, torch.tensor([2.0, 1.0]))


def test_weighted_average_zero_weight_contributes_nothing_even_nan():
    """Weights [0, 2]: the NaN tensor is skipped, result = 2 * [4] / 2 = [4]."""
    out = weighted_average([torch.tensor([float("nan")]), torch.tensor([4.0])], [0.0, 2.0])
    assert torch.equal(out, torch.tensor([4.0]))


def test_weighted_average_sums_in_float32_and_keeps_dtype():
    """bf16 keeps 8 significant bits, so 256 + 1 rounds back to 256 in bf16.

    Mean of [256, 1, 1, 1, 1] with equal weights: float32 sum 260 / 5 = 52 (exact in bf16). A
    bf16 running sum would stay at 256 and give 256 / 5 = 51.2 -> 51.25 in bf16.
    """
    tensors = [torch.tensor([256.0], dtype=torch.bfloat16)] + [torch.tensor([1.0], dtype=torch.bfloat16)] * 4
    out = weighted_average(tensors, [1, 1, 1, 1, 1])
    assert out.dtype == torch.bfloat16
    assert out.item() == 52.0


@pytest.mark.parametrize(
    ("tensors", "weights", "match"),
    [
        ([], [], "all weights are zero"),
        ([torch.ones(1), torch.ones(1)], [0, 0], "all weights are zero"),
        ([torch.ones(1)], [1, 2], "1 tensors but 2 weights"),
        ([torch.ones(1), torch.ones(1)], [2, -1], "non-negative"),
    ],
)
def test_weighted_average_rejects_bad_input(tensors, weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_average(tensors, weights)


def test_accumulate_adds_weighted_params_in_place():
    """sum starts [[1, 1]], [0]; += 2 * [[0.5, -1]], [3] -> [[2, -1]], [6]."""
    running = [torch.ones(1, 2), torch.zeros(1)]
    ids = [id(t) for t in running]
    params = [torch.nn.Parameter(torch.tensor([[0.5, -1.0]])), torch.nn.Parameter(torch.tensor([3.0]))]
    accumulate_(running, params, 2.0)
    assert torch.equal(running[0], torch.tensor([[2.0, -1.0]]))
    assert torch.equal(running[1], torch.tensor([6.0]))
    assert [id(t) for t in running] == ids  # in place
    assert torch.equal(params[0].detach(), torch.tensor([[0.5, -1.0]]))  # params untouched


def test_accumulate_float16_params_into_float32_sum():
    """2049 is not a float16 value but the float32 sum holds it: 2048 + 1 * 1 = 2049."""
    running = [torch.tensor([2048.0])]
    accumulate_(running, [torch.tensor([1.0], dtype=torch.float16)], 1.0)
    assert running[0].dtype == torch.float32 and running[0].item() == 2049.0


def test_accumulate_rejects_mismatches():
    with pytest.raises(ValueError, match="2 sums but 1 tensors"):
        accumulate_([torch.zeros(1), torch.zeros(1)], [torch.zeros(1)], 1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        accumulate_([torch.zeros(2)], [torch.zeros(3)], 1.0)


def test_accumulate_empty_is_noop():
    """No tensors: nothing to add and nothing to check (0 sums, 0 tensors), but the count check holds."""
    running = []
    assert accumulate_(running, [], 3.0) is None and running == []
    with pytest.raises(ValueError, match="0 sums but 1 tensors"):
        accumulate_(running, [torch.zeros(1)], 3.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_accumulate_device_params_into_host_sum():
    """Params on the GPU, sum in CPU memory: 0 + 3 * arange(4) = [0, 3, 6, 9] after the sync."""
    running = [torch.zeros(4), torch.zeros(1 << 20)]
    params = [torch.arange(4.0, device="cuda"), torch.ones(1 << 20, device="cuda")]
    accumulate_(running, params, 3.0)
    assert torch.equal(running[0], torch.tensor([0.0, 3.0, 6.0, 9.0]))
    assert bool((running[1] == 3.0).all())


def test_merge_weight_is_size_times_steps_and_rejects_negatives():
    assert merge_weight(3, 4) == 12 and merge_weight(5, 0) == 0
    with pytest.raises(ValueError, match="non-negative"):
        merge_weight(-1, 2)


def test_proxyset_merge_and_weighted_average_give_the_same_bits():
    """One implementation: ProxySet's running-sum merge is weighted_average of the proxies' weights
    with weights n_k * s_k, to the last bit (values chosen so a fused multiply-add would differ)."""
    from sd_memfree.method.proxies import ProxySet

    starts = [torch.tensor([0.1, 1 / 3, 2.0 / 7]), torch.tensor([0.7, -1 / 9, 5.0 / 11])]
    param = torch.nn.Parameter(starts[0].clone())
    proxies = ProxySet([param], 2, [3, 7])
    ends = [torch.tensor([0.3, 0.123456789, -1 / 7]), torch.tensor([1 / 13, 0.987654321, 2 / 3])]
    for k, end in enumerate(ends):
        proxies.begin_turn(k)
        with torch.no_grad():
            param.copy_(end)
        proxies.end_turn(5 if k == 0 else 2)
    proxies.merge()
    assert torch.equal(param.detach(), weighted_average(ends, [merge_weight(3, 5), merge_weight(7, 2)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_staged_add_rounds_as_product_then_add_and_leaves_no_temporary(monkeypatch, dtype):
    """The host-side add of staged device copies (merging._add_staged) forms weight * copy in the
    staging copy itself: the sums must be bit-identical to ``acc + (copy.float() * weight)``, the
    unfused rounding that makes one process taking turns and one process per proxy merge alike.
    The copies are fresh staging tensors (accumulate_ made them), so they may be overwritten."""
    from sd_memfree.method import merging

    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: None)  # CPU stand-in
    g = torch.Generator().manual_seed(0)
    accs = [torch.randn(1000, generator=g) * 10, torch.randn(3, 7, generator=g)]
    copies = [torch.randn(1000, generator=g).to(dtype), torch.randn(3, 7, generator=g).to(dtype)]
    weight = 7 / 3  # not a power of two: the product rounds
    expected = [a + (c.float() * weight) for a, c in zip(accs, copies)]
    merging._add_staged([(a, c, torch.device("cuda")) for a, c in zip(accs, copies)], weight)
    for got, want in zip(accs, expected):
        assert torch.equal(got, want)
