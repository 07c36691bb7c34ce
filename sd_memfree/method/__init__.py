"""The method's pieces (method.md): the round schedule, shards, proxies and their merges, AGC's loss
bank, loss-aware augmentation, per-sample losses and the shard sampler. ``sd_memfree.MemFree``
puts them together for a training loop."""
