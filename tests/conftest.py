"""Shared test helpers: real fixture folders on disk and real subprocess runs of the CLI."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# transformers copies a folder's remote code into HF_MODULES_CACHE under the folder's base name
# ("out", "o", ...), so two test processes loading different folders of the same name would
# overwrite each other's modules. The suite runs in several worker processes (pytest-xdist, see
# pyproject's addopts): each gets a private modules cache, set before transformers is imported and
# inherited by every CLI subprocess it starts.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix=f"hf-modules-{os.environ['PYTEST_XDIST_WORKER']}-")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], True)

# One OpenMP/MKL thread per process, for the pytest workers and every CLI and model process they
# start (inherited): the suite already runs one worker per core, and each worker's model process
# would otherwise start a thread per core too, whose spin-waiting threads then compete for the
# same cores (measured on 3 round-trip tests of test_verify.py, 2-core VM: 27.9 CPU-s with one
# thread against 35.1 with the default). A user's own setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# A shell without job control starts background commands (`pytest ... &` in a script) with SIGINT
# ignored, and an ignored signal is inherited across exec: every CLI the tests start would then
# ignore the Ctrl-C the interruption tests send, and those tests would fail for the way pytest was
# launched. Python's own handler is reset to the default on exec, so restoring it here is enough.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config: pytest.Config) -> None:
    """Warm yapf's grammar cache once, in the controlling process, before any worker starts.

    mmengine (the checkpoint helpers' real MessageHub) imports yapf, which on its first import on a
    machine writes a pickled grammar under ~/.cache/YAPF and reads it back; two workers importing it
    at once on a fresh CI machine raced, and one read the half-written pickle ("EOFError: Ran out of
    input" while collecting test_checkpoint_reader.py).
    """
    if hasattr(config, "workerinput"):
        return
    try:
        import yapf  # noqa: F401
    except ImportError:
        pass
    _compile_our_sources()


def _compile_our_sources() -> None:
    """Byte-compile the package once, where this environment writes no ``.pyc`` itself.

    With ``PYTHONDONTWRITEBYTECODE`` set (as on our CI machines) Python never caches the bytecode of
    the editable install's modules, so each of the suite's several hundred CLI, model and eval
    processes compiled them again (~0.15 s a process on the 2-core VM). Existing ``.pyc`` files are
    still read under that setting; ``compileall`` writes them explicitly, in ``__pycache__`` (ignored
    by git), and skips what is up to date.
    """
    import compileall
    import sys

    import sa2va_convert  # the copy every process imports (the editable src/, or an installed one)

    if sys.dont_write_bytecode:
        compileall.compile_dir(str(Path(sa2va_convert.__file__).parent), quiet=1)


from sa2va_convert.testing.fixtures import FixtureCheckpoint, write_base_folder, write_training_checkpoint

from _cli import run_cli


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


@pytest.fixture(autouse=True)
def _signals_left_as_found():
    """Every CLI run a test starts inherits this process's signal mask and ignored signals: a test (or
    the in-process API) that left SIGINT blocked or ignored would make later Ctrl-C tests pass or fail
    by order. So each test must leave them as it found them."""
    import signal

    before = (signal.pthread_sigmask(signal.SIG_BLOCK, []), signal.getsignal(signal.SIGINT),
              signal.getsignal(signal.SIGTERM))
    yield
    after = (signal.pthread_sigmask(signal.SIG_BLOCK, []), signal.getsignal(signal.SIGINT),
             signal.getsignal(signal.SIGTERM))
    if after != before:
        signal.pthread_sigmask(signal.SIG_SETMASK, before[0])
        signal.signal(signal.SIGINT, before[1])
        signal.signal(signal.SIGTERM, before[2])
        pytest.fail(f"the test changed this process's signal state: {before} -> {after}")
