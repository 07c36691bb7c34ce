"""RunLock: one run per output folder; live holders refuse, gone holders are taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest

from helpers import hold_lock_in_subprocess
from sd_memfree.run.runlock import LOCK_NAME, OutputDirError, RunLock, RunLockHeld, check_output_dir



def test_acquire_writes_holder_and_release_removes_it(tmp_path):
    out = tmp_path / "new" / "run"
    lock = RunLock(out)
    assert lock.acquire() is None
    assert lock.created_dir and lock.held
    holder = json.loads((out / LOCK_NAME).read_text())
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
    assert [p.name for p in out.iterdir()] == [LOCK_NAME], "no temporary file is left beside the lock"
    lock.release()
    assert not (out / LOCK_NAME).exists() and not lock.held
    second = RunLock(out)
    assert second.acquire() is None and not second.created_dir
    second.release()


def test_a_second_lock_on_the_same_folder_is_refused_even_in_one_process(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunLockHeld, match=rf"in use by another run: pid {os.getpid()} on host"):
        RunLock(tmp_path).acquire()
    first.release()


def test_live_holder_refuses_then_killed_holder_is_taken_over(tmp_path):
    proc = hold_lock_in_subprocess(tmp_path)
    try:
        before = (tmp_path / LOCK_NAME).read_text()
        with pytest.raises(RunLockHeld) as exc:
            RunLock(tmp_path).acquire()
        message = str(exc.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in message and "\n" not in message
        assert (tmp_path / LOCK_NAME).read_text() == before, "a refused run leaves the holder's lock alone"
    finally:
        proc.send_signal(signal.SIGKILL)  # dies without releasing: a stale lock
        proc.wait()
    assert (tmp_path / LOCK_NAME).exists()
    lock = RunLock(tmp_path)
    note = lock.acquire()
    assert note is not None and f"pid {proc.pid}" in note and "stale" in note
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_reused_pid_is_stale_other_host_and_unreadable_are_not(tmp_path):
    """A live pid whose start time differs from the recorded one is another process (pid reuse)."""
    me = RunLock.identity()
    (tmp_path / LOCK_NAME).write_text(json.dumps({**me, "pid_start": "1"}))
    lock = RunLock(tmp_path)
    if me["pid_start"] is None:
        pytest.skip("no /proc: process start times are unknown here")
    assert lock.acquire() is not None
    lock.release()

    (tmp_path / LOCK_NAME).write_text(json.dumps({**me, "host": "other-node-7", "pid": 1}))
    with pytest.raises(RunLockHeld, match=r"pid 1 on host other-node-7.*delete .*\.memfree-run\.lock"):
        RunLock(tmp_path).acquire()

    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(RunLockHeld, match=r"unreadable lock file"):
        RunLock(tmp_path).acquire()


def test_release_leaves_a_lock_that_another_run_took_over(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    other = {"host": socket.gethostname(), "pid": 424242, "pid_start": None, "locked_at": "x"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other))
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == other


def test_output_dir_that_is_a_file_or_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputDirError, match=rf"--output_dir {f} is a file, not a folder"):
        check_output_dir(f)
    with pytest.raises(OutputDirError, match=rf"cannot be created: {f} is a file"):
        RunLock(f / "sub" / "run").acquire()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder the mode bits forbid")
def test_read_only_folder_as_a_normal_user(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputDirError, match="not writable"):
            RunLock(ro / "run").acquire()
    finally:
        ro.chmod(0o755)


def test_folder_even_root_cannot_write():
    """sysfs refuses new folders to root too: the lock's own creation is the write test."""
    probe = Path("/sys/sd-memfree-write-probe")
    try:
        probe.mkdir()
    except OSError:
        pass
    else:
        probe.rmdir()
        pytest.skip("/sys accepts new folders here")
    with pytest.raises(OutputDirError, match=r"--output_dir /sys/sd-memfree-write-probe/run is not writable"):
        RunLock(probe / "run").acquire()
