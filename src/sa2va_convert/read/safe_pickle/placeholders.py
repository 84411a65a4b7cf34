"""Inert placeholders: what the known objects of a checkpoint become instead of being imported.

Real ``type`` objects (pickle's ``NEWOBJ`` needs one) that accept any arguments and record them,
with no behaviour; numpy arrays, dtypes and scalars keep their plain numbers for reports.
"""

from __future__ import annotations

import collections
import math
import struct
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from ...errors import UnsafeInputError


class PlaceholderMeta(type):
    """Freezes placeholder classes.

    A pickle can ``BUILD`` on any object it holds, including a class it got from
    ``find_class``; without this it could overwrite ``__setstate__`` or
    ``__new__`` of a placeholder class and change how later objects load.
    """

    def __setattr__(cls, name: str, value: Any) -> None:
        raise UnsafeInputError(f"the pickle tried to set attribute {name!r} on placeholder class {cls.__qualname__}")

    def __delattr__(cls, name: str) -> None:
        raise UnsafeInputError(f"the pickle tried to delete attribute {name!r} of placeholder class {cls.__qualname__}")


class Placeholder(metaclass=PlaceholderMeta):
    """An object the checkpoint carried, kept as data and never brought to life.

    It must be a real class: pickle's ``NEWOBJ`` opcode calls ``cls.__new__``
    and refuses non-types. Every entry point pickle uses (``__new__``,
    ``__init__``, ``__setstate__``, ``__setitem__``, ``append``/``extend``)
    only records what it was given.
    """

    __slots__ = ("args", "kwargs", "state", "mapping", "sequence")
    # the slots' types (set in __new__ and below with object.__setattr__, which type checkers do not follow)
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    mapping: dict[Any, Any] | None
    sequence: list[Any] | None
    qualified_name: ClassVar[str] = "?"
    _counter: ClassVar[collections.Counter | None] = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = object.__new__(cls)
        object.__setattr__(obj, "args", args)
        object.__setattr__(obj, "kwargs", kwargs)
        object.__setattr__(obj, "state", None)
        object.__setattr__(obj, "mapping", None)
        object.__setattr__(obj, "sequence", None)
        if cls._counter is not None:
            cls._counter[cls.qualified_name] += 1
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls cls(*args)
        pass

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "state", state)

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) on dict subclasses
        mapping = self.mapping
        if mapping is None:
            mapping = {}
            object.__setattr__(self, "mapping", mapping)
        mapping[key] = value

    def append(self, value: Any) -> None:  # APPEND on list subclasses
        sequence = self.sequence
        if sequence is None:
            sequence = []
            object.__setattr__(self, "sequence", sequence)
        sequence.append(value)

    def extend(self, values: Iterable[Any]) -> None:  # APPENDS on list subclasses
        for v in values:
            self.append(v)

    def __setattr__(self, name: str, value: Any) -> None:
        # pickle's BUILD uses __setstate__; nothing else should set attributes.
        raise UnsafeInputError(f"the pickle tried to set attribute {name!r} on a {self.qualified_name} placeholder")

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"

    def to_plain(self, convert: Callable[[Any], Any]) -> Any:
        """Plain-data view for reports (meta, message_hub)."""
        out: dict[str, Any] = {"__type__": self.qualified_name}
        if self.args:
            out["args"] = convert(list(self.args))
        if self.kwargs:
            out["kwargs"] = convert(self.kwargs)
        if self.state is not None:
            state = convert(self.state)
            if isinstance(state, dict) and not (state.keys() & out.keys()):
                out.update(state)
            else:
                out["state"] = state
        if self.mapping is not None:
            out["items"] = convert(self.mapping)
        if self.sequence is not None:
            out["list"] = convert(self.sequence)
        return out


class PlaceholderAttribute(Placeholder):
    """What ``getattr(placeholder, name)`` gives: a name, not a value.

    HistoryBuffer pickles its statistics methods as ``getattr(HistoryBuffer,
    'mean')``; we keep ``'...HistoryBuffer.mean'`` as text.
    """

    __slots__ = ()
    qualified_name = "builtins.getattr"

    def to_plain(self, convert: Callable[[Any], Any]) -> Any:
        return self.args[0] if self.args else "?"


# numpy dtype kind+size -> struct code; only plain numbers are decoded.
_STRUCT_CODES = {
    "b1": "?",
    "i1": "b",
    "u1": "B",
    "i2": "h",
    "u2": "H",
    "i4": "i",
    "u4": "I",
    "i8": "q",
    "u8": "Q",
    "f2": "e",
    "f4": "f",
    "f8": "d",
}
_BYTE_ORDERS = {"<": "<", ">": ">", "|": "<", "=": "=", None: "="}


class NumpyDtype(Placeholder):
    """numpy.dtype('f8', ...) + BUILD state (version, byteorder, ...)."""

    __slots__ = ()

    def struct_format(self) -> tuple[str, str, int] | None:
        """(byte order, struct code, itemsize) when the dtype is a plain number, else None."""
        code = self.args[0] if self.args else None
        if not isinstance(code, str) or code not in _STRUCT_CODES:
            return None
        order = None
        if isinstance(self.state, tuple) and len(self.state) > 1:
            order = self.state[1]
        if order not in _BYTE_ORDERS:
            return None
        fmt = _STRUCT_CODES[code]
        return _BYTE_ORDERS[order], fmt, struct.calcsize(fmt)

    def to_plain(self, convert: Callable[[Any], Any]) -> Any:
        code = self.args[0] if self.args else None
        return code if isinstance(code, str) else super().to_plain(convert)


class NumpyScalar(Placeholder):
    """numpy scalar; ``value`` holds the decoded Python number when possible."""

    __slots__ = ("value",)

    def to_plain(self, convert: Callable[[Any], Any]) -> Any:
        value = getattr(self, "value", None)
        if value is not None:
            return value
        return super().to_plain(convert)


class NumpyArray(Placeholder):
    """numpy.ndarray rebuilt by ``_reconstruct`` then BUILD (version, shape, dtype, fortran, data)."""

    __slots__ = ()
    max_plain_items: ClassVar[int] = 64

    def _parts(self) -> tuple[tuple, Any, bool, Any] | None:
        st = self.state
        if not isinstance(st, tuple) or len(st) not in (4, 5):
            return None
        shape, dtype, fortran, data = st[-4:]
        if not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
            return None
        return shape, dtype, bool(fortran), data

    def values(self) -> Any:
        """Nested lists of Python numbers (small numeric arrays only), else None."""
        parts = self._parts()
        if parts is None:
            return None
        shape, dtype, fortran, data = parts
        count = math.prod(shape)
        if count > self.max_plain_items:
            return None
        if isinstance(data, list) and len(data) == count:  # object arrays pickle a list
            flat = list(data)
        elif isinstance(data, (bytes, bytearray)) and isinstance(dtype, NumpyDtype):
            fmt = dtype.struct_format()
            if fmt is None or len(data) != count * fmt[2]:
                return None
            flat = list(struct.unpack(f"{fmt[0]}{count}{fmt[1]}", data))
        else:
            return None
        return _nest(flat, shape, fortran)

    def to_plain(self, convert: Callable[[Any], Any]) -> Any:
        values = self.values()
        if values is not None:
            return convert(values)
        parts = self._parts()
        if parts is None:
            return super().to_plain(convert)
        shape, dtype, _, _ = parts
        return {"__type__": "numpy.ndarray", "shape": list(shape), "dtype": convert(dtype)}


def _nest(flat: list, shape: tuple[int, ...], fortran: bool) -> Any:
    """Row-major nested lists from a flat C- or Fortran-ordered buffer."""
    strides = []
    for k in range(len(shape)):
        dims = shape[:k] if fortran else shape[k + 1 :]
        strides.append(math.prod(dims))

    def build(dim: int, offset: int) -> Any:
        if dim == len(shape):
            return flat[offset]
        return [build(dim + 1, offset + i * strides[dim]) for i in range(shape[dim])]

    return build(0, 0)


def is_placeholder(obj: Any) -> bool:
    return isinstance(obj, Placeholder) or (isinstance(obj, type) and issubclass(obj, Placeholder))
