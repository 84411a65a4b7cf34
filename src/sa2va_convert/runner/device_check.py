"""Whether the round trip's interpreter can use the GPU ``--device cuda`` asks for: checked before any work.

``--device cuda`` on a CPU-only torch used to be found by the child process, after the whole conversion.
The child runs under ``--python`` if given, else under this interpreter, so that is
the torch asked here: this one directly, another one by a short probe. A probe that cannot import torch
decides nothing (the round trip reports a missing package itself, exit 9).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

from ..errors import UsageError

__all__ = ["check_roundtrip_device", "cuda_seen"]

_PROBE = (
    "import json, torch; print(json.dumps([torch.cuda.is_available() and torch.cuda.device_count(), "
    "torch.version.cuda]))"
)


@functools.lru_cache(maxsize=8)
def cuda_seen(python: str | None) -> tuple[int, str | None] | None:
    """(GPUs visible, CUDA version torch was built with) for ``python`` (None: this interpreter); None if unknown.

    Cached: options are validated more than once per command, and a probe imports torch."""
    if python is None or os.path.realpath(python) == os.path.realpath(sys.executable):
        import torch

        return (torch.cuda.device_count() if torch.cuda.is_available() else 0), torch.version.cuda
    try:
        probe = subprocess.run(
            [python, "-c", _PROBE], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
        )
        count, built = json.loads(probe.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None
    return int(count or 0), built


def check_roundtrip_device(
    device: str, python: str | None, *, skip: str = "--no-verify to convert without the round trip"
) -> None:
    """A UsageError (exit 2) when ``device`` is ``cuda``/``cuda:N`` and the round trip's torch cannot use it.

    ``skip`` is how the caller's command goes without the round trip, for the hint."""
    m = re.fullmatch(r"cuda(?::(\d+))?", str(device or ""))
    if m is None:
        return
    seen = cuda_seen(python)
    if seen is None:
        return
    count, built = seen
    interpreter = python or sys.executable  # the file at fault: the interpreter the round trip would run in
    who = "its torch"
    if count == 0:
        why = "built without CUDA" if not built else "no GPU visible"
        raise UsageError(
            f"--device {device} asked for the round trip, but {who} sees no GPU ({why})",
            path=interpreter,
            hint="use --device auto or cpu (the model's .cuda() calls are mapped to the CPU), pass "
            f"--python with a CUDA environment, or {skip}",
        )
    if m.group(1) is not None and int(m.group(1)) >= count:
        raise UsageError(
            f"--device {device} asked for the round trip, but {who} sees only {count} GPU(s)",
            path=interpreter,
            hint="use --device cuda or cuda:0",
        )
