"""The ``sa2va-convert`` command: argument parsing over ``sa2va_convert.api``.

``sa2va-convert CKPT OUT`` is shorthand for ``sa2va-convert convert CKPT OUT``.
Errors print one line (``error: FILE: what (fix: how)``) and exit with the
documented code; ``--json`` puts a machine-readable report on stdout while
progress goes to stderr.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path

import click

from . import run_state
from ._version import __version__
from .cli_common import EXIT_HELP, SCHEMA_VERSION, emit_json, handle_errors, verbosity_options  # noqa: F401
from .cli_eval import register_eval
from .cli_verify import register_verify_commands
from .errors import BatchError

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


DEFAULT_MAX_SHARD_SIZE = "5GB"  # = ConvertOptions.max_shard_bytes (5 * 10**9), as save_pretrained's default


def parse_size(text: str) -> int:
    """``--max-shard-size`` exactly as ``save_pretrained(max_shard_size=...)`` reads it (see
    ``sizes.parse_size``); a bad size is a usage error (exit 2). Only called for a size the user typed:
    the default is ``ConvertOptions``', so a conversion does not import transformers for its parser
    (importing it costs 1.5 s at every start-up)."""
    from .sizes import parse_size as parse

    return parse(text, what="--max-shard-size")


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


def common_options(fn: Callable) -> Callable:
    fn = click.option(
        "--json", "json_out", is_flag=True, help="Print a JSON report on stdout (progress stays on stderr)."
    )(fn)
    fn = verbosity_options(fn)
    fn = click.option(
        "--allow-global",
        "allow_globals",
        multiple=True,
        metavar="MODULE.NAME",
        help="Admit this pickled global as an inert placeholder (never imported or called).",
    )(fn)
    return fn


@main.command(
    epilog=EXAMPLES + EXIT_HELP,
    short_help="Convert a checkpoint (iter_N.pth, DeepSpeed folder or work_dir) into a HF folder.",
)
@click.argument("checkpoint", type=click.Path(path_type=Path, readable=False))
@click.argument("out", type=click.Path(path_type=Path, readable=False))
@click.option(
    "--base",
    type=click.Path(path_type=Path, readable=False),
    help="Base Sa2VA HF folder the fine-tune started from (default: found from the training config).",
)
@click.option(
    "--pretrained",
    type=click.Path(path_type=Path, readable=False),
    help="Full-weights training .pth laid over the base (v2 pretrained_pth).",
)
@click.option(
    "--keymap",
    shell_complete=_complete_keymap,
    help="Built-in keymap name or YAML file (default: detected from the keys). It must fit the "
    "checkpoint's keys unless --force-keymap.",
)
@click.option("--force-keymap", is_flag=True, help="Use --keymap even where detection finds another family.")
@click.option(
    "--sam2",
    type=click.Path(path_type=Path, readable=False),
    help="Original recipe: sam2_hiera_large.pt; --base is then the raw InternVL2.5 folder.",
)
@click.option(
    "--code-from",
    type=click.Path(path_type=Path, readable=False),
    help="Original recipe: any Sa2VA HF folder of the family (remote code, config class, key check).",
)
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp16", "fp32", "auto"]),
    default="bf16",
    show_default=True,
    help="Output dtype for floating tensors; auto keeps the base's dtype.",
)
@click.option(
    "--max-shard-size",
    default=None,
    show_default=DEFAULT_MAX_SHARD_SIZE,
    help="Largest shard file (e.g. 5GB, 500MB, 2GiB).",
)
@click.option(
    "--lora-alpha",
    type=float,
    help="LoRA alpha, when the checkpoint's config lacks it (upstream: 2*r). "
    "A different value in the config is an error unless --override-lora-config.",
)
@click.option("--rslora/--no-rslora", default=None, help="Scale LoRA by alpha/sqrt(r) (default: from the config).")
@click.option(
    "--override-lora-config",
    is_flag=True,
    help="Let --lora-alpha/--rslora replace different values from the checkpoint's training config.",
)
@click.option(
    "--allow-unused",
    multiple=True,
    metavar="REGEX",
    help="Checkpoint keys matching REGEX may be left out of the output.",
)
@click.option("--template", help="Override the chat template name written to config.json.")
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing OUT that sa2va-convert wrote (it has our "
    "conversion_report.json), only after the new one is complete. Never an input.",
)
@click.option(
    "--replace-foreign",
    is_flag=True,
    help="Replace an existing OUT even though sa2va-convert did not "
    "write it. Never an input, nor a folder holding one.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the plan (tensors, bytes, peak RAM, disk) and write nothing (with --all: for every checkpoint).",
)
@click.option("--show-tensors", is_flag=True, help="With --dry-run: list every planned tensor (an error without it).")
@click.option(
    "--merge-device",
    default="cpu",
    show_default=True,
    help="Device for LoRA merges (cpu, cuda, cuda:1, auto = cuda if available).",
)
@click.option(
    "--read-back/--no-read-back",
    "read_back",
    default=False,
    show_default=True,
    help="Also read every written byte back from disk before publishing: values scanned, each shard's "
    "sha256 compared with the bytes written.",
)
@click.option(
    "--verify/--no-verify",
    "roundtrip",
    default=True,
    show_default=True,
    help="After writing, load OUT in a separate process and run predict_forward on a synthetic image.",
)
@click.option(
    "--device",
    "verify_device",
    default="auto",
    show_default=True,
    metavar="auto|cpu|cuda|cuda:N",
    help="Device of the verification round trip (the upstream Sa2VA code needs a GPU).",
)
@click.option(
    "--python",
    "verify_python",
    metavar="PATH",
    help="Interpreter for the round trip (e.g. your Sa2VA environment with its pinned transformers).",
)
@click.option(
    "--expect-mask",
    is_flag=True,
    help="Round trip fails when the model's own answer has no [SEG] (for CI on a real fine-tune).",
)
@click.option(
    "--allow-unresolved-imports",
    is_flag=True,
    help="Convert even though the base's remote code imports a module that is not the standard library, "
    "not installed and not a file beside it (the output then loads only where that module exists).",
)
@click.option(
    "--all",
    "all_checkpoints",
    is_flag=True,
    help="CHECKPOINT is a work_dir: convert every iter_N.pth into OUT/iter_N (skips ones already converted).",
)
@common_options
@handle_errors
def convert(
    checkpoint: Path,
    out: Path,
    base,
    pretrained,
    keymap,
    force_keymap,
    sam2,
    code_from,
    dtype,
    max_shard_size,
    lora_alpha,
    rslora,
    override_lora_config,
    allow_unused,
    template,
    force,
    replace_foreign,
    dry_run,
    show_tensors,
    merge_device,
    read_back,
    roundtrip,
    verify_device,
    verify_python,
    expect_mask,
    allow_unresolved_imports,
    all_checkpoints,
    quiet,
    verbose,
    json_out,
    debug,
    allow_globals,
) -> None:
    """Convert CHECKPOINT (iter_N.pth, a DeepSpeed iter_N.pth/ folder, or a work_dir) into a HuggingFace folder OUT.

    Given a work_dir, the checkpoint named in its last_checkpoint file (else the
    highest iter_N) is converted; with --all, every one of them.
    """
    if show_tensors and not dry_run:
        raise click.UsageError("--show-tensors lists the plan of a dry run: add --dry-run (nothing is written then)")
    try:
        _convert(
            checkpoint,
            out,
            base,
            pretrained,
            keymap,
            force_keymap,
            sam2,
            code_from,
            dtype,
            max_shard_size,
            lora_alpha,
            rslora,
            override_lora_config,
            allow_unused,
            template,
            force,
            replace_foreign,
            dry_run,
            show_tensors,
            merge_device,
            read_back,
            roundtrip,
            verify_device,
            verify_python,
            expect_mask,
            allow_unresolved_imports,
            all_checkpoints,
            quiet,
            verbose,
            json_out,
            allow_globals,
        )
    except KeyboardInterrupt:  # what is on disk decides the message, also after publishing
        raise run_state.interrupted(
            None if all_checkpoints or dry_run else out, otherwise="nothing was written"
        ) from None


def _convert(
    checkpoint,
    out,
    base,
    pretrained,
    keymap,
    force_keymap,
    sam2,
    code_from,
    dtype,
    max_shard_size,
    lora_alpha,
    rslora,
    override_lora_config,
    allow_unused,
    template,
    force,
    replace_foreign,
    dry_run,
    show_tensors,
    merge_device,
    read_back,
    roundtrip,
    verify_device,
    verify_python,
    expect_mask,
    allow_unresolved_imports,
    all_checkpoints,
    quiet,
    verbose,
    json_out,
    allow_globals,
) -> None:
    if not dry_run and not all_checkpoints:  # the disk reads the inputs while torch is imported
        from .read.prefetch import input_files, prefetch, prefetch_budget

        prefetch(input_files(checkpoint, base), prefetch_budget())
    from . import api, batch
    from .cli_render import make_progress, render_batch, render_plan, render_result

    options = api.ConvertOptions(
        base=base,
        pretrained=pretrained,
        keymap=keymap,
        dtype=dtype,
        **({"max_shard_bytes": parse_size(max_shard_size)} if max_shard_size is not None else {}),
        lora_alpha=lora_alpha,
        rslora=rslora,
        allow_unused=allow_unused,
        template=template,
        force=force,
        merge_device=merge_device,
        allow_globals=allow_globals,
        read_back=read_back,
        sam2=sam2,
        code_from=code_from,
        roundtrip=roundtrip,
        verify_device=verify_device,
        verify_python=verify_python,
        expect_mask=expect_mask,
        replace_foreign=replace_foreign,
        force_keymap=force_keymap,
        override_lora_config=override_lora_config,
        dry_run=dry_run,
        allow_unresolved_imports=allow_unresolved_imports,
    ).validate()
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
    if dry_run:
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
