"""One run per output folder: a lock file naming its holder (host, pid), and the folder's checks.

Two runs writing into the same ``--output_dir`` mix their checkpoints (a folder marked complete
holds files of both), and a second ``--resume_from_checkpoint latest`` started while the first
still runs overwrites the first run's checkpoints. :class:`RunLock` prevents both: the first run
creates ``output_dir/.memfree-run.lock``; any other run on the same folder stops with one line
naming the holder.

Invariants:
    - The lock file appears with its full content in one step (written to a private temporary
      file, then hard-linked to its name, which fails if the name exists; where hard links are not
      supported, ``O_CREAT | O_EXCL`` then a write), so a reader never judges a half-written lock.
    - A lock is taken over only when its holder is provably gone: same host and the pid is not
      alive, or alive but started at another time (the pid was reused). A lock from another host
      is never taken over (its process cannot be checked from here); the message says how to
      remove it by hand.
    - :meth:`RunLock.release` removes the file only while it still names this holder, so a run
      never deletes a lock that another run took over.

Pure filesystem code: no torch, no accelerate; the caller decides which process locks (the main
process only) and tells the others.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".memfree-run.lock"


class OutputDirError(ValueError):
    """``--output_dir`` cannot hold a run (a file, under a file, or not writable); one line."""


class RunLockHeld(RuntimeError):
    """Another live run holds the output folder's lock; the message names it, in one line."""


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc/<pid>/stat`` field 22), None elsewhere.

    Recorded in the lock so that a pid reused by an unrelated process after a crash does not keep
    the lock alive forever.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """Stop early, in one line, when ``output_dir`` cannot hold a run.

    Checks what can be known without writing: the path, or the nearest part of it that exists,
    must be a folder, and that folder must be writable (``os.access``; root passes it everywhere,
    so :meth:`RunLock.acquire` reports the real write failure, e.g. a read-only file system).

    Raises:
        OutputDirError: ``output_dir`` is a file, lies under a file, or is not writable.
    """
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--output_dir {path} is a file, not a folder; pass a folder (new or one of an earlier run).")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise OutputDirError(f"--output_dir {path} cannot be created: {existing} is a file, not a folder; pass another --output_dir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"--output_dir {path} is not writable ({existing} does not allow this user to write); "
                             "pass a folder you can write to.")


class RunLock:
    """The lock of one output folder, held by one process (the main process of a run).

    Use::

        lock = RunLock(output_dir)
        note = lock.acquire()  # raises RunLockHeld / OutputDirError; note says if a stale lock was taken over
        try:
            ...  # the run
        finally:
            lock.release()

    Args:
        output_dir: the run's folder; created (with parents) by :meth:`acquire` if missing.
        name: the lock file's name inside ``output_dir``.
    """

    def __init__(self, output_dir: str | os.PathLike, name: str = LOCK_NAME) -> None:
        self.output_dir = Path(output_dir).expanduser()
        self.path = self.output_dir / name
        self.created_dir = False  # whether acquire() created output_dir (the caller may remove it if unused)
        self._identity: dict | None = None

    @staticmethod
    def identity() -> dict:
        """This process as a lock holder: host, pid, the pid's start time, and when it locked."""
        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start_time(os.getpid()),
                "locked_at": time.strftime("%Y-%m-%d %H:%M:%S")}

    def read(self) -> dict | None:
        """The current holder as written in the lock file, None if there is no lock file.

        An unreadable or malformed file is returned as ``{}`` (a holder that cannot be judged).
        """
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            holder = json.loads(text)
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def is_stale(holder: dict) -> bool:
        """Whether ``holder``'s process is provably gone (same host, pid dead or reused)."""
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        pid = holder["pid"]
        if not _pid_alive(pid):
            return True
        recorded, now = holder.get("pid_start"), _process_start_time(pid)
        return recorded is not None and now is not None and recorded != now

    def describe(self, holder: dict) -> str:
        if not holder:
            return f"an unreadable lock file {self.path}"
        return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('locked_at', '?')})"

    def _create(self, identity: dict) -> bool:
        """Create the lock file holding ``identity`` in one step; False if it already exists."""
        payload = (json.dumps(identity) + "\n").encode()
        tmp = self.output_dir / f"{self.path.name}.{identity['pid']}.{time.monotonic_ns()}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, self.path)  # atomic, and fails if the lock exists
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # No hard links here (some network and FUSE file systems): exclusive create, then write.
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> str | None:
        """Take the lock, creating ``output_dir`` if needed.

        Returns:
            None, or a one-line note when a stale lock (of a process that is gone) was taken over.

        Raises:
            OutputDirError: the folder cannot be created or written (message names the path).
            RunLockHeld: another run that may still be alive holds the lock.
        """
        check_output_dir(self.output_dir)
        try:
            if not self.output_dir.is_dir():
                self.output_dir.mkdir(parents=True)
                self.created_dir = True
            identity = self.identity()
            taken_over = None
            for _ in range(3):  # a takeover race with another starting run: try again, then give up
                if self._create(identity):
                    self._identity = identity
                    return f"took over the stale lock {self.path} of {self.describe(taken_over)} (that process is gone)" if taken_over else None
                holder = self.read()
                if holder is None:  # released meanwhile
                    continue
                if not self.is_stale(holder):
                    raise RunLockHeld(
                        f"--output_dir {self.output_dir} is in use by another run: {self.describe(holder)}; wait for it to "
                        f"finish or stop it, or pass another --output_dir (if that run is gone, delete {self.path}).")
                # Move the stale lock aside under a name of our own, and check that what we moved is
                # the stale lock we judged (another run may have taken it over meanwhile).
                aside = self.path.with_name(f"{self.path.name}.stale-{identity['pid']}")
                try:
                    os.replace(self.path, aside)
                except FileNotFoundError:
                    continue
                try:
                    moved = json.loads(aside.read_text())
                except (OSError, ValueError):
                    moved = {}
                if moved != holder:  # we moved a fresh lock of another run: put it back
                    try:
                        os.link(aside, self.path)
                    except FileExistsError:
                        pass
                    aside.unlink(missing_ok=True)
                    raise RunLockHeld(f"--output_dir {self.output_dir} is in use by another run: {self.describe(moved)}; "
                                      "pass another --output_dir.")
                aside.unlink(missing_ok=True)
                taken_over = holder
            raise RunLockHeld(f"--output_dir {self.output_dir}: could not take the lock {self.path} (other runs keep "
                              "starting on this folder); pass another --output_dir.")
        except OSError as e:
            raise OutputDirError(f"--output_dir {self.output_dir} is not writable ({e.strerror or e}: "
                                 f"{e.filename or self.output_dir}); pass a folder you can write to.") from None

    def release(self) -> None:
        """Remove the lock file if it still names this holder; a no-op if this lock was not taken."""
        if self._identity is None:
            return
        if self.read() == self._identity:
            self.path.unlink(missing_ok=True)
        self._identity = None

    @property
    def held(self) -> bool:
        return self._identity is not None
