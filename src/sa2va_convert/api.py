"""The Python API: everything the CLI does, callable from code and CI scripts.

    from sa2va_convert.api import convert, ConvertOptions
    result = convert("work_dirs/exp/iter_12192.pth", "out/", ConvertOptions(base="Sa2VA-4B"))

Each function runs the pipeline stages in order (read -> plan -> transform ->
write -> verify) and returns plain dataclasses with ``to_dict()`` for JSON.
Failures raise ``sa2va_convert.errors.ConvertError`` subclasses.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__

from .plan.base_discovery import discover_base
from .plan.family import Detection, detect_family, require_family
from .plan.keymap import Keymap, load_all_builtin, resolve_keymap
from .plan.planner import ConversionPlan, PlanOptions, build_plan, check_raw_base
from .plan.vocab import read_tokenizer_state
from .progress import Progress, Silent
from .read.checkpoint import TrainingCheckpoint, open_checkpoint
from .errors import InputError
from .plan.raw_recipe import check_key_families, merge_raw_config, read_code_folder
from .read.hf_folder import HFFolder, open_hf_folder
from .read.layered import RenamedSource, UnionSource, open_sam2_checkpoint
from .transform.produce import TensorProducer, TransformReport
from .verify.structural import StructuralReport, check_against_plan
from .write.folder import WriteResult, write_folder
from .write.model_card import conversion_report, model_card


@dataclass
class ConvertOptions:
    base: str | Path | None = None
    pretrained: str | Path | None = None
    keymap: str | None = None  # built-in name or YAML path; None = detect
    dtype: str = "bf16"
    max_shard_bytes: int = 5 * 10**9
    lora_alpha: float | None = None
    rslora: bool | None = None
    allow_unused: Sequence[str] = ()
    template: str | None = None
    force: bool = False
    merge_device: str = "cpu"
    allow_globals: Sequence[str] = ()
    read_back: bool = False  # also read every written byte back from disk before publishing (sha256 compared)
    sam2: str | Path | None = None  # original recipe: sam2_hiera_large.pt (base is then a raw InternVL folder)
    code_from: str | Path | None = None  # any Sa2VA HF folder of the family: remote code + config class
    roundtrip: bool = False  # after writing, load OUT in a separate process and run predict_forward
    verify_device: str = "auto"
    verify_python: str | None = None

    def plan_options(self) -> PlanOptions:
        return PlanOptions(dtype=self.dtype, max_shard_bytes=self.max_shard_bytes, lora_alpha=self.lora_alpha,
                           rslora=self.rslora, allow_unused=tuple(self.allow_unused), template=self.template,
                           merge_device=self.merge_device, read_back=self.read_back)


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
            "checkpoint_sha256": self.checkpoint_sha256,
            "tool_version": __version__,
        }


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_path(path: Path) -> str:
    """A file's sha256, or for a checkpoint directory the hash of its files' names and hashes."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def choose_keymap(ckpt: TrainingCheckpoint, spec: str | None) -> tuple[Keymap, Detection | None]:
    if spec:
        return resolve_keymap(spec), None
    text = ckpt.config.text if ckpt.config is not None else None
    detection = detect_family(ckpt.weights.keys(), load_all_builtin(), text)
    return require_family(detection, path=str(ckpt.path)), detection


def open_inputs(checkpoint: str | Path, options: ConvertOptions, *, base_folder: HFFolder | None = None) -> Inputs:
    ckpt = open_checkpoint(checkpoint, allow_globals=tuple(options.allow_globals))
    keymap, detection = choose_keymap(ckpt, options.keymap)
    if options.sam2 or options.code_from:
        return open_raw_recipe(ckpt, keymap, detection, options)
    if base_folder is None:
        base_path = Path(options.base) if options.base else discover_base(keymap, ckpt.config, str(ckpt.path))
        base_folder = open_hf_folder(base_path)
    pretrained = None
    if options.pretrained:
        pretrained = open_checkpoint(options.pretrained, allow_globals=tuple(options.allow_globals))
        pretrained.weights.label = "pretrained"
    return Inputs(ckpt, keymap, detection, base_folder, pretrained)


def open_raw_recipe(ckpt: TrainingCheckpoint, keymap: Keymap, detection: Detection | None,
                    options: ConvertOptions) -> Inputs:
    """The original recipe: raw InternVL2.5 (--base) + SAM2 (--sam2) + a Sa2VA folder for code (--code-from)."""
    if not (options.sam2 and options.code_from and options.base):
        raise InputError("the raw-InternVL recipe needs --base (raw InternVL2.5 folder), --sam2 "
                         "(sam2_hiera_large.pt) and --code-from (a Sa2VA HF folder of the same family)",
                         path=str(ckpt.path), hint="pass all three, or only --base with a Sa2VA folder")
    raw = open_hf_folder(options.base)
    check_raw_base(raw.config, keymap, str(raw.path))
    sam2 = RenamedSource(open_sam2_checkpoint(options.sam2, allow_globals=tuple(options.allow_globals)),
                         keymap.sam2_name, label="base")
    code = read_code_folder(options.code_from)
    config = merge_raw_config(raw.config, code.config)
    weights = UnionSource([raw.weights, sam2], label="base")
    files = {f: raw.path / f for f in raw.other_files if not f.endswith(".py")}
    files.update({f: code.path / f for f in code.files if f.endswith(".py") and "/" not in f})
    folder = HFFolder(path=raw.path, config=config, weights=weights, weight_files=raw.weight_files,
                      other_files=sorted(files))
    return Inputs(ckpt, keymap, detection, folder, None, files=files, raw_base=True, code_keys=code.weight_keys)


def plan_from_inputs(inputs: Inputs, out: str | Path, options: ConvertOptions) -> ConversionPlan:
    ckpt = inputs.checkpoint
    plan = build_plan(
        checkpoint=ckpt.weights, base=inputs.base.weights, base_config=inputs.base.config,
        base_files=inputs.files if inputs.files is not None else inputs.base.other_files,
        tokenizer=read_tokenizer_state(inputs.base.path),
        keymap=inputs.keymap, out=Path(out).absolute(), options=options.plan_options(),
        pretrained=inputs.pretrained.weights if inputs.pretrained else None, embedded=ckpt.config,
        checkpoint_meta=dict(ckpt.meta), raw_base=inputs.raw_base,
    )
    if inputs.code_keys is not None:
        check_key_families(plan, inputs.code_keys, str(options.code_from))
    return plan


def plan_conversion(checkpoint: str | Path, out: str | Path, options: ConvertOptions | None = None) -> ConversionPlan:
    """The plan only (what --dry-run prints); reads headers, not tensor bytes."""
    options = options or ConvertOptions()
    return plan_from_inputs(open_inputs(checkpoint, options), out, options)


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


def convert(
    checkpoint: str | Path,
    out: str | Path,
    options: ConvertOptions | None = None,
    *,
    progress: Progress | None = None,
    base_folder: HFFolder | None = None,
) -> ConversionResult:
    """Convert one checkpoint into a HF folder at ``out``; returns what was done and measured."""
    options = options or ConvertOptions()
    progress = progress or Silent()
    started = time.perf_counter()
    progress.stage(f"reading {checkpoint}")
    inputs = open_inputs(checkpoint, options, base_folder=base_folder)
    progress.stage(f"planning ({inputs.keymap.name}, base {inputs.base.path})")
    plan = plan_from_inputs(inputs, out, options)
    sources = {"base": inputs.base.weights, "checkpoint": inputs.checkpoint.weights}
    if inputs.pretrained is not None:
        sources["pretrained"] = inputs.pretrained.weights
    producer = TensorProducer(sources, merge_device=options.merge_device)
    result = ConversionResult(plan=plan, transform=producer.report)
    # the checkpoint's sha256 (for the card and the report, needed only once the shards are written) is
    # taken in a helper thread while the shards are written: ~1 s per GB of hashing off the critical path
    # (hashlib and file reads release the GIL); before issue 14 it ran first, serially
    checkpoint_sha = _Background(sha256_path, Path(checkpoint))

    written: dict[str, str] = {}  # {shard: sha256 of the bytes handed to the disk}, filled before check()

    def check(tmp: Path) -> None:
        result.structural = check_against_plan(tmp, plan, read_values=options.read_back, expected_sha256=written)

    def extras(tmp: Path, checksums: dict[str, str]) -> dict[str, str]:
        written.update(checksums)
        result.checkpoint_sha256 = checkpoint_sha.result()
        result.seconds = time.perf_counter() - started
        return {"README.md": model_card(plan, result),
                "conversion_report.json": conversion_report(plan, result, shard_sha256=checksums)}

    result.write = write_folder(plan, producer, base_dir=inputs.base.path, force=options.force,
                                progress=progress, extra_files=extras, check=check)
    result.seconds = time.perf_counter() - started
    if options.roundtrip:
        run_verify_roundtrip(result, options, progress)
    if producer.report.zero_b:
        progress.stage(f"warning: {len(producer.report.zero_b)} LoRA adapter(s) have an all-zero B "
                       "(never trained): those layers equal the base")
    return result


def run_verify_roundtrip(result: ConversionResult, options: ConvertOptions, progress: Progress) -> None:
    """Load the written folder in a child process and segment a synthetic image; VerifyError on failure.

    The folder stays in place either way: it is complete and structurally checked; the error
    says what the round trip found and how to re-run it (e.g. on a GPU machine).
    """
    from .errors import VerifyError
    from .verify.commands import summary_line
    from .verify.roundtrip import run_roundtrip

    progress.stage(f"verifying {result.plan.out}: loading it in a separate process and running predict_forward")
    try:
        rt = run_roundtrip(result.plan.out, device=options.verify_device, python=options.verify_python,
                           max_new_tokens=16, on_stage=progress.stage)
    except VerifyError as e:
        raise VerifyError(f"converted, but the round trip failed: {e.message}", path=result.plan.out,
                          hint=(e.hint or "") + "; the folder is written: re-check it with `sa2va-convert verify OUT`"
                          " (pass --no-verify to convert without the round trip)") from None
    result.roundtrip = {"summary": summary_line(rt.to_dict()), **rt.to_dict()}


def dry_run(checkpoint: str | Path, out: str | Path, options: ConvertOptions | None = None) -> ConversionResult:
    options = options or ConvertOptions()
    plan = plan_conversion(checkpoint, out, options)
    return ConversionResult(plan=plan)



from .predict import PredictReport, predict  # noqa: E402  (re-exported: the whole API in one place)
from .verify.commands import VerifyReport, verify_folder as verify  # noqa: E402

__all__ = [
    "ConvertOptions", "ConversionResult", "Inputs", "convert", "dry_run", "plan_conversion", "open_inputs",
    "sha256_path", "verify", "VerifyReport", "predict", "PredictReport",
]
