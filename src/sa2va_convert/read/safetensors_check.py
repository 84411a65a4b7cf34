"""Validate a safetensors header as strictly as the safetensors library does, with the standard library only.

Why a copy of the library's rules and not only the library: a header that lies but stays inside its
file (a byte span that is not shape x dtype size, two tensors overlapping, a span that ends before
it begins, a negative dimension) used to be read as it claimed, so a wrong tensor was converted with
exit 0. ``safetensors.safe_open`` refuses such files, but says only "invalid offset for
tensor" and needs the library and its mmap; this module names the tensor and the rule, and imports
nothing but the standard library, so the round-trip child (``runner/child.py``, which runs under the
user's interpreter and cannot import this package) can load this one file by path and apply the same
rules. Nothing here may import from ``sa2va_convert``.

The rules, as safetensors 0.8 applies them (``Metadata::validate`` and ``read_metadata``; checked
against the library's own verdicts in ``tests/reliability/test_lying_headers.py``):

* an 8-byte little-endian header length N, N <= 100 MiB, 8 + N <= file size;
* the header is UTF-8 JSON, an object; ``__metadata__`` (optional) is null or an object of strings;
  every other key is a tensor: an object with ``dtype`` (a known name), ``shape`` (non-negative
  integers) and ``data_offsets`` (two non-negative integers ``[begin, end]``); extra fields are ignored;
* a name appears once (the library refuses a repeated name through its offsets);
* sorted by offsets, the spans tile the data area exactly: the first begins at 0, each begins where
  the previous one ended, ``end >= begin``, ``end - begin`` equals the shape's element count times the
  dtype's size (sub-byte dtypes: a whole number of bytes), with no overflow;
* the last span ends exactly where the file does (8 + N + end == file size).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

PREFIX_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the library's MAX_HEADER_SIZE
_USIZE_MAX = 2**64 - 1

# bits per element of every dtype name safetensors 0.8 knows
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

__all__ = [
    "PREFIX_BYTES",
    "MAX_HEADER_BYTES",
    "DTYPE_BITS",
    "HeaderProblem",
    "Span",
    "parse_header_bytes",
    "validate_header",
    "read_and_validate",
]


class HeaderProblem(ValueError):
    """What is wrong with a header, in words; ``tensor`` is the entry at fault (None: the file as a whole)."""

    def __init__(self, message: str, tensor: str | None = None):
        super().__init__(message)
        self.message = message
        self.tensor = tensor


class Span(NamedTuple):
    """One tensor as its validated header entry describes it; offsets count from the data area."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise HeaderProblem(f"the header names {key!r} twice", key)
        out[key] = value
    return out


def parse_header_bytes(raw: bytes) -> dict[str, Any]:
    """The header's JSON object (repeated names refused); HeaderProblem if it is not one."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise HeaderProblem("the header is not UTF-8 text") from None
    except RecursionError:
        raise HeaderProblem("the header is not valid JSON (nested too deep)") from None
    except ValueError as e:
        if isinstance(e, HeaderProblem):
            raise
        raise HeaderProblem(f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise HeaderProblem("the header is not a JSON object")
    return header


def _count(value: Any) -> bool:
    """A JSON integer the library reads as usize (not a bool, not a float, not negative, fits 64 bits)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _USIZE_MAX


def _entry(name: str, entry: Any) -> Span:
    if not isinstance(entry, dict):
        raise HeaderProblem(f"tensor {name!r} is not described by an object", name)
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise HeaderProblem(f"tensor {name!r} has no {field}", name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise HeaderProblem(f"tensor {name!r} has an unknown dtype {dtype!r}", name)
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        bad = next((d for d in shape if not _count(d)), shape) if isinstance(shape, list) else shape
        what = (
            "a negative dimension"
            if isinstance(bad, int) and not isinstance(bad, bool) and bad < 0
            else "a dimension that is not a non-negative integer"
        )
        raise HeaderProblem(f"tensor {name!r} has {what} in its shape {shape!r}", name)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets):
        raise HeaderProblem(f"tensor {name!r} has data_offsets {offsets!r}, not two non-negative integers", name)
    return Span(name, dtype, tuple(shape), offsets[0], offsets[1])


def validate_header(header: dict[str, Any], data_bytes: int) -> list[Span]:
    """Every tensor of ``header`` checked against the rules above; ``data_bytes`` is the file size
    minus 8 minus the header length. Returns the spans in file order; raises HeaderProblem."""
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise HeaderProblem("__metadata__ is not an object of strings")
    spans = [_entry(name, entry) for name, entry in header.items() if name != "__metadata__"]
    spans.sort(key=lambda s: (s.begin, s.end))
    cursor, previous = 0, None
    for s in spans:
        if s.end < s.begin:
            raise HeaderProblem(f"tensor {s.name!r} ends (byte {s.end}) before it begins (byte {s.begin})", s.name)
        if s.begin < cursor:
            raise HeaderProblem(
                f"tensors {previous!r} and {s.name!r} overlap (bytes {s.begin}-{cursor} are claimed by both)", s.name
            )
        if s.begin > cursor:
            after = f"after {previous!r} ends at byte {cursor}" if previous else "at the start of the data"
            raise HeaderProblem(f"tensor {s.name!r} begins at byte {s.begin}, leaving a gap {after}", s.name)
        numel = 1
        for d in s.shape:
            numel *= d
        bits = numel * DTYPE_BITS[s.dtype]
        if bits > _USIZE_MAX:
            raise HeaderProblem(f"tensor {s.name!r} has shape {list(s.shape)}, too large to be a tensor", s.name)
        if bits % 8:
            raise HeaderProblem(f"tensor {s.name!r} ({s.dtype} {list(s.shape)}) does not end on a whole byte", s.name)
        if s.end - s.begin != bits // 8:
            raise HeaderProblem(
                f"tensor {s.name!r} spans {s.end - s.begin} bytes but {s.dtype} {list(s.shape)} needs {bits // 8}",
                s.name,
            )
        cursor, previous = s.end, s.name
    if cursor != data_bytes:
        raise HeaderProblem(
            f"the header describes {cursor} bytes of tensor data but the file holds {data_bytes}"
            + (" (truncated)" if cursor > data_bytes else " (bytes no tensor owns)")
        )
    return spans


def read_and_validate(path: str | os.PathLike[str]) -> tuple[int, dict[str, Any], list[Span]]:
    """(header length N, header object, spans) of the file at ``path``, every rule checked.

    Raises HeaderProblem for a header that breaks a rule, OSError for a file that cannot be read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(PREFIX_BYTES)
        if len(prefix) < PREFIX_BYTES:
            raise HeaderProblem("the file is too short to be a safetensors file")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_BYTES or PREFIX_BYTES + n > size:
            raise HeaderProblem(
                f"the header length {n} is impossible for a file of {size} bytes (truncated, or not a safetensors file)"
            )
        raw = f.read(n)
    if len(raw) < n:
        raise HeaderProblem("the file ended inside its header (truncated)")
    header = parse_header_bytes(raw)
    return n, header, validate_header(header, size - PREFIX_BYTES - n)
