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
    args = with_adapter(args)
    args = {**args, "weight_files": weight_files(Path(args["folder"]))}
    started = time.perf_counter()
    tail: deque[str] = deque(maxlen=60)
    state = {"stage": "start"}
    out_chunks: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sa2va-verify-") as tmp:
        cmd = [python, str(CHILD_SCRIPT), json.dumps(args)]
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                cwd=tmp,
                env=child_env(os.path.join(tmp, "modules")),
                text=True,
                encoding="utf-8",
                errors="replace",
                start_new_session=True,
            )
        except OSError as e:
            raise VerifyError(
                f"cannot start {python} ({e.strerror or e})",
                path=python,
                hint="pass --python with a working interpreter",
            ) from None

        stderr, stdout = proc.stderr, proc.stdout
        assert stderr is not None and stdout is not None  # both are PIPEs

        def read_err() -> None:
            for line in stderr:
                if line.startswith(STAGE_PREFIX):
                    state["stage"] = line[len(STAGE_PREFIX) :].strip()
                    if on_stage:
                        on_stage(STAGE_WORDS.get(state["stage"], state["stage"]))
                else:
                    tail.append(line.rstrip("\n"))

        def read_out() -> None:
            out_chunks.append(stdout.read())

        readers = [threading.Thread(target=read_err, daemon=True), threading.Thread(target=read_out, daemon=True)]
        for r in readers:
            r.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
        except BaseException:  # Ctrl-C / SIGTERM: take the child down with us
            _kill(proc)
            raise
        for r in readers:
            r.join(timeout=10)
    result = None
    for line in reversed("".join(out_chunks).splitlines()):
        if line.strip().startswith("{"):
            try:
                result = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    return ChildRun(
        result=result,
        returncode=proc.returncode,
        stderr_tail="\n".join(tail),
        last_stage=(result or {}).get("stage") or state["stage"],
        seconds=time.perf_counter() - started,
        timed_out=timed_out,
    )


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
    "check_device",
    "child_env",
    "resolve_python",
    "run_child",
    "with_adapter",
]
