"""Ask the kernel to start reading a conversion's inputs while Python is still importing torch.

A conversion's first seconds are torch's import (1.5 s warm on the 2-core VM, more from a cold
disk), during which the disk has nothing of ours to do. ``POSIX_FADV_WILLNEED`` starts
asynchronous readahead of a file range and returns at once; the pages land in the page cache,
where the reader then finds them. It is a hint, not a read: nothing is held in our memory, errors
are ignored, and the amount is bounded (a quarter of the available RAM, at most 2 GiB) so it never
pushes out more of the cache than it can bring in. Only plain files the user named are advised
(the checkpoint file, the base folder's safetensors shards); nothing is opened for writing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..machine import available_ram

MAX_PREFETCH_BYTES = 2 << 30


def prefetch_budget() -> int:
    """A quarter of the RAM this process may use (``machine.available_ram``: MemAvailable, the cgroup's
    limit, ``SA2VA_CONVERT_RAM_LIMIT``), at most 2 GiB; ``SA2VA_PREFETCH=0`` turns prefetching off."""
    if os.environ.get("SA2VA_PREFETCH", "").strip() == "0":
        return 0
    have, _ = available_ram()
    return min(MAX_PREFETCH_BYTES, (have or 0) // 4)


def input_files(checkpoint: Path, base: str | os.PathLike | None) -> list[Path]:
    """The files read first: a checkpoint file (not a DeepSpeed or work_dir folder: which files those
    read is decided later), then a local base folder's ``*.safetensors`` in name order."""
    files = [Path(checkpoint)] if Path(checkpoint).is_file() else []
    if base is not None and Path(base).is_dir():
        files += sorted(p for p in Path(base).glob("*.safetensors") if p.is_file())
    return files


def prefetch(files: Sequence[Path], budget: int) -> int:
    """Advise the start of each file (the first gets up to half the budget, the rest share what is left);
    returns the bytes advised. A no-op where ``posix_fadvise`` does not exist."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None or budget <= 0 or not files:
        return 0
    advised = 0
    for i, path in enumerate(files):
        left = budget - advised
        if left <= 0:
            break
        share = left // 2 if i == 0 and len(files) > 1 else left // (len(files) - i)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            n = min(os.fstat(fd).st_size, share)
            if n > 0:
                advise(fd, 0, n, os.POSIX_FADV_WILLNEED)
                advised += n
        except OSError:
            pass
        finally:
            os.close(fd)
    return advised


__all__ = ["input_files", "prefetch", "prefetch_budget"]
