#!/usr/bin/env python
"""GPU check: what only a GPU can tell about IET-AGC / IET-AGC+ training (issues 13, 18).

One command, no downloads, a hard time budget. On one CUDA device it measures, for an SD-1.5
sized UNet (built from runwayml/stable-diffusion-v1-5's UNet config, random weights, ~860M
parameters) at 512 px (64x64 latents), batch 4:

- full fine-tuning and LoRA, plain vs IET-AGC (``--num_shards 4 --agc_ratio 1.25``) vs IET-AGC+
  (``+ --redistribute_fraction 0.25 --loss_aware_augmentation``, mid-round redistribution), in
  fp16 and bf16 mixed precision (accelerate's: fp32 master weights + autocast for full
  fine-tuning, GradScaler for fp16; frozen half-precision base + fp32 LoRA tensors for LoRA):
  the steady-state steps/s ratio of each method to plain, measured side by side, and
  ``torch.cuda.max_memory_allocated`` over each configuration, and its ratio to plain;
- the turn-boundary costs of K=4 proxies as the product pays them: every ``memfree.step()`` that
  ends a turn (pause, turn end, merge, redistribution, the next proxy's optimizer-state swap),
  with its ``ProxySet`` calls broken out, against one optimizer step, and the steps/s ratio
  amortised over a round at ``--merge_every`` 2000 (the default) and 500;
- xformers attention where it imports and works, else PyTorch SDPA (recorded);
- the CUDA-only tests (``pytest -m gpu``), their summary line.

What drives the training: ``sd_memfree.MemFree`` itself, through the calls of docs/plugin.md
(``prepare``, ``batch_sampler``, ``randn``/``randint``, ``reduce``, ``step``, ``logs``,
``end_training``), in a loop whose body is ``train_scripts/train_sd_ietagc.py``'s (``Trainer``),
so the figures are the product's: its round schedule decides the turns, merges and
redistributions. Not the training script itself: loading and saving a 4 GB pipeline per
configuration does not fit the budget. The VAE and the CLIP text encoder are real-shape modules
built from their SD-1.5 configs (random weights) and run every step, as in the script; the sample
ids come from ``MemFree``'s batch sampler, the pixels are random host tensors of the real shape
(the CPU-side data pipeline, and IET-AGC+'s RandAugment in it, is timed separately per image).

Timing: ``torch.cuda.synchronize`` around every timed region. plain runs alone: warm-up steps,
then a steady-state window (its step time and peak memory). A method runs alone for
``MEASURED_ROUNDS`` rounds at ``--measured_merge_every`` steps per proxy, each turn-ending
``memfree.step()`` timed on its own (``EventTimer``): the first round pays once-per-run costs
(pinning host memory for stashes), the second is the steady round whose events every later
round repeats. Then, per precision and mode, plain and the method configurations are built side
by side in this process (each with its own ``MemFree`` at ``--merge_every`` 2000, so no turn ends
in the windows) and short steady-state windows of each alternate (``run_interleaved``): the
steps/s ratio is the median over rounds of within-round ratios. Why: on the H200 machine the
same configuration measured in two windows a minute apart differed by 10-20%, so a ratio of
separate windows is noise.

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json --max_seconds 280
    python benchmarks/gpu_check.py --dry_run --out /tmp/gpu_check.json   # tiny model, CPU, ~2 min

The JSON (every figure) is rewritten after each configuration, so a run cut short keeps what it
measured; the last line printed is the same JSON. A human-readable log goes to ``--log``
(default: the ``--out`` path with ``.log``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Modules the check imports (import name -> pip name); a missing one stops the run before any work.
REQUIRED = {"torch": "torch", "torchvision": "torchvision", "diffusers": "diffusers", "transformers": "transformers",
            "accelerate": "accelerate", "peft": "peft", "safetensors": "safetensors", "PIL": "Pillow", "numpy": "numpy"}

# The method's settings as the training script's flags (parsed by MemFreeConfig, so they are
# validated exactly as the script validates them).
CONFIG_FLAGS = {
    "plain": [],
    "iet_agc": ["--num_shards=4", "--agc_ratio=1.25"],
    "iet_agc_plus": ["--num_shards=4", "--agc_ratio=1.25", "--redistribute_fraction=0.25", "--loss_aware_augmentation"],
}
PRECISIONS = ("bf16", "fp16")
MODES = ("full", "lora")
GOAL_TIME_RATIO = 0.97  # IET-AGC and IET-AGC+ (K=4, full) steady-state steps/s over plain (issues 13, 18)
GOAL_MEMORY_RATIO = 1.10  # IET-AGC (K=4, full) peak GPU memory over plain
AMORTISE_MERGE_EVERY = (2000, 500)  # --merge_every values the round overhead is spread over
MEASURED_ROUNDS = 3  # rounds a method configuration runs: the first pays once-per-run costs, the second is the steady round
LOG_EVERY = 10  # as the training script: host reads for logging every 10 optimizer steps

# runwayml/stable-diffusion-v1-5: unet/config.json, vae/config.json, text_encoder/config.json
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2,
    pad_token_id=1,
)
# --dry_run: the same block types at toy widths (VAE with 2 blocks: latents are pixels / 2).
TINY_UNET = dict(SD15_UNET, sample_size=16, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=4)
TINY_VAE = dict(SD15_VAE, block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32)
TINY_TEXT = dict(SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, prediction_type="epsilon", steps_offset=1)


ALARM_GRACE_S = 15  # a configuration still running this long after --max_seconds is stopped


class BudgetExceeded(Exception):
    """Raised by the SIGALRM safety net when a configuration runs far past --max_seconds."""


@contextlib.contextmanager
def budget_alarm(seconds: float):
    """Raise BudgetExceeded in this (main) thread after ``seconds``: a hung configuration still
    leaves the JSON of the others. No-op where there is no SIGALRM."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def _alarm(signum, frame):
        raise BudgetExceeded(f"a configuration ran more than {ALARM_GRACE_S}s past --max_seconds; stopped")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- recording ------------------------------------------------------------------------------------


class Report:
    """The JSON of every figure (rewritten atomically after each change) and a readable log."""

    def __init__(self, out: Path, log: Path) -> None:
        self.out, self.log_path = out, log
        out.parent.mkdir(parents=True, exist_ok=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "w", encoding="utf-8")
        self.data: dict = {"script": "benchmarks/gpu_check.py", "complete": False, "errors": [], "skipped": []}
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():7.1f}s] {msg}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        tmp = self.out.with_name(self.out.name + ".partial")
        tmp.write_text(json.dumps(self.data, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, self.out)

    def close(self) -> None:
        self._log.close()


def check_dependencies(proxyset_only: bool = False) -> list[str]:
    """Pip names of the required packages that do not import (import errors are named too)."""
    missing = []
    for module, pip_name in REQUIRED.items():
        if proxyset_only and module != "torch":
            continue
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - a broken install is as missing as an absent one
            missing.append(f"{pip_name} ({type(e).__name__}: {e})")
    try:
        importlib.import_module("sd_memfree.memfree")
    except Exception as e:  # noqa: BLE001
        missing.append(f"sd_memfree from {REPO} ({type(e).__name__}: {e})")
    return missing


def wheel_requirements() -> list[str]:
    """``name==version`` of every installed distribution the check needs besides torch: the
    dependency closure of diffusers, transformers, accelerate, peft and pytest, without torch,
    torchvision, triton, the nvidia-* runtime wheels and numpy (they come with a torch install).
    For ``pip download`` on a machine with a network, to install offline where there is none."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    skip = {"torch", "torchvision", "triton", "numpy"}
    todo = ["diffusers", "transformers", "accelerate", "peft", "safetensors", "Pillow", "pytest", "pytest-timeout"]
    found: dict[str, str] = {}
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in found or key in skip or key.startswith("nvidia-"):
            continue
        dist = md.distribution(name)
        found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return [f"{k}=={v}" for k, v in sorted(found.items())]


def environment(device) -> dict:
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "device": str(device)}
    for name in ("diffusers", "transformers", "accelerate", "peft", "xformers"):
        try:
            env[name] = importlib.import_module(name).__version__
        except Exception as e:  # noqa: BLE001
            env[name] = f"not importable ({type(e).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(torch_threads=torch.get_num_threads(), gpu=props.name, gpu_memory_bytes=props.total_memory, cudnn=torch.backends.cudnn.version(),
                   capability=f"{props.major}.{props.minor}")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip()
        except Exception:  # noqa: BLE001
            pass
    return env


# -- the CUDA-only tests --------------------------------------------------------------------------


def run_gpu_tests(timeout: float) -> dict:
    """``pytest -m gpu`` on the test files that hold gpu-marked tests, in a subprocess.

    Only those files are collected, so a test module that needs a package this machine lacks
    (unrelated to the GPU tests) cannot stop the run. ``addopts`` is cleared because it names
    ``--timeout`` (pytest-timeout), which a bare machine may not have.
    """
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text(encoding="utf-8"))
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider", "-o", "addopts=", *files]
    res = {"command": " ".join(cmd[1:]), "files": files}
    try:
        importlib.import_module("pytest")
    except ImportError:
        return {**res, "summary": "not run: pytest is not installed", "rc": None}
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**res, "summary": f"timed out after {timeout:.0f}s", "rc": None, "seconds": round(time.perf_counter() - t0, 1)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if re.search(r"\b(passed|failed|skipped|deselected|error|no tests ran)\b", ln)), "")
    outcomes = [ln for ln in lines if re.match(r"^(PASSED|FAILED|SKIPPED|ERROR)\b", ln)]
    failures = proc.stdout[-4000:] if proc.returncode not in (0, 5) else ""
    return {**res, "summary": summary.strip("= "), "rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "outcomes": outcomes, "failure_output": failures}


# -- models -----------------------------------------------------------------------------------------


def build_unet(spec: dict, device, seed: int):
    """The UNet from its config with seeded random weights, created directly on ``device`` in fp32."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**spec)
    return unet


def build_encoders(vae_spec: dict, text_spec: dict, device, dtype, seed: int):
    """Frozen VAE and CLIP text encoder of the given configs, on ``device`` in ``dtype`` (as the script)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed + 1)
    with torch.device(device):
        vae = AutoencoderKL(**vae_spec)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_spec))
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    return vae.to(device, dtype=dtype), text_encoder.to(device, dtype=dtype)


def setup_attention(unet, want: str) -> str:
    """xformers if wanted and working, else the default processor (SDPA with torch 2). Returns its name."""
    if want in ("auto", "xformers"):
        from diffusers.utils.import_utils import is_xformers_available

        if is_xformers_available():
            try:
                unet.enable_xformers_memory_efficient_attention()
            except Exception as e:  # noqa: BLE001 - e.g. an xformers build for another torch
                if want == "xformers":
                    raise
                return f"sdpa (xformers failed: {type(e).__name__}: {str(e)[:200]})"
        elif want == "xformers":
            raise RuntimeError("--attention xformers: xformers is not available; use --attention auto or sdpa.")
    names = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    return ",".join(names)


def reset_accelerate() -> None:
    """accelerate's state is a process-wide singleton; each configuration sets its own precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def free_device_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# -- driving MemFree ----------------------------------------------------------------------------------


class EventTimer:
    """Times what ``MemFree.step()`` does at turn boundaries, without changing what it does.

    On a step whose schedule event ends a turn (``memfree.schedule.after_step``, a pure function
    of the step count, read before the call), ``step`` is called between two
    ``torch.cuda.synchronize``: that is the cost the product's loop pays there (turn end or pause,
    merge, redistribution, the next proxy's optimizer-state swap). For the breakdown, the live
    ``ProxySet``'s ``begin_turn`` / ``pause_turn`` / ``end_turn`` / ``merge`` are wrapped on the
    instance: during a timed call each is timed between synchronisations too, then the real
    method runs unchanged; a redistribution is what the call took beyond its ``ProxySet`` calls.
    Steps without an event call ``memfree.step()`` untouched (it only counts).
    """

    PARTS = ("begin_turn", "pause_turn", "end_turn", "merge")

    def __init__(self, memfree, device) -> None:
        self.memfree, self.device = memfree, device
        self.events: list[dict] = []
        self._parts: list | None = None
        if memfree.proxies is not None:
            for name in self.PARTS:
                setattr(memfree.proxies, name, self._wrap(name, getattr(memfree.proxies, name)))

    def _wrap(self, name: str, method):
        def timed_call(*args, **kwargs):
            if self._parts is None:
                return method(*args, **kwargs)
            sync(self.device)
            t0 = time.perf_counter()
            out = method(*args, **kwargs)
            sync(self.device)
            self._parts.append([name, round(time.perf_counter() - t0, 5)])
            return out

        return timed_call

    def due(self) -> bool:
        """The next ``memfree.step()`` ends a turn (so it swaps, merges or redistributes)."""
        memfree = self.memfree
        return memfree.proxies is not None and not memfree.done and memfree.schedule.after_step(memfree.local_step).turn_ends

    def step(self, timed: bool):
        """``memfree.step()``; when ``timed``, recorded as an event with its parts."""
        memfree = self.memfree
        if not timed:
            return memfree.step()
        pos = memfree.schedule.position(memfree.local_step)
        sync(self.device)
        self._parts = []
        t0 = time.perf_counter()
        try:
            events = memfree.step()
            sync(self.device)
        finally:
            parts, self._parts = self._parts, None
        seconds = time.perf_counter() - t0
        record = {"step": memfree.local_step, "round": pos.round, "proxy": pos.proxy, "s": round(seconds, 5), "parts": parts,
                  "merged": events.merged, "redistributed": events.redistributed}
        if events.redistributed:
            record["redistribute_s"] = round(max(0.0, seconds - sum(p[1] for p in parts)), 5)
        self.events.append(record)
        return events


def method_config(name: str, merge_every: int):
    """``MemFreeConfig`` of a configuration, parsed from the training script's flags (so it is
    validated exactly as the script validates it)."""
    from sd_memfree.config import MemFreeConfig

    parser = argparse.ArgumentParser()
    MemFreeConfig.add_arguments(parser)
    return MemFreeConfig.from_args(parser.parse_args(CONFIG_FLAGS[name] + [f"--merge_every={merge_every}"]))


class Trainer:
    """One configuration trained through ``sd_memfree.MemFree``, as train_sd_ietagc.py trains.

    The setup and the loop body are the training script's (docs/plugin.md's calls): ``MemFree``
    with the configuration's flags, the LR scheduler over ``memfree.lr_schedule_steps``,
    ``memfree.prepare(unet, optimizer, lr_scheduler)``, per micro-batch the VAE sample, noise and
    timesteps drawn through ``memfree.randn`` / ``randint``, ``memfree.reduce``, accelerate's
    backward / clip / optimizer step, the LR scheduler stepped unless fp16 loss scaling skipped
    the update, ``memfree.step()`` after it, ``memfree.logs()`` and the loss read every
    ``LOG_EVERY`` steps, ``memfree.end_training()`` at the end. The batches: the sample ids come
    from ``memfree.batch_sampler`` (the shard of the proxy that trains, renewed after a
    redistribution), the pixels and token ids from host tensors held here (no image decoding in
    the timing; IET-AGC+'s RandAugment is timed on its own, ``augment_cost``).

    ``reset=False`` keeps accelerate's process-wide state, so that several configurations of the
    same precision can live side by side in one process (``run_interleaved``): each has its own
    ``Accelerator`` (own GradScaler), model, optimizer and ``MemFree``.
    """

    def __init__(self, ctx: dict, precision: str, mode: str, name: str, merge_every: int, max_train_steps: int,
                 reset: bool = True) -> None:
        import torch
        from accelerate import Accelerator
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        from sd_memfree import MemFree
        from sd_memfree.trainable import add_lora, trainable_parameters, upcast_trainable_

        a = ctx["args"]
        self.a, self.device, self.name = a, ctx["device"], name
        device = self.device
        self.mf = method_config(name, merge_every)
        use_lora = mode == "lora"
        if reset:
            reset_accelerate()
        self.accelerator = accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        self.vae, self.text_encoder = ctx["encoders"]
        self.noise_scheduler = DDPMScheduler(**SCHEDULER)
        T = self.noise_scheduler.config.num_train_timesteps
        # storage_device as the script: CPU memory for full fine-tuning, the device for LoRA.
        self.memfree = memfree = MemFree(self.mf, num_samples=a.num_samples, num_train_timesteps=T, max_train_steps=max_train_steps,
                                         seed=a.seed, accelerator=accelerator, storage_device=device if use_lora else "cpu")
        unet = build_unet(ctx["unet_spec"], device, a.seed)
        if use_lora:
            unet.to(device, dtype=self.weight_dtype)  # frozen base in half precision, as upstream
            add_lora(unet, a.rank)
            if accelerator.mixed_precision in ("fp16", "bf16"):
                upcast_trainable_(unet)
        else:
            unet.train()
        self.attention = setup_attention(unet, a.attention)
        self.params = trainable_parameters(unet)
        optimizer = torch.optim.AdamW(self.params, lr=1e-4 if use_lora else 1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_training_steps=memfree.lr_schedule_steps)
        self.unet, self.optimizer, self.lr_scheduler, _ = memfree.prepare(unet, optimizer, lr_scheduler)
        self.unet.train()
        self.sampler = memfree.batch_sampler(a.batch_size)
        self.batches = iter(self.sampler)
        self.host_pixels, self.host_ids = ctx["host_pixels"], ctx["host_input_ids"]
        self.timer = EventTimer(memfree, device)
        self.loss_sum = torch.zeros((), device=device)
        self.loss_count = 0
        self.micro_steps = 0  # which held host batch feeds the next micro-step
        self.skipped = 0  # fp16: GradScaler found inf/NaN gradients and skipped the update
        self.last_logs: dict = {}
        self.report = None

    def train_part(self) -> None:
        """One iteration of the script's loop up to ``lr_scheduler.step()`` (gradient
        accumulation 1): the batch, the draws, forward, ``memfree.reduce``, backward, clip, step."""
        import torch

        from sd_memfree.method.losses import per_sample_loss

        memfree, accelerator, device = self.memfree, self.accelerator, self.device
        keys = next(self.batches)  # [(sample_id, aug_seed)] from the live proxy's shard
        j = self.micro_steps % len(self.host_pixels)
        self.micro_steps += 1
        with accelerator.accumulate(self.unet):
            pixel_values = self.host_pixels[j].to(device, dtype=self.weight_dtype, non_blocking=True)
            input_ids = self.host_ids[j].to(device, non_blocking=True)
            sample_ids = torch.tensor([k[0] for k in keys]).to(device, non_blocking=True)
            with torch.no_grad():
                posterior = self.vae.encode(pixel_values).latent_dist
                latents = (posterior.mean + posterior.std * memfree.randn(posterior.mean.shape, dtype=posterior.mean.dtype)) \
                    * self.vae.config.scaling_factor
                encoder_hidden_states = self.text_encoder(input_ids, return_dict=False)[0]
            noise = memfree.randn(latents.shape, dtype=latents.dtype)
            timesteps = memfree.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
            noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
            with accelerator.autocast():
                model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = memfree.reduce(per_sample_loss(model_pred, noise), timesteps, sample_ids)
            self.loss_sum.add_(loss.detach())
            self.loss_count += 1
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if accelerator.optimizer_step_was_skipped:  # the LR waits, as upstream's prepared scheduler
            self.skipped += 1
        else:
            self.lr_scheduler.step()

    def after_step(self, timed: bool = False):
        """The rest of the iteration: ``memfree.step()`` (an ``EventTimer`` event when ``timed``),
        a new sampler iterator after a redistribution, the logging reads every ``LOG_EVERY``
        steps. Returns ``memfree.step()``'s ``StepEvents``."""
        memfree = self.memfree
        events = self.timer.step(timed)
        if events.reload_data:  # a redistribution: the sampler's next iterator draws from the new shards
            self.batches = iter(self.sampler)
        if memfree.local_step % LOG_EVERY == 0:  # the script's logging reads (host syncs)
            logs = {"train_loss": (self.loss_sum / max(1, self.loss_count)).item()}
            self.loss_sum.zero_()
            self.loss_count = 0
            for values in memfree.logs().values():
                logs.update(values)
            self.last_logs = logs
        return events

    def run_steps(self, n: int) -> None:
        """``n`` loop iterations (fewer if the budget ends first)."""
        for _ in range(n):
            if self.memfree.done:
                break
            self.train_part()
            self.after_step()

    def turn_ends(self, start: int, stop: int) -> int:
        """How many of the local steps ``start..stop-1`` ended a turn (read from the schedule
        afterwards, so the timed loop does no extra work)."""
        if self.memfree.proxies is None:
            return 0
        return sum(self.memfree.schedule.after_step(s).turn_ends for s in range(start, stop))

    def timed(self, fn, *args_) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        fn(*args_)
        sync(self.device)
        return time.perf_counter() - t0

    def run_rounds(self) -> list[dict]:
        """The whole budget, ``while not memfree.done``, then ``memfree.end_training()``: each
        turn-ending ``memfree.step()`` timed on its own (``EventTimer``), the steps between two
        of them timed as one segment, synchronised at both ends (a segment ends with the training
        part of the step whose ``memfree.step()`` is the event). Returns the segments."""
        memfree, segments = self.memfree, []
        while not memfree.done:
            pos = memfree.schedule.position(memfree.local_step)
            sync(self.device)
            t0, n = time.perf_counter(), 0
            while True:
                due = self.timer.due()
                self.train_part()
                n += 1
                if due or memfree.local_step + 1 >= memfree.local_steps:
                    sync(self.device)
                    segments.append({"round": pos.round, "proxy": pos.proxy, "steps": n, "s": round(time.perf_counter() - t0, 5)})
                    self.after_step(timed=due)
                    break
                self.after_step()
        self.report = memfree.end_training()
        return segments


def summarise_rounds(events: list[dict], segments: list[dict], K: int, H: int) -> dict:
    """The turn-boundary figures of a run of ``MEASURED_ROUNDS`` rounds (``EventTimer`` events).

    Round 1 pays the once-per-run costs (the first stash of each proxy's optimizer state and of
    each pause slot pins host memory); round 2 is the steady round: its events are what every
    later round costs, whatever ``--merge_every`` is (the events are the same, only the steps
    between them change), so ``round_overhead_s`` is the sum of round 2's ``memfree.step()``
    times, the next round's first swap included.
    """

    def parts(evs: list[dict], name: str) -> list[float]:
        return [p[1] for e in evs for p in e["parts"] if p[0] == name]

    first = [e for e in events if e["round"] == 0]
    steady = [e for e in events if e["round"] == 1]
    changes = [e["s"] for e in steady if not e["merged"] and not e["redistributed"]]
    redistributions = [e["redistribute_s"] for e in steady if e["redistributed"]]
    between = [s["s"] / s["steps"] for s in segments if s["round"] == 1]
    return {
        "num_proxies": K, "measured_merge_every": H, "rounds": MEASURED_ROUNDS, "events": events, "segments": segments,
        "end_turn_s": parts(events, "end_turn"), "pause_turn_s": parts(events, "pause_turn"),
        "begin_turn_first_s": parts(first, "begin_turn"),
        "begin_turn_s": round(statistics.median(parts(steady, "begin_turn")), 5),
        "turn_change_s": round(statistics.median(changes), 5),
        "first_merge_s": parts(first, "merge")[0], "merge_s": parts(steady, "merge")[0],
        "redistribute_s": round(statistics.median(redistributions), 5) if redistributions else None,
        "first_round_overhead_s": round(sum(e["s"] for e in first), 4),
        "round_overhead_s": round(sum(e["s"] for e in steady), 4),
        "step_s_between_events": round(statistics.median(between), 5) if between else None,
    }


def run_config(ctx: dict, precision: str, mode: str, name: str) -> dict:
    """Train one configuration alone through ``MemFree`` and time it; see the module docstring.

    plain: ``--warmup`` then ``--steps`` steady-state steps (the whole budget), peak memory.
    A method (K = 4): ``MEASURED_ROUNDS`` rounds at ``--measured_merge_every`` steps per proxy,
    every turn-ending ``memfree.step()`` timed (``EventTimer``), peak memory over all of it.
    Both end with ``memfree.end_training()``.
    """
    import torch

    a, device = ctx["args"], ctx["device"]
    K = method_config(name, 1).num_shards
    H = a.measured_merge_every
    if K == 1:
        t = Trainer(ctx, precision, mode, name, merge_every=AMORTISE_MERGE_EVERY[0], max_train_steps=a.warmup + a.steps)
    else:
        t = Trainer(ctx, precision, mode, name, merge_every=H, max_train_steps=MEASURED_ROUNDS * K * H)
    free_device_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    res: dict = {"flags": CONFIG_FLAGS[name], "attention": t.attention, "precision": t.accelerator.mixed_precision,
                 "grad_scaler": t.accelerator.scaler is not None, "trainable_params": sum(p.numel() for p in t.params),
                 "resident_bytes_before": resident, "local_steps": t.memfree.local_steps}
    t_cfg = time.perf_counter()
    if K == 1:
        warm = t.timed(t.run_steps, a.warmup)
        window = t.timed(t.run_steps, a.steps)
        res.update(warmup_s=round(warm, 4), window_s=round(window, 4), steps=a.steps, step_s=window / a.steps,
                   steps_per_s=a.steps / window)
        t.report = t.memfree.end_training()
    else:
        res.update(summarise_rounds(t.timer.events, t.run_rounds(), K, H))
        res["steps"] = t.memfree.local_step
    summary = t.report.summary
    res["num_merges"] = summary["num_merges"]
    if "agc/skip_rate" in summary:
        res["skip_rate"] = summary["agc/skip_rate"]
    if t.last_logs:
        res["last_logs"] = {k: round(v, 5) for k, v in t.last_logs.items()
                            if isinstance(v, (int, float)) and not k.startswith("agc/skip_rate_t")}
    if device.type == "cuda":
        res["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        res["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    res["host_rss_bytes"] = host_rss_bytes()
    res["config_s"] = round(time.perf_counter() - t_cfg, 2)
    res["skipped_optimizer_steps"] = t.skipped  # fp16: GradScaler found inf/NaN gradients
    return res


def run_interleaved(ctx: dict, precision: str, mode: str, names: list[str]) -> dict:
    """Steady-state steps/s of plain and the method side by side: the ratio the goals are about.

    Why: two runs of the *same* configuration measured minutes apart on the H200 machine differed
    by 10-20% in steady-state step time (fp16 full plain 167 vs 199 ms/step, bf16 LoRA plain 226 vs
    200 ms/step, docs/benchmarks.md), more than any method effect, so a ratio of two windows taken
    one after the other is noise. Here every configuration in ``names`` (``plain`` first) is built
    in this process as a ``Trainer`` (its own ``MemFree`` at the default ``--merge_every`` 2000),
    all of them warmed up, then short timed windows of ``--interleave_steps`` loop iterations of
    each alternate: plain, methods..., then the reverse order, and so on for
    ``--interleave_windows`` rounds (ABBA..., so a linear drift of the machine cancels). A ratio
    is formed within each round, where plain and method ran seconds apart; the median over rounds
    is the figure, min and max its spread. The windows hold no turn change (the first turn of
    2000 steps; ``turn_ends_in_windows`` says so): turn and merge costs are measured per
    configuration by ``run_config`` and amortised analytically. Memory: every configuration is
    resident at once (about 3 x 15 GB for full fine-tuning at SD-1.5 scale), so peak memory is
    measured by ``run_config``, not here.
    """
    a = ctx["args"]
    H = AMORTISE_MERGE_EVERY[0]
    needed = a.warmup + a.interleave_windows * a.interleave_steps
    trainers = {}
    for i, name in enumerate(names):
        K = method_config(name, 1).num_shards
        trainers[name] = Trainer(ctx, precision, mode, name, merge_every=H, max_train_steps=K * H * max(1, -(-needed // H)),
                                 reset=i == 0)
    for t in trainers.values():
        t.run_steps(a.warmup)
    n = a.interleave_steps
    step_s: dict[str, list[float]] = {name: [] for name in names}
    for w in range(a.interleave_windows):
        for name in (names if w % 2 == 0 else names[::-1]):
            t = trainers[name]
            before = t.memfree.local_step
            sync(t.device)
            t0 = time.perf_counter()
            t.run_steps(n)
            sync(t.device)
            step_s[name].append((time.perf_counter() - t0) / max(1, t.memfree.local_step - before))
    turn_ends = sum(t.turn_ends(0, t.memfree.local_step) for t in trainers.values())
    res: dict = {"configs": names, "windows": a.interleave_windows, "steps_per_window": n, "warmup_steps": a.warmup,
                 "merge_every": H, "turn_ends_in_windows": turn_ends,
                 "order": "each round runs every configuration once; odd rounds in reverse order",
                 "attention": {name: t.attention for name, t in trainers.items()},
                 "step_s": {name: [round(x, 5) for x in v] for name, v in step_s.items()},
                 "plain_step_s_median": statistics.median(step_s["plain"]), "ratio": {}}
    for name in names[1:]:
        per_round = [p / m for p, m in zip(step_s["plain"], step_s[name])]  # method steps/s over plain's
        res["ratio"][name] = {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
                              "per_round": [round(r, 4) for r in per_round]}
    return res


# -- figures ----------------------------------------------------------------------------------------


def ratios_and_goals(runs: dict, interleaved: dict | None = None) -> tuple[dict, list]:
    """Ratios of each method configuration to plain (same precision and mode), and the goals.

    ``time`` is the steady-state steps/s ratio from the interleaved windows (``run_interleaved``,
    key ``precision/mode``): median over rounds, with ``time_min``/``time_max``. The turn
    boundaries are amortised over a round of ``--merge_every`` H steps per proxy, from the
    measured steady round (``round_overhead_s``: the sum of its turn-ending ``memfree.step()``
    calls): ``turns_only_merge_every_H = plain step / (plain step + round overhead / (K * H))``
    (the ratio if the steady state cost nothing), and with an interleaved ratio r,
    ``time_amortised_merge_every_H = plain step / (plain step / r + round overhead / (K * H))``.
    The plain step is the interleaved median where there is one, else plain's own window.
    """
    interleaved = interleaved or {}
    ratios, goals = {}, []
    for key, run in runs.items():
        precision, mode, name = key.split("/")
        plain = runs.get(f"{precision}/{mode}/plain")
        if name == "plain" or plain is None or "error" in run or "error" in plain:
            continue
        side = interleaved.get(f"{precision}/{mode}") or {}
        side_ratio = side.get("ratio", {}).get(name)
        plain_step = side.get("plain_step_s_median") or plain["step_s"]
        r = {}
        if side_ratio:
            r.update(time=side_ratio["median"], time_min=side_ratio["min"], time_max=side_ratio["max"])
        if run.get("peak_bytes") and plain.get("peak_bytes"):
            r["memory"] = run["peak_bytes"] / plain["peak_bytes"]
        if "round_overhead_s" in run:
            overhead, K = run["round_overhead_s"], run["num_proxies"]
            for H in AMORTISE_MERGE_EVERY:
                per_step = overhead / (K * H)
                r[f"turns_only_merge_every_{H}"] = plain_step / (plain_step + per_step)
                if side_ratio:
                    r[f"time_amortised_merge_every_{H}"] = plain_step / (plain_step / side_ratio["median"] + per_step)
            r["merge_over_plain_step"] = run["merge_s"] / plain_step
            r["turn_change_over_plain_step"] = run["turn_change_s"] / plain_step
            r["round_overhead_over_plain_step"] = overhead / plain_step
        ratios[key] = {k: round(v, 4) for k, v in r.items()}
        if mode != "full":
            continue
        H = AMORTISE_MERGE_EVERY[0]

        def goal(what: str, field: str, target: str, ok, missing: str) -> None:
            v = ratios[key].get(field)
            goals.append({"goal": f"{key}: {what}", "value": v, "target": target,
                          "pass": None if v is None else ok(v), **({"note": missing} if v is None else {})})

        no_side = "not measured: no interleaved windows (budget, or --interleave_windows 0)"
        floor = GOAL_TIME_RATIO
        goal("steps/s ratio, steady state, interleaved with plain (median)", "time", f">= {floor}",
             lambda v: v >= floor, no_side)
        if "round_overhead_s" in run:
            goal(f"steps/s ratio from turn changes and merges alone, --merge_every {H}", f"turns_only_merge_every_{H}",
                 f">= {floor}", lambda v: v >= floor, "")
            goal(f"steps/s ratio incl. turn changes and merges, --merge_every {H}", f"time_amortised_merge_every_{H}",
                 f">= {floor}", lambda v: v >= floor, no_side)
        goal("peak GPU memory ratio", "memory", f"<= {GOAL_MEMORY_RATIO}", lambda v: v <= GOAL_MEMORY_RATIO,
             "not measured: no GPU")
    return ratios, goals


def proxyset_probe(device, numel: int = 860_000_000, num_tensors: int = 100) -> dict:
    """``MemFree``'s turn boundaries alone at SD-1.5 scale: needs torch and sd_memfree only (no diffusers).

    ``num_tensors`` fp32 parameters holding ``numel`` values, AdamW with random gradients, a
    ``MemFree`` of K = 4 proxies (``--merge_every 1``, storage in CPU memory) set up with
    ``attach``; ``MEASURED_ROUNDS`` rounds, each turn-ending ``memfree.step()`` timed with its
    ``ProxySet`` calls (``EventTimer``); then host-device copy rates of one parameter.
    """
    import torch

    from sd_memfree import MemFree, MemFreeConfig

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel // num_tensors, device=device) * 0.01) for _ in range(num_tensors)]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def optimizer_step() -> None:
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    optimizer_step()  # the optimizer state exists, as after plain training's first step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    optimizer_step()
    plain_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    K = 4
    memfree = MemFree(MemFreeConfig(num_shards=K, merge_every=1), num_samples=K, num_train_timesteps=1000,
                      max_train_steps=MEASURED_ROUNDS * K, device=device, storage_device="cpu")
    memfree.attach(params, optimizer)
    timer = EventTimer(memfree, device)
    loss = torch.zeros(1, device=device)
    ids = torch.zeros(1, dtype=torch.long, device=device)
    while not memfree.done:
        memfree.reduce(loss, ids, ids)  # counts the micro-step, as the loop's reduce
        optimizer_step()
        timer.step(timed=timer.due())
    memfree.end_training()
    rounds = summarise_rounds(timer.events, [], K, 1)
    res = {"numel": numel, "num_tensors": num_tensors,
           **{k: v for k, v in rounds.items() if k not in ("events", "segments", "step_s_between_events")}}
    if device.type == "cuda":
        res["peak_ratio_after_turns"] = round(torch.cuda.max_memory_allocated(device) / plain_peak, 4)
        gpu = params[0].detach()
        gb = gpu.numel() * 4 / 1e9
        pinned = gpu.to("cpu", non_blocking=True)
        sync(device)
        pageable = torch.empty(gpu.shape)

        def timed(fn) -> float:
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            return round(time.perf_counter() - t0, 4)

        res["copy_gb_per_s"] = {
            "device_to_pinned": round(gb / timed(lambda: gpu.to("cpu", non_blocking=True)), 1),
            "pinned_to_device": round(gb / timed(lambda: gpu.copy_(pinned, non_blocking=True)), 1),
            "pageable_to_device": round(gb / timed(lambda: gpu.copy_(pageable, non_blocking=True)), 1),
        }
    return res


def augment_cost(resolution: int, n: int = 16) -> dict:
    """CPU milliseconds per image of IET-AGC+'s RandAugment at strength 1 (data-loader work)."""
    import numpy as np
    import torch
    from PIL import Image

    from sd_memfree.method.augment import AugmentationStrengths, LossAwareAugment

    store = AugmentationStrengths(1)
    store.values.fill_(1.0)
    augment = LossAwareAugment(store, max_magnitude=5)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8), "RGB")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(n):
        augment(image, 0)
    return {"randaugment_ms_per_image": round(1000 * (time.perf_counter() - t0) / n, 2), "resolution": resolution,
            "magnitude": augment.magnitude(0), "note": "CPU work in the DataLoader (workers with --dataloader_num_workers)"}


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench_out" / "gpu_check.json"), help="JSON of every figure (rewritten after each configuration).")
    p.add_argument("--log", default=None, help="Human-readable log (default: --out with .log).")
    p.add_argument("--max_seconds", type=float, default=280, help="Wall-time budget: configurations that would not fit are skipped and listed.")
    p.add_argument("--dry_run", action="store_true", help="Tiny model, 32 px, batch 2, few steps (CPU unless --device cuda): checks the code path.")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (only with --dry_run).")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="Comma-separated: bf16,fp16.")
    p.add_argument("--modes", default=",".join(MODES), help="Comma-separated: full,lora.")
    p.add_argument("--configs", default=",".join(CONFIG_FLAGS), help="Comma-separated: plain,iet_agc,iet_agc_plus.")
    p.add_argument("--batch_size", type=int, default=None, help="Per step (default 4; 2 with --dry_run).")
    p.add_argument("--resolution", type=int, default=None, help="Pixels (default 512; 32 with --dry_run).")
    p.add_argument("--steps", type=int, default=None, help="Timed steady-state steps per configuration (default 20; 3 with --dry_run).")
    p.add_argument("--warmup", type=int, default=None, help="Untimed warm-up steps per configuration (default 4; 1 with --dry_run).")
    p.add_argument("--interleave_windows", type=int, default=None,
                   help="Rounds of side-by-side steady-state windows (plain, methods, alternating order) per precision/mode "
                        "(default 6; 2 with --dry_run; 0: none).")
    p.add_argument("--interleave_steps", type=int, default=None,
                   help="Optimizer steps per interleaved window (default 10, one logging read each; 1 with --dry_run).")
    p.add_argument("--measured_merge_every", type=int, default=2,
                   help="--merge_every of the method configurations' measured rounds (steps per proxy per round; "
                        "with IET-AGC+'s mid-round redistribution each is split into two turns). The events of a round do "
                        "not depend on it; the steady-state windows use the default 2000.")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (the script's --rank default).")
    p.add_argument("--num_samples", type=int, default=10000, help="Training-set size for shards, skip counts and strengths (LAION-10k: 10000).")
    p.add_argument("--attention", default="auto", choices=("auto", "xformers", "sdpa"), help="auto: xformers where it imports and works, else SDPA.")
    p.add_argument("--tests_timeout", type=float, default=90, help="Seconds for the pytest -m gpu subprocess.")
    p.add_argument("--no_tests", action="store_true", help="Skip the pytest -m gpu run.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--proxyset_only", action="store_true",
                   help="Only the CUDA tests and MemFree's turn boundaries over bare tensors at SD-1.5 scale (860M fp32 values): "
                        "needs torch, not diffusers.")
    p.add_argument("--print_wheel_requirements", action="store_true",
                   help="Print name==version of the dependencies to pip download for an offline GPU machine, and exit.")
    args = p.parse_args(argv)
    small = args.dry_run
    for name, full, tiny in (("batch_size", 4, 2), ("resolution", 512, 32), ("steps", 20, 2), ("warmup", 4, 1),
                             ("interleave_windows", 6, 2), ("interleave_steps", LOG_EVERY, 1)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else full)
    for name, allowed in (("precisions", PRECISIONS), ("modes", MODES), ("configs", tuple(CONFIG_FLAGS))):
        values = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            p.error(f"--{name}={getattr(args, name)}: use a comma-separated subset of {','.join(allowed)}")
        setattr(args, name, values)
    if args.steps < 1 or args.warmup < 0 or args.measured_merge_every < 1 or args.batch_size < 1 or args.interleave_steps < 1:
        p.error("--steps, --measured_merge_every, --interleave_steps and --batch_size must be >= 1 and --warmup >= 0")
    if args.interleave_windows < 0:
        p.error("--interleave_windows must be >= 0 (0: no side-by-side windows)")
    return args


def estimate_seconds(done: dict, mode: str, name: str, dry_run: bool) -> float:
    """Expected wall time of a configuration: the last one of the same mode and kind, or a guess."""
    for key in reversed(list(done)):
        _, m, n = key.split("/")
        if m == mode and (n == "plain") == (name == "plain") and "wall_s" in done[key]:
            return done[key]["wall_s"]
    if dry_run:
        return 2.0
    # The first full-fine-tuning method run also pins ~4 x 7 GB of host memory for stashes (1.7 GB/s
    # on the H200 machine); later runs reuse it.
    return {("full", False): 60.0, ("full", True): 15.0}.get((mode, name == "plain"), 12.0)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.print_wheel_requirements:
        print(" ".join(wheel_requirements()))
        return 0
    out = Path(args.out)
    report = Report(out, Path(args.log) if args.log else out.with_suffix(".log"))
    data = report.data
    data["command"] = " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else "gpu_check.main(" + repr(argv) + ")"
    data["started"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    data["dry_run"] = args.dry_run
    data["max_seconds"] = args.max_seconds

    missing = check_dependencies(args.proxyset_only)
    if missing:
        msg = ("missing or broken dependencies: " + "; ".join(missing) + ". Install them (pip install -e . from the repo), "
               "or on an offline GPU machine run benchmarks/gpu_check.sh with GPU_CHECK_WHEELS (docs/benchmarks.md), and rerun.")
        data["errors"].append(msg)
        report.log("error: " + msg)
        report.save()
        print(json.dumps(data, default=str))
        return 2

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        data["errors"].append("--device cuda but torch.cuda.is_available() is False")
    elif device.type != "cuda" and not args.dry_run:
        data["errors"].append(f"no CUDA device (torch {torch.__version__}, cuda {torch.version.cuda}); "
                              "this check measures a GPU: run it on a GPU machine, or pass --dry_run to check the code path on CPU")
    if data["errors"]:
        report.log("error: " + data["errors"][-1])
        report.save()
        print(json.dumps(data, default=str))
        return 2

    if not args.proxyset_only:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()  # .to(dtype) of built (not loaded) models warns every time
    data["env"] = environment(device)
    report.log(f"device {data['env'].get('gpu', device)}; torch {torch.__version__}; xformers {data['env']['xformers']}")
    flash_sdp = torch.backends.cuda.flash_sdp_enabled()  # _run may switch it off on the CPU
    try:
        return _run(args, report, device)
    except BudgetExceeded as e:
        data["errors"].append(str(e))
        report.log("error: " + str(e))
        return 3
    finally:
        # A process-wide switch: left off, it would change the attention kernel (and the bits) of
        # everything the calling process trains next, e.g. later tests of the same pytest run.
        torch.backends.cuda.enable_flash_sdp(flash_sdp)
        runs = data.get("runs", {})
        data["ratios"], data["goals"] = ratios_and_goals(runs, data.get("interleaved"))
        report.save()
        for g in data["goals"]:
            verdict = {True: "PASS", False: "FAIL", None: "N/A "}[g["pass"]]
            report.log(f"{verdict}  {g['goal']}: {g['value']} (target {g['target']}){' ' + g['note'] if g.get('note') else ''}")
        report.log(f"JSON: {out}   log: {report.log_path}")
        report.close()
        print(json.dumps(data, default=str))


def _run(args, report: Report, device) -> int:
    import torch

    data = report.data
    if not args.no_tests:
        report.log("running pytest -m gpu ...")
        data["tests"] = run_gpu_tests(min(args.tests_timeout, max(10.0, args.max_seconds / 3)))
        report.log(f"pytest -m gpu: {data['tests']['summary']} (rc {data['tests'].get('rc')})")
        for line in data["tests"].get("outcomes", []):
            report.log("  " + line)
        report.save()

    if args.proxyset_only or args.dry_run:  # a full run measures the same inside each configuration
        report.log("MemFree turns alone (K=4, bare tensors, CPU storage) ...")
        data["proxyset_probe"] = proxyset_probe(device, numel=100_000 if args.dry_run else 860_000_000)
        report.log(f"MemFree turns alone: {json.dumps(data['proxyset_probe'])}")
        report.save()
    if args.proxyset_only:
        data["complete"] = True
        return 0

    if device.type == "cpu":
        # torch's fused CPU attention kernel fails in bf16 backward unless ATen runs its AVX-512
        # kernels ("pack_vnni2 is only supported when avx512 is supported"); the dry run checks our
        # code path, not that kernel, so it uses the plain math attention on every CPU.
        # (The flag is named after CUDA but switches off the fused flash kernel on the CPU too.)
        torch.backends.cuda.enable_flash_sdp(False)
        data["cpu_attention"] = "math (torch's fused CPU attention needs AVX-512 for bf16 backward)"
    unet_spec, vae_spec, text_spec = (TINY_UNET, TINY_VAE, TINY_TEXT) if args.dry_run else (SD15_UNET, SD15_VAE, SD15_TEXT)
    vae_scale = 2 ** (len(vae_spec["block_out_channels"]) - 1)
    latent = args.resolution // vae_scale
    if latent % 8:
        raise SystemExit(f"--resolution {args.resolution} gives {latent}x{latent} latents; the UNet needs a multiple of 8.")
    t0 = time.perf_counter()
    probe = build_unet(unet_spec, device, args.seed)
    unet_params = sum(p.numel() for p in probe.parameters())
    del probe
    free_device_memory(device)
    build_s = time.perf_counter() - t0
    data["setup"] = {
        "driver": "sd_memfree.MemFree (docs/plugin.md: prepare, batch_sampler, randn/randint, reduce, step, logs, "
                  "end_training) in a loop whose body is train_sd_ietagc.py's (not the script: loading and saving a 4 GB "
                  "pipeline per configuration does not fit the time budget)",
        "unet": "tiny (dry run)" if args.dry_run else "SD-1.5 (runwayml/stable-diffusion-v1-5 unet config), random weights",
        "unet_params": unet_params, "unet_build_s": round(build_s, 2),
        "vae_and_text_encoder": "real-shape modules built from their SD-1.5 configs (random weights), frozen, in the "
                                "mixed-precision dtype, run every step" if not args.dry_run else "tiny modules, run every step",
        "images": "random tensors of the real shape; the CPU data pipeline is not part of the step timing",
        "batch_size": args.batch_size, "resolution": args.resolution, "latents": [4, latent, latent],
        "steps_timed": args.steps, "warmup_steps": args.warmup, "measured_merge_every": args.measured_merge_every,
        "measured_rounds": MEASURED_ROUNDS, "num_samples": args.num_samples,
        "lora_rank": args.rank, "optimizer": "torch.optim.AdamW (foreach), lr 1e-5 full / 1e-4 LoRA, constant schedule",
        "merge_every_amortised": list(AMORTISE_MERGE_EVERY), "num_shards": 4,
        "configs": {k: v for k, v in CONFIG_FLAGS.items() if k in args.configs},
    }
    report.log(f"UNet {unet_params / 1e6:.1f}M parameters (built in {build_s:.1f}s); batch {args.batch_size} at {args.resolution} px")
    data["augment_cpu"] = augment_cost(args.resolution)
    report.log(f"RandAugment (IET-AGC+ data side): {data['augment_cpu']['randaugment_ms_per_image']} ms per {args.resolution} px image on the CPU")

    g = torch.Generator().manual_seed(args.seed)
    host_pixels = [torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=g) * 2 - 1 for _ in range(2)]
    host_ids = [torch.randint(0, text_spec["vocab_size"], (args.batch_size, 77), generator=g) for _ in range(2)]
    data["runs"] = runs = {}
    data["interleaved"] = {}
    done_order = [f"{p}/{m}/{n}" for m in args.modes for p in args.precisions for n in args.configs]
    ctx = {"args": args, "device": device, "unet_spec": unet_spec, "host_pixels": host_pixels, "host_input_ids": host_ids}
    encoders_for = None
    previous_group = None
    for key in done_order:
        precision, mode, name = key.split("/")
        # The side-by-side windows of a precision/mode run once its configurations are done (run or
        # skipped), with its encoders still built: the next group's first key, or after the loop.
        if previous_group not in (None, f"{precision}/{mode}") and \
                interleave_group(args, report, ctx, previous_group, runs) == "stop":
            data["skipped"].extend(done_order[done_order.index(key):])
            return 3
        previous_group = f"{precision}/{mode}"
        if device.type == "cpu" and precision == "fp16" and mode == "full":
            # accelerate runs fp16 without autocast on a CPU, so fp32 weights meet fp16 latents.
            data["skipped"].append(f"{key} (CPU: accelerate has no fp16 autocast there; runs on a GPU)")
            continue
        need = estimate_seconds(runs, mode, name, args.dry_run)
        if report.elapsed() + need > args.max_seconds:
            data["skipped"].append(key)
            report.log(f"budget: {report.elapsed():.0f}s used, {key} needs ~{need:.0f}s of --max_seconds {args.max_seconds:.0f}: skipped")
            report.save()
            continue
        if encoders_for != precision:
            ctx.pop("encoders", None)
            free_device_memory(device)
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
            ctx["encoders"] = build_encoders(vae_spec, text_spec, device, dtype, args.seed)
            encoders_for = precision
        t0 = time.perf_counter()
        try:
            with budget_alarm(args.max_seconds - report.elapsed() + ALARM_GRACE_S):
                run = run_config(ctx, precision, mode, name)
        except BudgetExceeded as e:  # keep what was measured, list what was not, stop
            runs[key] = {"error": str(e), "wall_s": round(time.perf_counter() - t0, 2)}
            data["errors"].append(f"{key}: {e}")
            data["skipped"].extend(done_order[done_order.index(key) + 1:])
            report.save()
            return 3
        except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the others
            run = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            data["errors"].append(f"{key}: {type(e).__name__}: {e}")
        # Free everything the configuration allocated before the next one measures its peak.
        reset_accelerate()
        free_device_memory(device)
        run["wall_s"] = round(time.perf_counter() - t0, 2)
        runs[key] = run
        data["ratios"], data["goals"] = ratios_and_goals(runs, data["interleaved"])
        report.save()
        report.log(describe(key, run, data["ratios"].get(key)))
    if previous_group is not None and interleave_group(args, report, ctx, previous_group, runs) == "stop":
        return 3
    data["complete"] = not data["errors"] and not any("(CPU:" not in k for k in data["skipped"])
    return 0 if not data["errors"] else 1


def interleave_group(args, report: Report, ctx: dict, group: str, runs: dict) -> str | None:
    """``run_interleaved`` for one precision/mode if plain and a method ran and it fits the budget.

    Returns "stop" when the budget alarm fired (the caller stops), else None.
    """
    data = report.data
    precision, mode = group.split("/")
    names = [n for n in args.configs if "error" not in runs.get(f"{group}/{n}", {"error": "not run"})]
    if args.interleave_windows < 1 or "plain" not in names or len(names) < 2:
        return None
    names = ["plain"] + [n for n in names if n != "plain"]
    # A method's steady step is about plain's (what is measured here); models were built once already.
    plain_step = runs[f"{group}/plain"]["step_s"]
    windows_s = plain_step * len(names) * args.interleave_windows * args.interleave_steps
    build_s = 2.0 if args.dry_run else 4.0 * len(names)
    need = windows_s + build_s + args.warmup * plain_step * len(names)
    key = f"{group}/interleaved"
    if report.elapsed() + need > args.max_seconds:
        data["skipped"].append(key)
        report.log(f"budget: {report.elapsed():.0f}s used, {key} needs ~{need:.0f}s of --max_seconds {args.max_seconds:.0f}: skipped")
        report.save()
        return None
    free_device_memory(ctx["device"])
    t0 = time.perf_counter()
    try:
        with budget_alarm(args.max_seconds - report.elapsed() + ALARM_GRACE_S):
            side = run_interleaved(ctx, precision, mode, names)
    except BudgetExceeded as e:
        data["errors"].append(f"{key}: {e}")
        return "stop"
    except Exception as e:  # noqa: BLE001 - e.g. out of memory with every configuration resident
        side = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        data["errors"].append(f"{key}: {type(e).__name__}: {e}")
    finally:
        reset_accelerate()
        free_device_memory(ctx["device"])
    side["wall_s"] = round(time.perf_counter() - t0, 2)
    if "error" not in side:
        data["interleaved"][group] = side
        data["ratios"], data["goals"] = ratios_and_goals(runs, data["interleaved"])
        report.log(f"{key}: plain {1000 * side['plain_step_s_median']:.0f} ms/step (median of {side['windows']} windows of "
                   f"{side['steps_per_window']}); " + "; ".join(
                       f"{n} ratio {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f})" for n, r in side["ratio"].items())
                   + f" [{side['wall_s']:.1f}s]")
    else:
        data.setdefault("interleaved_errors", {})[group] = side
        report.log(f"{key}: ERROR {side['error']}")
    report.save()
    return None


def describe(key: str, run: dict, ratio: dict | None) -> str:
    if "error" in run:
        return f"{key}: ERROR {run['error']}"
    if "round_overhead_s" in run:
        parts = [f"{key}: {run['steps']} steps in {run['rounds']} rounds of --merge_every {run['measured_merge_every']}; "
                 f"steady round {1000 * run['round_overhead_s']:.0f} ms of memfree.step() (first round "
                 f"{1000 * run['first_round_overhead_s']:.0f} ms): turn change {1000 * run['turn_change_s']:.1f} ms, "
                 f"merge {1000 * run['merge_s']:.1f} ms"
                 + (f", redistribution {1000 * run['redistribute_s']:.1f} ms" if run.get("redistribute_s") is not None else "")]
    else:
        parts = [f"{key}: {run['steps_per_s']:.2f} steps/s ({1000 * run['step_s']:.0f} ms/step)"]
    if run.get("peak_bytes"):
        parts.append(f"peak {run['peak_bytes'] / 2**30:.2f} GiB")
    if ratio:
        parts.append("ratio " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()))
    parts.append(f"[{run['attention']}, {run['wall_s']:.1f}s]")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
