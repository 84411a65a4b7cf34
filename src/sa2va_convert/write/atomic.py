"""Make the output folder appear only when it is complete.

Everything is written into a hidden sibling ``.NAME.partial-<pid>`` and renamed
into place at the end, so an interrupted run (Ctrl-C, kill -9, disk full) never
leaves a folder that looks finished. A lock file beside it (``flock``, released
by the kernel even on kill -9) makes a second conversion into the same OUT fail
at once instead of interleaving; the lock holder clears partial folders that
dead runs left behind.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import run_state
from ..errors import OutputError
from . import guard


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.sa2va-convert.lock"


def partial_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``flock`` on the lock file beside OUT for the whole write.

    Only the holder ever removes the lock file, and it does so while still
    holding the lock; an acquirer re-checks after ``flock`` that the path still
    names the file it locked (the previous holder may have removed it in
    between), so two runs can never both believe they own OUT.
    """
    lock = _lock_path(out)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(
                f"cannot create a lock file beside the output ({e.strerror})",
                path=out.parent,
                hint="choose an output folder in a writable directory",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # the lock file is the running conversion's: leave it alone
            raise OutputError(
                "another sa2va-convert is writing this output right now",
                path=out,
                hint="wait for it to finish, or choose another output folder",
            ) from None
        except OSError as e:
            os.close(fd)
            raise OutputError(
                f"cannot lock the output ({e.strerror})",
                path=out.parent,
                hint="choose an output folder on a local file system",
            ) from None
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)  # we locked a file its holder has just removed; lock the current one
    try:
        yield
    except BaseException:
        # Ctrl-C can land between make_partial's mkdir and the caller's cleanup: our own
        # partial folder is removed here too, before anyone else may take the lock.
        shutil.rmtree(out.parent / f"{partial_prefix(out)}{os.getpid()}", ignore_errors=True)
        raise
    finally:
        try:
            lock.unlink()  # still holding the lock, see above
        except OSError:
            pass
        os.close(fd)


def check_destination(out: Path, force: bool) -> None:
    """Where OUT may be written; whether an existing OUT may be replaced is ``guard``'s call."""
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(
                "output folder already exists",
                path=out,
                hint="pass --force to replace it (the old folder is kept until the new one is complete)",
            )
        if not out.is_dir() or out.is_symlink():
            raise OutputError(
                "output path exists and is not a folder", path=out, hint="remove it or choose another path"
            )
    parent = out.parent
    if not parent.is_dir():
        raise OutputError("the output's parent folder does not exist", path=parent, hint="create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            "the output's parent folder is not writable",
            path=parent,
            hint="choose a writable location or fix its permissions",
        )


@dataclass(frozen=True)
class StaleFolder:
    """A hidden folder a dead run left beside OUT, removed by the next run that holds OUT's lock."""

    name: str
    kind: str  # "partial" (a conversion that never published) or "old" (a replaced OUT not yet deleted)
    pid: int
    nbytes: int

    def describe(self) -> str:
        what = (
            "a partial folder of a run that did not finish (killed or crashed)"
            if self.kind == "partial"
            else "a replaced previous OUT whose removal did not finish"
        )
        return f"removed {self.name} ({_size(self.nbytes)}): {what}, pid {self.pid}"


def _owned_by(out: Path, name: str, kind: str) -> int | None:
    """The pid in ``name`` if it is exactly ``.{OUT}.{kind}-{pid}``, else None.

    Compared as plain strings, never as a pattern: an OUT named ``run[1]`` or ``a*`` must not
    match another OUT's folders. The pid part is digits only, so a name belongs to
    exactly one OUT: ``.a.partial-1.partial-7`` is OUT ``a.partial-1``'s, never OUT ``a``'s."""
    prefix = f".{out.name}.{kind}-"
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix) :]
    return int(rest) if rest.isascii() and rest.isdigit() else None


def hidden_folders(out: Path, kind: str) -> list[tuple[Path, int]]:
    """OUT's own ``.{OUT}.{kind}-{pid}`` entries beside it (kind ``partial`` or ``old``), by exact name."""
    found = []
    try:
        with os.scandir(out.parent) as entries:
            for entry in entries:
                pid = _owned_by(out, entry.name, kind)
                if pid is not None:
                    found.append((out.parent / entry.name, pid))
    except OSError:
        return []
    return sorted(found)


def clear_stale_partials(out: Path) -> list[StaleFolder]:
    """Remove partial folders of runs that died; safe because we hold the lock. Returns what was removed,
    so the caller can say so (a kill -9 leaves up to a shard's worth of bytes until this runs).

    A ``.OUT.old-*`` folder is removed only while OUT exists (then it is a replaced
    folder whose removal was interrupted); without OUT it may be the only copy left.
    """
    removed = []
    stale = [(p, pid, "partial") for p, pid in hidden_folders(out, "partial")]
    if out.is_dir():
        stale += [(p, pid, "old") for p, pid in hidden_folders(out, "old")]
    for p, pid, kind in stale:
        if pid == os.getpid():
            continue  # ours (never the case under the lock; kept for safety)
        nbytes = _tree_bytes(p)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(StaleFolder(p.name, kind, pid, nbytes))
    return removed


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def make_partial(out: Path) -> Path:
    tmp = out.parent / f"{partial_prefix(out)}{os.getpid()}"
    try:
        tmp.mkdir(mode=0o755)
    except OSError as e:
        raise OutputError(
            f"cannot create the temporary output folder ({e.strerror})",
            path=tmp,
            hint="check free space and permissions of the output's parent folder",
        ) from None
    return tmp


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished folder into place; an old OUT is removed only after the new one is in.

    Replacing an existing OUT is one atomic ``renameat2(RENAME_EXCHANGE)`` where the
    file system supports it, so no signal or kill can ever leave OUT missing; elsewhere
    the two renames run with SIGINT/SIGTERM deferred and the old folder is put back if
    the second rename fails. Either way the rename and ``run_state.mark_published`` happen
    in one interrupt-deferred block: an interrupt is raised before both or after both, so
    the message it ends in says what is on disk.
    """
    _fsync_dir(tmp)
    old = None
    if out.exists():
        if not force:
            raise OutputError("output folder appeared while converting", path=out, hint="pass --force to replace it")
        with run_state.interrupts_deferred():
            swapped = _exchange(tmp, out)  # OUT is the new folder now; tmp holds the old one
            if swapped:
                run_state.mark_published(out, replaced=True)
        if swapped:
            _fsync_dir(out.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = out.parent / f".{out.name}.old-{os.getpid()}"
    with run_state.interrupts_deferred():
        if old is not None:
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
        run_state.mark_published(out, replaced=old is not None)
    _fsync_dir(out.parent)
    if old is not None:
        try:
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:  # an interrupt mid-removal: finish it, the new OUT is in place
            shutil.rmtree(old, ignore_errors=True)
            raise


class Staging:
    """One write's partial folder under OUT's lock (``staged_output``), and its publishing."""

    def __init__(self, out: Path, tmp: Path):
        self.out = out
        self.tmp = tmp
        self.holding = False  # interrupts held since publish(): released when the staged block ends

    def publish(self, *, force: bool, replace_foreign: bool, protected: Sequence[guard.NamedInput]) -> None:
        """Re-check an OUT that appeared or changed while writing, then move the partial folder into place.

        From here to the lock's release no interrupt is raised (``run_state.hold``): one that comes meanwhile
        is raised when the staged block ends, with OUT published, the lock file and any old folder gone, so
        the message it ends in says what is on disk."""
        if self.out.exists():
            guard.check_out(self.out, protected)
            guard.check_replaceable(self.out, force=force, replace_foreign=replace_foreign)
        run_state.hold()
        self.holding = True
        publish(self.tmp, self.out, force or replace_foreign)


@contextmanager
def staged_output(out: Path, note: Callable[[str], None]) -> Iterator[Staging]:
    """OUT's lock, stale partial folders cleared (each ``note``d), and a fresh partial folder to write into.

    The block writes into ``staging.tmp`` and ends with ``staging.publish(...)``. Any failure removes the
    partial folder (an unpublished OUT is never left half-written); interrupts held by ``publish`` are
    released once the lock is, or at once where publishing itself failed. The merged folder and the adapter
    are both written through this, so their publishing cannot drift apart."""
    staging: Staging | None = None
    try:
        with output_lock(out):
            for stale in clear_stale_partials(out):  # a kill -9 leaves one; say what went, not silently
                note(f"note: {stale.describe()}")
            staging = Staging(out, make_partial(out))
            try:
                yield staging
            except BaseException:
                shutil.rmtree(staging.tmp, ignore_errors=True)
                if staging.holding and not run_state.published(out):  # publishing failed: nothing to wait for
                    staging.holding = False
                    run_state.release()
                raise
    finally:
        if staging is not None and staging.holding:  # OUT published, lock released: a held interrupt lands now
            run_state.release()


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


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
        return OutputError(
            "disk full while writing the output",
            path=path,
            hint="free space (the plan's disk estimate is in --dry-run) or write elsewhere",
        )
    if e.errno == errno.EFBIG:
        return OutputError(
            "file size limit reached while writing the output",
            path=path,
            hint="raise the file size limit (ulimit -f) or use a smaller --max-shard-size",
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write the output ({e.strerror})", path=path, hint="choose a writable location")
    return OutputError(f"cannot write the output ({e.strerror or e})", path=path, hint="check the output location")
