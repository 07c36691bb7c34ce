"""Crash-safe checkpoint folders: write to a temporary folder, mark it complete, rename it.

The diffusers example scripts delete old checkpoints *before* writing the new one and write
``checkpoint-N`` in place, so a crash mid-save can leave a half-written folder that looks complete
and may already have deleted the newest good one. Here:

* a checkpoint is written into ``output_dir/.tmp-checkpoint-N`` (:func:`atomic_checkpoint_dir`),
  then a ``.complete`` marker is written, everything is fsynced, and the folder is renamed to
  ``checkpoint-N`` in one ``os.replace``;
* only folders ``checkpoint-<int>`` holding the marker count as checkpoints
  (:func:`list_checkpoints`), so a half-written folder is never resumed from;
* old checkpoints are pruned *after* the new one is complete (:func:`prune_checkpoints`).

Invariants:
    - A folder named ``checkpoint-<int>`` with a ``.complete`` marker holds a fully written,
      fsynced checkpoint (as long as only this module writes checkpoints).
    - Every folder this module creates that is not (yet) a complete checkpoint is named
      ``.tmp-checkpoint-*``; such folders are never resumable and are removed by
      :func:`prune_checkpoints`.
    - A ``checkpoint-<int>`` folder without the marker (another script's, e.g. diffusers'
      example scripts write accelerate's ``save_state`` layout there) is never replaced, pruned
      or resumed as ours (:func:`foreign_checkpoints`, :func:`is_accelerate_checkpoint`).
    - A ``checkpoint-<int>`` that is a symbolic link is never ours either: it is never listed as
      a checkpoint, pruned or replaced (deleting through it would reach another folder), only
      resumed when named explicitly.
    - A marker is trusted only as a JSON object whose ``step`` is a count (:func:`checkpoint_step`).

Pure filesystem helpers: nothing here imports accelerate; the caller passes
``accelerator.is_main_process`` and ``accelerator.wait_for_everyone``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..safeio import read_json, replace_file

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = ".complete"
TMP_PREFIX = ".tmp-" + CHECKPOINT_PREFIX

_CHECKPOINT_NAME = re.compile(re.escape(CHECKPOINT_PREFIX) + r"(\d+)")


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding the completion marker."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest step first.

    Only folders named exactly ``checkpoint-<int>`` that contain the ``.complete`` marker are
    listed; temporary (``.tmp-checkpoint-*``) and incomplete folders are ignored. A missing
    ``output_dir`` has no checkpoints.
    """
    return [(step, entry) for step, entry in _numbered_folders(output_dir) if not entry.is_symlink() and is_complete(entry)]


def _numbered_folders(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Folders (or links to folders) named exactly ``checkpoint-<int>`` in ``output_dir``, as
    ``(step, path)``, oldest step first; none when ``output_dir`` is missing."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found, key=lambda step_path: step_path[0])


# What accelerate's ``save_state`` writes (diffusers' example scripts checkpoint with it).
_ACCELERATE_STATE_FILES = ("optimizer.bin", "optimizer.safetensors", "scheduler.bin", "random_states_0.pkl", "model.safetensors")


def foreign_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-<int>`` folders in ``output_dir`` that this module did not write (no marker),
    e.g. diffusers' example scripts' checkpoints, oldest step first. They are never resumed,
    pruned or overwritten."""
    return [entry for _, entry in _numbered_folders(output_dir) if entry.is_symlink() or not is_complete(entry)]


def is_accelerate_checkpoint(path: str | os.PathLike) -> bool:
    """An unmarked folder holding accelerate ``save_state`` files (another script's checkpoint)."""
    path = Path(path)
    return not is_complete(path) and any((path / name).exists() for name in _ACCELERATE_STATE_FILES)


def describe_foreign(path: str | os.PathLike) -> str:
    """What an unmarked (or linked) checkpoint folder looks like, for error messages."""
    if Path(path).is_symlink():
        return "a symbolic link to another folder, which sd_memfree never prunes, replaces or resumes as 'latest'"
    if is_accelerate_checkpoint(path):
        return "an accelerate save_state checkpoint (as diffusers' train_text_to_image scripts write), not one of sd_memfree"
    return "not a complete sd_memfree checkpoint (no .complete marker: not written by sd_memfree, or not fully written)"


def checkpoint_step(checkpoint: str | os.PathLike) -> int:
    """The optimizer step a complete checkpoint was saved at, read from its marker.

    Read from the marker rather than the folder name, so a checkpoint copied or renamed
    elsewhere (``--resume_from_checkpoint=/backup/run1-final``) still resumes at the right step.

    Raises:
        ValueError: one line: the marker is not a regular file, not JSON, not an object, or its
            ``step`` is not a count (``1e400``, ``"3"``, ``-1``, ``true``).
    """
    marker = Path(checkpoint) / COMPLETE_MARKER
    fix = "the checkpoint is damaged: resume from another checkpoint."
    step = read_json(marker, fix).get("step")
    if type(step) is not int or not 0 <= step <= 2 ** 53:
        raise ValueError(f"{marker} gives step {step!r}, which is not a step count; {fix}")
    return step


def resolve_resume_checkpoint(
    resume_from_checkpoint: str | None, output_dir: str | os.PathLike
) -> Path | None:
    """The checkpoint folder to resume from, or None to start a new run.

    Args:
        resume_from_checkpoint: ``None`` (no resume), ``"latest"`` (newest complete checkpoint in
            ``output_dir``, or another script's accelerate checkpoint if that is newer; None when
            there is none) or a path: absolute, relative to the current directory, or else
            relative to ``output_dir`` (``"checkpoint-500"``). Unlike the diffusers scripts, a
            path outside ``output_dir`` is honoured.
        output_dir: the run's output folder.

    Returns:
        The checkpoint folder, or None. It is ours when :func:`is_complete`, else another
        script's (:func:`is_accelerate_checkpoint`), from which only weights can be taken.

    Raises:
        FileNotFoundError: an explicit path that does not exist, or that is neither complete nor
            an accelerate checkpoint.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        # Another script's (accelerate layout) checkpoint counts too, so a run can switch scripts;
        # on a tie of steps ours wins (it holds the exact state).
        candidates = [(step, 1, path) for step, path in list_checkpoints(output_dir)]
        candidates += [(int(p.name[len(CHECKPOINT_PREFIX):]), 0, p) for p in foreign_checkpoints(output_dir) if is_accelerate_checkpoint(p)]
        return max(candidates)[2] if candidates else None

    candidate = Path(resume_from_checkpoint).expanduser()
    if not candidate.exists() and not candidate.is_absolute():
        candidate = Path(output_dir) / resume_from_checkpoint
    if not candidate.is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint={resume_from_checkpoint!r}: no such folder (looked in the "
            f"current directory and in {str(output_dir)!r}); pass an existing checkpoint folder or 'latest'"
        )
    if not is_complete(candidate) and not is_accelerate_checkpoint(candidate):
        raise FileNotFoundError(
            f"--resume_from_checkpoint: {str(candidate)!r} has no {COMPLETE_MARKER} marker and no accelerate "
            f"state: it was not fully written; pick another checkpoint or 'latest'"
        )
    return candidate


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (``root`` included) to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    # A rename or a new file is durable only once its parent folder's entry is flushed. Windows
    # cannot open a folder for fsync and has no such requirement.
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_checkpoint_dir(
    output_dir: str | os.PathLike,
    step: int,
    is_main_process: bool = True,
    wait_for_everyone: Callable[[], None] = lambda: None,
) -> Iterator[Path]:
    """Yield a temporary folder to save a checkpoint into; publish it as ``checkpoint-<step>``.

    Use it on every process with ``accelerator.wait_for_everyone`` (all processes may write into
    the folder, e.g. accelerate's per-process RNG files), or on the main process only with the
    default no-op ``wait_for_everyone``::

        with atomic_checkpoint_dir(args.output_dir, global_step,
                                   accelerator.is_main_process, accelerator.wait_for_everyone) as path:
            accelerator.save_state(path)

    On normal exit: all processes meet, then the main process writes the ``.complete`` marker,
    fsyncs the folder and renames it to ``checkpoint-<step>`` with ``os.replace``; an existing
    ``checkpoint-<step>`` is first renamed aside and removed only once the new one is in place;
    then all processes meet again, so none proceeds before the checkpoint is published.

    On an exception inside the block: the main process removes the temporary folder and the
    exception propagates; an existing ``checkpoint-<step>`` is untouched.

    Raises:
        FileExistsError: ``checkpoint-<step>`` exists without our marker (another script's).
    """
    output_dir = Path(output_dir)
    tmp = output_dir / f"{TMP_PREFIX}{step}"
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    if final.is_symlink() or (final.exists() and not is_complete(final)):
        # Not ours (e.g. diffusers' script wrote it): replacing it would destroy the user's work.
        raise FileExistsError(f"{final} exists and is {describe_foreign(final)}; it is never overwritten: move it or choose a new --output_dir")
    if is_main_process:
        # A leftover from a crash at the same step would mix old files into the new checkpoint.
        if tmp.is_symlink():
            tmp.unlink()  # a link under our temporary name: never write (or delete) through it
        elif tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    # The other processes must not write into the folder before it exists (or while a leftover
    # is being removed).
    wait_for_everyone()
    try:
        yield tmp
    except BaseException:
        if is_main_process:
            # ignore_errors: the original exception is the one worth reporting; a leftover
            # .tmp-checkpoint-* is removed by prune_checkpoints anyway.
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    wait_for_everyone()
    if is_main_process:
        replace_file(tmp / COMPLETE_MARKER, f'{{"step": {int(step)}}}\n')
        _fsync_tree(tmp)
        if final.exists():
            # os.replace cannot overwrite a non-empty folder: move the old one aside (a name that
            # is never resumed and is cleaned up by prune_checkpoints), publish, then delete it.
            # Only a crash between the two renames leaves no checkpoint-<step>; older ones stay.
            aside = output_dir / f"{TMP_PREFIX}{step}.old"
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(final, aside)
            os.replace(tmp, final)
            _fsync_dir(output_dir)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, final)
            _fsync_dir(output_dir)
    wait_for_everyone()


def prune_checkpoints(
    output_dir: str | os.PathLike, total_limit: int | None, keep: str | os.PathLike | None = None
) -> list[Path]:
    """Remove the oldest complete checkpoints so that at most ``total_limit`` remain.

    Call it on the main process only, after :func:`atomic_checkpoint_dir` has published the new
    checkpoint (the diffusers scripts prune before saving, which loses the newest good checkpoint
    if the save then fails).

    Args:
        output_dir: the run's output folder.
        total_limit: how many complete checkpoints may remain (``--checkpoints_total_limit``);
            None keeps all of them.
        keep: a checkpoint that is never removed, normally the one just written.

    Returns:
        The removed folders: pruned checkpoints, oldest first, then stale ``.tmp-checkpoint-*``
        folders left by a crash (never resumable, so always removed). Incomplete
        ``checkpoint-<int>`` folders are left alone: they are not ours to judge.

    Raises:
        ValueError: ``total_limit`` below 1.
    """
    if total_limit is not None and total_limit < 1:
        raise ValueError(f"checkpoints total limit must be at least 1 or None, got {total_limit}")
    output_dir = Path(output_dir)
    removed: list[Path] = []

    if total_limit is not None:
        checkpoints = list_checkpoints(output_dir)
        keep_resolved = Path(keep).resolve() if keep is not None else None
        removable = [path for _, path in checkpoints if path.resolve() != keep_resolved]
        for path in removable[: max(0, len(checkpoints) - total_limit)]:
            # Rename first: a crash half-way through rmtree must not leave a folder that still
            # holds its marker and looks complete.
            trash = output_dir / f"{TMP_PREFIX}{path.name[len(CHECKPOINT_PREFIX):]}.removing"
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(path, trash)
            shutil.rmtree(trash)
            removed.append(path)

    if output_dir.is_dir():
        for stale in sorted(output_dir.glob(f"{TMP_PREFIX}*")):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
                removed.append(stale)
    return removed


def _remove(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a folder; nothing if absent."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def publish_entries(staging: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Move every top-level entry of ``staging`` into ``dest``, each with one atomic rename, then
    remove ``staging``. An entry that already exists in ``dest`` is renamed aside first and
    deleted only after the new one is in place, so a crash never leaves a half-written model file
    or folder under its final name (the final model is written to ``staging`` first).

    Returns:
        The names published.
    """
    staging, dest = Path(staging), Path(dest)
    _fsync_tree(staging)
    names = sorted(p.name for p in staging.iterdir())
    for name in names:
        target = dest / name
        old = dest / f".old-{name}"
        if target.exists() or target.is_symlink():
            _remove(old)
            os.replace(target, old)  # renames a link itself, never what it points to
        os.replace(staging / name, target)
        _remove(old)
    _fsync_dir(dest)
    shutil.rmtree(staging, ignore_errors=True)
    return names
