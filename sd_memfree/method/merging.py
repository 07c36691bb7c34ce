"""The averaging math of a merge, as pure functions (no state, no policy).

A merge replaces the trainable weights by the weighted mean of the proxies' weights
(method.md section 1): ``merged = sum_k w_k * theta_k / sum_k w_k``. The policy of *which*
weights lives in ``merge_weight`` (``w_k = n_k * s_k``); ``ProxySet`` (proxies.py) decides *when*.
``ProxySet`` and ``weighted_average`` share one implementation: the weight ``merge_weight`` and
the running sum ``accumulate_``, so the pure reference and the merge the scripts run give the
same bits.

Invariants:
- Sums are computed in float32, whatever the dtype of the inputs, so that fp16/bf16 weights do
  not lose precision while being summed; results are cast back to the input dtype.
- The empty case is written down: an entry with weight 0 (a proxy that took no optimizer step)
  contributes nothing, not even a NaN; if every weight is 0, ``ProxySet.merge`` keeps its weights
  unchanged, while ``weighted_average`` refuses (there is no mean).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Device-to-host copies are staged in chunks of at most this many bytes: enough to keep the copy
# engine busy, small enough that staging never holds a second full copy of a UNet in host memory.
_STAGING_CHUNK_BYTES = 256 * 2**20


def weighted_average(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Weighted mean ``sum_k w_k t_k / sum_k w_k`` of same-shaped tensors.

    Args:
        tensors: the K tensors to average (same shape; device and dtype of the first are used).
        weights: K non-negative weights; they need not sum to 1.

    Returns:
        The mean, computed in float32 and cast back to the dtype of ``tensors[0]``.

    Raises:
        ValueError: if the lengths differ, a weight is negative, or every weight is zero
            (which includes the empty input).
    """
    if len(tensors) != len(weights):
        raise ValueError(f"weighted_average got {len(tensors)} tensors but {len(weights)} weights.")
    if any(w < 0 for w in weights):
        raise ValueError(f"weighted_average weights must be non-negative, got {list(weights)}.")
    total = float(sum(weights))
    if total == 0.0:
        raise ValueError("weighted_average needs at least one positive weight (all weights are zero).")
    first = tensors[0]
    acc = torch.zeros(first.shape, dtype=torch.float32, device=first.device)
    for tensor, weight in zip(tensors, weights):
        # Skipping (rather than multiplying by 0) keeps a NaN in an unused proxy out of the mean.
        if weight != 0:
            accumulate_([acc], [tensor], weight)
    return acc.div_(total).to(first.dtype)


def accumulate_(running_sum: list[Tensor], params: list[Tensor], weight: float) -> None:
    """In place: ``running_sum[i] += weight * params[i]`` for every i.

    ``params`` may live on another device than ``running_sum`` (a UNet on the GPU, its running
    sum in CPU memory). Copies are issued with ``non_blocking=True``; device-to-host copies are
    staged in bounded chunks and the source device is synchronised before the host reads them,
    because a non-blocking device-to-host copy is not finished when ``.to()`` returns.

    Args:
        running_sum: accumulators (typically float32), one per parameter.
        params: tensors of the same shapes (parameters are read, never modified).
        weight: the factor applied to ``params``.

    Raises:
        ValueError: if the two lists differ in length or a pair differs in shape.
    """
    if len(running_sum) != len(params):
        raise ValueError(f"accumulate_ got {len(running_sum)} sums but {len(params)} tensors.")
    weight = float(weight)
    staged: list[tuple[Tensor, Tensor, torch.device]] = []
    staged_bytes = 0
    with torch.no_grad():
        for acc, param in zip(running_sum, params):
            if acc.shape != param.shape:
                raise ValueError(f"accumulate_: shape mismatch {tuple(acc.shape)} vs {tuple(param.shape)}.")
            param = param.detach()
            if param.device == acc.device or acc.device.type != "cpu":
                # Same device, or host-to-device: ordered on the device stream, no wait needed.
                # Round weight * param on its own before adding (no fused multiply-add), so the
                # sum equals the all-reduce of per-process terms: one process taking turns and
                # one process per proxy then merge to bit-identical weights.
                acc.add_(param.to(acc.device, non_blocking=True).float() * weight)
                continue
            staged.append((acc, param.to(acc.device, non_blocking=True), param.device))
            staged_bytes += param.numel() * param.element_size()
            if staged_bytes >= _STAGING_CHUNK_BYTES:
                _add_staged(staged, weight)
                staged, staged_bytes = [], 0
        if staged:
            _add_staged(staged, weight)


def _add_staged(staged: list[tuple[Tensor, Tensor, torch.device]], weight: float) -> None:
    """Waits for the pending device-to-host copies in ``staged``, then adds them on the host.

    ``acc += weight * host_copy``, rounded as ``acc.add_(host_copy.float() * weight)`` (the
    product rounded to float32 on its own, then added: no fused multiply-add, see accumulate_),
    but the product is formed in place in the staging copy. Each ``host_copy`` is a fresh tensor
    that ``accumulate_`` made for this add and nobody else holds (and ``.float()`` of a half
    copy is fresh too), so overwriting it is safe. Why: ``host_copy.float() * weight`` allocated a
    temporary of the tensor's size per parameter, and on the host a fresh large allocation is
    page-faulted in on first write; that made this add run at ~6 GB/s against ~40 GB/s without
    the temporary (H200 machine, docs/benchmarks.md) and made it the larger part of a full
    fine-tuning turn end.
    """
    for source in {source for _, _, source in staged}:
        torch.accelerator.synchronize(source)
    for acc, host_copy, _ in staged:
        product = host_copy.float()
        product.mul_(weight)  # same rounding as host_copy.float() * weight, no temporary
        acc.add_(product)


def merge_weight(shard_size: int, steps_taken: int) -> int:
    """Unnormalised merge weight ``n_k * s_k`` of one proxy: its shard size times the optimizer
    steps it took this round (``ProxySet`` folds its weights into the running sum with it).
    Normalised over a complete round (every ``s_k`` equal) it is ``n_k / sum_j n_j`` (method.md
    section 1); a proxy that took no step weighs 0.

    Raises:
        ValueError: if a value is negative.
    """
    if shard_size < 0 or steps_taken < 0:
        raise ValueError(f"merge weights need non-negative values, got shard size {shard_size} and {steps_taken} steps.")
    return shard_size * steps_taken
