"""The one safetensors header parser of the package (writing is ``write/safetensors_stream.py``).

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, data_offsets; optional ``__metadata__``) and the tensor bytes. The base folder's reader,
file sniffing and the verify stage all read headers here; the rules a header must keep are in
``safetensors_check`` (standard library only, so the round-trip child, ``runner/child.py``, which runs
under the user's interpreter without this package, can load that one file and apply them too).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..errors import InputError
from .safetensors_check import MAX_HEADER_BYTES, PREFIX_BYTES, HeaderProblem, read_and_validate

__all__ = [
    "PREFIX_BYTES",
    "MAX_HEADER_BYTES",
    "length_prefix",
    "header_length",
    "looks_like_safetensors",
    "tensor_names",
    "read_safetensors_header",
    "library_check",
]


def length_prefix(raw: bytes) -> int:
    """The header length the first 8 bytes (little-endian u64) announce."""
    return int.from_bytes(raw[:PREFIX_BYTES], "little")


def header_length(path: Path) -> int:
    """The header's length in bytes; tensor data starts at ``PREFIX_BYTES + header_length``."""
    with open(path, "rb") as f:
        return length_prefix(f.read(PREFIX_BYTES))


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """Whether a file's first bytes (at least 9) and size read as a safetensors header start."""
    if len(head) < PREFIX_BYTES + 1 or head[PREFIX_BYTES : PREFIX_BYTES + 1] != b"{":
        return False
    return 0 < length_prefix(head) <= size - PREFIX_BYTES


def tensor_names(path: Path) -> list[str]:
    """The tensor names of a header, unchecked (a damaged file raises OSError/ValueError):
    for callers that only need the names and report damage elsewhere."""
    with open(path, "rb") as f:
        n = length_prefix(f.read(PREFIX_BYTES))
        return [k for k in json.loads(f.read(n)) if k != "__metadata__"]


def read_safetensors_header(path: Path) -> dict:
    """Parse a safetensors header without mapping the file, every rule of the safetensors library
    checked (``safetensors_check``), with errors that name the file, the tensor and the rule.

    A header that lies while staying inside its file (a span that is not shape x dtype size,
    overlapping spans, a span ending before it begins, a negative dimension) is refused here: read
    as it claimed, it gave a wrong tensor and exit 0."""
    path = Path(path)
    try:
        _n, header, _spans = read_and_validate(path)
    except HeaderProblem as e:
        raise InputError(
            f"bad safetensors header: {e.message}",
            path=path,
            hint="re-copy or re-download this shard (its header does not describe its bytes)",
        ) from None
    except PermissionError:
        raise InputError("permission denied", path=path, hint="make the file readable") from None
    except IsADirectoryError:
        raise InputError(
            "is a directory, expected a safetensors file", path=path, hint="restore the shard from the original model"
        ) from None
    except OSError as e:
        raise InputError(
            f"cannot read ({e.strerror or e})", path=path, hint="re-copy or re-download this shard"
        ) from None
    return header


def library_check(path: Path, names: Iterable[str]) -> None:
    """The safetensors library's own verdict on a header we accepted: it must open the file and name the
    same tensors. A backstop behind ``safetensors_check`` (which copies its rules): if a later library
    version adds a rule, this finds the file before a user's ``from_pretrained`` does."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            theirs = set(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors' own error types
        raise InputError(
            f"the safetensors library refuses this file ({str(e).splitlines()[0] if str(e) else e})",
            path=path,
            hint="re-copy or re-download this shard",
        ) from None
    if theirs != set(names):
        raise InputError(
            "the safetensors library and sa2va-convert read different tensors from this file",
            path=path,
            hint="re-copy or re-download this shard",
        )
