"""Keep the disk reading a conversion's inputs from the first moment, while Python is still importing torch.

A conversion's first seconds are torch's import (1.5 s warm on the 2-core VM; 3.9-4.3 s on the H100
machine with the page cache dropped, in a 13.7 s conversion of Sa2VA-4B whose ``cp`` takes 7.5 s),
during which the disk has nothing of ours to do. ``POSIX_FADV_WILLNEED`` starts readahead of a file
range; the pages land in the page cache, where the reader then finds them. It is a hint, not a read:
nothing is held in our memory, errors are ignored, and nothing is opened for writing. Only plain
files the user named are advised (the checkpoint file, then the base folder's safetensors shards in
name order, the order the writer reads them).

Why a thread, one call per file: the call releases the GIL, so a daemon thread advises while the
main thread imports, whatever the kernel does with the call (queue it and return, or wait for the
disk), and :meth:`stop` ends it between two files. Not in small steps: each step needs the GIL back,
and the import holds it for long stretches (``dlopen`` of torch's libraries): 64 MiB steps advising
every input left a 4B write stage no faster than no hint at all (12.8 against 12.1 s, H200 machine).
``SA2VA_PREFETCH_STEP_MIB`` sets a step (benchmarking).

Why at most 2 GiB: advising every input (up to a quarter of the RAM) was tried and was slower, not
faster: Sa2VA-4B with the page cache dropped (H200 machine, one run each, in one call) took 25.1 s
against 23.1 s capped at 2 GiB and 23.4 s with no hint at all; the import there is bound by the CPU
(5.8 s warm, 10.2 s cold), not by an idle disk, and a far-ahead hint competes with the reader's own
reads. Advised pages are page cache, not our memory; the bound (also at most a quarter of the RAM
this process may use, ``machine.available_ram``) keeps the hint from pushing out pages it would
then have to read again.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..machine import available_ram, env_count

MAX_PREFETCH_BYTES = 2 << 30


def prefetch_budget() -> int:
    """2 GiB, or a quarter of the RAM this process may use where that is less (``machine.available_ram``:
    MemAvailable, the cgroup's limit, ``SA2VA_CONVERT_RAM_LIMIT``); ``SA2VA_PREFETCH=0`` turns
    prefetching off and ``SA2VA_PREFETCH=<GiB>`` sets the cap instead of 2 GiB (benchmarking)."""
    setting = os.environ.get("SA2VA_PREFETCH", "").strip()
    if setting == "0":
        return 0
    have, _ = available_ram()
    try:
        cap = int(float(setting) * (1 << 30)) if setting else MAX_PREFETCH_BYTES
    except ValueError:
        cap = MAX_PREFETCH_BYTES
    return min(max(cap, 0), (have or 0) // 4)


def input_files(checkpoint: Path, base: str | os.PathLike | None) -> list[Path]:
    """The files read first: a checkpoint file (not a DeepSpeed or work_dir folder: which files those
    read is decided later), then a local base folder's ``*.safetensors`` in name order."""
    files = [Path(checkpoint)] if Path(checkpoint).is_file() else []
    if base is not None and Path(base).is_dir():
        files += sorted(p for p in Path(base).glob("*.safetensors") if p.is_file())
    return files


def prefetch(files: Sequence[Path], budget: int, stop: threading.Event | None = None) -> int:
    """Advise ``files`` front to back, a file per call, until ``budget`` bytes or ``stop``; returns the
    bytes advised. A no-op where ``posix_fadvise`` does not exist."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None or budget <= 0 or not files:
        return 0
    step = (env_count("SA2VA_PREFETCH_STEP_MIB") or 0) << 20 or budget
    advised = 0
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            offset = 0
            while offset < size and advised < budget:
                if stop is not None and stop.is_set():
                    return advised
                n = min(step, size - offset, budget - advised)
                advise(fd, offset, n, os.POSIX_FADV_WILLNEED)
                offset += n
                advised += n
        except OSError:
            pass
        finally:
            os.close(fd)
        if advised >= budget:
            break
    return advised


class Prefetcher:
    """:func:`prefetch` in a daemon thread, started at once; :meth:`stop` ends it and waits (briefly).

    Stopped when the conversion ends, so that no thread of ours outlives the command (the console
    script's fast exit, ``_entry._exit``, waits for a process with no other thread)."""

    def __init__(self, files: Sequence[Path], budget: int):
        self.advised = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if budget > 0 and files and hasattr(os, "posix_fadvise"):
            self._thread = threading.Thread(target=self._run, args=(list(files), budget), name="sa2va-prefetch")
            self._thread.daemon = True
            self._thread.start()

    def _run(self, files: list[Path], budget: int) -> None:
        self.advised = prefetch(files, budget, self._stop)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


@contextlib.contextmanager
def inputs_prefetched(checkpoint: Path, base: str | os.PathLike | None, *, enabled: bool = True) -> Iterator[None]:
    """A :class:`Prefetcher` of a conversion's inputs (``input_files``) for the length of the block."""
    prefetcher = Prefetcher(input_files(checkpoint, base), prefetch_budget()) if enabled else None
    try:
        yield
    finally:
        if prefetcher is not None:
            prefetcher.stop()


__all__ = ["Prefetcher", "input_files", "inputs_prefetched", "prefetch", "prefetch_budget"]
