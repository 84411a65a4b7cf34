"""sa2va-convert: Sa2VA training checkpoints to HuggingFace folders, safely and in little memory.

Pipeline (one package per stage): read -> plan -> transform -> write -> verify.
The CLI (``sa2va_convert.cli``) is a thin layer over the Python API exported here::

    from sa2va_convert import ConvertOptions, convert
    result = convert("work_dirs/exp", "out", ConvertOptions(base="Sa2VA-4B"))

Names are loaded on first use (PEP 562), so ``import sa2va_convert`` -- and with it
``sa2va-convert --help`` and shell completion -- does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

# name -> module that defines it
_EXPORTS: dict[str, str] = {
    "convert": "api",
    "convert_all": "api",
    "dry_run": "api",
    "plan_conversion": "api",
    "verify_folder": "api",
    "predict": "api",
    "ConvertOptions": "api",
    "ConversionResult": "api",
    "VerifyReport": "api",
    "PredictReport": "api",
    "inspect_checkpoint": "inspection",
    "InspectReport": "inspection",
    "BatchResult": "batch",
    "ConvertError": "errors",
    "UsageError": "errors",
    "InputError": "errors",
    "UnsafeInputError": "errors",
    "PlanError": "errors",
    "KeymapError": "errors",
    "OutputError": "errors",
    "VerifyError": "errors",
    "BatchError": "errors",
    "EXIT_CODES": "errors",
}

# Spelled out (not ``["__version__", *_EXPORTS]``) so linters and type checkers see the re-exports
# below as public; a test checks the two lists agree.
__all__ = [
    "__version__",
    "convert",
    "convert_all",
    "dry_run",
    "plan_conversion",
    "verify_folder",
    "predict",
    "ConvertOptions",
    "ConversionResult",
    "VerifyReport",
    "PredictReport",
    "inspect_checkpoint",
    "InspectReport",
    "BatchResult",
    "ConvertError",
    "UsageError",
    "InputError",
    "UnsafeInputError",
    "PlanError",
    "KeymapError",
    "OutputError",
    "VerifyError",
    "BatchError",
    "EXIT_CODES",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sa2va_convert' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs (py.typed): the same names, imported eagerly
    from .api import (
        ConversionResult,
        ConvertOptions,
        PredictReport,
        VerifyReport,
        convert,
        convert_all,
        dry_run,
        plan_conversion,
        predict,
        verify_folder,
    )
    from .batch import BatchResult
    from .errors import (
        EXIT_CODES,
        BatchError,
        ConvertError,
        InputError,
        KeymapError,
        OutputError,
        PlanError,
        UnsafeInputError,
        UsageError,
        VerifyError,
    )
    from .inspection import InspectReport, inspect_checkpoint
