"""Shared helpers of the reliability catalogue: the invariants every bad-input case must keep.

Every case in ``tests/reliability`` runs the real ``sa2va-convert`` in a child
process and then calls :func:`assert_refused`, which checks the whole contract
at once (README "Exit codes", docs/GUARANTEES.md):

* the exit code is the documented one (and is in ``errors.EXIT_CODES``);
* stderr carries exactly one ``error:`` line, shaped ``error: FILE: what (fix: how)``,
  naming the file at fault, and no traceback;
* the inputs are byte-for-byte untouched (sha256 of every file, names, modes, mtimes);
* OUT is absent, or a complete previous OUT is exactly as it was;
* no hidden ``.OUT.partial-*`` / ``.OUT.old-*`` folder (nor the lock file) is left beside OUT.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import stat
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sa2va_convert.errors import EXIT_CODES

ERROR_LINE = re.compile(r"^error: (?P<file>\S.*?): (?P<what>\S.*) \(fix: (?P<fix>\S.*)\)$")


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    args: tuple[str, ...] = ()

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    def __repr__(self) -> str:  # what pytest shows when an assertion fails
        return f"<sa2va-convert {' '.join(self.args)} -> {self.returncode}\n--- stderr ---\n{self.stderr[-3000:]}>"


# ------------------------------------------------------------------ snapshots


def tree_digest(*roots: Path) -> dict[str, tuple]:
    """Name -> (kind, sha256 or link target, mode, size, mtime) for every entry under ``roots``.

    Symbolic links are recorded, never followed (the catalogue has symlink loops).
    """
    out: dict[str, tuple] = {}

    def record(p: Path) -> None:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            out[str(p)] = ("link", os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            out[str(p)] = ("dir", stat.S_IMODE(st.st_mode))
        elif stat.S_ISREG(st.st_mode):
            out[str(p)] = ("file", _sha256(p), stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns)
        else:
            out[str(p)] = ("special", stat.S_IFMT(st.st_mode))

    for root in roots:
        root = Path(root)
        if not os.path.lexists(root):
            out[str(root)] = ("absent",)
            continue
        record(root)
        if root.is_dir() and not root.is_symlink():
            for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
                for name in sorted(dirnames + filenames):
                    record(Path(dirpath) / name)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except PermissionError:  # only when the test itself runs unprivileged
        return "<unreadable>"
    return h.hexdigest()


def leftovers(out: Path, *, ignore: Iterable[str] = ()) -> list[str]:
    """Hidden siblings of OUT that the converter made (partial, old, lock)."""
    ignore = set(ignore)
    prefix = f".{out.name}."
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(prefix) and p.name not in ignore)


@dataclass
class Guard:
    """Snapshot of the inputs and of OUT before a run; :meth:`check` proves nothing changed."""

    inputs: tuple[Path, ...]
    out: Path
    before: dict = field(init=False)
    out_before: dict | None = field(init=False)

    def __post_init__(self) -> None:
        self.before = tree_digest(*self.inputs)
        self.out_before = tree_digest(self.out) if os.path.lexists(self.out) else None

    def check(self, *, ignore_leftovers: Iterable[str] = ()) -> None:
        after = tree_digest(*self.inputs)
        changed = sorted(k for k in set(self.before) | set(after) if self.before.get(k) != after.get(k))
        assert not changed, f"inputs were modified: {changed[:5]}"
        if self.out_before is None:
            assert not os.path.lexists(self.out), f"{self.out} exists after a refused run"
        else:
            assert tree_digest(self.out) == self.out_before, f"the previous {self.out} was changed"
        left = leftovers(self.out, ignore=ignore_leftovers)
        assert left == [], f"hidden partial/old/lock entries left behind: {left}"


def assert_one_error_line(r: CliResult, code: int, file: str | Path | None = None, *needles: str) -> str:
    """The documented exit code and exactly one ``error: FILE: what (fix: how)`` line."""
    assert code in EXIT_CODES, f"exit code {code} is not documented"
    assert r.returncode == code, r
    assert "Traceback" not in r.stderr, r
    lines = r.error_lines
    assert len(lines) == 1, r
    line = lines[0]
    m = ERROR_LINE.match(line)
    assert m, f"not shaped 'error: FILE: what (fix: how)': {line}"
    if file is not None:
        assert line.startswith(f"error: {file}"), f"the error does not name {file}: {line}"
    for needle in needles:
        assert needle in line, f"{needle!r} missing from: {line}"
    return line


def assert_refused(r: CliResult, code: int, guard: Guard, file: str | Path | None = None, *needles: str,
                   ignore_leftovers: Iterable[str] = ()) -> str:
    """The whole contract of a refused run (see the module docstring)."""
    line = assert_one_error_line(r, code, file, *needles)
    guard.check(ignore_leftovers=ignore_leftovers)
    return line


# ------------------------------------------------------------------ child processes


def cli_env(extra: dict | None = None) -> dict[str, str]:
    env = {**os.environ, "CI": "1"}
    env.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
    env.update(extra or {})
    return env


def spawn_cli(*args: Any, env: dict | None = None, preexec_fn=None, cwd: Path | None = None,
              stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
    """A fresh ``python -m sa2va_convert.cli`` (for signals, kills, privilege drops)."""
    return subprocess.Popen([sys.executable, "-m", "sa2va_convert.cli", *map(str, args)], env=cli_env(env),
                            preexec_fn=preexec_fn, cwd=cwd, stdout=stdout, stderr=stderr, text=True)  # noqa: PLW1509


def run_fresh(*args: Any, env: dict | None = None, preexec_fn=None, timeout: float = 180) -> CliResult:
    p = spawn_cli(*args, env=env, preexec_fn=preexec_fn)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"sa2va-convert hung for {timeout}s:\n{err[-3000:]}") from None
    return CliResult(p.returncode, out, err, tuple(map(str, args)))


# ------------------------------------------------------------------ crafting pickles


class Reduce:
    """An object whose pickle calls ``fn(*args)`` when loaded with an unrestricted unpickler."""

    def __init__(self, fn: Any, *args: Any):
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return self.fn, self.args


class RawOps:
    """Literal pickle opcodes spliced into a ``torch.save`` stream (they must push one object)."""

    def __init__(self, data: bytes):
        self.data = data


class _SplicingPickler(pickle._Pickler):  # the pure-Python pickler lets us write raw opcodes
    dispatch = dict(pickle._Pickler.dispatch)  # noqa: RUF012 - pickle's own class-level table
    dispatch[RawOps] = lambda self, obj: self.write(obj.data)


class _SplicingModule:
    """A ``pickle_module`` for ``torch.save`` that understands :class:`RawOps`."""

    Pickler = _SplicingPickler
    Unpickler = pickle.Unpickler
    __name__ = "reliability_pickle"


def save_with_raw_ops(obj: Any, path: Path, *, protocol: int = 2) -> Path:
    torch.save(obj, path, pickle_module=_SplicingModule, pickle_protocol=protocol)
    return path


def short_unicode(text: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4) or BINUNICODE for longer text."""
    raw = text.encode()
    if len(raw) < 256:
        return b"\x8c" + bytes([len(raw)]) + raw
    return b"X" + len(raw).to_bytes(4, "little") + raw


def binunicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def load_fixture_checkpoint(path: Path) -> dict:
    """Our own fixture file (trusted): loaded the ordinary way so a test can edit and re-save it."""
    return torch.load(path, weights_only=False)


# ------------------------------------------------------------------ permissions as root


_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def _drop_dac_capabilities() -> None:  # runs in the child between fork and exec
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def permission_preexec(probe_dir: Path):
    """A ``preexec_fn`` under which file modes bind, even when the tests run as root.

    Root ignores modes through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH; dropping both from the
    capability bounding set before exec gives a child that is still uid 0 (so it can run the
    interpreter under /root) but is refused a mode-000 file like anyone else. Skips the test
    when neither that nor an unprivileged uid makes a mode-000 file unreadable.
    """
    import pytest

    preexec = _drop_dac_capabilities if os.geteuid() == 0 else None
    secret = probe_dir / ".permission-probe"
    secret.write_text("x")
    secret.chmod(0)
    try:
        p = subprocess.run([sys.executable, "-c", f"open({str(secret)!r}).read()"], preexec_fn=preexec,
                           capture_output=True, text=True, check=False)
    except OSError as e:
        pytest.skip(f"cannot drop file-permission privileges here ({e}); modes cannot be tested as root")
    finally:
        secret.unlink()
    if "PermissionError" not in p.stderr:
        pytest.skip("file modes are not enforced for the test user here (root without droppable capabilities)")
    return preexec


# ------------------------------------------------------------------ written folders


def assert_complete_output(out: Path) -> None:
    """OUT is a finished conversion: index, config, and every indexed tensor readable from its shard."""
    import json

    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert (out / "config.json").is_file() and (out / "conversion_report.json").is_file()
    by_shard: dict[str, set[str]] = {}
    for name, shard in index["weight_map"].items():
        by_shard.setdefault(shard, set()).add(name)
    for shard, names in by_shard.items():
        with safe_open(str(out / shard), framework="pt") as f:
            assert set(f.keys()) == names, shard
            for name in names:
                f.get_tensor(name)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the converter exited ({proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def _no_verify() -> tuple[str, ...]:
    """``--no-verify`` where the command has it: the predict_forward round trip is not what these tests
    test, and it costs seconds per successful conversion."""
    from sa2va_convert.cli import convert

    return ("--no-verify",) if any("--no-verify" in getattr(p, "secondary_opts", ()) for p in convert.params) else ()


NO_VERIFY = _no_verify()
