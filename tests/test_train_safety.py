"""The training script when a real run goes wrong: a second run on the same folder, SIGTERM and
Ctrl-C, a diverging loss, a full disk, an unusable --output_dir. Tiny model, CPU, offline."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (MP_ENV, assert_no_partial_files, cli_error, complete_steps, hold_lock_in_subprocess, nan_losses_at,
                     saved_tensors, stop_with_signal, torchrun_cmd, train_argv)
from sd_memfree.run import checkpointing
from sd_memfree.run.runlock import LOCK_NAME
from sd_memfree.run.stopping import MAX_NONFINITE_STEPS
from train_scripts import train_sd_ietagc as train



# ---- one run per output_dir ------------------------------------------------------------------------

@pytest.mark.parametrize("resume", [False, True])
def test_second_run_on_a_locked_folder_stops_before_models_load(tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch, resume):
    """A live run holds the folder (a subprocess): a fresh run and a `--resume_from_checkpoint latest`
    both stop with one line naming the holder, before any model loads, and touch nothing."""
    from diffusers import UNet2DConditionModel

    out = tmp_path / "busy"
    holder = hold_lock_in_subprocess(out)
    try:
        lock_before = (out / LOCK_NAME).read_text()

        def no_model_loads(*a, **k):
            raise AssertionError("a model was loaded")

        monkeypatch.setattr(UNet2DConditionModel, "load_config", no_model_loads)
        monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_model_loads)
        extra = ["--resume_from_checkpoint=latest"] if resume else []
        line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, out, *extra))
        assert re.search(rf"--output_dir {re.escape(str(out))} is in use by another run: pid {holder.pid} on host ", line), line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME] and (out / LOCK_NAME).read_text() == lock_before
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_and_released_at_the_end(tiny_model_dir, tiny_data_dir, tmp_path, caplog):
    out = tmp_path / "stale"
    holder = hold_lock_in_subprocess(out)
    holder.kill()  # dies holding the lock
    holder.wait()
    summary = train.main(train.parse_args(train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", steps=1)))
    assert summary["global_step"] == 1
    assert f"took over the stale lock {out / LOCK_NAME} of pid {holder.pid}" in caplog.text
    assert not (out / LOCK_NAME).exists(), "the lock is released when the run ends"


def test_lock_released_and_new_folder_removed_when_the_run_fails(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "new"
    argv = train_argv(tiny_model_dir, tiny_data_dir, out, "--caption_column=no_such_column")
    cli_error(capsys, train.cli, argv)
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    cli_error(capsys, train.cli, [a.replace(str(out), str(existing)) for a in argv])
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]


def test_output_dir_file_or_unwritable_one_line_before_models_load(tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch):
    from diffusers import UNet2DConditionModel

    def no_model_loads(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(UNet2DConditionModel, "load_config", no_model_loads)
    f = tmp_path / "a-file"
    f.write_text("x")
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, f))
    assert line == f"error: --output_dir {f} is a file, not a folder; pass a folder (new or one of an earlier run)."
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, f / "run"))
    assert f"--output_dir {f / 'run'} cannot be created: {f} is a file" in line
    probe = Path("/sys/sd-memfree-write-probe")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError:  # also refused to root: a folder nobody may write to
        line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, probe / "run"))
        assert re.fullmatch(rf"error: --output_dir {probe / 'run'} is not writable \(.*\); pass a folder you can write to\.", line), line


# ---- SIGTERM / Ctrl-C -----------------------------------------------------------------------------

@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_checkpoints_and_resume_finishes(tiny_model_dir, tiny_data_dir, tmp_path, signum, code):
    """The real script in a subprocess with 100000 steps; the signal comes once checkpoint-2 exists.
    It exits 128 + signal with one line naming the checkpoint it wrote and how to resume, no
    traceback, no lock left; resuming from it runs to the end."""
    out = tmp_path / "run"
    argv = train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--rank=2", "--checkpointing_steps=2", steps=100000)
    step = stop_with_signal("train_sd_ietagc.py", argv, out, signum, code)
    assert step >= 2 and step in complete_steps(out) and complete_steps(out)[-1] == step
    assert not (out / LOCK_NAME).exists()
    assert_no_partial_files(out)
    if signum == signal.SIGTERM:
        argv = train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--rank=2", "--checkpointing_steps=2",
                         "--resume_from_checkpoint=latest", steps=step + 2)
        summary = train.main(train.parse_args(argv))
        assert summary["global_step"] == step + 2 and summary["steps_this_run"] == 2
        assert (out / "pytorch_lora_weights.safetensors").exists()


# ---- disk full ------------------------------------------------------------------------------------

def test_disk_full_during_a_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch):
    """checkpointing_steps=1: checkpoints 1 and 2 are written, the third save hits ENOSPC after
    writing part of its file. One line, exit 1, checkpoints 1 and 2 complete, no temporary left."""
    import sd_memfree.run.state as state

    real, calls = state.save_process_state, []

    def fill_the_disk(folder, *a, **k):
        calls.append(folder)
        if len(calls) < 3:
            return real(folder, *a, **k)
        target = state.state_files(folder, 0)[1]  # the tensors, written first
        target.write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(state, "save_process_state", fill_the_disk)
    out = tmp_path / "full"
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--checkpointing_steps=1", steps=5), 1)
    assert line.startswith(f"error: no space left on device while writing {out}/.tmp-checkpoint-3/state_rank0.safetensors "
                           "(newest checkpoint: checkpoint-2); free space there, then rerun the same command with "
                           "--resume_from_checkpoint latest (it continues from checkpoint-2"), line
    assert complete_steps(out) == [1, 2]
    assert_no_partial_files(out)
    assert not (out / LOCK_NAME).exists()


def test_disk_full_during_the_final_save(tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch):
    """The final model's save fails half-way: no .tmp-final, no model published, checkpoint-2 intact."""
    import sd_memfree.trainable as trainable

    def fill_the_disk(unet, pretrained, staging, **k):
        (Path(staging) / "unet").mkdir(parents=True)
        (Path(staging) / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(trainable, "save_full_pipeline", fill_the_disk)
    out = tmp_path / "full"
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, out, "--checkpointing_steps=2", steps=3), 1)
    assert line.startswith(f"error: no space left on device while writing {out} (newest checkpoint: checkpoint-2);"), line
    assert complete_steps(out) == [2] and not (out / "unet").exists()
    assert_no_partial_files(out)


# ---- diverging runs -------------------------------------------------------------------------------

@pytest.mark.parametrize("agc", [False, True])
def test_diverging_run_stops_and_saves_nothing_non_finite(tiny_model_dir, tiny_data_dir, tmp_path, capsys, agc):
    """--learning_rate 1e3 (the issue's case): the weights blow up at step 2. The run stops with exit
    1 and one line, writes no final model, and the checkpoint it wrote (step 1; step 2's is not
    written) is finite, state included."""
    out = tmp_path / "nan"
    argv = train_argv(tiny_model_dir, tiny_data_dir, out, "--checkpointing_steps=1", *(["--agc_ratio=1.25"] if agc else []),
                      steps=40, learning_rate="1e3")
    line = cli_error(capsys, train.cli, argv, 1)
    assert re.fullmatch(r"error: the run diverged at step \d+: .*NaN/inf.*; nothing non-finite was saved \(newest checkpoint: .*\); "
                        r"resuming replays the same steps and would diverge again: start a new run in a new --output_dir with a "
                        r"lower --learning_rate \(now 1000\).*", line), line
    assert not (out / "unet").exists() and not (out / "memfree_state.json").exists(), "no final model"
    tensors = saved_tensors(out)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert complete_steps(out) == [1] and f"{out}/checkpoint-1/state_rank0.safetensors" in {k.split(":")[0] for k in tensors}
    assert_no_partial_files(out)


def test_agc_does_not_hide_non_finite_losses(tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch):
    """AGC never keeps a NaN loss; where the weights stay finite (NaN loss values, finite
    gradients), the old run trained on with 'loss=0.0000 skip=1.00'. NaN from step 3 on, checks at
    every checkpoint (every 2 steps) and every LOG_EVERY=10 steps: step 2 is finite, checkpoint-2 is
    written; at steps 4 and 6 the runs of NaN steps are 2 and 4 (below the limit 5), so those
    checkpoints are not written (their step was NaN) and training goes on; at step 8 the run is
    6 >= 5: stop."""
    nan_losses_at(monkeypatch, set(range(3, 100)), nan_gradients=False)
    out = tmp_path / "agc"
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, out, "--agc_ratio=1.25", "--use_lora",
                                                   "--checkpointing_steps=2", steps=30), 1)
    assert MAX_NONFINITE_STEPS == 5
    assert line.startswith("error: the run diverged at step 8: the loss was NaN/inf in 6 consecutive optimizer steps "
                           f"(limit 5); nothing non-finite was saved (newest checkpoint: {out}/checkpoint-2)"), line
    assert complete_steps(out) == [2]
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_a_few_non_finite_steps_are_tolerated_with_agc(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """MAX_NONFINITE_STEPS - 1 NaN steps in a row (as fp16 overflow can give), masked by AGC: the run
    recovers and finishes, with a finite model."""
    nan_losses_at(monkeypatch, set(range(2, 2 + MAX_NONFINITE_STEPS - 1)), nan_gradients=False)
    out = tmp_path / "blip"
    summary = train.main(train.parse_args(train_argv(tiny_model_dir, tiny_data_dir, out, "--agc_ratio=1.25", "--use_lora",
                                                    steps=MAX_NONFINITE_STEPS + 3)))
    assert summary["global_step"] == MAX_NONFINITE_STEPS + 3
    assert all(torch.isfinite(t).all() for t in load_file(out / "pytorch_lora_weights.safetensors").values())


def test_final_save_refuses_non_finite_weights(tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch):
    """Without AGC one NaN step makes the weights NaN; on the last step that is below the
    consecutive-step limit, so the final save's own check must refuse the model."""
    nan_losses_at(monkeypatch, {3}, nan_gradients=True)
    out = tmp_path / "last"
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, out, "--checkpointing_steps=2", steps=3), 1)
    assert line.startswith(f"error: the trained weights are NaN/inf after step 3: the final model was not saved (newest checkpoint: {out}/checkpoint-2)"), line
    assert not (out / "unet").exists() and complete_steps(out) == [2]
    assert_no_partial_files(out)


# ---- several processes ----------------------------------------------------------------------------

@pytest.mark.multiprocess
def test_two_processes_on_a_locked_folder_both_stop(tiny_model_dir, tiny_data_dir, tmp_path):
    """Only the main process takes the lock; the other learns that it failed and stops too (no
    hang), each with the one line (exit 2; the launcher then stops whichever is still exiting)."""
    out = tmp_path / "busy"
    holder = hold_lock_in_subprocess(out)
    try:
        proc = subprocess.run(torchrun_cmd("train_sd_ietagc.py", train_argv(tiny_model_dir, tiny_data_dir, out)), env=MP_ENV, capture_output=True,
                              text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    # Counted in the whole stream, not per line: the two processes write to one pipe, and their
    # lines can interleave (seen: "...lock).error: --output_dir ..." on one line).
    messages = re.findall(r"is in use by another run: pid (\d+) on host", proc.stderr)
    assert proc.returncode != 0 and len(messages) == 2, proc.stderr[-3000:]
    assert messages == [str(holder.pid)] * 2
    assert 'train_sd_ietagc.py", line' not in proc.stderr, "no traceback from the script (the launcher prints its own)"
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


@pytest.mark.multiprocess
def test_two_processes_agree_on_the_sigterm_step_and_resume(tiny_model_dir, tiny_data_dir, tmp_path):
    """SIGTERM to the launcher (torchrun passes it to both workers, maybe at different steps): the
    workers agree at the next check, write one complete checkpoint holding both processes' state
    and both say so; a 2-process resume from it finishes."""
    out = tmp_path / "run"
    argv = train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--rank=2", "--checkpointing_steps=2", steps=100000)
    proc = subprocess.Popen(torchrun_cmd("train_sd_ietagc.py", argv), env=MP_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint-2" / checkpointing.COMPLETE_MARKER).exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode != 0, err[-3000:]  # the launcher's own status (torchrun re-raises the signal)
    stops = re.findall(r"stopped by SIGTERM after step (\d+) \(saved .*checkpoint-(\d+)\)", err)
    assert len(stops) == 2 and len({s for pair in stops for s in pair}) == 1, err[-3000:]  # both workers, one step
    step = int(stops[0][0])
    assert complete_steps(out)[-1] == step
    assert {p.name.split(".")[0] for p in (out / f"checkpoint-{step}").glob("state_rank*")} == {"state_rank0", "state_rank1"}
    assert not (out / LOCK_NAME).exists()
    resume = train_argv(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--rank=2", "--checkpointing_steps=2",
                       "--resume_from_checkpoint=latest", steps=step + 2)
    done = subprocess.run(torchrun_cmd("train_sd_ietagc.py", resume), env=MP_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("agc", [False, True])
def test_signal_on_a_non_finite_step_writes_no_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch, agc):
    """SIGTERM arrives during step 3, whose loss is NaN; checkpoint-2 exists. Without AGC the NaN
    gradients made the weights NaN: the unscheduled checkpoint's weight check stops the run as
    diverged (exit 1). With AGC (NaN values, finite gradients) the weights are fine but the step
    was non-finite: no checkpoint-3, exit 143, the line names checkpoint-2."""
    import sd_memfree.method.losses as losses

    real, calls = losses.per_sample_loss, []

    def loss(pred, target):
        calls.append(1)
        out = real(pred, target)
        if len(calls) != 3:
            return out
        os.kill(os.getpid(), signal.SIGTERM)
        return out + float("nan") if agc else out * float("nan")

    monkeypatch.setattr(losses, "per_sample_loss", loss)
    out = tmp_path / "sig"
    extra = ["--agc_ratio=1.25"] if agc else []
    line = cli_error(capsys, train.cli, train_argv(tiny_model_dir, tiny_data_dir, out, "--checkpointing_steps=2", *extra, steps=20), 143 if agc else 1)
    if agc:
        assert line == (f"stopped by SIGTERM after step 3 (newest checkpoint: {out}/checkpoint-2); to continue, run the same command "
                        "with --resume_from_checkpoint latest.")
    else:
        assert line.startswith("error: the run diverged at step 3: the trained weights became NaN/inf;"), line
    assert complete_steps(out) == [2] and not (out / LOCK_NAME).exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the run's handlers are removed when it ends"
