"""Check a written folder against what it must contain, reading it back from disk.

Run on the partial folder before it is published (against the plan), and by
``sa2va-convert verify`` on any folder (against its own index and config). It
reads headers with our strict parser, opens every shard with
``safetensors.safe_open`` and reads tensors back, so a truncated or corrupted
shard, a missing file, or an index that lies is found here rather than by a
user's ``from_pretrained`` that silently leaves weights uninitialised.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .. import dtypes
from ..errors import ConvertError, VerifyError
from ..formats import SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from ..plan.keymap import Keymap, lookup
from ..plan.types import ConversionPlan
from ..plan.vocab import read_tokenizer_state
from ..read.hf_folder import HFFolder, SafetensorsSource, open_hf_folder, read_range


@dataclass
class StructuralReport:
    folder: str
    tensors: int = 0
    shards: int = 0
    bytes: int = 0
    vocab_rows: int | None = None
    tokenizer_length: int | None = None
    checked_values: bool = False  # every byte read back from disk (values scanned, shards hashed)
    sha256: dict[str, str] = field(default_factory=dict)  # {shard: sha256 of the bytes on disk}, if read back
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _fail(message: str, path: Path | str, hint: str) -> VerifyError:
    return VerifyError(message, path=path, hint=hint)


_CHECKED_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
READ_BACK_CHUNK_BYTES = (
    64 * 1024 * 1024
)  # the value read-back reads in two buffers of half this (write.peak_ram counts it)


def _check_headers(hf: HFFolder[SafetensorsSource]) -> None:
    """Every shard's header as ``safetensors`` itself reads it must name exactly the tensors ours does.

    Reads headers only (``safe_open`` maps the file; no value page is touched),
    so it is part of every post-write check. Our own strict parser (run by
    ``open_hf_folder``) has already checked offsets, dtypes, shapes and that each
    file is exactly as long as its header says, so a truncated shard fails there.
    """
    src = hf.weights
    for fname in hf.weight_files:
        path = hf.path / fname
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                lib_keys = set(f.keys())
        except Exception as e:  # safetensors' own error types
            raise _fail(f"shard cannot be read back ({e})", path, "re-run the conversion") from None
        ours = {k for k in src.keys() if src.file_of(k) == path}
        if lib_keys != ours:
            raise _fail(
                "safetensors and sa2va-convert read different tensors from this shard", path, "re-run the conversion"
            )


def _read_all_values(
    hf: HFFolder[SafetensorsSource], expected_sha256: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Read every byte of every shard back from disk; {shard: sha256} of what is on disk.

    Catches what a header cannot show: values turned NaN/Inf (each floating
    tensor goes through ``aminmax``, which propagates NaN and sees Inf as an
    extreme) and, given ``expected_sha256`` (the digests recorded while
    writing), any byte that differs from what was written. Values are read with
    plain reads into two reused buffers, header and gaps included, in file
    order, and hashed in a second thread while the next piece is read (hashlib
    releases the GIL). Mapping the shard instead would count every byte of a
    5 GB shard in RSS, and ``isfinite`` is not vectorised for bf16 (measured
    ~30x slower, BENCHMARKS.md).
    """
    _check_headers(hf)
    src = hf.weights
    ranges: dict[Path, list[tuple[int, int, str]]] = {}
    for key in src.keys():
        fpath, begin, end = src.byte_range(key)
        ranges.setdefault(Path(fpath), []).append((begin, end, key))
    half = max(8, READ_BACK_CHUNK_BYTES // 2)
    step = half - half % 8  # whole elements of any dtype
    bufs = [torch.empty(step, dtype=torch.uint8), torch.empty(step, dtype=torch.uint8)]
    digests: dict[str, str] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="sa2va-sha") as hasher:
        for fname in hf.weight_files:
            path = hf.path / fname
            h = hashlib.sha256()
            idle: Future = Future()
            idle.set_result(None)
            using = [idle, idle]  # the hash job reading each buffer
            turn = [0]

            def read(off: int, n: int, what: str, h=h, path=path, turn=turn, using=using) -> torch.Tensor:
                """Bytes [off, off + n) into the free buffer, then queued for hashing (in file order)."""
                i = turn[0]
                using[i].result()  # the hash of the piece before last is done: its buffer is free
                turn[0] ^= 1
                piece = bufs[i][:n]
                try:
                    read_range(path, off, memoryview(piece.numpy()), what)
                except ConvertError as e:
                    raise _fail(e.message, path, "re-run the conversion") from None
                using[i] = hasher.submit(h.update, memoryview(piece.numpy()))
                return piece

            cursor = 0
            size = path.stat().st_size
            for begin, end, key in sorted(ranges.get(path, [])):
                if begin < cursor:
                    raise _fail(f"tensor {key} overlaps another tensor's bytes", path, "re-run the conversion")
                for off in range(cursor, begin, step):  # the header, and any gap between tensors
                    read(off, min(step, begin - off), fname)
                torch_dtype = dtypes.to_torch(src.info(key).dtype)
                for off in range(begin, end, step):
                    piece = read(off, min(step, end - off), key)
                    if torch_dtype in _CHECKED_FLOATS:
                        lo, hi = torch.aminmax(piece.view(torch_dtype))
                        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                            raise _fail(f"tensor {key} holds NaN/Inf", path, "re-run the conversion")
                cursor = max(cursor, end)
            for off in range(cursor, size, step):
                read(off, min(step, size - off), fname)
            for fut in using:
                fut.result()
            digests[fname] = h.hexdigest()
            want = (expected_sha256 or {}).get(fname)
            if want is not None and want != digests[fname]:
                raise _fail(
                    f"shard on disk differs from the bytes written (sha256 {digests[fname][:12]}..., "
                    f"written {want[:12]}...)",
                    path,
                    "the disk or file system corrupted it; check the disk and re-run the conversion",
                )
    return digests


def check_against_plan(
    folder: Path, plan: ConversionPlan, *, read_values: bool = True, expected_sha256: Mapping[str, str] | None = None
) -> StructuralReport:
    """The post-write check of a conversion, before publishing (see README "Guarantees").

    Always: headers (ours and safetensors'), names, shapes and dtypes against the
    plan, every file exactly as long as its header says, tokenizer against the
    embedding. ``read_values`` (``--read-back``) also reads every byte back from
    disk, scans values and compares each shard's sha256 with ``expected_sha256``.
    """
    report = StructuralReport(str(folder))
    try:
        hf = open_hf_folder(folder, label="output")
    except ConvertError as e:
        raise _fail(f"written folder does not open: {e.message}", e.path or folder, "re-run the conversion") from None
    expected = plan.by_name()
    got = set(hf.weights.keys())
    missing = sorted(set(expected) - got)
    extra = sorted(got - set(expected))
    if missing or extra:
        raise _fail(
            f"written tensors differ from the plan: missing {missing[:5]}, unexpected {extra[:5]}",
            folder,
            "this is a bug; please report it",
        )
    for name, pt in expected.items():
        info = hf.weights.info(name)
        if info.shape != pt.shape or info.dtype != pt.dtype:
            raise _fail(
                f"{name}: written {list(info.shape)} {info.dtype}, planned {list(pt.shape)} {pt.dtype}",
                folder,
                "this is a bug; please report it",
            )
    if read_values:
        report.sha256 = _read_all_values(hf, expected_sha256)
        report.checked_values = True
    else:
        _check_headers(hf)
    report.tensors, report.shards = len(got), len(hf.weight_files)
    report.bytes = sum((folder / f).stat().st_size for f in hf.weight_files)
    tok = read_tokenizer_state(folder)
    report.tokenizer_length, report.vocab_rows = tok.length, plan.vocab_rows
    if tok.length != plan.vocab_rows:
        raise _fail(
            f"written tokenizer has {tok.length} tokens but the embedding has {plan.vocab_rows} rows",
            folder,
            "this is a bug; please report it",
        )
    return report


def check_folder(
    folder: Path, keymap: Keymap | None = None, *, read_values: bool = True, required_code: Sequence[str] = ()
) -> StructuralReport:
    """Verify a folder on its own: index vs shards, config vocab vs embedding rows vs tokenizer, code files."""
    folder = Path(folder)
    report = StructuralReport(str(folder))
    if not (folder / SAFETENSORS_INDEX).is_file() and not (folder / SAFETENSORS_SINGLE).is_file():
        raise _fail(f"no {SAFETENSORS_INDEX} or {SAFETENSORS_SINGLE}", folder, "re-run the conversion")
    try:
        hf = open_hf_folder(folder, label="output")
    except ConvertError as e:
        raise _fail(e.message, e.path or folder, e.hint or "re-run the conversion") from None
    report.tensors, report.shards = len(list(hf.weights.keys())), len(hf.weight_files)
    report.bytes = sum((folder / f).stat().st_size for f in hf.weight_files)
    code = list(required_code) or [v.split(".")[0] + ".py" for v in (hf.config.get("auto_map") or {}).values()]
    for f in sorted(set(code)):
        if not (folder / f).is_file():
            raise _fail(
                f"remote-code file {f} named by config.json auto_map is missing",
                folder / f,
                "copy it from the base Sa2VA folder (or re-run the conversion)",
            )
    if keymap is not None:
        try:
            vocab = int(lookup(hf.config, keymap.vocab_config_field))
        except (KeyError, TypeError, ValueError):
            raise _fail(
                f"config.json has no {keymap.vocab_config_field}", folder / "config.json", "re-run the conversion"
            ) from None
        for name in (keymap.vocab_embedding, keymap.vocab_head):
            if name not in hf.weights:
                raise _fail(f"tensor {name} is missing", folder, "re-run the conversion")
            rows = hf.weights.info(name).shape[0]
            if rows != vocab:
                raise _fail(
                    f"config.json {keymap.vocab_config_field}={vocab} but {name} has {rows} rows",
                    folder / "config.json",
                    "re-run the conversion",
                )
        report.vocab_rows = vocab
        try:
            tok = read_tokenizer_state(folder)
        except ConvertError as e:
            raise _fail(e.message, e.path or folder, "re-run the conversion") from None
        report.tokenizer_length = tok.length
        if tok.length != vocab:
            raise _fail(
                f"tokenizer has {tok.length} tokens but the vocabulary is {vocab}",
                folder,
                "re-run the conversion with the right --base",
            )
    if read_values:
        report.sha256 = _read_all_values(hf)
        report.checked_values = True
    else:
        _check_headers(hf)
    return report


def keymap_for_folder(folder: Path, keymaps: Sequence[Keymap]) -> Keymap | None:
    """The keymap whose HF architecture the folder's config names (to know its vocab fields)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise _fail(f"config.json unreadable ({e})", Path(folder) / "config.json", "re-run the conversion") from None
    archs = set(cfg.get("architectures") or [])
    for km in keymaps:
        if archs & set(km.architectures):
            return km
    return None


__all__ = ["StructuralReport", "check_against_plan", "check_folder", "keymap_for_folder", "dtypes"]
