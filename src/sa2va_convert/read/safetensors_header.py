"""The one safetensors header parser of the package (writing is ``write/safetensors_stream.py``).

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, data_offsets; optional ``__metadata__``) and the tensor bytes. The base folder's reader,
file sniffing and the verify stage all read headers here. (The round-trip child,
``verify/_child.py``, keeps a copy of its own: it runs under the user's interpreter, which may
not have this package.)
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError

PREFIX_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024

__all__ = ["PREFIX_BYTES", "MAX_HEADER_BYTES", "length_prefix", "header_length", "looks_like_safetensors",
           "tensor_names", "read_safetensors_header"]


def length_prefix(raw: bytes) -> int:
    """The header length the first 8 bytes (little-endian u64) announce."""
    return int.from_bytes(raw[:PREFIX_BYTES], "little")


def header_length(path: Path) -> int:
    """The header's length in bytes; tensor data starts at ``PREFIX_BYTES + header_length``."""
    with open(path, "rb") as f:
        return length_prefix(f.read(PREFIX_BYTES))


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """Whether a file's first bytes (at least 9) and size read as a safetensors header start."""
    if len(head) < PREFIX_BYTES + 1 or head[PREFIX_BYTES:PREFIX_BYTES + 1] != b"{":
        return False
    return 0 < length_prefix(head) <= size - PREFIX_BYTES


def tensor_names(path: Path) -> list[str]:
    """The tensor names of a header, unchecked (a damaged file raises OSError/ValueError):
    for callers that only need the names and report damage elsewhere."""
    with open(path, "rb") as f:
        n = length_prefix(f.read(PREFIX_BYTES))
        return [k for k in json.loads(f.read(n)) if k != "__metadata__"]


def read_safetensors_header(path: Path) -> dict:
    """Parse a safetensors header without mapping the file, with errors that name the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(PREFIX_BYTES)
            if len(raw) < PREFIX_BYTES:
                raise InputError("file is too short to be a safetensors file", path=path,
                                 hint="re-copy or re-download this shard")
            n = length_prefix(raw)
            if n > MAX_HEADER_BYTES or PREFIX_BYTES + n > size:
                raise InputError("safetensors header length is impossible (truncated or not a safetensors file)",
                                 path=path, hint="re-copy or re-download this shard")
            header = json.loads(f.read(n))
    except PermissionError:
        raise InputError("permission denied", path=path, hint="make the file readable") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("safetensors header is not valid JSON", path=path,
                         hint="re-copy or re-download this shard") from None
    if not isinstance(header, dict):
        raise InputError("safetensors header is not a JSON object", path=path, hint="re-copy this shard")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = entry["data_offsets"]
            end = max(end, stop)
        except (KeyError, TypeError, ValueError):
            raise InputError(f"safetensors entry {name!r} has no valid data_offsets", path=path,
                             hint="re-copy this shard") from None
    if PREFIX_BYTES + n + end > size:
        raise InputError(f"file is truncated: header promises {PREFIX_BYTES + n + end} bytes, file has {size}",
                         path=path, hint="re-copy or re-download this shard")
    return header
