"""Reading files we did not write, and writing files in folders we do not fully control.

A checkpoint, a dataset or an output folder may come from someone else, sit on a shared disk, or
have been edited by hand. Three things go wrong with plain ``open()`` / ``write_text()`` there:

- a FIFO (or a device) where a file is expected blocks ``open()`` forever, and SIGTERM / Ctrl-C
  cannot interrupt it: :func:`check_regular_file` and :func:`read_regular_bytes` refuse anything
  that is not a regular file before (or without) blocking;
- a JSON file may hold anything: another type, ``1e400``, or nesting 100,000 deep (a
  ``RecursionError`` in ``json``): :func:`read_json` turns every such case into one ``ValueError``
  line and checks the top-level type;
- ``path.write_text()`` through a symlink overwrites the file the link points to, outside the
  output folder: :func:`replace_file` writes a new file beside it and renames it over the name,
  which replaces the link itself and never touches its target.

Invariants:
- Nothing here unpickles or evaluates what it reads.
- :func:`replace_file` leaves either the old file (or link) or the complete new file under the
  name, never a half-written one, and never writes to any other path than a fresh temporary file
  created with ``O_EXCL`` in the same folder.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

# JSON files of a checkpoint are small (tensors live in safetensors): anything larger is damage.
MAX_JSON_BYTES = 256 << 20


class UnsafeFile(ValueError):
    """A file that is not what it should be (not a regular file, not the JSON it should be); the
    message is the one line to show."""

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular_file(path: str | os.PathLike, fix: str) -> os.stat_result:
    """Refuse ``path`` unless it is (or links to) a regular file; never opens it.

    Args:
        path: the file about to be read by a reader we do not control (safetensors, torch).
        fix: what the user should do, for the message.

    Raises:
        UnsafeFile: one line naming the path, what it is and ``fix``; also when it is missing or a
            dangling link.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise UnsafeFile(f"{path} cannot be read ({e.strerror or e}); {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(f"{path} is {_kind(st.st_mode)}, not a regular file, and is never opened (reading it could block "
                         f"forever); {fix}")
    return st


def read_regular_bytes(path: str | os.PathLike, fix: str, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, opened without blocking.

    ``O_NONBLOCK`` makes ``open()`` of a FIFO return at once, so even a FIFO swapped in after a
    check is refused rather than waited on; the type is checked on the open descriptor.

    Raises:
        UnsafeFile: one line (not a regular file, too large, unreadable), ending with ``fix``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise UnsafeFile(f"{path} cannot be read ({e.strerror or e}); {fix}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{path} is {_kind(st.st_mode)}, not a regular file, and is never read (reading it could block "
                             f"forever); {fix}")
        if st.st_size > max_bytes:
            raise UnsafeFile(f"{path} is {st.st_size} bytes, more than the {max_bytes} such a file can hold: it is damaged; {fix}")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(max_bytes + 1)
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike, fix: str, expect: type | tuple[type, ...] = dict, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file we may not have written, as one value of type ``expect``.

    Raises:
        UnsafeFile: one line naming the file and the problem (not a regular file, not UTF-8, not
            JSON, nested too deep, another top-level type), ending with ``fix``.
    """
    data = read_regular_bytes(path, fix, max_bytes)
    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise UnsafeFile(f"{path} is JSON nested too deep to be ours: it is damaged or forged; {fix}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise UnsafeFile(f"{path} is not valid JSON ({str(e).splitlines()[0][:120]}); {fix}") from None
    if not isinstance(value, expect):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        raise UnsafeFile(f"{path} holds a JSON {type(value).__name__}, not the {names} it should: it is damaged or forged; {fix}")
    return value


def replace_file(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` by creating a new file beside it and renaming it over the name.

    Why: writing through an existing name follows a symlink placed there and overwrites its
    target (maybe outside the output folder); a rename replaces the link itself. The temporary
    file is made by ``mkstemp`` (``O_EXCL``: never an existing file or link) and flushed to disk
    before the rename, so the name holds the old or the complete new content after a crash.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a failed write names no file: name the one being written (disk-full messages show it)
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
