"""The checks of a conversion that need no tensor and no torch: which checkpoint, and whether OUT may be written.

Why a module of its own: the CLI runs them before it imports torch (1.5-4 s), so that a wrong OUT
(an input, inside one, a folder that is not ours) is refused at once, before any work. The conversion
runs the same function again at its start: the one implementation, and the answer as of that moment.
"""

from __future__ import annotations

from pathlib import Path

from .options import ConvertOptions
from .read.work_dir import resolve_checkpoint
from .write import guard


def checkpoint_inputs(given: Path, resolved: Path) -> list[guard.NamedInput]:
    """The checkpoint, and the work_dir it was found in when the user gave one."""
    inputs = [guard.NamedInput("checkpoint", resolved)]
    if Path(given) != Path(resolved):
        inputs.append(guard.NamedInput("work_dir", Path(given)))
    return inputs


def check_before_work(
    checkpoint: str | Path, out: str | Path, options: ConvertOptions
) -> tuple[Path, list[guard.NamedInput]]:
    """The checkpoint PATH means (a work_dir's newest), and the inputs OUT must not touch; raises the
    one-line error (exit 3 or 6) if OUT is, contains or lies inside an input, or exists and may not be
    replaced (``force`` replaces only a folder this tool wrote; ``replace_foreign`` anything else)."""
    given = Path(checkpoint)
    resolved = resolve_checkpoint(given)
    protected = checkpoint_inputs(given, resolved) + options.named_inputs()
    guard.check_out(out, protected)
    guard.check_replaceable(Path(out).absolute(), force=options.force, replace_foreign=options.replace_foreign)
    return resolved, protected


__all__ = ["check_before_work", "checkpoint_inputs"]
