"""Errors that reach the user as one line and a documented exit code.

Every failure the tool anticipates is a :class:`ConvertError` subclass. The CLI
prints ``error: <path>: <message> (fix: <hint>)`` and exits with the class's
``exit_code``; anything else is a bug and exits 1 with a traceback hint. Exit
codes are part of the public contract (README, "Exit codes"), so CI scripts can
branch on them.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, ParamSpec, Protocol, TypeVar


class Report(Protocol):
    """What an error carries of the work done before it failed (a round trip's, a folder check's, a batch's
    or an eval's report). Only the shape is named here: this module is the floor every stage imports, so it
    names none of theirs (a type import of them made a circle)."""

    def to_dict(self) -> dict[str, Any]: ...


class ConvertError(Exception):
    """Base of all anticipated failures; carries the file at fault and the fix."""

    exit_code = 1
    kind = "error"
    #: the model process's traceback, when the failure happened in one (printed by ``--debug``)
    details: str | None = None

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None
        self.hint = hint

    def one_line(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}: ")
        parts.append(self.message.replace("\n", " "))
        if self.hint:
            parts.append(f" (fix: {self.hint})")
        return "".join(parts)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "exit_code": self.exit_code,
            "path": self.path,
            "message": self.message,
            "hint": self.hint,
        }

    def __str__(self) -> str:  # so pytest and logs show the whole line
        return self.one_line()


class UsageError(ConvertError):
    """A name or value the caller passed is not one the tool knows or cannot work (an unknown
    built-in keymap, a size, a regex, a device, an interpreter, a dtype); found before any work.

    Exit 2, like click's own usage errors, because the fix is in the command line (or the call),
    not in any file."""

    exit_code = 2
    kind = "usage"


class InputError(ConvertError):
    """An input file or folder is missing, unreadable, truncated or of the wrong kind."""

    exit_code = 3
    kind = "input"


class UnsafeInputError(ConvertError):
    """A pickle asked for something we will not import or call (possible code execution)."""

    exit_code = 4
    kind = "unsafe"


class PlanError(ConvertError):
    """The inputs are readable but do not add up: family, keys, shapes, vocab, LoRA settings."""

    exit_code = 5
    kind = "plan"


class KeymapError(PlanError):
    """A keymap YAML file is invalid; ``path`` carries ``file:line``."""

    kind = "keymap"


class OutputError(ConvertError):
    """The output cannot be written: exists without --force, disk full, permissions, a lock."""

    exit_code = 6
    kind = "output"


class VerifyError(ConvertError):
    """A written folder failed verification (structure, loading, or predict_forward)."""

    exit_code = 7
    kind = "verify"
    #: what was checked before the failure: the round trip's report, or (from ``verify_folder``) the folder's
    report: Report | None = None


class VerifyEnvironmentError(VerifyError):
    """The round trip could not run here: a missing package, too little memory, no usable GPU,
    a transformers version the remote code does not support. Says nothing about the folder."""

    exit_code = 9
    kind = "verify-environment"


class BatchError(ConvertError):
    """At least one checkpoint of a batch failed; the others were converted."""

    exit_code = 8
    kind = "batch"
    #: every checkpoint's outcome, the converted ones included
    result: Report | None = None


class EvalFailuresError(ConvertError):
    """``eval``: at least one image could not be evaluated (unreadable, or the model raised on it).
    The report was still written, with each failure and its error; the other images were scored."""

    exit_code = 10
    kind = "eval-failures"
    #: the whole report (already written to disk)
    report: Report | None = None


class EvalGateError(ConvertError):
    """``eval --fail-under`` / ``--require-better``: the models were evaluated and the report written,
    but a condition the caller set for them does not hold. Its own code, so a CI job can tell "the
    fine-tune is not good enough" from "the evaluation could not run" or "some images failed"."""

    exit_code = 11
    kind = "eval-gate"
    #: the whole report (already written to disk)
    report: Report | None = None


EXIT_INTERRUPTED = 130


class Interrupted(ConvertError):
    """Ctrl-C / SIGTERM, with a message that says what is true about OUT at that moment."""

    exit_code = EXIT_INTERRUPTED
    kind = "interrupted"


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "internal error (a bug: please report it with the traceback from --debug)",
    2: "command-line usage error",
    InputError.exit_code: "input missing, unreadable, truncated or of the wrong kind",
    UnsafeInputError.exit_code: "input refused as unsafe (a pickle asked to import or call something not allowed)",
    PlanError.exit_code: "inputs do not add up (family, keymap, keys, shapes, vocab, LoRA settings, numerics)",
    OutputError.exit_code: "output cannot be written (exists without --force, disk full, permissions, busy)",
    VerifyError.exit_code: "verification of the written folder failed",
    BatchError.exit_code: "batch: at least one checkpoint failed (the others were converted)",
    VerifyEnvironmentError.exit_code: "the round trip could not run here (missing package, not enough memory, no "
    "usable GPU); the folder itself was not judged",
    EvalFailuresError.exit_code: "eval: at least one image failed (recorded with its error in the report; the "
    "others were scored)",
    EvalGateError.exit_code: "eval: a --fail-under, --fail-above or --require-better condition does not hold (the "
    "report was written; the line says which condition failed)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C / SIGTERM); the message says what was left (a half-written folder is never "
    "published)",
}


# ---------------------------------------------------------------- hints for Python callers

# Hints are written for the command line (``pass --base DIR``). A Python caller has no flags, so the
# public API functions (``sa2va_convert.convert`` etc.) rewrite them into the keyword or option to set,
# unless the call came from the CLI, which sets this flag for the duration of a command.
FROM_CLI: ContextVar[bool] = ContextVar("sa2va_convert_from_cli", default=False)

_API_WORDING: dict[str, str] = {
    "--no-verify": "ConvertOptions(roundtrip=False)",
    "--verify": "ConvertOptions(roundtrip=True)",
    "--no-roundtrip": "roundtrip=False",
    "--no-read-back": "ConvertOptions(read_back=False)",
    "--max-shard-size": "ConvertOptions.max_shard_bytes",
    "--format": "ConvertOptions.output_format",
    "--allow-global": "ConvertOptions.allow_globals",
    "--all": "convert_all()",
    "--dry-run": "plan_conversion()",
    "--debug": "the traceback (e.__cause__)",
    "--device": "verify_device= / device=",
    "--python": "verify_python= / python=",
    "--rslora": "ConvertOptions(rslora=True)",
    "--no-rslora": "ConvertOptions(rslora=False)",
}
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")
_COMMANDS = [
    (re.compile(r"`?sa2va-convert keymaps list`?"), "`sa2va_convert.plan.keymap.builtin_names()`"),
    (re.compile(r"`?sa2va-convert keymaps show( NAME)?`?"), "the built-in keymaps (`keymaps/*.yaml`)"),
    (re.compile(r"`?sa2va-convert verify OUT`?"), "`sa2va_convert.verify_folder(OUT)`"),
]


def api_wording(hint: str | None) -> str | None:
    """A CLI hint in Python terms: ``--base DIR`` -> ``ConvertOptions.base``, ``--no-verify`` -> ``roundtrip=False``."""
    if not hint:
        return hint
    for pattern, text in _COMMANDS:
        hint = pattern.sub(text, hint)

    def flag(m: re.Match) -> str:
        whole = m.group(0)
        return _API_WORDING.get(whole) or f"ConvertOptions.{m.group(1).replace('-', '_')}"

    return _FLAG.sub(flag, hint)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def api_errors(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate a public API function: its ConvertErrors carry Python-worded hints (unless run by the CLI)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except ConvertError as e:
            if not FROM_CLI.get():
                e.hint = api_wording(e.hint)
            raise

    return wrapper
