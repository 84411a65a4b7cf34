"""``verify`` as one call: the file checks, then the round trip.

``verify_folder`` is what ``sa2va-convert verify FOLDER`` and ``api.verify`` run. Beyond
``structural.check_folder`` (index vs shards, headers, truncation, config vocab vs embedding
rows vs tokenizer, NaN/Inf, auto_map files) it checks two things a user's ``from_pretrained``
would otherwise trip over much later:

- every remote-code file the folder's code imports relatively (``from .sam2 import ...``), to any
  depth, and where every import resolves, found by parsing the files (never importing them) the
  way transformers does before it loads them (``read/remote_code.py``);
- shard checksums, when the conversion recorded them (``conversion_report.json`` key
  ``shard_sha256``): flipped bytes that still decode as finite numbers are invisible otherwise.

Plain data only: the ``verify`` command (``cli_verify.py``) renders the report for a person.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checksums import sha256_file
from ..errors import ConvertError, InputError, VerifyEnvironmentError, VerifyError
from ..formats import ADAPTER_RECORD, ADAPTER_WEIGHTS, SAFETENSORS_SINGLE, index_weight_map, weight_files
from ..plan.keymap import Keymap, load_all_builtin
from ..read.adapter_folder import is_adapter_folder, resolve_adapter
from ..read.remote_code import ImportCheck, check_imports, install_hint, pip_name
from ..read.safetensors_header import tensor_names
from ..runner.device_check import check_roundtrip_device
from ..runner.process import DEFAULT_TIMEOUT, resolve_python
from ..runner.report import ChildReport
from ..write.guard import (  # the files and keys verify reads are the ones the write stage wrote
    REPORT_NAME,
    TOOL_NAME,
    read_report,
)
from ..write.model_card import CHECKSUM_KEY
from .roundtrip import DEFAULT_PROMPT, run_roundtrip

if TYPE_CHECKING:  # structural imports torch: loaded only when a folder is checked, so `--help` stays fast
    from .structural import StructuralReport

PEFT_KEY_PREFIX = "base_model.model."  # every key PEFT saves for a model it wraps (write/adapter.py)


@dataclass
class VerifyReport:
    """Everything ``verify`` checked; ``to_dict()`` is the ``--json`` output."""

    folder: str
    ok: bool = False
    keymap: str | None = None
    keymap_source: str | None = None  # "conversion_report.json", or how it was guessed
    structural: StructuralReport | None = None
    code_files: list[str] = field(default_factory=list)
    checksums: dict[str, Any] = field(default_factory=dict)
    roundtrip: ChildReport | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "folder": self.folder,
            "keymap": self.keymap,
            "keymap_source": self.keymap_source,
            "structural": self.structural.to_dict() if self.structural else None,
            "code_files": self.code_files,
            "checksums": self.checksums,
            "roundtrip": self.roundtrip.to_dict() if self.roundtrip else None,
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------- remote code


def check_remote_code(
    folder: str | Path, config: dict | None = None, *, python: str | None = None, need_packages: bool = False
) -> ImportCheck:
    """Every remote-code file the folder's auto_map modules need, to any depth, and where their imports resolve.

    A missing file or an import that exists nowhere is the folder's fault (VerifyError, exit 7);
    a known package missing from ``python`` is the environment's (exit 9), and only matters when
    the round trip is to run there (``need_packages``)."""
    folder = Path(folder)
    try:
        check = check_imports(folder, config, python=python)
    except ConvertError as e:  # a file that is not valid Python: the folder is broken
        raise VerifyError(e.message, path=e.path, hint=e.hint) from None
    for fname, by in check.code.missing:
        raise VerifyError(
            f"remote-code file {fname} is missing (needed by {by})",
            path=folder / fname,
            hint="copy it from the base Sa2VA folder (or re-run the conversion)",
        )
    if check.nowhere:
        r = check.nowhere[0]
        raise VerifyError(
            f"remote code line {r.line} imports {r.module!r}, which is not the standard library, "
            "not an installed package and not a file beside it: the folder loads only where that "
            "module exists",
            path=folder / r.file,
            hint="convert again from a self-contained Sa2VA folder",
        )
    if need_packages and check.missing_packages:
        names = sorted({pip_name(r.module) for r in check.missing_packages})
        first = check.missing_packages[0]
        raise VerifyEnvironmentError(
            f"the round trip cannot run in {python or sys.executable}: the folder's remote code imports "
            f"{', '.join(names)}, not installed there (e.g. {first.file}:{first.line})",
            path=folder,
            hint=f"{install_hint(names)}, or pass --python with an environment that has them",
        )
    return check


# ---------------------------------------------------------------- checksums


def shard_checksums(folder: str | Path, files: Iterable[str]) -> dict[str, str]:
    """{shard file: sha256}: what the writer should record in conversion_report.json under ``shard_sha256``."""
    return {f: sha256_file(Path(folder) / f) for f in sorted(files)}


def check_checksums(
    folder: str | Path, shard_files: Iterable[str], computed: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Compare shards with the checksums recorded at conversion, if any were recorded.

    ``computed``: digests the value read-back already took from disk, so each shard is read once.
    """
    folder = Path(folder)
    report_path = folder / REPORT_NAME
    recorded: dict[str, str] = {}
    if report_path.is_file():
        report = read_report(folder)
        if report is None:
            raise VerifyError(
                f"{REPORT_NAME} is unreadable",
                path=report_path,
                hint="restore it, or delete it to skip the checksum check",
            )
        recorded = report.get(CHECKSUM_KEY) or {}
    if not recorded:
        return {"checked": 0, "status": "not recorded"}
    files = sorted(shard_files)
    unlisted = [f for f in files if f not in recorded]
    if unlisted:
        raise VerifyError(
            f"shard {unlisted[0]} has no checksum in {REPORT_NAME}",
            path=folder / unlisted[0],
            hint="the folder was changed after conversion; re-run the conversion",
        )
    for f in files:
        got = computed[f] if computed and f in computed else sha256_file(folder / f)
        if got != recorded[f]:
            raise VerifyError(
                f"shard content differs from the checksum recorded at conversion "
                f"(sha256 {got[:12]}..., recorded {str(recorded[f])[:12]}...)",
                path=folder / f,
                hint="the file is corrupted: copy it again from where it was converted, or re-run the conversion",
            )
    return {"checked": len(files), "status": "match"}


# ---------------------------------------------------------------- verify


def verify_folder(
    folder: str | Path,
    *,
    roundtrip: bool = True,
    device: str = "auto",
    python: str | None = None,
    max_new_tokens: int = 32,
    prompt: str = DEFAULT_PROMPT,
    timeout: float = DEFAULT_TIMEOUT,
    video: bool = True,
    read_values: bool = True,
    expect_mask: bool = False,
    on_stage: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Check a converted folder: files first (fast, nothing executed), then load + predict in a child.

    Raises VerifyError (exit 7) at the first failure, with the report so far attached as
    ``error.report``; returns the report when everything passed.
    """
    started = time.perf_counter()
    folder = Path(folder)
    report = VerifyReport(folder=str(folder.resolve()))
    say = on_stage or (lambda _msg: None)
    try:
        if not folder.is_dir():  # nothing to judge: a missing input (exit 3), not a failed verification (7)
            raise InputError(
                "folder does not exist" if not folder.exists() else "not a folder",
                path=folder,
                hint="pass the converted HuggingFace folder",
            )
        if roundtrip:  # a GPU asked for where the round trip's interpreter sees none: say so before any work
            check_roundtrip_device(device, python, skip="--no-roundtrip to check the files only")
        say("checking files")
        if is_adapter_folder(folder):
            _check_adapter_files(folder, report, python=resolve_python(python) if roundtrip else None)
        else:
            _check_model_files(folder, report, roundtrip=roundtrip, python=python, read_values=read_values)
        if roundtrip:
            say(
                f"round trip: running the model's own code from {folder} in a child process "
                "(from_pretrained(trust_remote_code=True) + predict_forward)"
            )
            report.roundtrip = run_roundtrip(
                folder,
                device=device,
                python=python,
                max_new_tokens=max_new_tokens,
                prompt=prompt,
                timeout=timeout,
                video=video,
                expect_mask=expect_mask,
                on_stage=lambda s: say(f"round trip: {s}"),
            )
            report.notes += report.roundtrip.warnings
        else:
            report.notes.append("round trip skipped (--no-roundtrip): the folder was not loaded")
    except VerifyError as e:
        if isinstance(e.report, ChildReport):
            report.roundtrip = e.report
        report.seconds = time.perf_counter() - started
        e.report = report
        raise
    report.ok = True
    report.seconds = time.perf_counter() - started
    return report


def _check_adapter_files(folder: Path, report: VerifyReport, *, python: str | None) -> None:
    """A ``--format adapter`` folder: its base found from the record and hashed as recorded (a different
    base is refused, exit 5), the adapter's tensors readable and all in PEFT's naming, the base's code."""
    found = resolve_adapter(folder)
    assert found is not None
    keymap = found.record.get("keymap")
    report.keymap = str(keymap.get("name")) if isinstance(keymap, dict) and keymap.get("name") else None
    report.keymap_source = ADAPTER_RECORD
    names = tensor_names(folder / ADAPTER_WEIGHTS)
    stray = [n for n in names if not n.startswith(PEFT_KEY_PREFIX)]
    if not names or stray:
        raise VerifyError(
            f"{ADAPTER_WEIGHTS} holds {len(names)} tensors"
            + (f", {stray[0]} not in PEFT's naming ({PEFT_KEY_PREFIX}...)" if stray else ""),
            path=folder / ADAPTER_WEIGHTS,
            hint="convert again with --format adapter",
        )
    config = json.loads((found.base / "config.json").read_text(encoding="utf-8"))
    code = check_remote_code(found.base, config, python=python, need_packages=python is not None)
    report.code_files = sorted(code.code.files)
    report.checksums = {"checked": len(found.record["base"]["weight_files"]), "status": "match", "of": "base"}
    report.notes.append(
        f"adapter ({len(names)} tensors) on base {found.base}: its {report.checksums['checked']} weight file(s) "
        "hash as recorded at conversion"
    )


def _check_model_files(
    folder: Path, report: VerifyReport, *, roundtrip: bool, python: str | None, read_values: bool
) -> None:
    """A merged folder: structure, remote code and the recorded shard checksums."""
    from .structural import check_folder

    keymap, report.keymap_source = folder_keymap(folder)
    report.keymap = keymap.name if keymap else None
    if keymap is None:
        report.notes.append("config.json architectures match no built-in keymap: vocabulary sizes not checked")
    report.structural = check_folder(folder, keymap, read_values=read_values)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    child_python = resolve_python(python) if roundtrip else None
    code = check_remote_code(folder, config, python=child_python, need_packages=roundtrip)
    report.code_files = sorted(code.code.files)
    if code.missing_packages and not roundtrip:
        report.notes.append(
            "loading this folder needs "
            + ", ".join(sorted({pip_name(r.module) for r in code.missing_packages}))
            + ", not installed here"
        )
    report.checksums = check_checksums(folder, weight_files(folder), report.structural.sha256)
    if report.checksums["status"] == "not recorded":
        report.notes.append(
            "no shard checksums recorded: corruption that still decodes as finite numbers "
            "would go unseen by the file checks"
        )


def folder_keymap(folder: Path) -> tuple[Keymap | None, str | None]:
    """The keymap describing this folder, and how we know: the conversion report, or a guess.

    A folder this tool wrote names its keymap in ``conversion_report.json``; that is the truth
    (v1 Qwen2 and v2 InternVL3 folders have the same layout, so a layout cannot tell them
    apart). For any other folder the keymap is guessed from config.json and the tensors, and
    the report says it is a guess."""
    from .structural import keymap_for_folder

    keymaps = load_all_builtin()
    recorded = _recorded_keymap(folder)
    if recorded is not None:
        for km in keymaps:
            if km.name == recorded:
                return km, REPORT_NAME
    first = keymap_for_folder(folder, keymaps)
    if first is None:
        return None, None
    guess = "guessed from config.json architectures and the tensor names (no conversion report)"
    try:
        names = set(_weight_names(folder))
    except (OSError, ValueError, KeyError):
        return first, guess  # check_folder reports the broken index/shard with its own message
    archs = set(first.architectures)
    for km in keymaps:
        if set(km.architectures) & archs and {km.vocab_embedding, km.vocab_head} <= names:
            return km, guess
    return first, guess


def _recorded_keymap(folder: Path) -> str | None:
    report = read_report(folder)
    if report is None or report.get("tool") != TOOL_NAME:
        return None
    keymap = report.get("keymap")
    name = keymap.get("name") if isinstance(keymap, dict) else None
    return name if isinstance(name, str) else None


def _weight_names(folder: Path) -> list[str]:
    weight_map = index_weight_map(folder)
    return list(weight_map) if weight_map is not None else tensor_names(folder / SAFETENSORS_SINGLE)


__all__ = [
    "VerifyReport",
    "verify_folder",
    "check_remote_code",
    "check_checksums",
    "shard_checksums",
    "folder_keymap",
    "CHECKSUM_KEY",
    "REPORT_NAME",
]
