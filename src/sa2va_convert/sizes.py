"""Byte sizes as users type them (``5GB``, ``500MB``, ``2GiB``), for options and environment variables.

Parsed by transformers' own ``convert_file_size_to_int`` (the parser behind
``save_pretrained(max_shard_size=...)``: ``5GB`` = 5·10^9, ``2GiB`` = 2·2^30, a lowercase ``b``
means bits, as there), so a size means the same here as in every HF tool; a bare integer is bytes.
Lives apart from the CLI so the API, the round trip's memory check and the CLI parse sizes the
same way and fail with the same :class:`~sa2va_convert.errors.UsageError` (exit 2). transformers
is imported on use, not at module level: ``--help`` must not pay for it.
"""

from __future__ import annotations

from .errors import UsageError


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Bytes in ``text``; more than 0, or a UsageError naming ``what``."""
    if isinstance(text, bool):
        raise UsageError(f"{what} {text!r} is not a size", hint="give a size such as 5GB")
    if isinstance(text, int):
        value = text
    else:
        from transformers.utils.hub import convert_file_size_to_int

        stripped = str(text).strip()
        try:
            value = int(stripped) if stripped.isdigit() else int(convert_file_size_to_int(stripped))
        except (ValueError, TypeError):
            raise UsageError(
                f"{what} {text!r} is not a size like 5GB, 500MB or 2GiB",
                hint="write a number with one of B, KB, MB, GB, KiB, MiB, GiB (or bytes alone)",
            ) from None
    if value <= 0:
        raise UsageError(f"{what} {text!r} must be more than 0 bytes", hint="give a positive size such as 5GB")
    return value
