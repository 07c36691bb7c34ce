"""Run a recipe under ``torchrun`` with the default process group created as ``cuda:gloo``.

On a CPU machine such a group refuses host tensors with NCCL's own error ("No backend type
associated with device type cpu"), as NCCL does on a GPU machine: a run that completes under it
issued no host-tensor collective on the default group. Usage (under torchrun):

    python tests/nccl_like_launch.py train_scripts/train_sd_ietagc.py --flag ...
"""

import runpy
import sys

import torch.distributed as dist

if __name__ == "__main__":
    dist.init_process_group(backend="cuda:gloo")  # accelerate's PartialState reuses it
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
