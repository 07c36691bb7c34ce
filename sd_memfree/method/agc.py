"""AGC (anti-gradient control): the per-timestep loss bank and skip statistics (method.md, section 2).

One ``LossBank`` per proxy holds the running mean loss ``M[t]`` of each training timestep. A
sample whose loss is abnormally low for its timestep, ``ratio * l < M[t]``, is one the proxy has
started to memorize, and AGC skips it (its loss does not enter the training loss).

Invariants:
- ``LossBank.update`` gives the same bank as the sequential reference update
  ``for i in batch order: if isfinite(l_i): M[t_i] = ema * M[t_i] + (1 - ema) * l_i``,
  duplicate timesteps in one batch included, up to float32 rounding.
- Non-finite losses never enter the bank and are never kept.
- ``keep_mask``, ``update`` and ``SkipStats.update`` never synchronise host and device (no
  ``.item()``, no Python branch on tensor values, no boolean indexing), so AGC does not stall a
  GPU step. Only ``SkipStats.summary`` reads values, at logging time.
"""

import torch


class LossBank:
    """Per-timestep exponential running mean of the per-sample loss, for one proxy.

    Args:
        num_timesteps: the noise scheduler's ``num_train_timesteps``.
        ratio: the AGC ratio r (``--agc_ratio``); a sample is kept when ``r * l >= M[t]``.
        ema: the decay beta (``--agc_ema``) of ``M[t] = beta * M[t] + (1 - beta) * l``.
        device: where the bank lives (the training device, so no copies happen in the step).
    """

    def __init__(
        self, num_timesteps: int = 1000, ratio: float = 1.25, ema: float = 0.8, device: torch.device | str | None = None
    ) -> None:
        self.ratio = float(ratio)
        self.ema = float(ema)
        self.bank = torch.zeros(num_timesteps, dtype=torch.float32, device=device)

    def keep_mask(self, losses: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Which samples train: ``ratio * l_i >= M[t_i]``, all of them while ``M[t_i]`` is 0.

        Args:
            losses: Tensor [B] of per-sample losses (before SNR weighting).
            timesteps: LongTensor [B], on the bank's device.

        Returns:
            BoolTensor [B]; False for non-finite losses.
        """
        losses = losses.detach().float()
        threshold = self.bank[timesteps]
        return torch.isfinite(losses) & ((threshold == 0) | (self.ratio * losses >= threshold))

    def update(self, losses: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Fold a micro-batch into the bank, in batch order, kept and skipped samples alike.

        Sequentially, after the n valid (finite) samples at timestep t have been folded in,
        ``M[t] = ema^n * M[t] + sum_i (1 - ema) * ema^(n - 1 - j_i) * l_i``, where j_i counts the
        valid samples at t that come before i. Both terms are computed at once with a B x B
        comparison (B is a micro-batch, so this is small) and two ``scatter_add``.

        Args:
            losses: Tensor [B] of per-sample losses (detached here).
            timesteps: LongTensor [B], on the bank's device.
        """
        losses = losses.detach().float()
        valid = torch.isfinite(losses)
        same = (timesteps[:, None] == timesteps[None, :]) & valid[:, None] & valid[None, :]
        earlier = torch.ones_like(same).tril(diagonal=-1)  # earlier[i, j]: j comes before i
        num_before = (same & earlier).sum(dim=1)  # j_i
        num_same = same.sum(dim=1)  # n_i (for a valid i; unused for an invalid one)
        exponent = (num_same - 1 - num_before).clamp(min=0).float()
        # torch.pow(python float, tensor): building a device tensor from a Python scalar would be
        # a blocking host-to-device copy. torch.where rather than a product, so that a NaN loss
        # gives 0 and not NaN * 0 = NaN.
        decay = torch.pow(self.ema, exponent)
        contribution = torch.where(valid, (1 - self.ema) * decay * losses, torch.zeros_like(losses))
        count = torch.zeros_like(self.bank).scatter_add_(0, timesteps, valid.float())
        added = torch.zeros_like(self.bank).scatter_add_(0, timesteps, contribution)
        self.bank.mul_(torch.pow(self.ema, count)).add_(added)

    def to(self, device: torch.device | str) -> "LossBank":
        """Move the bank to ``device``; returns self."""
        self.bank = self.bank.to(device)
        return self

    def state_dict(self) -> dict:
        """The bank, plus the ratio and ema it was built with (recorded for inspection)."""
        return {"bank": self.bank.clone(), "ratio": self.ratio, "ema": self.ema}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the bank values (on this bank's device).

        The ratio and ema of this object (this run's flags) stay in force: they may change
        between a checkpoint and its resume, the accumulated bank is what must carry over.
        """
        bank = state_dict["bank"]
        if bank.shape != self.bank.shape:
            raise ValueError(
                f"loss bank in the checkpoint has {bank.shape[0]} timesteps but the scheduler has "
                f"{self.bank.shape[0]}; resume with the same noise scheduler."
            )
        self.bank.copy_(bank)


class SkipStats:
    """Device-side counts of seen and skipped samples, for logging the AGC skip rate.

    Counts are kept per (proxy, timestep bucket) in ``seen`` and ``skipped`` (LongTensor
    [num_proxies, num_buckets]); a multi-process script may all-reduce these two tensors in place
    before ``summary()``. Bucket b holds timesteps t with ``t * num_buckets // num_timesteps == b``.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        num_buckets: int = 10,
        num_proxies: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_timesteps = num_timesteps
        self.num_buckets = num_buckets
        self.num_proxies = num_proxies
        self.seen = torch.zeros(num_proxies, num_buckets, dtype=torch.long, device=device)
        self.skipped = torch.zeros_like(self.seen)

    def update(self, keep: torch.Tensor, timesteps: torch.Tensor, proxy: int, valid: torch.Tensor | None = None) -> None:
        """Count one micro-batch of proxy ``proxy``; no host-device sync.

        Args:
            keep: BoolTensor [B] from ``LossBank.keep_mask``.
            timesteps: LongTensor [B], on this object's device.
            proxy: index of the proxy that trained on the batch.
            valid: BoolTensor [B], False for a sample whose loss is not finite: it is neither seen
                nor skipped (a diverging run must not read as "everything skipped"; the training
                script's non-finite check reports it). None counts every sample.
        """
        if not 0 <= proxy < self.num_proxies:
            raise ValueError(f"proxy={proxy} is out of range for {self.num_proxies} proxies.")
        cell = proxy * self.num_buckets + timesteps * self.num_buckets // self.num_timesteps
        seen = torch.ones_like(cell) if valid is None else valid.long()
        self.seen.view(-1).scatter_add_(0, cell, seen)
        self.skipped.view(-1).scatter_add_(0, cell, (~keep).long() * seen)

    def summary(self, reset: bool = True) -> dict[str, float]:
        """Skip rates since the last summary, then reset the counts unless ``reset`` is False
        (this syncs: call it at logging).

        Returns:
            ``{"agc/skip_rate": ..., "agc/skip_rate_proxy_{k}": ..., "agc/skip_rate_t{lo}-{hi}": ...}``;
            a proxy or bucket that saw no sample since the last summary has no entry.
        """
        seen, skipped = self.seen.cpu(), self.skipped.cpu()
        rates: dict[str, float] = {}

        def _add(key: str, num_skipped: torch.Tensor, num_seen: torch.Tensor) -> None:
            if num_seen > 0:
                rates[key] = num_skipped.item() / num_seen.item()

        _add("agc/skip_rate", skipped.sum(), seen.sum())
        for k in range(self.num_proxies):
            _add(f"agc/skip_rate_proxy_{k}", skipped[k].sum(), seen[k].sum())
        for b in range(self.num_buckets):
            lo = -(-b * self.num_timesteps // self.num_buckets)  # ceil: first t with bucket b
            hi = -(-(b + 1) * self.num_timesteps // self.num_buckets) - 1
            _add(f"agc/skip_rate_t{lo}-{hi}", skipped[:, b].sum(), seen[:, b].sum())
        if reset:
            self.seen.zero_()
            self.skipped.zero_()
        return rates
