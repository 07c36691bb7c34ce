"""Several processes per proxy (W = K x D), one collectives module, the same result at any scale.

The layout and the routing policy are pure and tested on hand-worked cases; the integration
tests run the real recipe under ``torchrun`` on CPU (gloo). Runs with more processes than
proxies go through ``tests/nccl_like_launch.py``: its default group is ``cuda:gloo``, which
refuses host tensors as NCCL does, so any collective that sends a host tensor to the default
group fails the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_memfree import MemFree, MemFreeConfig
from sd_memfree.collectives import ProcessLayout, check_spread, route
from sd_memfree.method.losses import masked_mean

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "train_scripts" / "train_sd_ietagc.py")
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# -- the layout and the routing: pure ---------------------------------------------------------

def test_layout_of_eight_processes_over_four_proxies():
    """K=4, W=8: D=2; ranks 4,5 train proxy 2; rank 5 is data rank 1; its merge group is the data
    rank 1 of every proxy group (1, 3, 5, 7); a local step is 4 proxy steps."""
    lay = ProcessLayout(4, 8, 5)
    assert (lay.num_groups, lay.group_size, lay.group, lay.data_rank) == (4, 2, 2, 1)
    assert lay.local_proxies == [2] and lay.step_unit == 4
    assert lay.ranks("data") == [4, 5] and lay.ranks("merge") == [1, 3, 5, 7] and lay.ranks("world") == list(range(8))
    assert lay.all_ranks("data") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.all_ranks("merge") == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_layout_with_fewer_processes_than_proxies_and_with_one_proxy():
    """K=4, W=2: process 1 trains proxies 1 and 3 in turn, alone (D=1). K=1, W=4: plain data
    parallelism, rank 2 takes slice 2 of 4, nothing to merge."""
    lay = ProcessLayout(4, 2, 1)
    assert (lay.group_size, lay.local_proxies, lay.step_unit, lay.ranks("data"), lay.ranks("merge")) == (1, [1, 3], 2, [1], [0, 1])
    lay = ProcessLayout(1, 4, 2)
    assert (lay.group_size, lay.data_rank, lay.local_proxies, lay.step_unit, lay.ranks("merge")) == (4, 2, [0], 1, [2])


def test_a_process_count_that_neither_divides_nor_is_a_multiple_gets_one_line():
    with pytest.raises(ValueError) as e:
        check_spread(4, 6)
    assert str(e.value) == ("--num_shards=4 cannot be spread over 6 processes: launch a number of processes that divides 4 or "
                            "is a multiple of it (1, 2, 4, 8, 12, 16, ...), or use --num_shards=6")
    for k, w in ((4, 8), (4, 2), (1, 16), (3, 3)):
        check_spread(k, w)


def test_host_tensors_go_to_the_host_group_when_the_default_backend_cannot_reduce_them():
    """NCCL ("cuda:nccl"): device tensors to the default group, host tensors to the gloo twin;
    a backend that serves both ("cpu:gloo,cuda:nccl") takes both."""
    nccl = {"cuda"}
    assert route("cuda", nccl) == "default" and route("cpu", nccl) == "host"
    assert route("cpu", {"cpu", "cuda"}) == "default" and route("cuda", {"cpu", "cuda"}) == "default"


def test_no_torch_distributed_reduction_outside_the_collectives_module():
    """Only sd_memfree/collectives.py calls torch.distributed's collectives (or accelerate's, which
    use the default group); the library and the recipes go through it. Calls are found in the
    syntax tree, so docstrings that name them do not count."""
    import ast

    names = {"all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "broadcast_object_list", "reduce_scatter",
             "barrier", "new_group", "gather", "reduce", "wait_for_everyone", "main_process_first", "monitored_barrier"}
    owners = {"dist", "distributed", "accelerator", "state", "PartialState"}
    offenders = []
    for path in [*(REPO / "sd_memfree").rglob("*.py"), *(REPO / "train_scripts").glob("*.py")]:
        if path.name == "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names:
                owner = node.func.value
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if name in owners:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: .{node.func.attr}(")
            if isinstance(node, ast.ImportFrom) and node.module and "accelerate.utils" in node.module:
                offenders += [f"{path.relative_to(REPO)}:{node.lineno}: {a.name}" for a in node.names if a.name in names | {"broadcast_object_list", "gather_object"}]
    assert not offenders, "\n".join(offenders)


def _collectives_worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from sd_memfree.collectives import Collectives, ProcessLayout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("cuda:gloo", rank=rank, world_size=4)  # refuses host tensors, as NCCL does
    try:
        raw = "accepted"
        try:
            dist.all_reduce(torch.ones(1))
        except RuntimeError as e:
            raw = str(e).splitlines()[0]
        c = Collectives(ProcessLayout(2, 4, rank))
        world = c.all_reduce(torch.tensor([rank + 1.0])).item()
        data = c.all_gather(torch.tensor([[rank]]), over="data").flatten().tolist()
        merge = c.all_reduce(torch.tensor([float(rank)]), over="merge").item()
        flag = c.all_reduce(torch.tensor([rank == 3]).long(), op="max").item()
        c.barrier()
        with c.main_process_first():
            pass
        results[rank] = (raw, world, data, merge, flag, c.broadcast_object({"from": rank}), c.group("data", "cpu") is not None)
    finally:
        dist.destroy_process_group()


def test_every_collective_takes_host_tensors_past_an_nccl_like_default_group():
    """4 processes, K=2 (D=2), default group ``cuda:gloo``: a raw all-reduce of a host tensor is
    refused with NCCL's error, while every ``Collectives`` call goes through: world sum 1+2+3+4=10,
    the data group of ranks (0,1) / (2,3) gathers in rank order, the merge groups (0,2) / (1,3) sum
    to 2 / 4, a max, a barrier, main-process-first and rank 0's object everywhere."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_collectives_worker, args=(free_port(), results), nprocs=4, join=True)
    for rank in range(4):
        raw, world, data, merge, flag, obj, host_group = results[rank]
        assert raw == "No backend type associated with device type cpu"
        assert world == 10 and data == ([0, 1] if rank < 2 else [2, 3]) and merge == (2 if rank % 2 == 0 else 4)
        assert flag == 1 and obj == {"from": 0} and host_group


# -- a proxy's draws and loss do not depend on how many processes share it ---------------------

class _NoCollectives:
    """MemFree's draws need no process group: a stand-in for a process that is not alone."""


def test_each_process_draws_its_slice_of_the_proxy_batch():
    """K=1 over W=2, rank 1, local batch 2: the stream draws the whole micro-batch of 4 and rank 1
    takes rows 2-3, exactly what one process with batch 4 draws there (seed 7 -> stream 7000)."""
    m = MemFree(MemFreeConfig(), num_samples=8, num_train_timesteps=10, max_train_steps=4, seed=7, rank=1, world_size=2,
                collectives=_NoCollectives())
    g = torch.Generator().manual_seed(7000)
    expected_noise = torch.randn((4, 3), generator=g)[2:4]
    expected_t = torch.randint(0, 10, (4,), generator=g)[2:4]
    assert torch.equal(m.randn((2, 3)), expected_noise) and torch.equal(m.randint(0, 10, (2,)), expected_t)
    single = MemFree(MemFreeConfig(), num_samples=8, num_train_timesteps=10, max_train_steps=4, seed=7)
    g = torch.Generator().manual_seed(7000)
    assert torch.equal(single.randn((4, 3)), torch.randn((4, 3), generator=g))


def test_a_slice_divides_by_its_share_of_the_micro_batch_kept_count():
    """Micro-batch losses [1, 2 | 3, 5] on two processes, AGC keeps 1, 3, 5 (3 kept): the masked
    mean is 9/3 = 3. Each process divides its kept sum by 3/2: (1)/1.5 and (3+5)/1.5, whose
    average (what DDP does to gradients) is 9/3 = 3."""
    keep = torch.tensor([True, False]), torch.tensor([True, True])
    share = torch.tensor(3.0) / 2
    a = masked_mean(torch.tensor([1.0, 2.0]), keep[0], denominator=share)
    b = masked_mean(torch.tensor([3.0, 5.0]), keep[1], denominator=share)
    assert a.item() == pytest.approx(1 / 1.5) and b.item() == pytest.approx(8 / 1.5)
    assert ((a + b) / 2).item() == pytest.approx(masked_mean(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([True, False, True, True])).item())


# -- the real recipe at several scales -----------------------------------------------------------

@pytest.fixture(scope="module")
def model20(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a 20-timestep scheduler, so AGC's loss banks fill in a few steps."""
    d = tmp_path_factory.mktemp("model20-scale") / "m"
    shutil.copytree(tiny_model_dir, d)
    cfg_path = d / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "num_train_timesteps": 20}))
    return d


def run_args(model, data, out, *extra, batch, steps=8):
    """The run compared at several scales. ``--adam_epsilon=1e-4``: a bias in front of a GroupNorm
    has a gradient that is zero but for round-off (~1e-10), and AdamW with its default epsilon
    turns that noise into steps of +-lr, so two correct runs would differ by lr wherever
    round-off differs; with epsilon above the noise they agree to round-off."""
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={out}",
            "--resolution=32", f"--train_batch_size={batch}", f"--max_train_steps={steps}", "--learning_rate=1e-3",
            "--adam_epsilon=1e-4", "--lr_warmup_steps=0", "--seed=3", "--report_to=none", "--checkpointing_steps=4", *extra]


def launch(nproc: int, argv: list[str], nccl_like: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc`` of the SD recipe (the default group
    ``cuda:gloo`` with ``nccl_like``); 1 process runs without torchrun."""
    if nproc == 1:
        cmd = [sys.executable, SCRIPT, *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *([str(REPO / "tests" / "nccl_like_launch.py")] if nccl_like else []), SCRIPT, *argv]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(argv: list[str], nnodes: int = 2, nproc: int = 2, nccl_like: bool = True, logs: Path | None = None) -> list[subprocess.Popen]:
    """``nnodes`` torchrun launches on this machine, as on ``nnodes`` machines: static rendezvous
    on 127.0.0.1 (node 0's launcher hosts the store). Output goes to pipes, or with ``logs`` to
    files ``logs/node<r>.err`` (a long run must not block on a full pipe nobody reads)."""
    port = free_port()
    procs = []
    for node in range(nnodes):
        out = subprocess.PIPE if logs is None else open(logs / f"node{node}.out", "w")
        err = subprocess.PIPE if logs is None else open(logs / f"node{node}.err", "w")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
               *([str(REPO / "tests" / "nccl_like_launch.py")] if nccl_like else []), SCRIPT, *argv]
        procs.append(subprocess.Popen(cmd, env=ENV, stdout=out, stderr=err, text=True))
    return procs


def signal_tree(pid: int, sig: int) -> None:
    """``sig`` to a launcher and every process under it (torchrun starts its workers in sessions
    of their own, so its process group does not hold them)."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def weights(out: Path, lora: bool) -> dict:
    return load_file(out / ("pytorch_lora_weights.safetensors" if lora else "unet/diffusion_pytorch_model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


METHOD = ["--num_shards=2", "--merge_every=2", "--agc_ratio=1.02", "--agc_ema=0.1", "--redistribute_fraction=0.5",
          "--loss_aware_augmentation"]


@pytest.mark.multiprocess
@pytest.mark.parametrize(("lora", "redistribute_at"), [(False, "mid_round"), (True, "merge")], ids=["full-mid_round", "lora-merge"])
def test_four_processes_two_per_proxy_equal_two_processes_with_twice_the_batch(model20, tiny_data_dir, tmp_path, lora, redistribute_at):
    """K=2 with AGC, redistribution and loss-aware augmentation, 8 steps: 4 processes of batch 1
    (two per proxy, DDP inside each pair, default group NCCL-like; for LoRA as two torchrun
    nodes of two) give the weights of 2 processes of batch 2, to float round-off (the pair's
    gradient is the mean of two halves). Both agree on the shard moves, and the 4-process
    checkpoint resumes to its own end bit for bit."""
    extra = [*METHOD, f"--redistribute_at={redistribute_at}", *(["--use_lora", "--rank=4"] if lora else [])]
    four, two = tmp_path / "four", tmp_path / "two"
    if lora:  # as two nodes of two processes: one process group over both launches
        nodes = start_nodes(run_args(model20, tiny_data_dir, four, *extra, batch=1))
        for node in nodes:
            _, err = node.communicate(timeout=900)
            assert node.returncode == 0, err[-4000:]
    else:
        launch(4, run_args(model20, tiny_data_dir, four, *extra, batch=1), nccl_like=True)
    launch(2, run_args(model20, tiny_data_dir, two, *extra, batch=2))
    assert max_difference(weights(four, lora), weights(two, lora)) <= 1e-5
    moves = [json.loads((d / "memfree_state.json").read_text())["moves"] for d in (four, two)]
    assert moves[0] == moves[1] and (moves[0] or lora)  # the LoRA runs skip nothing in 8 steps: nothing to move
    if not lora:  # resume on the same W from checkpoint-4 (a merge and a redistribution behind it): bit-identical
        resumed = tmp_path / "resumed"
        launch(4, run_args(model20, tiny_data_dir, resumed, *extra, f"--resume_from_checkpoint={four / 'checkpoint-4'}", batch=1),
               nccl_like=True)
        assert max_difference(weights(resumed, lora), weights(four, lora)) == 0.0


@pytest.mark.multiprocess
def test_one_proxy_on_four_processes_equals_one_process_with_the_whole_batch(model20, tiny_data_dir, tmp_path):
    """K=1 (plain data parallelism) with AGC and augmentation: 4 processes of batch 1 (NCCL-like
    default group) == 1 process of batch 4 to float round-off: the one noise stream draws the
    whole batch and each process takes its slice; a resume on 2 processes stops with one line."""
    extra = ["--agc_ratio=1.02", "--agc_ema=0.1", "--loss_aware_augmentation"]
    four, one = tmp_path / "four", tmp_path / "one"
    launch(4, run_args(model20, tiny_data_dir, four, *extra, batch=1), nccl_like=True)
    launch(1, run_args(model20, tiny_data_dir, one, *extra, batch=4))
    assert max_difference(weights(four, False), weights(one, False)) <= 1e-5
    skips = [json.loads((d / "memfree_skip_counts.json").read_text()) for d in (four, one)]
    assert skips[0] == skips[1]
    other = tmp_path / "other"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
                           *run_args(model20, tiny_data_dir, other, *extra, f"--resume_from_checkpoint={four / 'checkpoint-4'}", batch=1)],
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0  # torchrun exits 1 whatever its workers' codes (2 here)
    # Both workers print the line into one pipe, so the two can run together on one line.
    line = f"error: checkpoint {four / 'checkpoint-4'} was written by 4 processes but this run has 2; resume with --num_processes 4."
    assert proc.stderr.count(line) == 2, proc.stderr[-3000:]
    assert not [x for x in proc.stderr.splitlines() if x.startswith("error:") and line not in x]
    assert not other.exists() or not any(other.iterdir())


# -- a lost process or node --------------------------------------------------------------------

def test_stall_watch_speaks_once_and_exits_after_its_seconds_without_a_beat(tmp_path):
    """A loop that beats for 1 s then hangs (as in a collective whose peer froze): the watch
    prints its one line and ends the process with exit 1 about 2 s after the last beat; the
    release callback ran first; a paused block of 3 s is not a stall."""
    script = tmp_path / "hang.py"
    script.write_text(
        "import sys, time\n"
        "from sd_memfree.run.stopping import StallWatch\n"
        "w = StallWatch(2.0, lambda: 'no step for 2 s', on_expire=lambda: print('released', flush=True), poll=0.1)\n"
        "for _ in range(5):\n    w.beat(); time.sleep(0.2)\n"
        "with w.paused():\n    time.sleep(3)\n"
        "w.beat(); print('hanging', flush=True); time.sleep(60)\n")
    import time

    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == "error: no step for 2 s"
    assert proc.stdout.split() == ["hanging", "released"] and 5 < elapsed < 20


@pytest.mark.multiprocess
def test_a_frozen_node_stops_the_other_within_the_collective_timeout(model20, tiny_data_dir, tmp_path):
    """Two nodes of one process (K=2), --collective_timeout 5: once checkpoint-50 exists, node 1
    is frozen as a whole (SIGSTOP to its launcher and worker: connections stay open, nothing
    answers). Node 0's worker waits in its next collective (a merge every 2 steps, a stop check
    every 10; the next checkpoint, whose barrier the backends' timeout bounds instead, is 50 steps
    away) and exits with the stall watch's line naming the step and the newest checkpoint, well
    before the backends' own 10-30 minutes."""
    import signal
    import time

    out = tmp_path / "run"
    argv = run_args(model20, tiny_data_dir, out, "--num_shards=2", "--merge_every=2", "--collective_timeout=5",
                    "--checkpointing_steps=50", batch=1, steps=4000)
    nodes = start_nodes(argv, nproc=1, nccl_like=False, logs=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("checkpoint-*")) and time.monotonic() < deadline:
            assert all(n.poll() is None for n in nodes), (tmp_path / "node0.err").read_text()[-3000:]
            time.sleep(0.2)
        signal_tree(nodes[1].pid, signal.SIGSTOP)
        frozen = time.monotonic()
        nodes[0].wait(timeout=120)
        waited = time.monotonic() - frozen
    finally:
        for n in nodes:
            signal_tree(n.pid, signal.SIGCONT)
            signal_tree(n.pid, signal.SIGKILL)
    err = (tmp_path / "node0.err").read_text()
    lines = [line for line in err.splitlines() if line.startswith("error: another process or node stopped answering")]
    assert len(lines) == 1, err[-3000:]
    assert "no optimizer step for 5 s (--collective_timeout)" in lines[0] and "this process waited after step " in lines[0]
    assert f"newest checkpoint: {out}/checkpoint-" in lines[0] and lines[0].endswith("--resume_from_checkpoint latest once all nodes are back.")
    assert waited < 60


def test_sharded_engines_are_refused_with_one_line():
    """DeepSpeed / FSDP / Megatron shard what a proxy must hold whole: refused before anything
    loads, naming the engine and what to use instead; plain multi-GPU (DDP) and CPU pass."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from sd_memfree.collectives import refuse_sharded_engines

    for kind, name in ((DistributedType.DEEPSPEED, "DEEPSPEED"), (DistributedType.FSDP, "FSDP")):
        with pytest.raises(ValueError) as e:
            refuse_sharded_engines(SimpleNamespace(distributed_type=kind))
        assert str(e.value).startswith(f"accelerate is configured for {name}, which sd_memfree does not support")
        assert "choose multi-GPU (DDP)" in str(e.value) and "\n" not in str(e.value)
    for kind in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.NO):
        refuse_sharded_engines(SimpleNamespace(distributed_type=kind))
