"""A training run's life cycle, shared by the recipes: the output folder's lock, the guard
(signals, one-line exits), stopping (divergence, stalls), where a run starts (resume, diffusers'
checkpoints), checkpoints and the per-process state file, and the step-loss log."""
