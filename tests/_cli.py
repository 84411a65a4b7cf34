"""Running ``sa2va-convert`` as users do, for tests: a real subprocess with plain (CI) output.

A module of its own (not conftest.py) so that test files can import it by name: the suite has two
conftest.py files, and ``from conftest import ...`` would pick whichever was imported first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


_NOT_CONVERT = {"inspect", "keymaps", "verify", "predict", "eval", "--help", "-h", "--version"}


def run_cli(*args: str, timeout: float = 300, env: dict | None = None, roundtrip: bool = False) -> CliResult:
    """Run ``sa2va-convert`` as users do: a separate process, plain (CI) output.

    Conversions skip the round trip (``--no-verify``) unless a test asks for it: loading the model in a
    child costs seconds, and tests/test_verify.py covers it.
    """
    full_env = {**os.environ, "CI": "1", **(env or {})}
    argv = [str(a) for a in args]
    if not roundtrip and argv and argv[0] not in _NOT_CONVERT and "--no-verify" not in argv:
        argv.append("--no-verify")
    p = subprocess.run([sys.executable, "-m", "sa2va_convert", *argv], capture_output=True,
                       text=True, timeout=timeout, env=full_env)
    return CliResult(p.returncode, p.stdout, p.stderr)
