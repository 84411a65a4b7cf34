"""Give back the resident pages of a memory-mapped checkpoint once a tensor has been used.

``torch.load(mmap=True)`` maps the checkpoint privately and read-only in
practice: nothing is copied until a tensor is read, but every page read stays
counted in the process's RSS until the mapping goes away, so by the end of a
conversion the whole checkpoint (0.65 GiB for 1B, 3.5 GiB for 26B) is "ours"
in ``top`` and, worse, in a cgroup memory limit. ``madvise(MADV_DONTNEED)`` on
the pages of a tensor already written drops them from the mapping; the data
stays in the file (and usually the page cache), and a later read of the same
tensor faults it back in, identical, because we never write to the mapping.

Dropping pages of *anonymous* memory would zero them, so the release is only
ever applied to a page range that lies wholly inside a mapping of the
checkpoint file itself, as listed in ``/proc/self/maps``. Anywhere that check
cannot be made (not Linux, no ``madvise``, a tensor that was copied into
ordinary memory) the release does nothing, which is always safe.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
from pathlib import Path

import torch

_MADV_DONTNEED = 4  # Linux


@functools.cache
def _madvise():
    """libc's ``madvise``, looked up once, from the symbols already loaded in this process.

    Not ``ctypes.util.find_library("c")``: on Linux that runs ``/sbin/ldconfig -p`` in a child, here
    in the middle of a write (the first tensor released), on the writer's path; with the page cache
    dropped the child took long enough that benchmark samplers summing the process tree counted the
    vfork'd child (which shares our memory until it execs) as a second copy of the converter.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # dlopen(NULL): the process's own symbols, libc's included
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def file_mappings(path: str | Path) -> list[tuple[int, int, int]]:
    """(first address, end address, file offset of the first address) of every mapping of ``path`` in this
    process, from ``/proc/self/maps``; empty where that cannot be read (not Linux).

    Also how the checkpoint reader finds which zip record a memory-mapped tensor's bytes came from
    (``zip_records``): address - first address + file offset is the byte's place in the file."""
    found: list[tuple[int, int, int]] = []
    try:
        target = os.stat(path)
        name = str(Path(path).resolve())
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6:
                    continue
                dev, inode = parts[3], int(parts[4])
                major, minor = (int(x, 16) for x in dev.split(":"))
                same_file = inode == target.st_ino and os.makedev(major, minor) == target.st_dev
                if not same_file and parts[5].rstrip("\n") != name:  # overlayfs shows other numbers
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                found.append((lo, hi, int(parts[2], 16)))
    except (OSError, ValueError):
        return []
    return found


class MappedFilePages:
    """Release the pages of tensors that live in the mapping(s) of one file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._ranges: list[tuple[int, int]] | None = None
        self._madvise = _madvise()
        self.released_bytes = 0

    def _file_ranges(self) -> list[tuple[int, int]]:
        """Address ranges mapped from our file; read once, after torch.load has made the mapping."""
        if self._ranges is None:
            self._ranges = [(lo, hi) for lo, hi, _offset in file_mappings(self.path)]
        return self._ranges

    def release(self, t: torch.Tensor) -> bool:
        """Drop ``t``'s whole pages from RSS if they are pages of our file's mapping; True if done."""
        if self._madvise is None or t.device.type != "cpu" or t.numel() == 0:
            return False
        ptr, n = t.data_ptr(), t.numel() * t.element_size()
        page = mmap.PAGESIZE
        lo, hi = -(-ptr // page) * page, (ptr + n) // page * page  # whole pages only: neighbours may be in use
        if hi <= lo:
            return False
        if not any(start <= lo and hi <= end for start, end in self._file_ranges()):
            return False
        if self._madvise(lo, hi - lo, _MADV_DONTNEED) != 0:
            return False
        self.released_bytes += hi - lo
        return True
