"""Atomic file writes: a temporary file in the same folder, fsync, then os.replace (atomic_write, and
atomic_write_bytes on it).

Where the OS and filesystem allow it (Linux, O_TMPFILE) the temporary file has no name until it is complete:
a process killed while writing (kill -9 included) leaves nothing behind, not even a temporary file.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path


def open_unnamed(folder: str | os.PathLike[str]) -> int | None:
    """A new unnamed file (O_TMPFILE, read-write, mode 0o666 minus the umask) in folder, as a descriptor, or
    None where the OS or the filesystem has no unnamed files. Give it a name with publish()."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, flag | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise


_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000


def _link(fd: int, dst: Path) -> bool:
    """Give the unnamed file fd the name dst (which must not exist): True, or False where no way works."""
    try:  # linkat(fd, "", AT_FDCWD, dst, AT_EMPTY_PATH): where the kernel allows it to this process
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(dst), _AT_EMPTY_PATH) == 0:
            return True
        if ctypes.get_errno() == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    except (OSError, AttributeError) as e:
        if isinstance(e, FileExistsError):
            raise
    try:  # the way of open(2)'s O_TMPFILE example
        os.link(f"/proc/self/fd/{fd}", dst, follow_symlinks=True)
        return True
    except FileExistsError:
        raise
    except OSError:
        return False


def publish(fd: int, path: str | os.PathLike[str]) -> None:
    """Name the unnamed file fd (from open_unnamed) path, atomically replacing a file there. Where the file
    cannot be linked (some kernels and sandboxes) it is copied to a temporary file that is renamed."""
    path = Path(path)
    # linked to a temporary name, then renamed over path: the name exists for microseconds only
    tmp = _temp_path(path)
    try:
        if not _link(fd, tmp):
            with open(tmp, "xb") as out:
                size, done = os.fstat(fd).st_size, 0
                while done < size:
                    n = os.sendfile(out.fileno(), fd, done, min(size - done, 2**30))
                    if n == 0:
                        raise OSError(errno.EIO, "short copy", str(tmp))
                    done += n
                out.flush()
                os.fsync(out.fileno())
            shutil.copymode(f"/proc/self/fd/{fd}", tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[Path], None],
    mode_from: str | os.PathLike[str] | None = None,
) -> Path:
    """Write path atomically: write(tmp) fills a new, empty temporary file in path's folder (tmp is a path it
    may open and write; for an unnamed file, its /proc/self/fd link), which is then given mode_from's mode
    (None: 0o666 minus the umask, as a new file), fsynced and renamed to path. A reader, or a crash, sees
    either the old file or the whole new one. On any exception, KeyboardInterrupt included, the temporary
    file is removed, path is left as it was, and the exception propagates unchanged."""
    path = Path(path)
    ufd = open_unnamed(path.parent)
    if ufd is not None:
        try:
            write(Path(f"/proc/self/fd/{ufd}"))
            if mode_from is not None:
                os.fchmod(ufd, stat.S_IMODE(os.stat(mode_from).st_mode))
            os.fsync(ufd)
            publish(ufd, path)
        finally:
            os.close(ufd)
        return path
    tmp = _temp_path(path)  # a fresh random name: if it is there, it is ours
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        write(tmp)
        if mode_from is not None:
            os.chmod(tmp, stat.S_IMODE(os.stat(mode_from).st_mode))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write data to path so that a reader (or a crash) sees either the old file or the whole new one; on
    failure the temporary file is removed and path is left as it was. The new file's mode is a new file's
    (0o666 minus the umask)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)
