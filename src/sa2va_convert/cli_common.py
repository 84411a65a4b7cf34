"""What every ``sa2va-convert`` command shares: one ``error:`` line and an exit code, ``--json``.

Kept apart from ``cli.py`` so that command modules beside it (``cli_verify.py``) can use the
same error handling without importing the group that registers them: imports run one way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from . import run_state
from .errors import EXIT_CODES, EXIT_INTERRUPTED, FROM_CLI, ConvertError
from .options import cli_flag

EXIT_HELP = "\n\b\nExit codes:\n" + "\n".join(f"  {k:<4} {v}" for k, v in sorted(EXIT_CODES.items()))


# Version of every ``--json`` document's layout; bump when a key is renamed or removed (adding keys is
# compatible). Scripts can check it before they read the rest.
SCHEMA_VERSION = 1


def emit_json(data: Any) -> None:
    """Every ``--json`` document is an object carrying ``schema_version`` (and ``ok``, set by its producer)."""
    if isinstance(data, dict):
        data = {"schema_version": SCHEMA_VERSION, **data}
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def handle_errors(fn: Callable) -> Callable:
    """Turn anticipated failures into one line + exit code; Ctrl-C into 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        json_mode = kwargs.get("json_out", False)
        debug = kwargs.get("debug", False) or kwargs.get("verbose", False)
        # hints keep their --flags while the command runs (the API rewrites them for Python callers);
        # reset afterwards, so an API call later in the same process gets Python wording again
        from_cli = FROM_CLI.set(True)
        # Once the outcome is decided (returned, or an error to print), run_state.finishing() holds further
        # interrupts until the process exits (only under the console script): a second Ctrl-C must not turn a
        # printed result into a traceback or a second, contradicting line.
        try:
            result = fn(*args, **kwargs)
            run_state.finishing()
            return result
        except ConvertError as e:
            run_state.finishing()
            if json_mode:
                emit_json({"ok": False, "error": e.to_dict()})
            click.echo(f"error: {e.one_line()}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException:  # a usage error: click prints it with the usage line, exit 2
            raise
        except KeyboardInterrupt:
            run_state.finishing()
            # Commands that write raise Interrupted with what was left; an interrupt that reaches here says
            # what run_state knows (what this process published, if anything), else only that it stopped.
            intr = run_state.interrupted(None)
            if intr.path is None:
                intr.path = str(
                    kwargs.get("out") or kwargs.get("folder") or kwargs.get("checkpoint") or "sa2va-convert"
                )
            if json_mode:
                emit_json({"ok": False, "error": intr.to_dict()})
            click.echo(f"error: {intr.one_line()}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as e:  # a bug: say so, keep it one line unless --debug
            run_state.finishing()
            if debug:
                traceback.print_exc()
            click.echo(
                f"error: internal error: {type(e).__name__}: {e} (run with --debug for the traceback "
                "and please report it)",
                err=True,
            )
            sys.exit(1)
        finally:
            FROM_CLI.reset(from_cli)

    return wrapper


def verbosity_options(fn: Callable) -> Callable:
    """``-q/--quiet``, ``-v/--verbose`` and ``--debug``: the same pair on every command."""
    fn = click.option("--debug", is_flag=True, help="Show tracebacks for internal errors.")(fn)
    fn = click.option(
        "--verbose",
        "-v",
        is_flag=True,
        help="More detail on stderr: every tensor as it is written; tracebacks as with --debug.",
    )(fn)
    fn = click.option("--quiet", "-q", is_flag=True, help="No progress or notes on stderr; errors still print.")(fn)
    return fn


# A field's annotation decides the shape of its option. An annotation not listed here is a KeyError when
# the CLI is built: a new kind of field needs a decision, not a guess.
_SHAPES: dict[str, dict[str, Any]] = {
    "str": {},
    "str | None": {},
    "str | Path | None": {"type": click.Path(path_type=Path, readable=False)},
    "float | None": {"type": float},
    "bool": {"is_flag": True},
    "bool | None": {"is_flag": True},
    "Sequence[str]": {"multiple": True},
    # a size as typed, or the field's default bytes, handed on untouched: the dataclass parses it (with the
    # --max-shard-size wording), so a run without a typed size does not import transformers for the parser
    "int | str": {"type": click.UNPROCESSED},
}


def field_option(field: dataclasses.Field, **settings: Any) -> Callable:
    """The click option of one dataclass field, from the ``Flag`` in its metadata: its parameter is named
    after the field, its default is the field's, so the parsed value goes straight back into the class."""
    flag = cli_flag(field)
    kwargs: dict[str, Any] = dict(_SHAPES[str(field.type)])
    if "/" in flag.flag_for(field.name):
        kwargs.pop("is_flag", None)  # an on/off pair: click makes it boolean from the two spellings
    if flag.choices is not None:
        kwargs["type"] = click.Choice(list(flag.choices))
    if flag.metavar is not None:
        kwargs["metavar"] = flag.metavar
    if flag.show_default:
        kwargs["show_default"] = flag.show_default
    return click.option(
        flag.flag_for(field.name),
        field.name,
        default=field.default,
        help=flag.help,
        **kwargs,
        **settings,
    )


def field_options(
    cls: type,
    *,
    insert_after: Mapping[str, Sequence[Callable]] | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable:
    """Decorate a command with one option per field of the dataclass ``cls``, in field order.

    ``insert_after`` puts options of the command's own (not fields) after a field, where ``--help`` lists
    them; ``settings`` adds click-only keywords to a field's option (e.g. ``shell_complete``)."""
    decorators: list[Callable] = []
    for field in dataclasses.fields(cls):
        decorators.append(field_option(field, **(settings or {}).get(field.name, {})))
        decorators.extend((insert_after or {}).get(field.name, ()))

    def apply(fn: Callable) -> Callable:
        for decorate in reversed(decorators):  # click lists the last applied first
            fn = decorate(fn)
        return fn

    return apply


__all__ = [
    "EXIT_HELP",
    "SCHEMA_VERSION",
    "emit_json",
    "field_option",
    "field_options",
    "handle_errors",
    "verbosity_options",
]
