"""The Python API: everything the CLI does, callable from code and CI scripts.

    from sa2va_convert.api import convert, ConvertOptions
    result = convert("work_dirs/exp/iter_12192.pth", "out/", ConvertOptions(base="Sa2VA-4B"))

Each function runs the pipeline stages in order (read -> plan -> transform ->
write -> verify) and returns plain dataclasses with ``to_dict()`` for JSON.
Failures raise ``sa2va_convert.errors.ConvertError`` subclasses.

This module is the public face only: one conversion lives in ``conversion.py``, a work_dir's
many in ``batch.py``, the checks in ``verify/``; each is re-exported here, so the whole API is
in one place and nothing below imports it.
"""

from __future__ import annotations

from pathlib import Path

from .batch import BatchResult, convert_all as _convert_all
from .conversion import (  # noqa: F401  (re-exported: the public API)
    ConversionResult,
    Inputs,
    choose_keymap,
    convert,
    dry_run,
    open_inputs,
    plan_conversion,
    plan_from_inputs,
    record_roundtrip,
    recorded_roundtrip,
    run_verify_roundtrip,
    sha256_file,
    sha256_path,
)
from .errors import api_errors
from .options import ConvertOptions, check_merge_device  # noqa: F401  (re-exported: the public API)
from .predict import PredictReport, predict as _predict
from .progress import Progress
from .verify.folder import VerifyReport, verify_folder as _verify_folder

verify = verify_folder = api_errors(_verify_folder)
predict = api_errors(_predict)


def convert_all(
    work_dir: str | Path,
    out_root: str | Path,
    options: ConvertOptions | None = None,
    *,
    progress: Progress | None = None,
) -> BatchResult:
    """``--all``: every ``iter_N`` of ``work_dir`` into ``out_root/iter_N``; BatchError (exit 8) if any failed."""
    return api_errors(_convert_all)(Path(work_dir), Path(out_root), options or ConvertOptions(), progress=progress)


__all__ = [
    "ConvertOptions",
    "ConversionResult",
    "Inputs",
    "convert",
    "dry_run",
    "plan_conversion",
    "open_inputs",
    "sha256_path",
    "verify",
    "verify_folder",
    "convert_all",
    "VerifyReport",
    "predict",
    "PredictReport",
]
