"""Start the model process and read what it reports: the process side of every mode.

Why a separate process: a folder's remote code (``trust_remote_code=True``) is arbitrary Python;
the converter reads untrusted checkpoints without executing them and must not then import that
code itself. The child (``child.py`` beside this file, a standalone script passed by path) may
also run under another interpreter (``python=``): a CUDA environment when this one has none, or
one with the transformers version the upstream code pins. The round trip (``verify/``),
``predict`` and ``eval`` all start it here, so they load a folder the same way and fail the same
way (``failure.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError, VerifyError
from ..formats import weight_files
from ..read.adapter_folder import resolve_adapter

CHILD_SCRIPT = Path(__file__).with_name("child.py")
DEFAULT_TIMEOUT = 1800.0
DEVICES = ("auto", "cpu", "cuda")
STAGE_PREFIX = "@@stage "

# The child's stage names, as the parent says them (progress lines and error messages).
STAGE_WORDS = {
    "start": "starting",
    "import": "importing torch/transformers",
    "device": "choosing the device",
    "config": "building the config",
    "load": "loading the model",
    "dtypes": "checking dtypes",
    "adapter": "merging the adapter onto the base (PEFT)",
    "tokenizer": "loading the tokenizer",
    "prepare": "calling preparing_for_generation",
    "predict_image": "running predict_forward on an image",
    "predict_video": "running predict_forward on a video",
    "predict": "running predict_forward",
    "save": "saving the masks",
    "image": "reading the image",
    "predict_forced": "running predict_forward with [SEG] forced",
}


def resolve_python(python: str | os.PathLike | None) -> str:
    """The interpreter for the child: ours by default, else a path or a name on PATH that runs and
    is a Python 3. Checked before any work, so a typo costs a second, not a whole conversion."""
    if python is None:
        return sys.executable
    text = str(python)
    found = shutil.which(text) if os.sep not in text else (text if os.path.isfile(text) else None)
    if not found or not os.access(found, os.X_OK):
        raise UsageError(
            f"Python interpreter {text!r} not found or not executable",
            path=text,
            hint="pass --python with the path of a python that has torch and transformers",
        )
    try:
        probe = subprocess.run(
            [found, "-c", "import sys; print('sa2va-python', sys.version_info[0])"],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        out = probe.stdout.split()
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(
            f"{text!r} does not run ({type(e).__name__})",
            path=text,
            hint="pass --python with a working Python 3 interpreter",
        ) from None
    if probe.returncode != 0 or out[:1] != ["sa2va-python"] or out[1:2] != ["3"]:
        raise UsageError(
            f"{text!r} is not a Python 3 interpreter",
            path=text,
            hint="pass --python with the path of a python that has torch and transformers",
        )
    return found


def check_device(device: str) -> str:
    if device in DEVICES or re.fullmatch(r"cuda:\d+", device or ""):
        return device
    raise UsageError(f"unknown device {device!r}", hint="use --device auto, cpu, cuda or cuda:N")


def child_env(modules_cache: str) -> dict[str, str]:
    """The child's environment: ours, offline, with a private cache for the copied remote code.

    transformers copies remote code into HF_MODULES_CACHE under the folder's base name; a private
    one keeps two folders both called ``out`` from sharing (or racing on) one copy."""
    env = dict(os.environ)
    env.update(
        {
            "HF_MODULES_CACHE": modules_cache,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TQDM_DISABLE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    return env


@dataclass
class ChildRun:
    result: dict[str, Any] | None
    returncode: int | None
    stderr_tail: str
    last_stage: str
    seconds: float
    timed_out: bool = False
    waited: float | None = None  # a StartedChild: seconds it waited, imports done, for its folder


def with_adapter(args: dict[str, Any]) -> dict[str, Any]:
    """An adapter folder (``--format adapter``) as ``folder``: the child loads its recorded base, checked
    against the sha256 of every base weight file (a different base is refused, exit 5), then the adapter."""
    found = resolve_adapter(args["folder"])
    if found is None:
        return args
    return {**args, "folder": str(found.base), "adapter": str(found.adapter), "adapter_dtype": found.dtype}


def run_child(
    args: dict[str, Any], *, python: str, timeout: float, on_stage: Callable[[str], None] | None = None
) -> ChildRun:
    """Run ``child.py`` with ``args``; never raises for the child's own failures (see ChildRun).

    The child is told which files hold ``args["folder"]``'s weights (``weight_files``): it cannot
    import ``formats``, so the names stay spelled once, here in the package."""
    args = _full_args(args)
    child = _Child(python, [json.dumps(args)], stdin=subprocess.DEVNULL)
    return child.wait(timeout=timeout, on_stage=on_stage)


class StartedChild:
    """A model process started before its folder exists, to take its imports off the round trip.

    Why: the round trip's child spends its first seconds importing torch and transformers and
    starting the GPU (4.4 s of a 23 s round trip at 8B on the H100 machine, before the folder is
    even read), while the conversion that precedes it is busy with the disk. Started as the write
    begins, the child does only that (``child.py -``: imports, and a CUDA context unless the device
    is ``cpu``) and then waits on stdin; :meth:`run` hands it the written folder's arguments, and
    from there it runs exactly as a child started by :func:`run_child`. Nothing of the folder, and
    no remote code, is touched before :meth:`run`. :meth:`cancel` (always called, in a ``finally``)
    ends a child that was never given its folder: closing stdin makes it exit, and its process group
    is killed if it has not. ``SA2VA_EARLY_CHILD=0`` turns this off (benchmarking).
    """

    def __init__(self, python: str, *, device: str = "auto"):
        self._child: _Child | None = _Child(python, ["-", json.dumps({"device": device})], stdin=subprocess.PIPE)
        self._used = False

    @classmethod
    def maybe_start(cls, python: str | None, *, device: str = "auto") -> StartedChild | None:
        """A started child, or None where early start is off or the interpreter does not start (the
        round trip then starts its child as usual, and reports that failure in its own words)."""
        if os.environ.get("SA2VA_EARLY_CHILD", "").strip() == "0":
            return None
        try:
            return cls(python or sys.executable, device=device)
        except (OSError, VerifyError):
            return None

    def run(self, args: dict[str, Any], *, timeout: float, on_stage: Callable[[str], None] | None = None) -> ChildRun:
        """Give the waiting child its arguments and wait for its report, as :func:`run_child` does."""
        child = self._child
        if child is None or self._used:
            raise RuntimeError("StartedChild.run called twice or after cancel")
        self._used = True
        child.send(json.dumps(_full_args(args)))
        return child.wait(timeout=timeout, on_stage=on_stage)

    def cancel(self) -> None:
        """End the child if it was never run (or is still running); idempotent."""
        child, self._child = self._child, None
        if child is not None:
            child.close()


def _full_args(args: dict[str, Any]) -> dict[str, Any]:
    args = with_adapter(args)
    return {**args, "weight_files": weight_files(Path(args["folder"]))}


class _Child:
    """One ``child.py`` process: started, its stderr (stage lines) and stdout read in threads, waited for."""

    def __init__(self, python: str, argv: list[str], *, stdin: int):
        self.spawned = time.perf_counter()
        self.sent: float | None = None
        self.tail: deque[str] = deque(maxlen=60)
        self.stage = "start"
        self.on_stage: Callable[[str], None] | None = None
        self.out_chunks: list[str] = []
        self.tmp = tempfile.TemporaryDirectory(prefix="sa2va-verify-")
        try:
            self.proc = subprocess.Popen(
                [python, str(CHILD_SCRIPT), *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=stdin,
                cwd=self.tmp.name,
                env=child_env(os.path.join(self.tmp.name, "modules")),
                text=True,
                encoding="utf-8",
                errors="replace",
                start_new_session=True,
            )
        except OSError as e:
            self.tmp.cleanup()
            raise VerifyError(
                f"cannot start {python} ({e.strerror or e})",
                path=python,
                hint="pass --python with a working interpreter",
            ) from None
        self.readers = [
            threading.Thread(target=self._read_err, daemon=True),
            threading.Thread(target=self._read_out, daemon=True),
        ]
        for r in self.readers:
            r.start()

    def _read_err(self) -> None:
        stderr = self.proc.stderr
        assert stderr is not None  # a PIPE
        for line in stderr:
            if line.startswith(STAGE_PREFIX):
                self.stage = line[len(STAGE_PREFIX) :].strip()
                if self.on_stage:
                    self.on_stage(STAGE_WORDS.get(self.stage, self.stage))
            else:
                self.tail.append(line.rstrip("\n"))

    def _read_out(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None  # a PIPE
        self.out_chunks.append(stdout.read())

    def send(self, line: str) -> None:
        """The arguments, as one line on the waiting child's stdin (then EOF). A child that already
        died is not an error here: :meth:`wait` reports what it said."""
        self.sent = time.perf_counter()
        stdin = self.proc.stdin
        assert stdin is not None  # a PIPE
        try:
            stdin.write(line + "\n")
            stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass

    def wait(self, *, timeout: float, on_stage: Callable[[str], None] | None) -> ChildRun:
        self.on_stage = on_stage
        started = self.sent if self.sent is not None else self.spawned
        timed_out = False
        try:
            try:
                self.proc.wait(timeout=max(0.0, timeout - (time.perf_counter() - started)))
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill(self.proc)
            except BaseException:  # Ctrl-C / SIGTERM: take the child down with us
                _kill(self.proc)
                raise
            for r in self.readers:
                r.join(timeout=10)
        finally:
            self.tmp.cleanup()
        result = None
        for line in reversed("".join(self.out_chunks).splitlines()):
            if line.strip().startswith("{"):
                try:
                    result = json.loads(line)
                    break
                except json.JSONDecodeError:
                    continue
        return ChildRun(
            result=result,
            returncode=self.proc.returncode,
            stderr_tail="\n".join(self.tail),
            last_stage=(result or {}).get("stage") or self.stage,
            seconds=time.perf_counter() - started,
            timed_out=timed_out,
            waited=round(self.sent - self.spawned, 3) if self.sent is not None else None,
        )

    def close(self) -> None:
        """End the process (EOF on its stdin, then its group killed if still alive) and remove its folder."""
        if self.proc.poll() is None:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
            _kill(self.proc)
        for r in self.readers:
            r.join(timeout=10)
        self.tmp.cleanup()


def _kill(proc: subprocess.Popen) -> None:
    """Kill the child's process group (it was started in a session of its own) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


__all__ = [
    "CHILD_SCRIPT",
    "ChildRun",
    "DEFAULT_TIMEOUT",
    "DEVICES",
    "STAGE_WORDS",
    "StartedChild",
    "check_device",
    "child_env",
    "resolve_python",
    "run_child",
    "with_adapter",
]
