"""Plain data for reports: placeholders, tensors and containers as JSON-friendly values."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .placeholders import Placeholder


def to_plain(obj: Any, *, max_depth: int = 32) -> Any:
    """JSON-friendly copy of unpickled data: placeholders decoded, tensors summarised.

    Guards against cycles and deep nesting, which a hostile pickle can build.
    """
    active: set[int] = set()

    def convert(value: Any, depth: int = 0) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if depth > max_depth:
            return "<nested too deep>"
        if isinstance(value, (bytes, bytearray)):
            return f"<{len(value)} bytes>"
        if isinstance(value, complex):
            return str(value)
        if isinstance(value, torch.Tensor):
            return {"__type__": "tensor", "shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        if isinstance(value, torch.dtype):
            return str(value).removeprefix("torch.")
        if isinstance(value, (torch.device, slice)):
            return str(value)
        if isinstance(value, type):
            return f"<class {getattr(value, 'qualified_name', value.__qualname__)}>"
        if id(value) in active:
            return "<cycle>"
        active.add(id(value))
        try:
            return _convert_container(value, lambda v: convert(v, depth + 1))
        finally:
            active.discard(id(value))

    return convert(obj)


def _convert_container(value: Any, convert: Callable[[Any], Any]) -> Any:
    if isinstance(value, Placeholder):
        return value.to_plain(convert)
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else repr(convert(k)): convert(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [convert(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [convert(v) for v in value]
    return f"<{type(value).__name__}>"
