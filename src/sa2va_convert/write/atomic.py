"""Make the output folder appear only when it is complete.

Everything is written into a hidden sibling ``.NAME.partial-<pid>`` and renamed
into place at the end, so an interrupted run (Ctrl-C, kill -9, disk full) never
leaves a folder that looks finished. A lock file beside it (``flock``, released
by the kernel even on kill -9) makes a second conversion into the same OUT fail
at once instead of interleaving; the lock holder clears partial folders that
dead runs left behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import OutputError


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.sa2va-convert.lock"


def partial_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    lock = _lock_path(out)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(f"cannot create a lock file beside the output ({e.strerror})", path=out.parent,
                          hint="choose an output folder in a writable directory") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError("another sa2va-convert is writing this output right now", path=out,
                              hint="wait for it to finish, or choose another output folder") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
        try:
            lock.unlink()
        except OSError:
            pass


def check_destination(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError("output folder already exists", path=out,
                              hint="pass --force to replace it (the old folder is kept until the new one is complete)")
        if not out.is_dir() or out.is_symlink():
            raise OutputError("output path exists and is not a folder", path=out, hint="remove it or choose another path")
    parent = out.parent
    if not parent.is_dir():
        raise OutputError("the output's parent folder does not exist", path=parent, hint="create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError("the output's parent folder is not writable", path=parent,
                          hint="choose a writable location or fix its permissions")


def clear_stale_partials(out: Path) -> list[str]:
    """Remove partial folders of runs that died; safe because we hold the lock."""
    removed = []
    for p in out.parent.glob(partial_prefix(out) + "*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def make_partial(out: Path) -> Path:
    tmp = out.parent / f"{partial_prefix(out)}{os.getpid()}"
    try:
        tmp.mkdir(mode=0o755)
    except OSError as e:
        raise OutputError(f"cannot create the temporary output folder ({e.strerror})", path=tmp,
                          hint="check free space and permissions of the output's parent folder") from None
    return tmp


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished folder into place; an old OUT is removed only after the new one is in."""
    _fsync_dir(tmp)
    old = None
    if out.exists():
        if not force:
            raise OutputError("output folder appeared while converting", path=out,
                              hint="pass --force to replace it")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def describe_os_error(e: OSError, path: Path) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError("disk full while writing the output", path=path,
                           hint="free space (the plan's disk estimate is in --dry-run) or write elsewhere")
    if e.errno == errno.EFBIG:
        return OutputError("file size limit reached while writing the output", path=path,
                           hint="raise the file size limit (ulimit -f) or use a smaller --max-shard-size")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write the output ({e.strerror})", path=path,
                           hint="choose a writable location")
    return OutputError(f"cannot write the output ({e.strerror or e})", path=path, hint="check the output location")
