"""A file's sha256, read in large blocks: the one implementation behind the conversion report's
input hashes, ``verify``'s shard checks and an adapter's record of its base (a module of its own,
low in the house, so that ``read/``, ``verify/`` and ``conversion`` all take it from below)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 16 * 1024 * 1024


def sha256_file(path: str | Path, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


__all__ = ["sha256_file"]
