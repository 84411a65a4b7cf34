"""Byte sizes as users type them (``5GB``, ``500MB``, ``2GiB``), for options and environment variables.

Lives apart from the CLI so the API, the round trip's memory check and the CLI parse sizes the
same way and fail with the same :class:`~sa2va_convert.errors.UsageError` (exit 2).
"""

from __future__ import annotations

import re

from .errors import UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.I)
_POWERS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
           "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Bytes in ``text`` (decimal units KB/MB/GB/TB, binary KiB/MiB/GiB/TiB); > 0 or UsageError."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.match(str(text))
        unit = (m.group(2) or "").upper() if m else None
        if not m or unit not in _POWERS:
            raise UsageError(f"{what} {text!r} is not a size like 5GB, 500MB or 2GiB",
                             hint="write a number with one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
        value = int(float(m.group(1)) * _POWERS[unit])
    if value <= 0:
        raise UsageError(f"{what} {text!r} must be more than 0 bytes", hint="give a positive size such as 5GB")
    return value
