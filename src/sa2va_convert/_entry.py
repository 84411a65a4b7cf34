"""The console script's entry point: a thin shell around ``cli.main`` that owns Ctrl-C and SIGTERM.

Ctrl-C can land before any command runs (while Python imports the CLI, or while click parses
the arguments); click would print "Aborted!" and exit 1, Python a traceback. Here every
interrupt becomes one line and exit 130, and only an interrupt exits 130. Both signals go through
``run_state`` from the first line of ``main``: it can hold them while OUT is renamed into place,
and once a command's outcome is decided, until the exit, so that the one line printed says what is
on disk.
"""

from __future__ import annotations

import os
import sys
import threading

EXIT_INTERRUPTED = 130  # errors.EXIT_INTERRUPTED, repeated so this module imports nothing at its top


def _exit(code: int) -> None:
    """Exit with ``code``, skipping torch's teardown when nothing is left to finish.

    Once torch is loaded, its atexit finalizers and the interpreter's teardown of its modules
    cost 0.5-1 s at the end of every conversion (measured with py-spy: ``torch.library``'s
    ``_del_library`` alone 0.48 s on the 2-core VM) and do nothing a user needs: by the time
    a command returns, its files are closed, fsync'ed and published, its helper threads joined
    and its child processes waited for. So, with torch loaded and no other thread alive, the
    output is flushed and the process ends with ``os._exit``; otherwise Python exits normally.
    """
    if "torch" in sys.modules and threading.active_count() == 1:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said
                pass
        os._exit(code)
    sys.exit(code)


def _interrupted(when: str) -> None:
    """The one line of every interrupt (``error: WHERE: what (fix: ...)``); before the command has
    parsed its arguments there is no file to name yet, so the line names the program, and since
    nothing was read or written, running the same command again is the whole fix."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "sa2va-convert"
    if prog in ("__main__.py", "-c", "cli.py"):
        prog = "sa2va-convert"
    sys.stderr.write(
        f"error: {prog}: interrupted {when}; nothing was read or written (fix: run the same command again)\n"
    )
    sys.exit(EXIT_INTERRUPTED)


def _interrupted_late() -> None:
    """An interrupt that escaped the command's own handlers (it landed inside one of them, or while click
    parsed the arguments): the message comes from what this process has done (``run_state``)."""
    from . import run_state

    run_state.finishing()
    if not run_state.started():
        _interrupted("before the command started")
        return
    e = run_state.interrupted(None)
    sys.stderr.write(f"error: {e.one_line()}\n")
    _exit(EXIT_INTERRUPTED)


def main(argv: list[str] | None = None) -> None:
    try:
        from . import run_state  # light (errors only); SIGINT and SIGTERM are routed through it from here on

        run_state.reset()
        run_state.install_handlers()
        import click

        from .cli import main as group
    except KeyboardInterrupt:
        _interrupted("while starting")
        return
    try:
        try:
            code = group.main(args=argv, prog_name="sa2va-convert", standalone_mode=False)
        finally:
            run_state.finishing()  # the outcome is decided: from here to the exit, hold further interrupts
    except (KeyboardInterrupt, click.exceptions.Abort):
        _interrupted_late()
        return
    except click.exceptions.ClickException as e:
        e.show()
        _exit(e.exit_code)
        return
    except SystemExit as e:  # a command's documented exit code (errors are printed already)
        if not isinstance(e.code, int):
            raise
        _exit(e.code)
        return
    _exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
