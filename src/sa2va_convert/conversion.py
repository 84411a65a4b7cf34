"""One checkpoint through the pipeline: read -> plan -> transform -> write -> verify.

The stages meet here and nowhere else: this module opens the inputs, builds the plan, hands the
plan and a tensor producer to the writer, and runs the round trip. ``batch.py`` drives it once
per checkpoint of a work_dir; ``api.py`` is the public face of both. Results are plain
dataclasses with ``to_dict()`` for JSON; failures raise ``ConvertError`` subclasses.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import run_state
from ._version import __version__
from .checksums import sha256_file
from .errors import InputError, PlanError, VerifyEnvironmentError, VerifyError, api_errors
from .formats import ADAPTER_RECORD
from .machine import process_age
from .options import ConvertOptions
from .plan.base_discovery import discover_base, resolve_base
from .plan.family import Detection, detect_family, match_family, require_family
from .plan.keymap import Keymap, load_all_builtin, resolve_keymap
from .plan.planner import build_plan, check_raw_base
from .plan.raw_recipe import check_key_families, merge_raw_config, read_code_folder
from .plan.types import ConversionPlan
from .plan.vocab import read_tokenizer_state
from .preflight import check_before_work, checkpoint_inputs
from .progress import Progress, Silent
from .read.checkpoint import TrainingCheckpoint, open_checkpoint
from .read.hf_folder import HFFolder, open_hf_folder
from .read.layered import RenamedSource, UnionSource, open_sam2_checkpoint
from .read.remote_code import ImportCheck, check_imports, install_hint, pip_name, require_self_contained
from .read.work_dir import checkpoint_note, resolve_checkpoint
from .recipe import build_recipe, keymap_identity
from .runner.process import StartedChild
from .transform.produce import TensorProducer, TransformReport, warm_up
from .verify.structural import READ_BACK_CHUNK_BYTES, StructuralReport, check_against_plan
from .write import guard
from .write.folder import OUTPUT_FORMAT, WriteResult, write_folder
from .write.model_card import conversion_report, model_card
from .write.peak_ram import choose_window, estimate_peak_ram, process_baseline, resident_layers


@dataclass
class Inputs:
    checkpoint: TrainingCheckpoint
    keymap: Keymap
    detection: Detection | None
    base: HFFolder
    pretrained: TrainingCheckpoint | None
    files: dict[str, Path] | None = None  # non-weight files to copy, when not all from base.path
    raw_base: bool = False
    code_keys: list[str] | None = None  # the Sa2VA key set of --code-from, when it has an index


@dataclass
class ConversionResult:
    plan: ConversionPlan
    write: WriteResult | None = None
    transform: TransformReport | None = None
    structural: StructuralReport | None = None
    seconds: float = 0.0
    roundtrip: dict[str, Any] | None = None
    checkpoint_sha256: str | None = None
    # where the wall time went outside the write stage (issue 26): process start + imports, opening the
    # inputs, planning, the remote-code check, writing (shards, then the rest: index, files, check, publish)
    phase_seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": True,
            "dry_run": self.write is None,
            "out": self.plan.out,
            "plan": self.plan.to_dict(tensors=False),
            "lora_deltas": self.transform.to_dict() if self.transform else None,
            "structural": self.structural.to_dict() if self.structural else None,
            "roundtrip": self.roundtrip,
            "bytes_written": self.write.bytes_written if self.write else 0,
            "seconds": round(self.seconds, 3),
            "stage_seconds": self.write.stage_seconds if self.write else None,
            "phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()} or None,
            "checkpoint_sha256": self.checkpoint_sha256,
            "tool_version": __version__,
        }


def sha256_path(path: Path) -> str:
    """A file's sha256, or for a checkpoint directory the hash of its files' names and hashes."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def choose_keymap(
    ckpt: TrainingCheckpoint, spec: str | None, *, force: bool = False
) -> tuple[Keymap, Detection | None]:
    """The detected keymap, or the one asked for — which must fit the keys unless ``force``.

    A forced keymap of another family converts "successfully" into a folder whose model card
    names the wrong family (or whose tensors land in the wrong places): refuse with what
    detection saw."""
    text = ckpt.config.text if ckpt.config is not None else None
    if not spec:
        detection = detect_family(ckpt.weights.keys(), load_all_builtin(), text)
        return require_family(detection, path=str(ckpt.path)), detection
    km = resolve_keymap(spec)
    if force:
        return km, None
    keys = sorted(ckpt.weights.keys())
    own = match_family(km, keys, text)
    if own.matched:
        return km, None
    detection = detect_family(keys, load_all_builtin(), text)
    if detection.chosen is None or detection.chosen.name == km.name:
        return km, None  # a keymap for a layout no built-in knows: the user's call
    missing = [p for p, k in own.evidence.items() if k is None]
    why = (
        f"lacks {missing[0]!r}"
        if missing
        else f"has {next(iter(own.excluded_by.values()))!r}"
        if own.excluded_by
        else "does not fit"
    )
    theirs = next((m for m in detection.matches if m.keymap == detection.chosen.name), None)
    seen = next((k for k in (theirs.evidence.values() if theirs else ()) if k), None)
    raise PlanError(
        f"--keymap {km.name} does not fit this checkpoint (it {why}); its keys are "
        f"{detection.chosen.name} ({detection.chosen.family_label})" + (f", e.g. {seen!r}" if seen else ""),
        path=str(ckpt.path),
        hint=f"drop --keymap (detection picks {detection.chosen.name}), or pass --force-keymap if you "
        "really mean to convert with this keymap",
    )


def open_inputs(checkpoint: str | Path, options: ConvertOptions, *, base_folder: HFFolder | None = None) -> Inputs:
    ckpt = open_checkpoint(resolve_checkpoint(Path(checkpoint)), allow_globals=tuple(options.allow_globals))
    keymap, detection = choose_keymap(ckpt, options.keymap, force=options.force_keymap)
    if options.sam2 or options.code_from:
        return open_raw_recipe(ckpt, keymap, detection, options)
    if base_folder is None:
        base_path = resolve_base(options.base) if options.base else discover_base(keymap, ckpt.config, str(ckpt.path))
        base_folder = open_hf_folder(base_path)
    pretrained = None
    if options.pretrained:
        pretrained = open_checkpoint(options.pretrained, allow_globals=tuple(options.allow_globals))
        pretrained.weights.label = "pretrained"
    return Inputs(ckpt, keymap, detection, base_folder, pretrained)


def open_raw_recipe(
    ckpt: TrainingCheckpoint, keymap: Keymap, detection: Detection | None, options: ConvertOptions
) -> Inputs:
    """The original recipe: raw InternVL2.5 (--base) + SAM2 (--sam2) + a Sa2VA folder for code (--code-from)."""
    if not (options.sam2 and options.code_from and options.base):
        raise InputError(
            "the raw-InternVL recipe needs --base (raw InternVL2.5 folder), --sam2 "
            "(sam2_hiera_large.pt) and --code-from (a Sa2VA HF folder of the same family)",
            path=str(ckpt.path),
            hint="pass all three, or only --base with a Sa2VA folder",
        )
    raw = open_hf_folder(options.base)
    check_raw_base(raw.config, keymap, str(raw.path))
    sam2 = RenamedSource(
        open_sam2_checkpoint(options.sam2, allow_globals=tuple(options.allow_globals)), keymap.sam2_name, label="base"
    )
    code = read_code_folder(options.code_from)
    config = merge_raw_config(raw.config, code.config)
    weights = UnionSource([raw.weights, sam2], label="base")
    files = {f: raw.path / f for f in raw.other_files if not f.endswith(".py")}
    files.update({f: code.path / f for f in code.files if f.endswith(".py") and "/" not in f})
    folder = HFFolder(
        path=raw.path, config=config, weights=weights, weight_files=raw.weight_files, other_files=sorted(files)
    )
    return Inputs(ckpt, keymap, detection, folder, None, files=files, raw_base=True, code_keys=code.weight_keys)


def check_base_code(inputs: Inputs, options: ConvertOptions, progress: Progress | None = None) -> ImportCheck:
    """Before any work: the remote code that goes into OUT must be self-contained, and importable
    where the round trip will run it.

    An import that resolves nowhere (not the standard library, not installed, not a file beside
    it) would make OUT fail to load wherever the base does: refused (exit 3) unless
    ``allow_unresolved_imports``. A known package missing from the round trip's interpreter
    (torchvision, timm, ...) would fail the round trip after the whole conversion: stopped now
    (exit 9, nothing written), or only noted when there is no round trip."""
    folder = Path(options.code_from) if options.code_from else Path(inputs.base.path)
    config = inputs.base.config
    if options.code_from:
        import json

        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    import sys

    runs_here = options.roundtrip and not options.dry_run
    python = (options.verify_python or sys.executable) if runs_here else None
    check = check_imports(folder, config, python=python)
    require_self_contained(check, python_label=python or sys.executable, allow=options.allow_unresolved_imports)
    if check.nowhere and progress is not None:
        r = check.nowhere[0]
        progress.stage(
            f"warning: --allow-unresolved-imports: {r.file}:{r.line} imports {r.module!r}, found nowhere; "
            "OUT loads only where it exists"
        )
    if check.missing_packages:
        names = sorted({pip_name(r.module) for r in check.missing_packages})
        first = check.missing_packages[0]
        if runs_here:
            raise VerifyEnvironmentError(
                f"the round trip cannot run in {python}: the base's remote code imports {', '.join(names)}, not "
                f"installed there (e.g. {first.file}:{first.line}); nothing was written",
                path=folder,
                hint=f"{install_hint(names)}, or pass --python with an environment that has them, or --no-verify "
                "to convert without the round trip",
            )
        if progress is not None:
            progress.stage(
                f"note: loading OUT will need {', '.join(names)} (its remote code imports them), not installed here"
            )
    return check


def plan_from_inputs(
    inputs: Inputs, out: str | Path, options: ConvertOptions, *, baseline_bytes: int | None = None
) -> ConversionPlan:
    """The plan, its peak-RAM estimate and the writer's window chosen with it.

    ``baseline_bytes``: the process's RSS the estimate starts from (default: measured now). A conversion
    measures it before its GPU warm-up starts: the estimate adds CUDA's host cost itself
    (``CUDA_CONTEXT_BYTES``), so an RSS taken while the warm-up thread is part-way through starting CUDA
    counted that cost twice, by however far the thread had got, and shrank the window by as much (the
    dry run, which starts no GPU, chose 512 MiB where the same conversion could choose less).
    """
    ckpt = inputs.checkpoint
    plan = build_plan(
        checkpoint=ckpt.weights,
        base=inputs.base.weights,
        base_config=inputs.base.config,
        base_files=inputs.files if inputs.files is not None else inputs.base.other_files,
        tokenizer=read_tokenizer_state(inputs.base.path),
        keymap=inputs.keymap,
        out=Path(out).absolute(),
        naming=OUTPUT_FORMAT.naming,
        options=options.plan_options(),
        pretrained=inputs.pretrained.weights if inputs.pretrained else None,
        embedded=ckpt.config,
        checkpoint_meta=dict(ckpt.meta),
        raw_base=inputs.raw_base,
    )
    if inputs.code_keys is not None:
        check_key_families(plan, inputs.code_keys, str(options.code_from))
    # the write stage estimates the memory the plan will take to write (and, with --read-back, to check)
    # and sizes the writer's window with it: the largest (up to the default) that keeps it under the target
    estimate = functools.partial(
        estimate_peak_ram,
        plan.tensors,
        plan.shards,
        merge_device=options.merge_device,
        baseline_bytes=process_baseline() if baseline_bytes is None else baseline_bytes,
        read_back_bytes=READ_BACK_CHUNK_BYTES if options.read_back else None,
        resident_layers=resident_layers(ckpt.weights, inputs.pretrained.weights if inputs.pretrained else None),
    )
    window = choose_window(estimate)
    return dataclasses.replace(plan, peak_ram_bytes=estimate(window_bytes=window), window_bytes=window)


@api_errors
def plan_conversion(checkpoint: str | Path, out: str | Path, options: ConvertOptions | None = None) -> ConversionPlan:
    """The plan only (what --dry-run prints); reads headers, not tensor bytes, writes nothing."""
    options = (options or ConvertOptions()).validate()
    baseline = process_baseline()  # where the conversion takes it, so that both choose the same window
    resolved = resolve_checkpoint(Path(checkpoint))
    guard.check_out(out, checkpoint_inputs(Path(checkpoint), resolved) + options.named_inputs())
    inputs = open_inputs(resolved, options)
    plan = plan_from_inputs(inputs, out, options, baseline_bytes=baseline)
    check_base_code(inputs, options)
    if options.output_format == "adapter":  # refused now if PEFT cannot hold it; the estimate is the adapter's
        from .write.adapter import plan_adapter

        layout = plan_adapter(plan, inputs.base.config)
        note = (
            f"--format adapter: {len(layout.targets)} LoRA targets and {len(layout.modules_to_save)} modules to "
            f"save, {len(layout.tensors)} tensors in adapter_model.safetensors ({layout.nbytes} bytes); the "
            "tensor list above is the merged model's"
        )
        plan = dataclasses.replace(plan, warnings=(*plan.warnings, note), disk_bytes=layout.nbytes)
    return plan


class _Background:
    """``fn(*args)`` in a daemon thread; ``result()`` waits and returns it or raises what it raised.

    A daemon thread, not an executor's: a conversion stopped by Ctrl-C or an error exits at once
    instead of waiting for the job to finish at interpreter exit.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), name="sa2va-ckpt-sha", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by result()
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


@api_errors
def convert(
    checkpoint: str | Path,
    out: str | Path,
    options: ConvertOptions | None = None,
    *,
    progress: Progress | None = None,
    base_folder: HFFolder | None = None,
) -> ConversionResult:
    """Convert one checkpoint (a file, a DeepSpeed folder or a work_dir's newest) into a HF folder at ``out``.

    Before any work: every option is validated, OUT is checked against every input (it may not
    be, contain or lie inside one) and, if it exists, against what may be replaced (only a
    folder this tool wrote, with ``force``; anything else only with ``replace_foreign``).
    """
    options = (options or ConvertOptions()).validate()
    if options.dry_run:
        return dry_run(checkpoint, out, options)
    progress = progress or Silent()
    started = time.perf_counter()
    phases: dict[str, float] = {}
    age = process_age()
    if age is not None:
        phases["start_and_imports"] = age
    baseline = process_baseline()  # before the warm-up: the estimate adds CUDA's share itself (plan_from_inputs)
    warm_up(options.merge_device)  # a GPU merge's CUDA start-up overlaps reading and planning
    given = Path(checkpoint)
    resolved, protected = check_before_work(given, out, options)
    run_state.note_target(Path(out).absolute(), Path(out).exists(), roundtrip=options.roundtrip)
    note = checkpoint_note(given)
    if note:  # a copied work_dir's last_checkpoint names the original run's file: say which one is converted
        progress.stage(f"note: {note}")
    progress.stage(f"reading {resolved}")
    inputs = open_inputs(resolved, options, base_folder=base_folder)
    phases["open_inputs"] = time.perf_counter() - started
    protected.append(guard.NamedInput("base folder", Path(inputs.base.path)))
    guard.check_out(out, protected)  # the base may have been discovered from the training config
    progress.stage(f"planning ({inputs.keymap.name}, base {inputs.base.path})")
    plan = plan_from_inputs(inputs, out, options, baseline_bytes=baseline)
    phases["plan"] = time.perf_counter() - started - phases["open_inputs"]
    check_base_code(inputs, options, progress)  # after the plan: a raw MLLM base is refused there (exit 5) first
    if options.output_format == "adapter":
        return convert_adapter(inputs, plan, options, resolved, protected, progress, started)
    sources = {"base": inputs.base.weights, "checkpoint": inputs.checkpoint.weights}
    if inputs.pretrained is not None:
        sources["pretrained"] = inputs.pretrained.weights
    producer = TensorProducer(sources, merge_device=options.merge_device, plan_order=[t.name for t in plan.tensors])
    result = ConversionResult(plan=plan, transform=producer.report, phase_seconds=phases)
    phases["code_check"] = time.perf_counter() - started - phases["open_inputs"] - phases["plan"]
    # the checkpoint's sha256 (for the card and the report, needed only once the shards are written) is
    # taken in a helper thread while the shards are written: ~1 s per GB of hashing off the critical path
    # (hashlib and file reads release the GIL); it used to run first, serially, before any shard was written
    checkpoint_sha = _Background(sha256_path, resolved)

    written: dict[str, str] = {}  # {shard: sha256 of the bytes handed to the disk}, filled before check()

    def check(tmp: Path) -> None:
        result.structural = check_against_plan(tmp, plan, read_values=options.read_back, expected_sha256=written)

    def extras(tmp: Path, checksums: dict[str, str]) -> dict[str, str]:
        written.update(checksums)
        result.checkpoint_sha256 = checkpoint_sha.result()
        result.seconds = time.perf_counter() - started
        deltas = result.transform.to_dict() if result.transform else None
        made_from = build_recipe(
            options,
            checkpoint_sha256=result.checkpoint_sha256,
            base=inputs.base.path,
            keymap=keymap_identity(inputs.keymap.name, inputs.keymap.source),
        )
        return {
            "README.md": model_card(plan, checkpoint_sha256=result.checkpoint_sha256, lora_deltas=deltas),
            guard.REPORT_NAME: conversion_report(
                plan,
                checkpoint_sha256=result.checkpoint_sha256,
                lora_deltas=deltas,
                shard_sha256=checksums,
                recipe=made_from,
            ),
        }

    # the round trip's child imports torch and transformers (and starts the GPU) while the shards are
    # written; it touches the folder only once it is published (runner.process.StartedChild)
    early = StartedChild.maybe_start(options.verify_python, device=options.verify_device) if options.roundtrip else None
    try:
        result.write = write_folder(
            plan,
            producer,
            base_dir=inputs.base.path,
            force=options.force,
            replace_foreign=options.replace_foreign,
            protected=protected,
            progress=progress,
            extra_files=extras,
            check=check,
        )
        result.seconds = time.perf_counter() - started
        shards = result.write.stage_seconds.get("total", 0.0)
        phases.update(write_shards=shards, write_rest=max(0.0, result.write.seconds - shards))
        if options.roundtrip:
            rt_started = time.perf_counter()
            run_verify_roundtrip(result, options, progress, started=early)
            phases["roundtrip"] = time.perf_counter() - rt_started
        if producer.report.zero_b:
            progress.stage(
                f"warning: {len(producer.report.zero_b)} LoRA adapter(s) have an all-zero B "
                "(never trained): those layers equal the base"
            )
    except KeyboardInterrupt:  # what is on disk decides the message: before, while or after publishing
        raise run_state.interrupted(plan.out, during="while converting") from None
    finally:
        if early is not None:  # never given its folder (a failure, an interrupt): it ends here
            early.cancel()
    return result


def convert_adapter(
    inputs: Inputs,
    plan: ConversionPlan,
    options: ConvertOptions,
    resolved: Path,
    protected: list[guard.NamedInput],
    progress: Progress,
    started: float,
) -> ConversionResult:
    """``--format adapter``: the PEFT adapter of ``plan`` (``write/adapter.py``), its base recorded by path,
    Hub id and the sha256 of every base weight file, then the round trip on base + adapter."""
    import json

    from .read.adapter_folder import RECORD_SCHEMA, base_weight_digests
    from .write.adapter import lora_config_dict, plan_adapter, write_adapter

    layout = plan_adapter(plan, inputs.base.config)  # refuses what PEFT cannot express, before any write
    sources = {"base": inputs.base.weights, "checkpoint": inputs.checkpoint.weights}
    full = [t.planned.name for t in layout.tensors if t.planned is not None]
    producer = TensorProducer(sources, merge_device=options.merge_device, plan_order=full)
    result = ConversionResult(plan=plan, transform=producer.report)
    checkpoint_sha = _Background(sha256_path, resolved)  # both hashed while the adapter is written
    base_path = Path(inputs.base.path).resolve()
    base_sha = _Background(base_weight_digests, base_path)
    given = str(options.base) if options.base else str(base_path)
    repo_id = given if options.base and not Path(given).expanduser().exists() else None
    peft_config = _Background(lora_config_dict, layout, given)  # importing PEFT takes seconds: beside the write

    def extras() -> dict[str, str]:
        result.checkpoint_sha256 = checkpoint_sha.result()
        base = {"path": str(base_path), "given": given, "repo_id": repo_id, "weight_files": base_sha.result()}
        common = {
            "tool": guard.TOOL_NAME,
            "tool_version": __version__,
            "format": "adapter",
            "checkpoint": plan.checkpoint,
            "checkpoint_sha256": result.checkpoint_sha256,
            "keymap": {"name": plan.keymap, "source": plan.keymap_source},
            "family": plan.family,
            "dtype": options.dtype,
            "base": base,
            "adapter": layout.to_dict(),
        }
        recipe = build_recipe(
            options,
            checkpoint_sha256=result.checkpoint_sha256,
            base=inputs.base.path,
            keymap=keymap_identity(inputs.keymap.name, inputs.keymap.source),
        )
        report = {**common, "lora_deltas": producer.report.to_dict(), "recipe": recipe}
        return {
            ADAPTER_RECORD: json.dumps({"schema": RECORD_SCHEMA, **common}, indent=2, sort_keys=True) + "\n",
            guard.REPORT_NAME: json.dumps(report, indent=2, sort_keys=True) + "\n",
        }

    try:
        t0 = time.perf_counter()
        written, files = write_adapter(
            plan,
            layout,
            sources,
            producer,
            adapter_config=peft_config.result,
            extra_files=extras,
            force=options.force,
            replace_foreign=options.replace_foreign,
            protected=protected,
            progress=progress,
        )
        result.write = WriteResult(Path(plan.out), files, written, time.perf_counter() - t0)
        result.seconds = time.perf_counter() - started
        if options.roundtrip:
            run_verify_roundtrip(result, options, progress)
    except KeyboardInterrupt:
        raise run_state.interrupted(plan.out, during="while converting") from None
    return result


def run_verify_roundtrip(
    result: ConversionResult, options: ConvertOptions, progress: Progress, *, started: StartedChild | None = None
) -> None:
    """Load the written folder in a child process and segment a synthetic image; VerifyError on failure.

    The folder stays in place either way: it is complete and structurally checked. The outcome
    is recorded in its ``conversion_report.json`` (``roundtrip``), so batch mode re-verifies a
    folder whose round trip failed instead of skipping it.
    """
    from .verify.roundtrip import run_roundtrip, summary_line

    out = Path(result.plan.out)
    # said before it happens: this runs foreign code with the user's rights (README "Safety"; --no-verify skips it)
    progress.stage(
        f"verifying {out}: running the model's own code from {result.plan.base} in a child process "
        "(from_pretrained(trust_remote_code=True) + predict_forward)"
    )
    run_state.set_roundtrip(out, "running")
    try:
        rt = run_roundtrip(
            out,
            device=options.verify_device,
            python=options.verify_python,
            max_new_tokens=16,
            expect_mask=options.expect_mask,
            on_stage=progress.stage,
            started=started,
        )
    except VerifyError as e:
        run_state.set_roundtrip(out, "failed")
        record_roundtrip(out, {"ok": False, "error": e.one_line(), "exit_code": e.exit_code})
        err = type(e)(
            f"converted, but the round trip failed: {e.message}",
            path=out,
            hint=(e.hint or "") + f"; the folder is written: re-check it with `sa2va-convert verify {out}`"
            " (pass --no-verify to convert without the round trip)",
        )
        err.report = e.report
        raise err from None
    result.roundtrip = {"summary": summary_line(rt.to_dict()), **rt.to_dict()}
    record_roundtrip(out, {"ok": True, "summary": result.roundtrip["summary"]})
    run_state.set_roundtrip(out, "passed")  # after the report says so: "verified" is then true on disk too


def record_roundtrip(out: Path, outcome: dict[str, Any]) -> None:
    """Add the round trip's outcome to OUT's conversion report (atomic rename, same folder)."""
    import json
    import os

    path = Path(out) / guard.REPORT_NAME
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    report["roundtrip"] = outcome
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:  # an interrupt or a full disk: no stray temporary file in a published OUT
        tmp.unlink(missing_ok=True)
        raise


def recorded_roundtrip(out: Path) -> dict[str, Any] | None:
    report = guard.read_report(out)
    value = report.get("roundtrip") if report is not None else None
    return value if isinstance(value, dict) else None


@api_errors
def dry_run(checkpoint: str | Path, out: str | Path, options: ConvertOptions | None = None) -> ConversionResult:
    """``--dry-run`` as a result object: the plan, nothing written."""
    options = options or ConvertOptions()
    plan = plan_conversion(checkpoint, out, options)
    return ConversionResult(plan=plan)


__all__ = [
    "ConvertOptions",
    "ConversionResult",
    "Inputs",
    "convert",
    "dry_run",
    "plan_conversion",
    "open_inputs",
    "sha256_path",
    "record_roundtrip",
    "recorded_roundtrip",
]
