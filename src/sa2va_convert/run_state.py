"""What this process has done to the disk, so that the message after an interrupt is true in every window.

Ctrl-C or SIGTERM can land between any two bytecodes. Each handler used to say what its own place in
the code implied ("interrupted while converting; nothing was published"), and several were reached after
OUT had been published: in the ~100-250 ms between publishing and exit (the end of a ``--no-verify``
conversion, where a CI timeout lands) 7 of 9 interrupts said "nothing published / run the same command
again" while a complete new OUT was in place, and the rerun then failed with exit 6.

Now there is one record, written at the moment it becomes true:

* ``note_target(out, existed)``: a conversion into OUT starts (and whether OUT existed before);
* ``mark_published(out, ...)``: OUT has been renamed into place. ``atomic.publish`` calls it inside the
  same interrupt-deferred block as the rename, so no interrupt can fall between the two;
* ``set_roundtrip(out, state)``: the round trip is running, passed or failed.

and every interrupt handler (conversion, batch, the CLI's, the console script's) builds its message from
it with :func:`interrupted`. The console script (``_entry``) also owns the handlers of SIGINT and SIGTERM
(``install_handlers``); :func:`interrupts_deferred` holds an interrupt for the length of a block, and
:func:`finishing` holds them for good once a command has decided its outcome and prints it (a second
Ctrl-C must not turn a printed result into a traceback).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import Interrupted

__all__ = [
    "note_target",
    "mark_published",
    "set_roundtrip",
    "published",
    "started",
    "interrupted",
    "interrupts_deferred",
    "hold",
    "release",
    "install_handlers",
    "finishing",
    "reset",
    "on_signal",
]

RoundTrip = str  # "off" | "pending" | "running" | "passed" | "failed"


@dataclass
class Target:
    out: Path
    existed: bool
    published: bool = False
    replaced: bool = False
    roundtrip: RoundTrip = "off"


_targets: dict[str, Target] = {}
_defer_depth = 0
_pending: list[int] = []
_program = False  # set by the console script: it owns the process's signals and its exit
_final = False


def _key(out: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(out)))


def reset() -> None:
    """Forget everything (a new command in the same process: the test launcher, an in-process CLI run)."""
    global _defer_depth, _final
    _targets.clear()
    _pending.clear()
    _masks.clear()
    _defer_depth = 0
    _final = False


def note_target(out: str | os.PathLike, existed: bool, *, roundtrip: bool = False) -> None:
    """A conversion into ``out`` starts; ``existed``: OUT was there before (then it is kept until replaced);
    ``roundtrip``: the round trip is to run once OUT is published."""
    _targets[_key(out)] = Target(Path(out), existed, roundtrip="pending" if roundtrip else "off")


def mark_published(out: str | os.PathLike, *, replaced: bool) -> None:
    """``out`` is now the new, complete folder. Called right after the rename, with interrupts deferred."""
    t = _targets.setdefault(_key(out), Target(Path(out), existed=replaced))
    t.published, t.replaced = True, replaced


def set_roundtrip(out: str | os.PathLike, state: RoundTrip) -> None:
    t = _targets.get(_key(out))
    if t is not None:
        t.roundtrip = state


def started() -> bool:
    """Whether a conversion has begun in this process (so an interrupt may have something to report)."""
    return bool(_targets)


def published(out: str | os.PathLike | None = None) -> list[Target]:
    """The folders this process has published (all of them, or ``out``'s record if it was)."""
    if out is not None:
        t = _targets.get(_key(out))
        return [t] if t is not None and t.published else []
    return [t for t in _targets.values() if t.published]


def _one(t: Target) -> tuple[str, str]:
    out = t.out
    verify = f"run `sa2va-convert verify {out}`"
    if t.roundtrip == "passed":
        return (f"interrupted after {out} was published and verified: it is complete", "nothing to redo")
    if t.roundtrip == "failed":
        return (
            f"interrupted after the round trip of {out} failed: OUT is complete (written and checked) but "
            "did not pass the round trip",
            f"{verify} to see why",
        )
    if t.roundtrip == "running":
        return (
            "interrupted during the round trip: OUT is complete (written and checked) but not verified",
            f"{verify} to finish the check",
        )
    if t.roundtrip == "pending":
        return (
            "interrupted after OUT was published: it is complete (written and checked) but not verified",
            f"{verify} to finish the check",
        )
    return (
        "interrupted after OUT was published: it is complete (written and checked)",
        f"nothing to redo; {verify} to check it again (rerunning the conversion would need --force)",
    )


def interrupted(out: str | os.PathLike | None = None, *, during: str = "", otherwise: str = "") -> Interrupted:
    """The Interrupted error whose message is what is true on disk now, for ``out`` (or for the whole run).

    ``otherwise``: what the caller knows to be true when this process has started no conversion at all
    (e.g. "nothing was written"); without it such a message claims nothing beyond "interrupted"."""
    during = f" {during}" if during else ""
    done = published(out) if out is not None else published()
    if out is not None and done:
        message, hint = _one(done[0])
        return Interrupted(message, path=done[0].out, hint=hint)
    if out is None and len(done) == 1:
        message, hint = _one(done[0])
        return Interrupted(message, path=done[0].out, hint=hint)
    if out is None and done:
        names = ", ".join(str(t.out) for t in done)
        return Interrupted(
            f"interrupted{during}; published complete before the interrupt: {names}; nothing else was published",
            path=done[-1].out,
            hint="run the same command again (finished folders are skipped)",
        )
    target = _targets.get(_key(out)) if out is not None else None
    if target is None and out is None and len(_targets) == 1:
        target = next(iter(_targets.values()))
    if target is not None:
        state = "left as it was" if target.existed else "not created"
        return Interrupted(
            f"interrupted{during}; nothing was published: OUT was {state} and no partial folder is left",
            path=target.out,
            hint="run the same command again",
        )
    return Interrupted(
        f"interrupted{during}" + (f"; {otherwise}" if otherwise else ""), path=out, hint="run the same command again"
    )


# ---------------------------------------------------------------- the signals


def _is_finalizer(code: Any) -> bool:
    return code.co_name == "__del__" or code.co_filename.endswith(("weakref.py", "_weakrefset.py"))


_TORCH_DIR = f"{os.sep}torch{os.sep}"


def _is_torch_import(code: Any) -> bool:
    """A torch module's top level running, i.e. torch being imported. Some of those modules are imported
    from torch's C++ start-up through pybind11; a KeyboardInterrupt raised there crosses C++ and ends the
    process with ``terminate called ... pybind11::error_already_set`` and SIGABRT (exit -6) instead of our
    one line (the CI's Ctrl-C-while-starting test hit it at 0.6 s)."""
    return code.co_name == "<module>" and _TORCH_DIR in code.co_filename


def _is_importlib(code: Any) -> bool:
    return code.co_filename.startswith("<frozen importlib")


def _no_trace(frame: Any, event: str, arg: Any) -> None:  # noqa: ARG001 - trace function signature
    return None


def _interrupt_after_finalizer(frame: Any) -> bool:
    """If ``frame`` is a finalizer (``__del__``, a weakref callback) or runs inside one, or inside an import
    of torch (:func:`_is_torch_import`), arrange for KeyboardInterrupt at the next line of the code the
    finalizer interrupted (the code that imported torch, once the import has finished), and return True.

    Python prints an exception raised inside a finalizer as "Exception ignored in ..." with a traceback
    and carries on: the interrupt would be lost, the run would go on to exit 0 with a traceback on stderr
    (the interrupt sweep found it, in ``ZipFile.__del__``). So the frame the outermost finalizer
    interrupted gets a local trace function that raises at its next line (passed up to its caller if it
    returns first); a trace function already set (a debugger, coverage) is left alone, and then the
    interrupt is lost as before."""
    target = None
    f = frame
    while f is not None:
        if _is_finalizer(f.f_code) or _is_torch_import(f.f_code):
            target = f.f_back
        f = f.f_back
    while target is not None and _is_importlib(target.f_code):  # the import machinery: the importer's frame
        target = target.f_back
    if target is None:
        return False
    if sys.gettrace() is not None:
        return True  # not ours to replace; at worst Python reports the finalizer's KeyboardInterrupt

    def fire(fr: Any, event: str, arg: Any) -> Any:  # noqa: ARG001 - trace function signature
        if event == "line":
            fr.f_trace = None
            sys.settrace(None)
            raise KeyboardInterrupt
        if event == "return" and fr.f_back is not None:  # returned before another line: its caller's next
            fr.f_back.f_trace, fr.f_back.f_trace_lines = fire, True
        return fire

    target.f_trace, target.f_trace_lines = fire, True
    sys.settrace(_no_trace)  # line events of a frame's f_trace need tracing on; new frames stay untraced
    return True


def on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    """SIGINT and SIGTERM, as the console script installs them: KeyboardInterrupt, unless held, and not
    inside a finalizer (see :func:`_interrupt_after_finalizer`)."""
    if _defer_depth or _final:
        _pending.append(signum)
        return
    if _interrupt_after_finalizer(frame):
        return
    raise KeyboardInterrupt


def install_handlers() -> None:
    """Route SIGINT and SIGTERM through :func:`on_signal` (main thread only; a no-op elsewhere)."""
    global _program
    try:
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    except ValueError:  # not the main thread
        return
    _program = True


def _ours() -> bool:
    try:
        return signal.getsignal(signal.SIGINT) is on_signal and signal.getsignal(signal.SIGTERM) is on_signal
    except ValueError:
        return False


_masks: list[Iterable[int] | None] = []  # pthread_sigmask states saved by hold(), when our handlers are not installed


def hold() -> None:
    """Hold SIGINT/SIGTERM until the matching :func:`release` (nestable). With our handlers installed this
    is a counter the handler reads, which works whichever thread the kernel gives the signal to; otherwise
    (the Python API inside someone else's program) the signals are blocked in this thread."""
    global _defer_depth
    if _ours():
        _defer_depth += 1
        return
    try:
        _masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}))
    except (AttributeError, OSError, ValueError):
        _masks.append(None)


def release() -> None:
    """End a :func:`hold`; an interrupt that came meanwhile is raised now (KeyboardInterrupt)."""
    global _defer_depth
    if _defer_depth:
        _defer_depth -= 1
        if not _defer_depth and _pending and not _final:
            _pending.clear()
            raise KeyboardInterrupt
        return
    previous = _masks.pop() if _masks else None
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a blocked signal is delivered right here


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the block (see :func:`hold`); one that came meanwhile is raised right after."""
    hold()
    try:
        yield
    finally:
        release()


def finishing() -> None:
    """The command has decided its outcome and is printing it: hold interrupts until the process exits.

    Only when the console script owns the signals (an in-process caller keeps its own Ctrl-C)."""
    global _final
    if _program and _ours():
        _final = True
