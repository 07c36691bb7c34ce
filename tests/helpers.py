"""Helpers the tests share: the recipes' argument builder, the one-line-error check, hand-built bad
files and foreign checkpoints, subprocess runs. Test files import them from here (``from helpers
import ...``; pytest puts tests/ on sys.path), never from another test file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The tiny run every recipe test starts from: 32 px, batch 2, a fixed seed, no tracker, no
# checkpoint unless a test asks for one.
TRAIN_FLAGS = {"resolution": 32, "train_batch_size": 2, "learning_rate": "1e-3", "lr_warmup_steps": 0, "seed": 7,
               "report_to": "none", "checkpointing_steps": 1000000}


def train_argv(model, data, out, *extra: str, steps: int = 4, **flags) -> list[str]:
    """A recipe's command line on ``model`` and ``data`` into ``out``, ``steps`` optimizer steps.

    ``flags`` replace ``TRAIN_FLAGS`` by name (None leaves the flag out, i.e. the recipe's default);
    ``extra`` comes last, so a flag there overrides one before it, as argparse keeps the last."""
    values = {**TRAIN_FLAGS, **flags}
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={out}",
            f"--max_train_steps={steps}", *(f"--{k}={v}" for k, v in values.items() if v is not None), *extra]


def run_recipe(recipe, argv: list[str]) -> dict:
    """``recipe.main(recipe.parse_args(argv))``, as ``accelerate launch`` runs it; returns the summary."""
    return recipe.main(recipe.parse_args(argv))


def cli_error(capsys, cli, argv: list[str], code: int = 2, usage: bool = False) -> str:
    """Run a command line (a recipe's or the scorer's ``cli``) expecting exit ``code``, no traceback
    and one error line, the last one: ``error: ...``, or with ``usage`` argparse's ``<prog>: error:
    ...`` after its usage line (a flag refused while parsing); after a stop signal (exit 128 + the
    signal) no error line. Returns the last line."""
    with pytest.raises(SystemExit) as e:
        cli(argv)
    err = capsys.readouterr().err
    assert e.value.code == code, err[-3000:]
    # datasets may draw a progress bar first; the error is one line of its own, the last one.
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err, err
    if code > 128:  # stopped by a signal (128 + its number): the line says where it stopped, not an error
        assert not any("error:" in l for l in err.splitlines()), err
        return last
    assert sum("error:" in l for l in err.splitlines()) == 1, err
    if usage:
        assert re.match(r"\S+: error: ", last) and err.lstrip().startswith("usage: "), err
    else:
        assert last.startswith("error: "), err
    return last


def with_train_timesteps(model_dir: Path, dest: Path, num_train_timesteps: int) -> Path:
    """A copy of a model folder whose scheduler has ``num_train_timesteps`` (AGC's loss banks fill
    up in a few steps with 20)."""
    if Path(model_dir) != Path(dest):
        shutil.copytree(model_dir, dest)
    cfg_path = Path(dest) / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_train_timesteps"] = num_train_timesteps
    cfg_path.write_text(json.dumps(cfg))
    return Path(dest)


def tree_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def same(a: dict, b: dict) -> bool:
    """Two state dicts with the same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- bad image files --------------------------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_corrupt_data(width: int = 32, height: int = 32) -> bytes:
    """An RGB PNG whose IDAT holds a scrambled deflate stream (zlib header kept) under a correct
    CRC: PIL's verify (header + CRCs) accepts it, decoding fails."""
    rows_ = b"".join(b"\x00" + bytes((x * 7) % 256 for x in range(3 * width)) for _ in range(height))
    data = bytearray(zlib.compress(rows_))
    for i in range(2, len(data) - 4):
        data[i] ^= 0x5A
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", bytes(data)) + png_chunk(b"IEND", b"")


def rows(folder: Path) -> list[dict]:
    """The rows of an imagefolder's metadata.jsonl."""
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]


def write_rows(folder: Path, new_rows: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in new_rows))


def add_image(folder: Path, name: str, blob: bytes, caption: str = "a broken picture") -> None:
    """Add file ``name`` holding ``blob`` as the last row of an imagefolder."""
    (folder / name).write_bytes(blob)
    write_rows(folder, rows(folder) + [{"file_name": name, "text": caption}])


# ---- other scripts' checkpoints -------------------------------------------------------------------

class Hostile:
    """Unpickling this calls ``open(marker, "w")``: the file appears iff the pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def fake_upstream_checkpoint(out: Path, step: int, marker: Path, weights: dict[str, Path], optimizer_state: dict | None = None) -> Path:
    """checkpoint-<step> as diffusers' train_text_to_image(.py|_lora.py) writes it through
    accelerate's save_state and its save hook. scheduler.bin and random_states_0.pkl (and
    optimizer.bin unless ``optimizer_state`` is given) are pickles that create ``marker`` if loaded.
    ``weights`` maps a name in the folder to a file or folder to copy there."""
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        torch.save({"x": Hostile(marker)}, ckpt / name)
    if optimizer_state is not None:
        torch.save(optimizer_state, ckpt / "optimizer.bin")
    for name, source in weights.items():
        (shutil.copytree if source.is_dir() else shutil.copy)(source, ckpt / name)
    return ckpt


def upstream_full_checkpoint(model_dir: Path, tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """``tmp_path/out/checkpoint-2`` as diffusers' full fine-tuning scripts write it: unet/ = the
    base UNet + 0.01 (also saved as ``tmp_path/their_unet``), optimizer.bin = AdamW moments at
    step 30 (plain tensors), the other pickles hostile (they would create ``tmp_path/pwned``).
    Returns the output folder, the marker and the checkpoint's digest."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
    unet.save_pretrained(tmp_path / "their_unet")
    opt = torch.optim.AdamW(unet.parameters())
    for p in unet.parameters():
        opt.state[p] = {"step": torch.tensor(30.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    out, marker = tmp_path / "out", tmp_path / "pwned"
    fake_upstream_checkpoint(out, 2, marker, {"unet": tmp_path / "their_unet"}, optimizer_state=opt.state_dict())
    return out, marker, tree_digest(out / "checkpoint-2")


# ---- subprocesses ---------------------------------------------------------------------------------

def hold_lock_in_subprocess(folder: Path) -> subprocess.Popen:
    """A live holder: another process that takes the lock and sleeps until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from sd_memfree.run.runlock import RunLock
        RunLock({str(folder)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def stop_with_signal(script: str, argv: list[str], out: Path, signum: int, code: int) -> int:
    """Run ``train_scripts/<script>`` in a subprocess, send ``signum`` once ``checkpoint-2`` is
    complete, and check the stop: exit ``code``, no traceback, and a last stderr line naming the
    step it stopped after, the checkpoint of that same step and how to resume. Returns the step."""
    from sd_memfree.run import checkpointing

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train_scripts" / script), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint-2" / checkpointing.COMPLETE_MARKER).exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    m = re.fullmatch(rf"stopped by {name} after step (\d+) \(saved {re.escape(str(out))}/checkpoint-(\d+)\); "
                     r"to continue, run the same command with --resume_from_checkpoint latest\.", last)
    assert m and m.group(1) == m.group(2), last
    return int(m.group(1))


def nan_losses_at(monkeypatch, bad_steps: set[int], nan_gradients: bool):
    """Make the per-sample losses NaN at the given optimizer steps (1-based; one micro-batch a step),
    in either recipe (both read ``sd_memfree.method.losses.per_sample_loss`` when they start).

    ``nan_gradients``: ``loss * nan`` (its gradient is NaN even where AGC masks the loss, since
    0 * nan = nan, as with a real NaN prediction) or ``loss + nan`` (a NaN value whose gradient is
    finite, so with AGC masking it the weights stay finite and only the loss check can see it)."""
    import sd_memfree.method.losses as losses

    real, calls = losses.per_sample_loss, []

    def loss(pred, target):
        calls.append(1)
        out = real(pred, target)
        if len(calls) not in bad_steps:
            return out
        return out * float("nan") if nan_gradients else out + float("nan")

    monkeypatch.setattr(losses, "per_sample_loss", loss)


# Two processes on the CPU (gloo), one thread each, the checkout importable.
MP_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def torchrun_cmd(script: str | Path, argv: list[str]) -> list[str]:
    """torchrun of ``script`` (a file name in train_scripts/, or an absolute path) on 2 processes."""
    path = Path(script) if Path(script).is_absolute() else REPO / "train_scripts" / script
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(path), *argv]


def run_two_processes(script: str | Path, argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``torchrun_cmd(script, argv)`` with ``MP_ENV``; it must exit 0 (its stderr's tail if not)."""
    proc = subprocess.run(torchrun_cmd(script, argv), env=MP_ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@contextmanager
def one_thread():
    """Run the block on one intra-op thread, as each process of ``run_two_processes`` runs
    (``OMP_NUM_THREADS=1``): CPU reductions then sum in the same order, so runs compare bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def noise_magnitude_probe(pipe, prompts: list[str], latents: torch.Tensor, guidance: float, steps: int = 1) -> torch.Tensor | None:
    """The scorer's ``NoiseMagnitudeProbe`` over ``steps`` first steps of a 3-step generation of
    ``prompts`` from ``latents`` (cloned) at ``guidance``; its per-generation result."""
    from sd_memfree.scoring import generate

    with generate.NoiseMagnitudeProbe(pipe, steps) as probe:
        probe.begin(len(prompts))
        pipe(prompt=prompts, latents=latents.clone(), num_inference_steps=3, guidance_scale=guidance, output_type="latent")
        return probe.result()


def complete_steps(out: Path) -> list[int]:
    """The steps of ``out``'s complete checkpoints, oldest first."""
    from sd_memfree.run import checkpointing

    return [step for step, _ in checkpointing.list_checkpoints(out)]


def assert_no_partial_files(out: Path) -> None:
    leftovers = [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-")) or p.name.endswith(".partial")]
    assert leftovers == []


def saved_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor in every safetensors file under ``out``: models and checkpoint states."""
    from safetensors.torch import load_file

    found = {}
    for f in out.rglob("*.safetensors"):
        found.update({f"{f}:{k}": v for k, v in load_file(f).items()})
    return found


def scaled_accelerator(skipped: list):
    """An ``accelerate.Accelerator`` with torch's loss scaler on the CPU (accelerate makes none
    there) whose first backward writes an inf into one gradient, as an fp16 overflow would: the
    unscale, overflow check and skipped step are torch's and accelerate's real code. Each read of
    ``optimizer_step_was_skipped`` is appended to ``skipped``. Patch it in with
    ``monkeypatch.setattr(accelerate, "Accelerator", scaled_accelerator(skipped))``."""
    import accelerate

    class Scaled(accelerate.Accelerator):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # before prepare(): the optimizer wrapper takes it
            self.backward_calls = 0

        def backward(self, loss, **kwargs):
            super().backward(loss, **kwargs)
            self.backward_calls += 1
            if self.backward_calls == 1:
                grads = [p.grad for g in self._optimizers[0].optimizer.param_groups for p in g["params"] if p.grad is not None]
                grads[0].view(-1)[0] = float("inf")

        @property
        def optimizer_step_was_skipped(self):
            value = super().optimizer_step_was_skipped
            skipped.append(value)
            return value

    return Scaled

