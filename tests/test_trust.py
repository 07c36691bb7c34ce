"""Trust, second round (issue 19): hostile checkpoints, datasets, weights mirrors and output
folders. Each test builds the hostile input and asserts the one line (or the refusal, or the
bounded time), no traceback, and that nothing already on disk was lost. Tiny model, CPU, offline."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_memfree import safeio
from sd_memfree.run import checkpointing, state
from sd_memfree.run.runguard import check_launched_processes, check_learning_rate, guarded_run
from sd_memfree.run.stopping import RunStopped
from helpers import assert_no_partial_files, complete_steps, run_recipe, saved_tensors
from helpers import cli_error as recipe_cli_error
from helpers import train_argv as args
from train_scripts import train_sd_ietagc as train


def run(argv):
    return run_recipe(train, argv)


def one_line_error(capsys, argv, cli=None) -> str:
    """The SD script's (or ``cli``'s) one line for bad input, exit 2."""
    return recipe_cli_error(capsys, cli or train.cli, argv, 2)


def cli_error(capsys, argv, code) -> str:
    return recipe_cli_error(capsys, train.cli, argv, code)


@contextmanager
def within(seconds: int):
    """Fail (instead of hanging the suite) if the block takes longer than ``seconds``."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def listing(folder: Path) -> dict[str, tuple[str, int]]:
    """Every entry under ``folder`` with its kind and size, read with lstat only (never opens a
    FIFO): what must still be there after a refused resume."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        kind = "link" if p.is_symlink() else "fifo" if p.is_fifo() else "dir" if p.is_dir() else "file"
        out[str(p.relative_to(folder))] = (kind, st.st_size if kind == "file" else 0)
    return out


# ---- 1. non-finite state anywhere ---------------------------------------------------------------

class _Holder:
    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state


def test_non_finite_tensor_anywhere_in_the_state_is_refused_before_writing(tmp_path):
    """A NaN deep in a stashed optimizer state, and an inf in what Slimmed leaves to the model
    folders: NonFiniteState names where, and the folder stays empty. bf16 and int tensors pass
    through the grouping (ints are never non-finite); finite huge values (1e38) are fine."""
    stash = {"state": {0: {"exp_avg": torch.tensor([1.0, float("nan")]), "step": torch.tensor(3)}}}
    objects = {"proxies": _Holder({"stashed": [None, stash], "sum": torch.full((3,), 1e38), "half": torch.ones(2, dtype=torch.bfloat16)})}
    with pytest.raises(state.NonFiniteState) as e:
        state.save_process_state(tmp_path, 0, 1, objects)
    assert e.value.where == ["proxies.stashed[1].state.0.exp_avg"]
    assert "NaN/inf in 1 tensor(s): proxies.stashed[1].state.0.exp_avg" in str(e.value)
    assert list(tmp_path.iterdir()) == []

    live = _Holder({"w": torch.tensor([float("inf")])})
    slim = state.Slimmed(live, drop=lambda s: ["w"], fill=lambda keys: {})
    with pytest.raises(state.NonFiniteState, match=r"trainable\.w"):
        state.save_process_state(tmp_path, 0, 1, {"trainable": slim})
    assert list(tmp_path.iterdir()) == []
    ok = {"proxies": _Holder({"sum": torch.full((3,), 1e38), "half": torch.ones(2, dtype=torch.bfloat16), "n": torch.tensor([7])})}
    state.save_process_state(tmp_path, 0, 1, ok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state_rank0.json", "state_rank0.safetensors"]


def test_sharded_run_with_non_finite_inactive_proxy_state_writes_no_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """The issue's run: --num_shards 2 --merge_every 2 --learning_rate 3e37 --checkpointing_steps 3.
    The live weights pass the weights check at step 3, but the other proxy's stashed AdamW state
    is non-finite: the run stops before writing checkpoint-3, says so truthfully, and gives advice
    that works (a new run; a resume would replay the same steps). Nothing non-finite on disk."""
    out = tmp_path / "div"
    argv = [a for a in args(tiny_model_dir, tiny_data_dir, out, "--num_shards=2", "--merge_every=2", "--checkpointing_steps=3", steps=12)
            if not a.startswith("--learning_rate")] + ["--learning_rate=3e37"]
    line = cli_error(capsys, argv, 1)
    assert line.startswith("error: the run diverged by step 3: the state of the checkpoint holds NaN/inf in "), line
    assert "proxies.state.stashed_optimizer." in line and "so checkpoint-3 was not written and nothing non-finite was saved" in line
    assert "newest checkpoint: none was written" in line
    assert "start a new run in a new --output_dir with a lower --learning_rate (now 3e+37)" in line
    assert "then resume" not in line
    assert complete_steps(out) == []
    assert all(torch.isfinite(t).all() for t in saved_tensors(out).values())
    assert_no_partial_files(out)


def test_learning_rate_beyond_float32_is_one_line(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """--learning_rate 1e38 made AdamW raise 'value cannot be converted to type float without
    overflow' at step 1; now one line, exit 2, before anything loads. A rate --scale_lr pushes
    past the limit is caught where AdamW fails (guarded_run: one line, exit 1)."""
    out = tmp_path / "lr"
    line = cli_error(capsys, args(tiny_model_dir, tiny_data_dir, out, "--learning_rate=1e38"), 2)
    assert line.startswith("error: --learning_rate=1e+38 is too large") and "below 3.4e+37" in line, line
    assert not out.exists()
    check_learning_rate(3e37)  # the diverging rate is a legal one
    with pytest.raises(ValueError, match="too large"):
        check_learning_rate(float("nan"))

    def overflowing(stop):
        p = torch.nn.Parameter(torch.ones(2))
        p.grad = torch.ones(2)
        torch.optim.AdamW([p], lr=1e38).step()

    with pytest.raises(RunStopped, match="the optimizer step overflowed float32.*lower --learning_rate"):
        guarded_run(str(tmp_path / "o"), overflowing)


# ---- 3, 4, 5. damaged and forged checkpoints --------------------------------------------------

@pytest.fixture(scope="module")
def full_checkpoint_run(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """A full fine-tuning run's output folder holding checkpoint-2 (unet/ is the live model, so a
    resume fills the trainable weights from unet/*.safetensors)."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    run(args(tiny_model_dir, tiny_data_dir, out, "--checkpointing_steps=2", steps=2))
    return out


def _edit_state(ckpt: Path, change) -> None:
    path = ckpt / "state_rank0.json"
    payload = json.loads(path.read_text())
    change(payload)
    path.write_text(json.dumps(payload))


def _deep_json(ckpt: Path) -> None:
    (ckpt / "state_rank0.json").write_text("[" * 100_000 + "]" * 100_000)


def _bad_header(ckpt: Path) -> None:
    (ckpt / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 64)


def _link_to_non_model(ckpt: Path) -> None:
    weights = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    weights.symlink_to(ckpt / "trajectory.json")


def _fifo(name: str):
    def make(ckpt: Path) -> None:
        (ckpt / name).unlink()
        os.mkfifo(ckpt / name)
    return make


def _bad_rng(payload: dict) -> None:
    payload["rng"]["python"] = {"__tuple__": [3, "not a state", None]}


HOSTILE = {
    "bad safetensors header in unet/": (_bad_header, "diffusion_pytorch_model.safetensors is not a readable safetensors file"),
    "unet weights linked to a non-model file": (_link_to_non_model, "diffusion_pytorch_model.safetensors is not a readable safetensors file"),
    "global_step is 'abc'": (lambda c: _edit_state(c, lambda p: p["objects"]["counters"].update(global_step="abc")),
                             "counters.global_step = 'abc' is not a count"),
    "global_step is 10**30": (lambda c: _edit_state(c, lambda p: p["objects"]["counters"].update(global_step=10 ** 30)),
                              "is not a count"),
    "global_step disagrees with the marker": (lambda c: _edit_state(c, lambda p: p["objects"]["counters"].update(global_step=3)),
                                              "its state is at step 3 but its .complete marker says step 2"),
    "marker step past the budget": (lambda c: (c / ".complete").write_text('{"step": 1000}'),
                                    "is at step 1000, past this run's --max_train_steps=4"),
    "bad RNG state": (lambda c: _edit_state(c, _bad_rng), "its RNG state is damaged"),
    ".complete holds 1e400": (lambda c: (c / ".complete").write_text("1e400"), "holds a JSON float, not the dict it should"),
    ".complete holds []": (lambda c: (c / ".complete").write_text("[]"), "holds a JSON list, not the dict it should"),
    ".complete step is 1e400": (lambda c: (c / ".complete").write_text('{"step": 1e400}'), "gives step inf, which is not a step count"),
    "trajectory.json is a list": (lambda c: (c / "trajectory.json").write_text("[]"), "trajectory.json holds a JSON list"),
    "train_args.json is a list": (lambda c: (c / "train_args.json").write_text("[1]"), "train_args.json holds a JSON list"),
    "state JSON nested 100,000 deep": (_deep_json, "is JSON nested too deep"),
    "state JSON is a FIFO": (_fifo("state_rank0.json"), "state_rank0.json is a FIFO (named pipe), not a regular file"),
    "state tensors are a FIFO": (_fifo("state_rank0.safetensors"), "state_rank0.safetensors is a FIFO (named pipe), not a regular file"),
    "unet weights are a FIFO": (_fifo("unet/diffusion_pytorch_model.safetensors"), "is a FIFO (named pipe), not a regular file"),
    "trajectory.json is a FIFO": (_fifo("trajectory.json"), "trajectory.json is a FIFO (named pipe), not a regular file"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_damaged_or_forged_checkpoint_is_one_line(full_checkpoint_run, tiny_model_dir, tiny_data_dir, tmp_path, capsys, case):
    """Each damage of checkpoint-2, resumed with 'latest' (budget 4): exit 2, one line naming the
    problem, within 120 s (a FIFO used to block open() forever), and the folder unchanged."""
    damage, expected = HOSTILE[case]
    out = tmp_path / "run"
    shutil.copytree(full_checkpoint_run, out, symlinks=True)
    damage(out / "checkpoint-2")
    before = listing(out)
    with within(120):
        line = one_line_error(capsys, args(tiny_model_dir, tiny_data_dir, out, "--resume_from_checkpoint=latest", steps=4))
    assert expected in line, line
    assert listing(out) == before


def test_upstream_optimizer_of_wrong_shapes_starts_moments_from_zero(tiny_model_dir, tiny_data_dir, tmp_path, caplog):
    """diffusers' checkpoint-2 whose optimizer.bin holds moments of the wrong shapes (it loaded,
    then crashed at step 1): a warning, the moments start from zero, the run finishes."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    unet.save_pretrained(tmp_path / "their_unet")
    opt = torch.optim.AdamW(unet.parameters())
    for p in unet.parameters():
        opt.state[p] = {"step": torch.tensor(30.0), "exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1)}
    ckpt = tmp_path / "out" / "checkpoint-2"
    shutil.copytree(tmp_path / "their_unet", ckpt / "unet")
    torch.save(opt.state_dict(), ckpt / "optimizer.bin")
    summary = run(args(tiny_model_dir, tiny_data_dir, tmp_path / "out", "--resume_from_checkpoint=latest", steps=4))
    assert summary["steps_this_run"] == 2
    assert any("optimizer.bin not loaded" in r.message and "has shape (1,)" in r.message for r in caplog.records)


def test_symlinked_checkpoint_is_never_pruned_replaced_or_listed(tmp_path):
    """checkpoint-1 is a link to another run's folder: pruning skips it (rmtree raised through it),
    writing checkpoint-1 refuses it, 'latest' ignores it, a fresh run is told to move it."""
    elsewhere = tmp_path / "elsewhere" / "checkpoint-1"
    elsewhere.mkdir(parents=True)
    (elsewhere / ".complete").write_text('{"step": 1}')
    (elsewhere / "keep.txt").write_text("theirs")
    out = tmp_path / "out"
    for step in (2, 3):
        with checkpointing.atomic_checkpoint_dir(out, step) as tmp:
            (tmp / "x").write_text(str(step))
    (out / "checkpoint-1").symlink_to(elsewhere, target_is_directory=True)
    assert checkpointing.prune_checkpoints(out, 1) == [out / "checkpoint-2"]
    assert (out / "checkpoint-1").is_symlink() and (elsewhere / "keep.txt").read_text() == "theirs"
    assert [s for s, _ in checkpointing.list_checkpoints(out)] == [3]
    with pytest.raises(FileExistsError, match="symbolic link"):
        with checkpointing.atomic_checkpoint_dir(out, 1):
            pass
    assert (elsewhere / "keep.txt").read_text() == "theirs"
    from sd_memfree.run.startpoint import plan_start

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "checkpoint-1").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="holds checkpoint-1, a symbolic link to another folder, which sd_memfree never prunes") as e:
        plan_start(None, fresh, {}, max_train_steps=4, num_shards=1, merge_every=1)
    assert "\n" not in str(e.value)


# ---- 4. datasets and the scorer -----------------------------------------------------------------

def _data_with(tmp_path: Path, tiny_data_dir: Path, name: str) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    outside = tmp_path / "x.png"
    shutil.copy(next(data.glob("*.png")), outside)
    with open(data / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": name if name != "ABS" else str(outside), "text": "outside"}) + "\n")
    return data


@pytest.mark.parametrize("name", ["../x.png", "ABS"])
def test_dataset_file_name_outside_the_folder(tmp_path, tiny_data_dir, tiny_model_dir, capsys, name):
    """A metadata row naming ../x.png or an absolute path (datasets raised a traceback): one line
    naming the row, exit 2; check_samples(drop_bad=True), as --drop_bad_samples, drops exactly it."""
    from sd_memfree.data import check_samples, load_image_caption_dataset

    rows = len((tiny_data_dir / "metadata.jsonl").read_text().split("\n")) - 1
    data = _data_with(tmp_path, tiny_data_dir, name)
    line = cli_error(capsys, args(tiny_model_dir, data, tmp_path / "o"), 2)
    assert f"1 of {rows + 1} training samples cannot be used" in line and "leaves the dataset folder" in line, line
    assert "--drop_bad_samples" in line and not (tmp_path / "o").exists()
    ds, image_col, caption_col = load_image_caption_dataset(train_data_dir=str(data), verify_images=False)
    kept, dropped = check_samples(ds, image_col, caption_col, drop_bad=True, progress=False)
    assert len(kept) == rows and [d["index"] for d in dropped] == [rows] and "outside" not in kept[caption_col]


def test_dataset_image_that_is_a_fifo_is_refused_without_blocking(tmp_path, tiny_data_dir):
    """An image file replaced by a FIFO: the start-up check names it instead of hanging in open()."""
    from sd_memfree.data import DataError, check_samples, load_image_caption_dataset

    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    first = json.loads((data / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    ds, image_col, caption_col = load_image_caption_dataset(train_data_dir=str(data), verify_images=False)
    (data / first).unlink()
    os.mkfifo(data / first)
    with within(60), pytest.raises(DataError, match=f"{first} \\(sample 0\\): not a regular file") as e:
        check_samples(ds, image_col, caption_col, progress=False)
    assert "\n" not in str(e.value)


def test_scorer_with_one_training_image_stops_before_generation(tmp_path, tiny_data_dir, tiny_model_dir, capsys, monkeypatch):
    """One training image: the pixel copy test (d1/d2) and FID need two, so the scorer stops with
    one line before loading the pipeline (it failed after generation and embedding)."""
    from sd_memfree.scoring import generate, run as score
    from sd_memfree.testing import standin

    def refuse(*a, **k):
        raise AssertionError("the pipeline was loaded before the input was checked")

    monkeypatch.setattr(generate, "load_pipeline", refuse)
    data = tmp_path / "one"
    data.mkdir()
    first = json.loads((tiny_data_dir / "metadata.jsonl").read_text().splitlines()[0])
    shutil.copy(tiny_data_dir / first["file_name"], data / first["file_name"])
    (data / "metadata.jsonl").write_text(json.dumps(first) + "\n")
    sscd_file = standin.make_copy_detector_sscd(tmp_path / "sscd.pt")
    with pytest.raises(SystemExit) as e:
        score.cli(["--model", str(tiny_model_dir), "--train_data_dir", str(data), "--sscd_model", str(sscd_file),
                   "--no_clip_score", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "has 1 distinct image(s) but the pixel copy test and FID need at least 2" in line, line
    assert "--pixel_size 0 and --no_fid" in line and not (tmp_path / "o").exists()


# ---- 2. SSCD weights that lie -------------------------------------------------------------------

class _RandomUnitVectors(torch.nn.Module):
    """What the issue served: a well-formed model returning random unit vectors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(x.shape[0], 512), dim=-1)


def test_copy_check_passes_a_copy_detector_and_refuses_random_weights(tmp_path):
    """The thumbnail stand-in (a real, if weak, copy detector) passes; random unit vectors and a
    random-weight SSCD-shaped network fail with one line giving both similarity ranges."""
    from sd_memfree.scoring import sscd
    from sd_memfree.testing import standin

    good = sscd.load_sscd(str(standin.make_copy_detector_sscd(tmp_path / "good.pt")))
    low, high = sscd.check_copy_detection(good, "good")
    assert low > high + 0.2
    for model in (torch.jit.script(_RandomUnitVectors()), sscd.load_sscd(str(standin.make_standin_sscd(tmp_path / "random.pt")))):
        with pytest.raises(sscd.SSCDError, match="does not detect copies: an image and its re-encoded / resized / cropped copies") as e:
            sscd.check_copy_detection(model, "m")
        assert "\n" not in str(e.value)


def test_known_name_in_the_cache_is_verified_then_pinned_to_its_hash(tmp_path, monkeypatch):
    """A random-weight file put in the cache as sscd_disc_mixup is refused (nothing recorded);
    a copy detector there passes and its SHA-256 is recorded; swapping in other bytes afterwards
    is refused by the hash, and so is a file that differs from a published hash."""
    from sd_memfree.scoring import sscd
    from sd_memfree.testing import standin

    monkeypatch.setenv("SD_MEMFREE_CACHE", str(tmp_path / "cache"))
    dest = sscd.cached_sscd_path("sscd_disc_mixup")
    standin.make_standin_sscd(dest)
    with pytest.raises(sscd.SSCDError, match="does not detect copies"):
        sscd.load_sscd("sscd_disc_mixup")
    assert not (dest.parent / sscd.VERIFIED_FILE).exists()
    standin.make_copy_detector_sscd(dest)
    sscd.load_sscd("sscd_disc_mixup")
    recorded = json.loads((dest.parent / sscd.VERIFIED_FILE).read_text())
    assert recorded == {"sscd_disc_mixup": sscd.file_sha256(dest)}
    sscd.load_sscd("sscd_disc_mixup")  # the same bytes: accepted
    standin.make_copy_detector_sscd(dest, seed=1)  # another file (also a copy detector)
    with pytest.raises(sscd.SSCDError, match="recorded in .*verified.json when it was first verified"):
        sscd.load_sscd("sscd_disc_mixup")
    monkeypatch.setitem(sscd.KNOWN_SSCD_SHA256, "sscd_disc_blur", "0" * 64)
    standin.make_copy_detector_sscd(sscd.cached_sscd_path("sscd_disc_blur"))
    with pytest.raises(sscd.SSCDError, match="not 0{64} \\(the SSCD authors' published SHA-256\\)"):
        sscd.load_sscd("sscd_disc_blur")


# ---- 6. disk full after the final model is in place ----------------------------------------------

def test_disk_full_after_the_final_model_names_the_file_and_the_state(tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch):
    """ENOSPC writing memfree_state.json, after the LoRA weights are published, with no checkpoint:
    the line names memfree_state.json, says the model is in place and the card is missing, and
    does not say 'resume from latest' (which would start from scratch): rerun the command."""
    real = safeio.replace_file
    monkeypatch.setattr(safeio, "replace_file", lambda path, data: _enospc_for(path, data, real))
    out = tmp_path / "full"
    line = cli_error(capsys, args(tiny_model_dir, tiny_data_dir, out, "--use_lora", steps=2), 1)
    assert line.startswith(f"error: no space left on device while writing {out / 'memfree_state.json'} "
                           f"(the final model (pytorch_lora_weights.safetensors) is in {out} but memfree_state.json"), line
    assert "no checkpoint was written" in line and "rerun the same command (with no checkpoint it trains again from step 0" in line
    assert "latest" not in line
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "memfree_state.json").exists()


def _enospc_for(path, data, real):
    """``replace_file`` on a disk that fills up at memfree_state.json (the write fails, the old
    name is untouched: replace_file never publishes a partial file)."""
    if Path(path).name == "memfree_state.json":
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:  # as replace_file reports a failed write: with the file's name
            raise OSError(e.errno, e.strerror, str(path)) from e
    return real(path, data)


def test_replace_file_names_the_file_on_a_full_disk(tmp_path, monkeypatch):
    """A write that fails for lack of space names the file being written and leaves no temporary."""
    target = tmp_path / "a.json"
    target.write_text("old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as e:
        safeio.replace_file(target, "new")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


# ---- 7. several processes on CPU ----------------------------------------------------------------

def test_workers_that_see_only_themselves_are_refused():
    """torchrun set WORLD_SIZE=2 but accelerate sees one process (CPU without ACCELERATE_USE_CPU=1):
    one line saying what to set; a real 2-process group, or one process, passes."""
    with pytest.raises(ValueError) as e:
        check_launched_processes(1, {"WORLD_SIZE": "2"})
    assert str(e.value).startswith("WORLD_SIZE=2: 2 processes were launched but each sees only itself (ACCELERATE_USE_CPU=unset)")
    assert "set ACCELERATE_USE_CPU=1" in str(e.value) and "\n" not in str(e.value)
    check_launched_processes(2, {"WORLD_SIZE": "2"})
    check_launched_processes(1, {})
    check_launched_processes(1, {"WORLD_SIZE": "x"})


# ---- 8. never write through a symlink -------------------------------------------------------------

def test_links_in_output_dir_are_replaced_not_written_through(tiny_model_dir, tiny_data_dir, tmp_path):
    """train_args.json, README.md, memfree_config.json and memfree_state.json in output_dir are
    links to files outside it, and .tmp-final (where the final model is staged) links to another
    folder: the run replaces the links with its own files, the files outside keep their bytes and
    the other folder is neither written into nor emptied."""
    out = tmp_path / "out"
    out.mkdir()
    outside = {}
    for name in ("train_args.json", "README.md", "memfree_config.json", "memfree_state.json"):
        target = tmp_path / f"precious-{name}"
        target.write_text(f"do not overwrite {name}")
        (out / name).symlink_to(target)
        outside[name] = target
    theirs = tmp_path / "their-folder"  # the final model's staging name, linked to another folder
    theirs.mkdir()
    (theirs / "keep.txt").write_text("theirs")
    (out / ".tmp-final").symlink_to(theirs, target_is_directory=True)
    run(args(tiny_model_dir, tiny_data_dir, out, "--use_lora", steps=2))
    for name, target in outside.items():
        assert target.read_text() == f"do not overwrite {name}"
        assert not (out / name).is_symlink() and (out / name).is_file()
    assert [p.name for p in theirs.iterdir()] == ["keep.txt"] and not (out / "keep.txt").exists()
    assert json.loads((out / "train_args.json").read_text())["max_train_steps"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(out / "pytorch_lora_weights.safetensors").values())


def test_read_json_refuses_a_fifo_without_blocking(tmp_path):
    """The reader every checkpoint JSON goes through: a FIFO is refused at once (O_NONBLOCK)."""
    os.mkfifo(tmp_path / "p.json")
    with within(10), pytest.raises(safeio.UnsafeFile, match="is a FIFO \\(named pipe\\), not a regular file"):
        safeio.read_json(tmp_path / "p.json", "fix it.")


def test_resume_of_a_finished_run_writes_its_final_files_again(tiny_model_dir, tiny_data_dir, tmp_path):
    """The disk-full advice when a checkpoint exists: memfree_state.json and the card were lost
    after the model was published; rerunning with --resume_from_checkpoint latest (the checkpoint
    is at the last step) trains nothing and writes them again, with the same weights."""
    out = tmp_path / "done"
    run(args(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--checkpointing_steps=2", steps=2))
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    (out / "memfree_state.json").unlink()
    (out / "README.md").unlink()
    summary = run(args(tiny_model_dir, tiny_data_dir, out, "--use_lora", "--checkpointing_steps=2", "--resume_from_checkpoint=latest", steps=2))
    assert summary["steps_this_run"] == 0 and summary["global_step"] == 2
    assert json.loads((out / "memfree_state.json").read_text())["global_step"] == 2 and (out / "README.md").is_file()
    after = load_file(out / "pytorch_lora_weights.safetensors")
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in after)
