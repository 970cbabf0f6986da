"""Directories written and read whole: a reader sees the old contents or the new, never a mix.

`write_directory(path, files)` writes every file into a fresh sibling directory
(`.<name>.geopeft-new-<host>-<pid>-<id>`), fsyncs each file and the directory, then
swaps it in: on Linux in one atomic step (`renameat2(RENAME_EXCHANGE)`), elsewhere by
two renames (the directory is absent for an instant in between: a reader then finds no
directory, never a mix). Entries of the old directory that are not among `files` are
carried over (hard links, copies where a link fails). Files get the permissions a plain
`open(path, "w")` gives them (0666 less the umask). What an interrupted write leaves
behind (a crash: the writing process is gone) is removed by the next write to the path.

`read_files(path, names)` reads files of one directory through one directory handle, so
a swap between two reads cannot pair an old file with a new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import socket
import stat
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import CheckpointError

_TAG = ".geopeft-"
_HOST = socket.gethostname().replace("-", "_")


def write_directory(path: str | os.PathLike, files: Mapping[str, bytes]) -> Path:
    """Make directory `path` hold `files` ({name: content}) atomically; returns the path.
    A `path` that is a file is refused before anything is written."""
    given = Path(path)
    target = Path(os.path.realpath(given))  # a symlink to a directory: replace what it points to
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{given} is a file, not a directory: geopeft writes a directory of "
                              "files there; choose a path that is a directory or does not exist")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    new = _sibling(target, "new")
    os.mkdir(new)  # the mode mkdir gives (0777 less the umask), not mkdtemp's 0700
    try:
        for name, data in files.items():
            _write_file(new / name, data)
        if target.is_dir():
            os.chmod(new, stat.S_IMODE(target.stat().st_mode))
            _carry_over(target, new, skip=set(files))
            _fsync_dir(new)
            _swap(new, target)  # `new` now names the old directory
        else:
            _fsync_dir(new)
            os.rename(new, target)
        _fsync_dir(target.parent)
    finally:
        _remove(new)  # the old directory after a swap; the partial new one after a failure
    return given


def read_files(path: str | os.PathLike, names: Sequence[str]) -> dict[str, bytes | None]:
    """{name: content, or None if absent} of files in directory `path`, all from the same
    directory even when a `write_directory` swaps it meanwhile."""
    if not (hasattr(os, "O_DIRECTORY") and os.open in os.supports_dir_fd):
        return {n: _read_or_none(Path(path) / n) for n in names}  # no directory handles here
    for _ in range(3):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            found = {n: _read_or_none(n, fd) for n in names}
            moved = any(v is None for v in found.values()) and _replaced(path, fd)
        finally:
            os.close(fd)
        if not moved:
            return found
    return found  # swapped three times during our reads: report what the last pass saw


def remove_leftovers(target: Path) -> None:
    """Delete the siblings that interrupted writes to `target` left, when the process that
    made them (on this host) is gone."""
    prefix = f".{target.name}{_TAG}"
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            if entry.name.startswith(prefix) and _abandoned(entry.name[len(prefix):]):
                _remove(entry)


# ---------------------------------------------------------------------------- helpers
def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}{_TAG}{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _abandoned(rest: str) -> bool:
    """Whether `<kind>-<host>-<pid>-<id>` names a write by a process of this host that has ended."""
    parts = rest.split("-")
    if len(parts) != 4 or parts[1] != _HOST or not parts[2].isdigit():
        return False
    pid = int(parts[2])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by someone else
        return False
    return False


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _read_or_none(name: str | Path, dir_fd: int | None = None) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_BINARY", 0), dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _replaced(path: str | os.PathLike, fd: int) -> bool:
    """Whether `path` no longer names the directory open as `fd`."""
    try:
        now, held = os.stat(path), os.fstat(fd)
    except OSError:
        return True
    return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)


def _carry_over(old: Path, new: Path, skip: set[str]) -> None:
    """Entries of `old` that the write does not replace, into `new` (hard links where possible)."""
    for entry in old.iterdir():
        if entry.name in skip:
            continue
        dest = new / entry.name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dest, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dest, follow_symlinks=False)


def _link_or_copy(src, dst, *, follow_symlinks: bool = True) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _swap(new: Path, target: Path) -> None:
    """Exchange directories `new` and `target` (then `new` names the old one)."""
    if _exchange(new, target):
        return
    old = _sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    os.rename(old, new)


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(a, b, RENAME_EXCHANGE): True if done, False where the system lacks it."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this file system cannot exchange: fall back to two renames
    raise OSError(err, f"cannot swap {a} into {b}: {os.strerror(err)}")


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def _fsync_dir(path: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):
        return  # Windows: directories cannot be opened for fsync
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()
