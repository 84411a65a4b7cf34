"""Turn a model process that failed into one error whose hint says what to do.

The child only reports facts (its stage, the exception chain, the GPU it saw, the versions); the
round trip, ``predict`` and ``eval`` each ask here what those facts mean, so a model whose code
needs a GPU, a transformers that breaks its code or a missing package reads the same in every
command: :class:`VerifyEnvironmentError` (exit 9) when the environment is at fault
(``environment.py`` names the known ones), :class:`VerifyError` (exit 7) when the folder or its
code is.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import VerifyEnvironmentError, VerifyError
from .environment import diagnose
from .process import STAGE_WORDS, ChildRun

# Upstream remote code that a given transformers breaks (FORMATS.md §5): message pattern -> hint.
_KNOWN_BREAKAGE = (
    (
        re.compile(r"has no attribute 'generate'"),
        "this remote code predates transformers 4.50 (PreTrainedModel lost generate); pass --python with an "
        "environment that has transformers 4.42-4.49 (upstream v1 pins 4.42.3)",
    ),
    (
        re.compile(r"KeyError: 'architectures'|^'architectures'$"),
        "this v1 config class breaks on transformers 4.53+; pass --python with an environment that has "
        "transformers<4.53 (upstream v1 pins 4.42.3)",
    ),
)
INSTALL_HINT = "pip install 'sa2va-convert[verify]'"
_CUDA_WORDS = re.compile(r"cuda|nvidia|gpu", re.I)
_CUDA_CALLS = re.compile(r"\.cuda\(|autocast\(\s*['\"]cuda|device_type\s*=\s*['\"]cuda|['\"]cuda['\"]")


# What the child's CPU mapping (``child.map_cuda_to_cpu``) cannot rewrite: calls into torch.cuda itself,
# CUDA generators, and kernels compiled for CUDA.
_UNMAPPED_CUDA = re.compile(
    r"torch\.cuda\.(?!is_available|amp\b|empty_cache|device_count)\w+\(|"
    r"Generator\([^)]*cuda|extra_cuda_cflags|load_inline\("
)


def cuda_calls(folder: Path, limit: int = 3, *, mapped: bool = False) -> list[str]:
    """``file:line`` of remote-code lines that put work on CUDA (read as text, never imported).

    With ``mapped`` (the child mapped ``.cuda()`` and autocast to the CPU) only the forms it
    cannot map are listed, so the message points at the line that really failed."""
    pattern = _UNMAPPED_CUDA if mapped else _CUDA_CALLS
    found: list[str] = []
    for path in sorted(Path(folder).glob("*.py")):
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for n, line in enumerate(lines, 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and "is_available" not in code:
                found.append(f"{path.name}:{n}")
                if len(found) >= limit:
                    return found
    return found


def child_failure(
    run: ChildRun, *, folder: Path, python: str, device: str, timeout: float, what: str = "round trip"
) -> VerifyError:
    """One VerifyError for a child that failed, timed out or died, with the most useful hint."""
    where = STAGE_WORDS.get(run.last_stage, run.last_stage)
    if run.timed_out:
        return VerifyEnvironmentError(
            f"{what} did not finish within {timeout:g}s (it was {where})",
            path=folder,
            hint="raise --timeout, lower --max-new-tokens, or use a GPU (--device cuda)",
        )
    if run.result is None:
        rc = run.returncode
        died = f"was killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with code {rc}"
        oom = " (signal 9: often out of memory)" if rc == -9 else ""
        last = _last_line(run.stderr_tail)
        cls = VerifyEnvironmentError if rc == -9 else VerifyError
        return cls(
            f"the {what} process {died}{oom} while {where}, without a report" + (f": {last}" if last else ""),
            path=folder,
            hint="run with --debug to see its output; check memory and the interpreter",
        )
    err = run.result.get("error") or {}
    stage_name, etype, msg = err.get("stage", run.last_stage), err.get("type", "Error"), err.get("message", "")
    where = STAGE_WORDS.get(stage_name, stage_name)
    gpu = run.result.get("gpu") or {}
    text = f"{etype}: {msg}"
    used = run.result.get("device") or device
    env = diagnose(
        run.result, folder=folder, python=python, what=what, sibling_modules={p.stem for p in Path(folder).glob("*.py")}
    )
    if env is not None:
        return env
    if stage_name == "import":
        return VerifyEnvironmentError(
            f"{python} cannot run the {what}: {text}",
            path=python,
            hint=f"{INSTALL_HINT}, or pass --python with an environment that has torch, transformers, numpy and pillow",
        )
    if stage_name == "device" and err.get("own"):
        n = int(gpu.get("count") or 0)
        hint = (
            ("use --device auto, cuda or " + ("cuda:0" if n == 1 else f"cuda:0..cuda:{n - 1}"))
            if n
            else _gpu_hint(python, what)
        )
        return VerifyEnvironmentError(msg, path=folder, hint=hint)
    if etype == "MemoryError" or "DefaultCPUAllocator: can't allocate memory" in msg or "out of memory" in msg.lower():
        return VerifyEnvironmentError(
            f"{what} ran out of memory while {where}: {text}", path=folder, hint=memory_hint(what)
        )
    tb = err.get("traceback", "")
    if _CUDA_WORDS.search(text) or (not gpu.get("cuda_available") and ".cuda(" in tb):
        if str(used).startswith("cpu"):
            calls = cuda_calls(folder, mapped=bool(run.result.get("cuda_mapped")))
            where_code = f" (CUDA calls at {', '.join(calls)})" if calls else ""
            if gpu.get("cuda_available"):
                return VerifyEnvironmentError(
                    f"the model's remote code needs a GPU{where_code} but the {what} ran on CPU: {text}",
                    path=folder,
                    hint="use --device cuda (or auto)",
                )
            return VerifyEnvironmentError(
                f"the model's remote code needs a GPU{where_code}, and {python} sees none: {text}",
                path=folder,
                hint=_gpu_hint(python, what),
            )
    for pattern, hint in _KNOWN_BREAKAGE:
        if pattern.search(text) or pattern.search(tb):
            versions = run.result.get("versions") or {}
            return VerifyEnvironmentError(
                f"{what} failed while {where} under transformers {versions.get('transformers')}: {text}",
                path=folder,
                hint=hint,
            )
    return VerifyError(
        f"{what} failed while {where}: {text}",
        path=folder,
        hint="run with --debug for the traceback; --no-roundtrip checks the files only",
    )


def debug_details(run: ChildRun) -> str:
    """The child's traceback and the end of its stderr, for ``--debug``."""
    parts = []
    tb = ((run.result or {}).get("error") or {}).get("traceback")
    if tb:
        parts.append("child traceback:\n" + tb.rstrip())
    if run.stderr_tail.strip():
        parts.append("child stderr (last lines):\n" + run.stderr_tail.rstrip())
    return "\n".join(parts)


def memory_hint(what: str) -> str:
    """How to get more memory for ``what``, in the words of the command that ran it."""
    if what == "prediction":
        return "run `sa2va-convert predict ... --device cuda` on a machine with a GPU and enough memory"
    return (
        "run `sa2va-convert verify OUT --device cuda` on a machine with a GPU and enough memory, or convert with "
        "--no-verify"
    )


def _gpu_hint(python: str, what: str) -> str:
    if what == "prediction":
        return (
            "run `sa2va-convert predict ... --device cuda` on a machine with a GPU, or pass --python with a "
            "CUDA-enabled environment"
        )
    return (
        "run `sa2va-convert verify --device cuda` on a machine with a GPU, or pass --python with a "
        "CUDA-enabled environment; --no-roundtrip checks the files only"
    )


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


__all__ = ["child_failure", "cuda_calls", "debug_details", "memory_hint", "INSTALL_HINT"]
