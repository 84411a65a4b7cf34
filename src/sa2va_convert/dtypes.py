"""One vocabulary for dtypes across torch, safetensors headers, the plan and the CLI.

The plan is plain data, so dtypes travel as short strings ("bf16", "fp32", ...);
this module is the only place that knows how those map to torch and to the
safetensors header codes.
"""

from __future__ import annotations

import torch

# short name -> (torch dtype, safetensors code, bytes per element)
_TABLE: dict[str, tuple[torch.dtype, str, int]] = {
    "fp64": (torch.float64, "F64", 8),
    "fp32": (torch.float32, "F32", 4),
    "fp16": (torch.float16, "F16", 2),
    "bf16": (torch.bfloat16, "BF16", 2),
    "int64": (torch.int64, "I64", 8),
    "int32": (torch.int32, "I32", 4),
    "int16": (torch.int16, "I16", 2),
    "int8": (torch.int8, "I8", 1),
    "uint8": (torch.uint8, "U8", 1),
    "bool": (torch.bool, "BOOL", 1),
}
_BY_TORCH = {v[0]: k for k, v in _TABLE.items()}
_BY_ST = {v[1]: k for k, v in _TABLE.items()}

FLOAT_NAMES = ("fp64", "fp32", "fp16", "bf16")


def from_torch(dtype: torch.dtype) -> str:
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise ValueError(f"unsupported tensor dtype {dtype}") from None


def is_supported_torch(dtype: torch.dtype) -> bool:
    """Whether a torch dtype has a short name here (what readers accept in a checkpoint)."""
    try:
        from_torch(dtype)
    except ValueError:
        return False
    return True


def from_safetensors(code: str) -> str:
    try:
        return _BY_ST[code]
    except KeyError:
        raise ValueError(f"unsupported safetensors dtype {code}") from None


def to_torch(name: str) -> torch.dtype:
    return _TABLE[name][0]


def to_safetensors(name: str) -> str:
    return _TABLE[name][1]


def itemsize(name: str) -> int:
    return _TABLE[name][2]


def is_float(name: str) -> bool:
    return name in FLOAT_NAMES


def normalise(name: str) -> str:
    """Accept the spellings users type (bfloat16, float32, torch.float16, BF16)."""
    key = name.strip().lower().removeprefix("torch.")
    aliases = {
        "bfloat16": "bf16",
        "float16": "fp16",
        "half": "fp16",
        "float32": "fp32",
        "float": "fp32",
        "float64": "fp64",
        "double": "fp64",
        "f32": "fp32",
        "f16": "fp16",
        "f64": "fp64",
    }
    key = aliases.get(key, key)
    if key not in _TABLE:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(_TABLE)}")
    return key
