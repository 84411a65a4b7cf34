"""Never harm a user's files: OUT must not touch an input, and only our own folders are replaced.

Checked before any work (the CLI and the API call :func:`check_out` first thing) and again in
the write stage, right before a folder is replaced, so no path through the code can publish
over, or delete, a checkpoint, a work_dir, a base folder or a keymap file. Paths are compared
after ``realpath`` (symlinks, ``..``, ``.``) and, where both exist, with ``samefile`` (bind
mounts, hard links, case-insensitive file systems).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError

REPORT_NAME = "conversion_report.json"
TOOL_NAME = "sa2va-convert"


@dataclass(frozen=True)
class NamedInput:
    """An input path and what the user called it (``--base``, ``the checkpoint``, ...)."""

    role: str
    path: Path


def _real(path: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    """``child`` is ``parent`` or lies below it (by real path, or by identity of an ancestor)."""
    if child == parent or parent in child.parents:
        return True
    try:
        if not parent.is_dir():
            return False
        return any(_same(anc, parent) for anc in child.parents if anc.exists())
    except OSError:
        return False


def check_out(out: str | os.PathLike, inputs: Iterable[NamedInput], *, what: str = "OUT") -> None:
    """Refuse an OUT that equals, contains or lies inside any input."""
    real_out = _real(Path(out))
    for inp in inputs:
        real_in = _real(inp.path)
        if _same(real_out, real_in):
            raise OutputError(
                f"{what} is the {inp.role} itself ({inp.path}); writing there would destroy it",
                path=out,
                hint=f"choose an {what} outside every input, e.g. a new folder beside them",
            )
        if _inside(real_in, real_out):
            raise OutputError(
                f"{what} contains the {inp.role} ({inp.path}); replacing it would delete that input",
                path=out,
                hint=f"choose an {what} outside every input, e.g. a new folder beside them",
            )
        if _inside(real_out, real_in):
            raise OutputError(
                f"{what} lies inside the {inp.role} ({inp.path}); this tool never writes into an input",
                path=out,
                hint=f"choose an {what} outside every input, e.g. a new folder beside them",
            )


def read_report(folder: str | os.PathLike) -> dict | None:
    """``folder``'s conversion report as a dict; None when it is missing, unreadable, not JSON or not an object.

    The one reader of ``REPORT_NAME``: each caller decides what a missing or damaged report means.
    """
    try:
        report = json.loads((Path(folder) / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def written_by_us(folder: Path) -> bool:
    """True when ``folder`` holds a conversion report this tool wrote (the only folders --force replaces)."""
    report = read_report(folder)
    return report is not None and report.get("tool") == TOOL_NAME


def check_replaceable(out: Path, *, force: bool, replace_foreign: bool) -> None:
    """An existing OUT is replaced only when asked, and only when it is ours (or the user said so by name)."""
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not out.is_dir():
        raise OutputError("output path exists and is not a folder", path=out, hint="remove it or choose another path")
    if not (force or replace_foreign):
        hint = (
            "pass --force to replace it (the old folder is kept until the new one is complete)"
            if written_by_us(out)
            else f"it was not written by {TOOL_NAME} (no {REPORT_NAME}): choose another OUT, or pass "
            "--replace-foreign if you really mean to replace that folder"
        )
        raise OutputError("output folder already exists", path=out, hint=hint)
    if not replace_foreign and not written_by_us(out):
        raise OutputError(
            f"output folder exists and was not written by {TOOL_NAME} (no {REPORT_NAME}); --force "
            "replaces only folders this tool wrote",
            path=out,
            hint="choose another OUT, or pass --replace-foreign to replace this folder anyway",
        )


__all__ = ["NamedInput", "check_out", "check_replaceable", "read_report", "written_by_us", "REPORT_NAME", "TOOL_NAME"]
