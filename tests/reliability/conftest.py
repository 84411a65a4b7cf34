"""Fixtures of the reliability catalogue: a fast way to run the real CLI, and guarded inputs.

``sa2va`` runs ``sa2va-convert ARGS`` in a child process and returns a
:class:`CliResult`. By default the child is forked from a pre-warmed launcher
(``_zygote.py``: torch and the converter already imported, each child a fresh
fork with its own pid, cwd, environment, stdout/stderr and exit status,
running the same ``sa2va_convert.cli.main`` as the console script). That
keeps ~40 CLI runs within the suite's time budget on a 2-core machine. Set
``SA2VA_RELIABILITY_FRESH=1`` to start a brand-new interpreter for every run
instead (what ``tests/conftest.py::run_cli`` does); the catalogue passes both
ways. Cases about signals, kills, privileges and the interpreter's start-up
(``sitecustomize``) always use fresh interpreters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _reliability import CliResult, Guard, cli_env, run_fresh

_ZYGOTE = Path(__file__).with_name("_zygote.py")
FRESH = os.environ.get("SA2VA_RELIABILITY_FRESH", "") not in ("", "0")


class Zygote:
    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.count = 0
        self.proc = subprocess.Popen([sys.executable, str(_ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(logdir / "zygote.log", "w"),  # noqa: SIM115
                                     env=cli_env(), text=True)
        ready = self.proc.stdout.readline()
        if json.loads(ready or "{}").get("ready") is not True:
            raise RuntimeError(f"the CLI launcher did not start: {(logdir / 'zygote.log').read_text()[-2000:]}")

    def run(self, args: list[str], *, env: dict, cwd: Path, timeout: int, **extra) -> CliResult:
        """One child; ``extra`` are the optional request fields of ``_zygote.py`` (the interrupt sweep's)."""
        self.count += 1
        so, se = self.logdir / f"{self.count}.out", self.logdir / f"{self.count}.err"
        req = {"args": args, "env": env, "cwd": str(cwd), "stdout": str(so), "stderr": str(se), "timeout": timeout,
               **extra}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError("the CLI launcher died")
        answer = json.loads(reply)
        r = CliResult(answer["rc"], so.read_text(errors="replace"), se.read_text(errors="replace"), tuple(args))
        r.seconds, r.signalled = answer.get("seconds"), answer.get("signalled")  # type: ignore[attr-defined]
        return r

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def _zygote(tmp_path_factory):
    if FRESH:
        yield None
        return
    z = Zygote(tmp_path_factory.mktemp("cli-launcher"))
    yield z
    z.close()


@pytest.fixture
def sa2va(_zygote, tmp_path):
    """``sa2va(*args, env=None, timeout=120) -> CliResult``: the real CLI in a child process."""

    def run(*args, env: dict | None = None, timeout: int = 120) -> CliResult:
        args = [str(a) for a in args]
        if _zygote is None:
            return run_fresh(*args, env=env, timeout=timeout)
        return _zygote.run(args, env=cli_env(env), cwd=tmp_path, timeout=timeout)

    return run


@pytest.fixture
def tiny(make_family, tmp_path):
    """A tiny Sa2VA-1B fine-tune: checkpoint in tmp_path, session-shared base (read-only input)."""
    fam = make_family("sa2va-1b")
    fam.out = tmp_path / "out"
    return fam


@pytest.fixture
def guard_for():
    """``guard_for(out, *inputs) -> Guard``: snapshot before the run, ``.check()`` after."""

    def make(out: Path, *inputs: Path) -> Guard:
        return Guard(tuple(Path(p) for p in inputs), Path(out))

    return make


MEDIUM = {"hidden": 128, "intermediate": 512, "layers": 6}


@pytest.fixture
def medium(make_family, tmp_path):
    """A Sa2VA-1B fine-tune big enough that writing it in 64 KB shards takes a noticeable while
    (signals and kills must land mid-write); the base is shared by the session."""
    from sa2va_convert.testing import Sizes

    sizes = Sizes.tiny().with_(**MEDIUM)
    fam = make_family("sa2va-1b", base_kw={"sizes": sizes}, sizes=sizes)
    fam.out = tmp_path / "out"
    fam.shard_args = ("--max-shard-size", "64KB")
    return fam
