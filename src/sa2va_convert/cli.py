"""The ``sa2va-convert`` command: argument parsing over ``sa2va_convert.api``.

``sa2va-convert CKPT OUT`` is shorthand for ``sa2va-convert convert CKPT OUT``.
Errors print one line (``error: FILE: what (fix: how)``) and exit with the
documented code; ``--json`` puts a machine-readable report on stdout while
progress goes to stderr.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import run_state
from ._version import __version__
from .cli_common import (  # noqa: F401  (SCHEMA_VERSION: read by scripts and tests from here)
    EXIT_HELP,
    SCHEMA_VERSION,
    emit_json,
    field_option,
    field_options,
    handle_errors,
    verbosity_options,
)
from .cli_eval import register_eval
from .cli_verify import register_verify_commands
from .errors import BatchError
from .options import ConvertOptions

EXAMPLES = """
\b
Examples:
  sa2va-convert work_dirs/exp/iter_12192.pth out/ --base Sa2VA-4B/
  sa2va-convert inspect work_dirs/exp/iter_12192.pth
  sa2va-convert iter_12192.pth out/ --base Sa2VA-4B/ --dry-run
  sa2va-convert iter_12192.pth out/ --base Sa2VA-4B/ --json > report.json
  sa2va-convert keymaps list
"""


class DefaultToConvert(click.Group):
    """Treat ``sa2va-convert CKPT OUT`` as ``sa2va-convert convert CKPT OUT``."""

    default_command = "convert"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List commands with the default one marked ``*``, as llm and sqlite-utils do."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is None or cmd.hidden:
                continue
            mark = "*" if name == self.default_command else ""
            rows.append((name + mark, cmd.get_short_help_str(limit=formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
                formatter.write_paragraph()
                formatter.write_text(
                    f"* default: `sa2va-convert CKPT OUT` runs `sa2va-convert {self.default_command} CKPT OUT`."
                )


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def _route_sigterm() -> None:
    """SIGTERM as Ctrl-C when this module runs as a program (``python -m sa2va_convert.cli``); the console
    script routes both through ``run_state`` instead (which can hold them). Never from the group itself: a
    program that calls the CLI in-process (click's runner, a test) keeps its own handlers."""
    if signal.getsignal(signal.SIGTERM) is not run_state.on_signal:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _complete_keymap(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """TAB completion for keymap names (built-in names; file paths are left to the shell)."""
    from click.shell_completion import CompletionItem

    from .plan.keymap import builtin_names

    names = [CompletionItem(n) for n in builtin_names() if n.startswith(incomplete)]
    return names or [CompletionItem(incomplete, type="file")]


@click.group(
    cls=DefaultToConvert, epilog=EXAMPLES + EXIT_HELP, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(__version__, prog_name="sa2va-convert")
def main() -> None:
    """Convert Sa2VA training checkpoints (iter_N.pth) into HuggingFace folders.

    Reads the checkpoint without executing anything from it, merges LoRA onto the
    base Sa2VA weights tensor by tensor, writes sharded safetensors atomically, and
    checks the result.
    """


def json_option(fn: Callable) -> Callable:
    return click.option(
        "--json", "json_out", is_flag=True, help="Print a JSON report on stdout (progress stays on stderr)."
    )(fn)


def common_options(fn: Callable) -> Callable:
    """What ``inspect`` shares with ``convert``: --allow-global is ``ConvertOptions.allow_globals``'s option,
    so the two commands cannot spell or explain it differently."""
    fn = json_option(fn)
    fn = verbosity_options(fn)
    allow_globals = next(f for f in dataclasses.fields(ConvertOptions) if f.name == "allow_globals")
    return field_option(allow_globals)(fn)


# convert's options that are not ConvertOptions: they choose what to run (one checkpoint or a work_dir's
# every one) or how much of the plan to print, not how a folder is made
_SHOW_TENSORS = click.option(
    "--show-tensors", is_flag=True, help="With --dry-run: list every planned tensor (an error without it)."
)
_ALL = click.option(
    "--all",
    "all_checkpoints",
    is_flag=True,
    help="CHECKPOINT is a work_dir: convert every iter_N.pth into OUT/iter_N (skips ones already converted).",
)


@main.command(
    epilog=EXAMPLES + EXIT_HELP,
    short_help="Convert a checkpoint (iter_N.pth, DeepSpeed folder or work_dir) into a HF folder.",
)
@click.argument("checkpoint", type=click.Path(path_type=Path, readable=False))
@click.argument("out", type=click.Path(path_type=Path, readable=False))
@field_options(
    ConvertOptions,
    insert_after={"dry_run": [_SHOW_TENSORS], "allow_unresolved_imports": [_ALL]},
    settings={"keymap": {"shell_complete": _complete_keymap}},
)
@verbosity_options
@json_option
@handle_errors
def convert(
    checkpoint: Path,
    out: Path,
    show_tensors: bool,
    all_checkpoints: bool,
    quiet: bool,
    verbose: bool,
    json_out: bool,
    debug: bool,
    **fields: Any,
) -> None:
    """Convert CHECKPOINT (iter_N.pth, a DeepSpeed iter_N.pth/ folder, or a work_dir) into a HuggingFace folder OUT.

    Given a work_dir, the checkpoint named in its last_checkpoint file (else the
    highest iter_N) is converted; with --all, every one of them.
    """
    options = ConvertOptions(**fields)
    if show_tensors and not options.dry_run:
        raise click.UsageError("--show-tensors lists the plan of a dry run: add --dry-run (nothing is written then)")
    from .read.prefetch import inputs_prefetched

    one_write = not all_checkpoints and not options.dry_run
    try:
        if one_write:  # OUT against the inputs, before reading ahead or importing torch
            from .preflight import check_before_work

            check_before_work(checkpoint, out, options)
        # the disk reads the inputs while torch is imported (a thread, stopped when the command ends)
        with inputs_prefetched(checkpoint, options.base, enabled=one_write):
            _convert(checkpoint, out, options, show_tensors, all_checkpoints, quiet, verbose, json_out)
    except KeyboardInterrupt:  # what is on disk decides the message, also after publishing
        raise run_state.interrupted(
            None if all_checkpoints or options.dry_run else out, otherwise="nothing was written"
        ) from None


def _convert(
    checkpoint: Path,
    out: Path,
    options: ConvertOptions,
    show_tensors: bool,
    all_checkpoints: bool,
    quiet: bool,
    verbose: bool,
    json_out: bool,
) -> None:
    options.validate()  # before torch is imported, unless an option needs it (--merge-device cuda)
    from . import api, batch
    from .cli_render import make_progress, render_batch, render_plan, render_result

    progress = make_progress(json_out, quiet, verbose)
    if all_checkpoints:
        try:
            res = batch.convert_all(checkpoint, out, options, progress=progress)
        except BatchError as e:
            if e.result is not None:
                emit_json(e.result.to_dict()) if json_out else render_batch(e.result.to_dict())
                click.echo(f"error: {e.one_line()}", err=True)
                sys.exit(e.exit_code)
            raise
        emit_json(res.to_dict()) if json_out else render_batch(res.to_dict())
        return
    if options.dry_run:
        plan = api.plan_conversion(checkpoint, out, options)
        if json_out:
            emit_json({"ok": True, "dry_run": True, "plan": plan.to_dict(tensors=show_tensors)})
        else:
            render_plan(plan.to_dict(tensors=False), tensors=plan.to_dict()["tensors"] if show_tensors else None)
        return
    result = api.convert(checkpoint, out, options, progress=progress)
    if json_out:
        emit_json(result.to_dict())
    else:
        render_result(result.to_dict(), verbose=verbose and not quiet)


@main.command(epilog=EXIT_HELP, short_help="Show what is inside a checkpoint, executing nothing from it.")
@click.argument("checkpoint", type=click.Path(path_type=Path, readable=False))
@click.option("--keymap", shell_complete=_complete_keymap, help="Use this keymap instead of detecting the family.")
@common_options
@handle_errors
def inspect(checkpoint: Path, keymap, quiet, verbose, json_out, debug, allow_globals) -> None:
    """Show what is inside CHECKPOINT (iter_N.pth, a DeepSpeed folder, or a work_dir: its newest
    checkpoint, as convert picks it), without executing anything from it."""
    from .batch import resolve_checkpoint
    from .cli_render import render_inspect
    from .inspection import inspect_checkpoint

    report = inspect_checkpoint(resolve_checkpoint(checkpoint), keymap=keymap, allow_globals=allow_globals).to_dict()
    if json_out:
        emit_json(report)
    else:
        render_inspect(report)


@main.group()
def keymaps() -> None:
    """List, show and lint keymaps (the YAML rules that rename training keys)."""


@keymaps.command("list")
@click.option("--json", "json_out", is_flag=True, help="Print the keymaps as JSON on stdout.")
@verbosity_options
@handle_errors
def keymaps_list(json_out, quiet, verbose, debug) -> None:
    """The built-in keymaps, the families they cover and the evidence each needs."""
    from .cli_render import out_console, table
    from .plan.keymap import load_all_builtin

    kms = load_all_builtin()
    if json_out:
        emit_json({"ok": True, "keymaps": [km.summary() for km in kms]})
        return
    out_console.print(
        table(
            "Built-in keymaps",
            ["name", "family", "models", "detected by"],
            [
                [
                    km.name,
                    km.family_label,
                    ", ".join(km.models),
                    "; ".join(
                        [f"has {p.pattern}" for p in km.detect_all] + [f"lacks {p.pattern}" for p in km.detect_none]
                    ),
                ]
                for km in kms
            ],
        )
    )


@keymaps.command("show")
@click.argument("name", shell_complete=_complete_keymap)
@verbosity_options
@handle_errors
def keymaps_show(name, quiet, verbose, debug, json_out=False) -> None:
    """Print a keymap's YAML (a built-in name or a file)."""
    from .plan.keymap import resolve_keymap

    km = resolve_keymap(name)
    click.echo(Path(km.source).read_text(encoding="utf-8"), nl=False)


@keymaps.command("lint")
@click.argument("file", type=click.Path(path_type=Path, readable=False))
@click.option("--json", "json_out", is_flag=True, help="Print the result as JSON on stdout.")
@verbosity_options
@handle_errors
def keymaps_lint(file, json_out, quiet, verbose, debug) -> None:
    """Validate a keymap file: fields, regexes, examples, collisions."""
    from .plan.keymap import load_keymap

    km = load_keymap(file)
    if json_out:
        emit_json({"ok": True, "keymap": km.summary()})
    else:
        click.echo(
            f"ok: {file}: keymap {km.name} ({len(km.roles)} role rules, {len(km.rename)} rename rules, "
            f"{len(km.examples)} examples)"
        )


register_verify_commands(main)  # adds `verify` and `predict`
register_eval(main)  # adds `eval`

if __name__ == "__main__":  # pragma: no cover
    _route_sigterm()
    main(prog_name="sa2va-convert")
