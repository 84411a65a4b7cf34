"""Shared test helpers: real fixture folders on disk and real subprocess runs of the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from sa2va_convert.testing.fixtures import FixtureCheckpoint, write_base_folder, write_training_checkpoint


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


_NOT_CONVERT = {"inspect", "keymaps", "verify", "predict", "--help", "-h", "--version"}


def run_cli(*args: str, timeout: float = 300, env: dict | None = None, roundtrip: bool = False) -> CliResult:
    """Run ``sa2va-convert`` as users do: a separate process, plain (CI) output.

    Conversions skip the round trip (``--no-verify``) unless a test asks for it: loading the model in a
    child costs seconds, and tests/test_verify.py covers it.
    """
    full_env = {**os.environ, "CI": "1", **(env or {})}
    argv = [str(a) for a in args]
    if not roundtrip and argv and argv[0] not in _NOT_CONVERT and "--no-verify" not in argv:
        argv.append("--no-verify")
    p = subprocess.run([sys.executable, "-m", "sa2va_convert.cli", *argv], capture_output=True,
                       text=True, timeout=timeout, env=full_env)
    return CliResult(p.returncode, p.stdout, p.stderr)


@pytest.fixture
def cli():
    return run_cli


@dataclass
class Family:
    preset: str
    base: Path
    ckpt: FixtureCheckpoint


_BASES: dict[tuple, Path] = {}


@pytest.fixture(scope="session")
def base_cache(tmp_path_factory):
    """Base folders are read-only inputs: write each preset's once per session."""
    root = tmp_path_factory.mktemp("bases")

    def get(preset: str, **kw) -> Path:
        key = (preset, tuple(sorted(kw.items())))
        if key not in _BASES:
            _BASES[key] = write_base_folder(root / f"{preset}-{len(_BASES)}", preset, **kw)
        return _BASES[key]

    return get


@pytest.fixture
def make_family(base_cache, tmp_path):
    def make(preset: str, *, base_kw: dict | None = None, **ckpt_kw) -> Family:
        base = base_cache(preset, **(base_kw or {}))
        ckpt = write_training_checkpoint(tmp_path / "work_dirs" / "exp" / "iter_100.pth", preset, base_dir=base,
                                         **ckpt_kw)
        return Family(preset, base, ckpt)

    return make
