"""The console script's entry point: a thin shell around ``cli.main`` that owns Ctrl-C.

Ctrl-C can land before any command runs (while Python imports the CLI, or while click parses
the arguments); click would print "Aborted!" and exit 1, Python a traceback. Here every
interrupt becomes one line and exit 130, and only an interrupt exits 130.
"""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130  # errors.EXIT_INTERRUPTED, repeated so this module imports nothing


def _interrupted(when: str) -> None:
    sys.stderr.write(f"error: interrupted {when}; nothing was read or written\n")
    sys.exit(EXIT_INTERRUPTED)


def main(argv: list[str] | None = None) -> None:
    try:
        import click

        from .cli import main as group
    except KeyboardInterrupt:
        _interrupted("while starting")
        return
    try:
        code = group.main(args=argv, prog_name="sa2va-convert", standalone_mode=False)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _interrupted("before the command started")
        return
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
