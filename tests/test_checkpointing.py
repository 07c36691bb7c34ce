"""Crash-safe checkpoint folders: write, crash, list, resume, prune, overwrite."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_memfree.run.checkpointing import (
    COMPLETE_MARKER,
    atomic_checkpoint_dir,
    checkpoint_step,
    list_checkpoints,
    prune_checkpoints,
    resolve_resume_checkpoint,
)


def save(output_dir: Path, step: int, payload: str | None = None) -> Path:
    """Write a checkpoint the way the training script does, with one state file."""
    with atomic_checkpoint_dir(output_dir, step) as path:
        (path / "state.txt").write_text(payload if payload is not None else f"step {step}")
    return output_dir / f"checkpoint-{step}"


def names(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.iterdir())


def test_save_publishes_complete_checkpoint_and_no_temp(tmp_path):
    """One save at step 7 -> exactly `checkpoint-7` with the state file, the marker and step 7."""
    path = save(tmp_path, 7)
    assert names(tmp_path) == ["checkpoint-7"]
    assert (path / "state.txt").read_text() == "step 7"
    assert (path / COMPLETE_MARKER).is_file()
    assert checkpoint_step(path) == 7
    assert list_checkpoints(tmp_path) == [(7, path)]


def test_crash_inside_context_leaves_previous_checkpoints_only(tmp_path):
    """Saves at 1 and 2, then a crash while writing 3 -> no checkpoint-3, no temp folder."""
    save(tmp_path, 1)
    save(tmp_path, 2)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_checkpoint_dir(tmp_path, 3) as path:
            (path / "state.txt").write_text("half")
            raise RuntimeError("disk full")
    assert names(tmp_path) == ["checkpoint-1", "checkpoint-2"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1, 2]
    assert resolve_resume_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-2"


def test_crash_during_overwrite_keeps_existing_checkpoint(tmp_path):
    """checkpoint-4 holds "old"; a failed re-save of step 4 must leave "old" in place."""
    save(tmp_path, 4, "old")
    with pytest.raises(OSError):
        with atomic_checkpoint_dir(tmp_path, 4) as path:
            (path / "state.txt").write_text("new")
            raise OSError("crash")
    assert names(tmp_path) == ["checkpoint-4"]
    assert (tmp_path / "checkpoint-4" / "state.txt").read_text() == "old"


def test_overwrite_existing_step_replaces_it(tmp_path):
    """Re-saving step 4 replaces its content ("old" -> "new"; the stale file is gone) and
    leaves no aside/temp folder."""
    old = save(tmp_path, 4, "old")
    (old / "only_in_old.txt").write_text("x")
    new = save(tmp_path, 4, "new")
    assert names(tmp_path) == ["checkpoint-4"]
    assert (new / "state.txt").read_text() == "new"
    assert not (new / "only_in_old.txt").exists()
    assert checkpoint_step(new) == 4


def test_leftover_temp_of_same_step_is_not_mixed_in(tmp_path):
    """A `.tmp-checkpoint-6` left by a crash holds `junk.txt`; the next save at step 6 must not
    carry it into checkpoint-6."""
    (tmp_path / ".tmp-checkpoint-6").mkdir()
    (tmp_path / ".tmp-checkpoint-6" / "junk.txt").write_text("junk")
    path = save(tmp_path, 6)
    assert sorted(p.name for p in path.iterdir()) == [COMPLETE_MARKER, "state.txt"]


def test_barriers_and_non_main_process(tmp_path):
    """Every process meets 3 times (after creating the folder, before publishing, after
    publishing). A non-main process creates, marks and renames nothing."""
    calls = []
    with atomic_checkpoint_dir(tmp_path, 2, is_main_process=True, wait_for_everyone=lambda: calls.append(1)) as p:
        (p / "rng_0.pkl").write_text("0")
    assert len(calls) == 3

    other = tmp_path / "other"
    other.mkdir()
    calls.clear()
    with atomic_checkpoint_dir(other, 2, is_main_process=False, wait_for_everyone=lambda: calls.append(1)) as p:
        assert p == other / ".tmp-checkpoint-2"
    assert len(calls) == 3
    assert names(other) == []


def test_incomplete_folder_ignored_by_list_and_latest_refused_explicitly(tmp_path):
    """checkpoint-1 complete; checkpoint-9 without marker and without accelerate files (a crash
    or a copy) -> list and "latest" see only step 1; asking for checkpoint-9 explicitly raises."""
    save(tmp_path, 1)
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-9" / "half.safetensors").write_text("half")
    (tmp_path / ".tmp-checkpoint-12").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    assert list_checkpoints(tmp_path) == [(1, tmp_path / "checkpoint-1")]
    assert resolve_resume_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-1"
    with pytest.raises(FileNotFoundError, match=r"checkpoint-9.*no \.complete marker.*not fully written.*'latest'"):
        resolve_resume_checkpoint("checkpoint-9", tmp_path)


def test_accelerate_checkpoints_resolve_as_another_scripts(tmp_path):
    """Ours at 1 and 4, diffusers' (accelerate layout) at 3 and 4: 'latest' takes ours at 4 (a
    tie goes to ours, which holds the exact state); with diffusers' at 6 too, 'latest' is that
    one; an explicit path to one is returned (the script continues from its weights)."""
    from sd_memfree.run.checkpointing import is_accelerate_checkpoint

    save(tmp_path, 1)
    save(tmp_path, 4)
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "random_states_0.pkl").write_text("x")
    assert resolve_resume_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-4"
    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "checkpoint-6" / "optimizer.bin").write_text("x")
    assert resolve_resume_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-6"
    assert resolve_resume_checkpoint("checkpoint-3", tmp_path) == tmp_path / "checkpoint-3"
    assert is_accelerate_checkpoint(tmp_path / "checkpoint-3") and not is_accelerate_checkpoint(tmp_path / "checkpoint-4")


def test_foreign_checkpoints_listed_and_never_overwritten(tmp_path):
    """An upstream checkpoint-4 (accelerate layout, no marker) is listed as foreign, oldest step
    first; saving our step 4 over it raises and leaves its files untouched."""
    from sd_memfree.run.checkpointing import foreign_checkpoints

    for step in (4, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "optimizer.bin").write_text("theirs")
    save(tmp_path, 2)
    assert foreign_checkpoints(tmp_path) == [tmp_path / "checkpoint-4", tmp_path / "checkpoint-12"]
    with pytest.raises(FileExistsError, match=r"checkpoint-4 exists .*never overwritten"):
        save(tmp_path, 4)
    assert (tmp_path / "checkpoint-4" / "optimizer.bin").read_text() == "theirs"
    assert names(tmp_path) == ["checkpoint-12", "checkpoint-2", "checkpoint-4"]


def test_resolve_none_latest_empty_and_missing(tmp_path):
    """None -> None; "latest" with no (or no complete) checkpoint -> None; a missing path raises."""
    assert resolve_resume_checkpoint(None, tmp_path) is None
    assert resolve_resume_checkpoint("latest", tmp_path / "does-not-exist") is None
    (tmp_path / "checkpoint-3").mkdir()
    assert resolve_resume_checkpoint("latest", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="checkpoint-8"):
        resolve_resume_checkpoint("checkpoint-8", tmp_path)


def test_resolve_numeric_order_not_lexical(tmp_path):
    """Steps 9, 10, 100: lexical order would pick "checkpoint-9"; numeric order picks 100."""
    for step in (10, 9, 100):
        save(tmp_path, step)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [9, 10, 100]
    assert resolve_resume_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-100"


def test_resolve_relative_to_output_dir(tmp_path, monkeypatch):
    """CWD has no `checkpoint-5`, so "checkpoint-5" resolves to output_dir/checkpoint-5."""
    out = tmp_path / "run"
    save(out, 5)
    monkeypatch.chdir(tmp_path)
    assert resolve_resume_checkpoint("checkpoint-5", out).resolve() == (out / "checkpoint-5").resolve()


def test_resolve_path_outside_output_dir(tmp_path, monkeypatch):
    """A checkpoint copied to /backup/final (another name, outside output_dir) is honoured,
    both as an absolute path and relative to the CWD, and its step comes from the marker (5)."""
    src = save(tmp_path / "old-run", 5)
    backup = tmp_path / "backup" / "final"
    backup.parent.mkdir()
    src.rename(backup)
    out = tmp_path / "new-run"
    assert resolve_resume_checkpoint(str(backup), out) == backup
    monkeypatch.chdir(tmp_path)
    assert resolve_resume_checkpoint("backup/final", out).resolve() == backup.resolve()
    assert checkpoint_step(backup) == 5


def test_prune_limit_2_after_3_keeps_two_newest(tmp_path):
    """Saves at 10, 20, 30, limit 2 -> 3 - 2 = 1 removed: the oldest (10)."""
    for step in (10, 20, 30):
        save(tmp_path, step)
    removed = prune_checkpoints(tmp_path, 2, keep=tmp_path / "checkpoint-30")
    assert removed == [tmp_path / "checkpoint-10"]
    assert names(tmp_path) == ["checkpoint-20", "checkpoint-30"]


def test_prune_limit_1_never_deletes_newest(tmp_path):
    """Saves at 1, 2, 3, limit 1, keep = checkpoint-3 -> 1 and 2 removed, 3 stays."""
    for step in (1, 2, 3):
        save(tmp_path, step)
    removed = prune_checkpoints(tmp_path, 1, keep=tmp_path / "checkpoint-3")
    assert removed == [tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"]
    assert names(tmp_path) == ["checkpoint-3"]


def test_prune_keeps_keep_even_when_it_is_oldest(tmp_path):
    """Resumed from checkpoint-5 and re-saved it while 7 and 9 exist; limit 2 -> 3 - 2 = 1
    removal, taken from the oldest that is not `keep`: checkpoint-7."""
    for step in (5, 7, 9):
        save(tmp_path, step)
    removed = prune_checkpoints(tmp_path, 2, keep=str(tmp_path / "checkpoint-5"))
    assert removed == [tmp_path / "checkpoint-7"]
    assert names(tmp_path) == ["checkpoint-5", "checkpoint-9"]


def test_prune_leaves_incomplete_removes_stale_temp(tmp_path):
    """Complete 1, 2; incomplete checkpoint-0; stale .tmp-checkpoint-3 and a half-removed
    .tmp-checkpoint-4.removing. Limit 1 -> complete 1 removed (2 - 1 = 1), incomplete 0 kept,
    both stale temp folders removed."""
    save(tmp_path, 1)
    save(tmp_path, 2)
    (tmp_path / "checkpoint-0").mkdir()
    (tmp_path / ".tmp-checkpoint-3").mkdir()
    (tmp_path / ".tmp-checkpoint-4.removing").mkdir()
    (tmp_path / "unet").mkdir()
    removed = prune_checkpoints(tmp_path, 1, keep=tmp_path / "checkpoint-2")
    assert removed == [
        tmp_path / "checkpoint-1",
        tmp_path / ".tmp-checkpoint-3",
        tmp_path / ".tmp-checkpoint-4.removing",
    ]
    assert names(tmp_path) == ["checkpoint-0", "checkpoint-2", "unet"]


def test_prune_without_limit_keeps_all_and_rejects_zero(tmp_path):
    """No limit -> nothing but stale temp removed; limit 0 is refused."""
    for step in (1, 2):
        save(tmp_path, step)
    assert prune_checkpoints(tmp_path, None) == []
    assert names(tmp_path) == ["checkpoint-1", "checkpoint-2"]
    with pytest.raises(ValueError, match="at least 1"):
        prune_checkpoints(tmp_path, 0)


def test_publish_entries_replaces_and_leaves_nothing_behind(tmp_path):
    """Existing entries are replaced by the staged ones; other files and the staging folder go."""
    from sd_memfree.run.checkpointing import publish_entries

    dest = tmp_path / "out"
    (dest / "unet").mkdir(parents=True)
    (dest / "unet" / "old.bin").write_text("old")
    (dest / "checkpoint-5").mkdir()
    staging = dest / ".tmp-final"
    (staging / "unet").mkdir(parents=True)
    (staging / "unet" / "new.bin").write_text("new")
    (staging / "model_index.json").write_text("{}")
    assert publish_entries(staging, dest) == ["model_index.json", "unet"]
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint-5", "model_index.json", "unet"]
    assert [p.name for p in (dest / "unet").iterdir()] == ["new.bin"]
