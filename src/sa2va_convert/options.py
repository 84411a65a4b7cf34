"""``ConvertOptions``: every choice a conversion takes, declared once for the API and the CLI.

Each field carries its own ``--help`` text, flag spelling and default (``Flag`` in the field's
metadata); ``cli_common.field_options`` builds the click options of ``sa2va-convert convert`` from
them and the command hands the parsed values straight back to this class. A new option is one field
here, and the CLI, the API default and the help cannot disagree.

Kept apart from ``conversion.py`` because the CLI reads these fields at import time, to build
``--help``: this module must not import torch (the pipeline does), so what needs the stages is
imported on use.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FROM_CLI, UsageError
from .sizes import parse_size
from .write import guard

if TYPE_CHECKING:
    from .plan.types import PlanOptions

DTYPES = ("bf16", "fp16", "fp32", "auto")
OUTPUT_FORMATS = ("folder", "adapter")


@dataclass(frozen=True)
class Flag:
    """How a field is spelled on the command line. Plain data, so the API does not depend on click.

    ``decl`` is the flag as typed (``--verify/--no-verify`` for an on/off pair); None means the field's
    name with dashes. ``show_default`` is click's: True, or the text to show instead of the value."""

    help: str
    decl: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    show_default: bool | str = False

    def flag_for(self, name: str) -> str:
        return self.decl or "--" + name.replace("_", "-")


def _option(default: Any, help: str, **cli: Any) -> Any:
    return dataclasses.field(default=default, metadata={"cli": Flag(help=help, **cli)})


def cli_flag(field: dataclasses.Field) -> Flag:
    """The ``Flag`` of a ``ConvertOptions`` field (every field has one)."""
    return field.metadata["cli"]


@dataclass
class ConvertOptions:
    """Everything ``sa2va-convert convert`` takes, with the same defaults as the CLI (they are the CLI's).

    ``base`` is a folder or a Hub repo id (``org/name``) resolved offline from the local HF cache.
    ``roundtrip`` defaults to True, as the CLI (``--verify``) and ``verify_folder`` do: after writing,
    OUT is loaded in a separate process and ``predict_forward`` runs. Pass ``roundtrip=False`` on
    machines that cannot run the model (no GPU for upstream Sa2VA code). ``max_shard_bytes`` takes
    bytes or a size as typed (``"5GB"``); ``validate()`` turns it into bytes.

    The fields are in ``--help`` order."""

    base: str | Path | None = _option(
        None, "Base Sa2VA HF folder the fine-tune started from (default: found from the training config)."
    )
    pretrained: str | Path | None = _option(None, "Full-weights training .pth laid over the base (v2 pretrained_pth).")
    keymap: str | None = _option(
        None,
        "Built-in keymap name or YAML file (default: detected from the keys). It must fit the "
        "checkpoint's keys unless --force-keymap.",
    )
    force_keymap: bool = _option(False, "Use --keymap even where detection finds another family.")
    sam2: str | Path | None = _option(
        None, "Original recipe: sam2_hiera_large.pt; --base is then the raw InternVL2.5 folder."
    )
    code_from: str | Path | None = _option(
        None, "Original recipe: any Sa2VA HF folder of the family (remote code, config class, key check)."
    )
    dtype: str = _option(
        "bf16", "Output dtype for floating tensors; auto keeps the base's dtype.", choices=DTYPES, show_default=True
    )
    output_format: str = _option(
        "folder",
        "folder: the merged HF model; adapter: a PEFT LoRA adapter (+ trained modules) on --base, which it "
        'records and needs at load time (README, "Output formats").',
        decl="--format",
        choices=OUTPUT_FORMATS,
        show_default=True,
    )
    # --help shows the default as typed; the default itself stays bytes, so that a conversion without a
    # typed size never imports transformers for its size parser (1.5 s at every start-up)
    max_shard_bytes: int | str = _option(
        5 * 10**9, "Largest shard file (e.g. 5GB, 500MB, 2GiB).", decl="--max-shard-size", show_default="5GB"
    )
    lora_alpha: float | None = _option(
        None,
        "LoRA alpha, when the checkpoint's config lacks it (upstream: 2*r). "
        "A different value in the config is an error unless --override-lora-config.",
    )
    rslora: bool | None = _option(
        None, "Scale LoRA by alpha/sqrt(r) (default: from the config).", decl="--rslora/--no-rslora"
    )
    override_lora_config: bool = _option(
        False, "Let --lora-alpha/--rslora replace different values from the checkpoint's training config."
    )
    allow_unused: Sequence[str] = _option(
        (), "Checkpoint keys matching REGEX may be left out of the output.", metavar="REGEX"
    )
    template: str | None = _option(None, "Override the chat template name written to config.json.")
    force: bool = _option(
        False,
        "Replace an existing OUT that sa2va-convert wrote (it has our "
        "conversion_report.json), only after the new one is complete. Never an input.",
    )
    replace_foreign: bool = _option(
        False,
        "Replace an existing OUT even though sa2va-convert did not write it. Never an input, nor a folder holding one.",
    )
    dry_run: bool = _option(
        False,
        "Print the plan (tensors, bytes, peak RAM, disk) and write nothing (with --all: for every checkpoint).",
    )
    merge_device: str = _option(
        "auto",
        "Device for LoRA merges (auto = cuda where torch sees a GPU, else cpu; cpu, cuda, cuda:1). "
        "The GPU merge is the faster one there; --merge-device cpu gives bytes that never depend on the GPU.",
        show_default=True,
    )
    read_back: bool = _option(
        False,
        "Also read every written byte back from disk before publishing: values scanned, each shard's "
        "sha256 compared with the bytes written.",
        decl="--read-back/--no-read-back",
        show_default=True,
    )
    roundtrip: bool = _option(
        True,
        "After writing, load OUT in a separate process and run predict_forward on a synthetic image.",
        decl="--verify/--no-verify",
        show_default=True,
    )
    verify_device: str = _option(
        "auto",
        "Device of the verification round trip (the upstream Sa2VA code needs a GPU).",
        decl="--device",
        metavar="auto|cpu|cuda|cuda:N",
        show_default=True,
    )
    verify_python: str | None = _option(
        None,
        "Interpreter for the round trip (e.g. your Sa2VA environment with its pinned transformers).",
        decl="--python",
        metavar="PATH",
    )
    expect_mask: bool = _option(
        False, "Round trip fails when the model's own answer has no [SEG] (for CI on a real fine-tune)."
    )
    allow_unresolved_imports: bool = _option(
        False,
        "Convert even though the base's remote code imports a module that is not the standard library, "
        "not installed and not a file beside it (the output then loads only where that module exists).",
    )
    allow_globals: Sequence[str] = _option(
        (),
        "Admit this pickled global as an inert placeholder (never imported or called).",
        decl="--allow-global",
        metavar="MODULE.NAME",
    )

    def plan_options(self) -> PlanOptions:
        from .plan.types import PlanOptions

        return PlanOptions(
            dtype=self.dtype,
            max_shard_bytes=parse_size(self.max_shard_bytes, what=_named("max_shard_bytes", "max shard size")),
            lora_alpha=self.lora_alpha,
            rslora=self.rslora,
            override_lora_config=self.override_lora_config,
            allow_unused=tuple(self.allow_unused),
            template=self.template,
        )

    def validate(self) -> ConvertOptions:
        """Every option checked before any work; a bad one is a UsageError (exit 2) naming it.

        Normalises in place (a size string becomes bytes, an interpreter name its path)."""
        if self.dtype not in DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
        self.max_shard_bytes = parse_size(self.max_shard_bytes, what=_named("max_shard_bytes", "max shard size"))
        if self.output_format not in OUTPUT_FORMATS:
            raise UsageError(
                f"unknown output format {self.output_format!r}", hint=f"use one of {', '.join(OUTPUT_FORMATS)}"
            )
        if self.output_format == "adapter" and (self.pretrained or self.sam2 or self.code_from):
            given = next(
                f
                for f, v in (("--pretrained", self.pretrained), ("--sam2", self.sam2), ("--code-from", self.code_from))
                if v
            )
            raise UsageError(
                f"--format adapter cannot be combined with {given}: an adapter's base must be one HF folder "
                "that from_pretrained loads, and these recipes build the base from several files",
                hint="convert with --format folder, or first convert the base recipe into a folder and pass "
                "it as --base",
            )
        if self.lora_alpha is not None:
            try:
                alpha = float(self.lora_alpha)
            except (TypeError, ValueError):
                raise UsageError(f"LoRA alpha {self.lora_alpha!r} is not a number", hint="give e.g. 256") from None
            if not math.isfinite(alpha) or alpha <= 0:
                raise UsageError(
                    f"LoRA alpha must be a finite number above 0, not {self.lora_alpha!r}",
                    hint="upstream Sa2VA configs use alpha = 2*r, e.g. 256 for r=128",
                )
        for pattern in self.allow_unused:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UsageError(
                    f"allow-unused pattern {pattern!r} is not a valid regular expression ({e})",
                    hint="escape special characters, e.g. 'foo\\.bar'",
                ) from None
        self.merge_device = check_merge_device(self.merge_device)
        if self.roundtrip and not self.dry_run:
            from .runner.device_check import check_roundtrip_device
            from .runner.process import check_device, resolve_python

            check_device(self.verify_device)
            self.verify_python = resolve_python(self.verify_python) if self.verify_python else None
            check_roundtrip_device(self.verify_device, self.verify_python)  # now, not after the conversion
        return self

    def named_inputs(self) -> list[guard.NamedInput]:
        """Every path option that is an input, for the never-harm-an-input check."""
        out = []
        for role, value in (
            ("--base folder", self.base),
            ("--pretrained checkpoint", self.pretrained),
            ("--sam2 checkpoint", self.sam2),
            ("--code-from folder", self.code_from),
        ):
            if value:
                out.append(guard.NamedInput(role, Path(value)))
        if self.keymap and Path(self.keymap).exists():
            out.append(guard.NamedInput("--keymap file", Path(self.keymap)))
        return out


def _named(field_name: str, api_words: str) -> str:
    """An option as the user gave it: its flag under the CLI, plain words for a Python caller."""
    if FROM_CLI.get():
        return cli_flag(next(f for f in dataclasses.fields(ConvertOptions) if f.name == field_name)).flag_for(
            field_name
        )
    return api_words


def check_merge_device(device: str) -> str:
    """cpu, auto, cuda or cuda:N — and CUDA only where this torch sees a GPU (asked before any work).

    ``auto`` stays ``auto`` here: the transform stage resolves it (cuda when a GPU is seen)."""
    text = str(device or "").strip()
    if text in ("cpu", "auto"):
        return text
    if not re.fullmatch(r"cuda(:\d+)?", text):
        raise UsageError(f"unknown merge device {device!r}", hint="use cpu, auto, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        raise UsageError(
            f"merge device {text!r} asked for, but this torch sees no GPU"
            f" ({'built without CUDA' if not torch.version.cuda else 'no device visible'})",
            hint="drop --merge-device (the CPU merge gives the same bytes)",
        )
    if ":" in text and int(text.split(":")[1]) >= torch.cuda.device_count():
        raise UsageError(
            f"merge device {text!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible",
            hint="use cuda or cuda:0",
        )
    return text


__all__ = ["DTYPES", "ConvertOptions", "Flag", "check_merge_device", "cli_flag"]
