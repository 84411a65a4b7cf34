"""The unpickler policy: what each global of one pickle stream resolves to, and the stream checks.

One policy per load, so placeholder counts and classes do not leak between files. Before
unpickling, one pass over the opcodes rejects memo indices and byte counts that the C unpickler
would otherwise allocate blindly (``_prescan``), and nesting is bounded.
"""

from __future__ import annotations

import collections

# The codecs pickle opcodes decode with (UNICODE: raw-unicode-escape; STRING/BINSTRING with an
# encoding: latin-1/ascii), loaded now: a codec is imported on first use, and reading an
# untrusted file must never be what runs module code, even stdlib code (the fuzz tests audit it).
import encodings.ascii  # noqa: F401
import encodings.latin_1  # noqa: F401
import encodings.raw_unicode_escape  # noqa: F401
import encodings.unicode_escape  # noqa: F401
import encodings.utf_8  # noqa: F401
import os
import pickle
import pickletools
import struct
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ...errors import InputError, UnsafeInputError
from .allow_lists import (
    KNOWN_PLACEHOLDERS,
    NUMPY_CORE,
    NUMPY_DTYPE_CLASS,
    NUMPY_NUMERIC,
    SAFE_TYPES,
    TENSOR_FUNCTIONS,
    TENSOR_TYPE_NAMES,
    TENSOR_TYPES,
    TORCH_DTYPES,
    UNTYPED_STORAGE,
    SafeCallable,
    TensorTypeMarker,
    python3_name,
)
from .placeholders import (
    NumpyArray,
    NumpyDtype,
    NumpyScalar,
    Placeholder,
    PlaceholderAttribute,
    PlaceholderMeta,
    is_placeholder,
)


class SafeUnpicklerPolicy:
    """Decides what every global in one pickle stream resolves to."""

    def __init__(self, *, allow_globals: Iterable[str] = (), source: str | os.PathLike | None = None):
        self.allow_globals = frozenset(_check_allow_name(n) for n in allow_globals)
        self.source = str(source) if source is not None else None
        self.placeholders: collections.Counter[str] = collections.Counter()
        self._classes: dict[str, type] = {}
        self._functions = self._make_functions()

    # -- public ------------------------------------------------------------------------------

    def find_class(self, module: Any, name: Any) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise self._refuse(f"{module!r}.{name!r}")
        module, name = python3_name(module, name)
        qualified = f"{module}.{name}"
        if module == "torch" and name in TORCH_DTYPES:
            return TORCH_DTYPES[name]
        if qualified in SAFE_TYPES:
            return SAFE_TYPES[qualified]
        if qualified in self._functions:
            return self._functions[qualified]
        if qualified == "torch.storage.UntypedStorage" or qualified == "torch.UntypedStorage":
            return UNTYPED_STORAGE
        if qualified in TENSOR_TYPES:
            return TENSOR_TYPES[qualified]
        if self._is_placeholder_name(module, name):
            return self.placeholder_class(qualified)
        owner, dot, attr = name.rpartition(".")
        if dot and self._is_placeholder_name(module, owner):
            # protocol>=4 spells ``getattr(Class, 'method')`` as the global ``Class.method``
            return self.placeholder_class("builtins.getattr", base=PlaceholderAttribute)(f"{module}.{name}")
        raise self._refuse(qualified)

    def placeholder_class(self, qualified: str, base: type[Placeholder] | None = None) -> type:
        cls = self._classes.get(qualified)
        if cls is None:
            base = base or _base_for(qualified)
            module, _, name = qualified.rpartition(".")
            namespace = {
                "__slots__": (),
                "__module__": f"<inert {module}>",
                "__qualname__": name,
                "qualified_name": qualified,
                "_counter": None if base is PlaceholderAttribute else self.placeholders,
            }
            cls = PlaceholderMeta(name, (base,), namespace)
            self._classes[qualified] = cls
        return cls

    def pickle_module(self) -> types.SimpleNamespace:
        """A module-like object for ``torch.load(pickle_module=...)``."""
        policy = self

        class Unpickler(pickle.Unpickler):
            def __init__(self, file: Any, **kwargs: Any):
                _prescan(file)
                super().__init__(file, **kwargs)

            def find_class(self, module: str, name: str) -> Any:  # never calls super()
                return policy.find_class(module, name)

        def load(file: Any, **kwargs: Any) -> Any:
            return Unpickler(file, **kwargs).load()

        return types.SimpleNamespace(
            __name__="sa2va_convert.read.safe_pickle",
            Unpickler=Unpickler,
            load=load,
            UnpicklingError=pickle.UnpicklingError,
        )

    # -- internals ---------------------------------------------------------------------------

    def _is_placeholder_name(self, module: str, name: str) -> bool:
        qualified = f"{module}.{name}"
        return (
            qualified in KNOWN_PLACEHOLDERS
            or qualified in self.allow_globals
            or (module == "numpy.dtypes" and bool(NUMPY_DTYPE_CLASS.match(name)))
        )

    def _refuse(self, qualified: str) -> UnsafeInputError:
        qualified = printable(qualified)
        return UnsafeInputError(
            f"refused to load {qualified}: the checkpoint asks to import and call it, and sa2va-convert "
            "never runs code from a checkpoint",
            path=self.source,
            hint=(
                f"if you trust this file and {qualified} only holds data, pass --allow-global {qualified} "
                "to keep it as an inert placeholder (it is still never imported or called)"
            ),
        )

    def _make_functions(self) -> dict[str, SafeCallable]:
        stand_ins: dict[str, Callable] = dict(TENSOR_FUNCTIONS)
        stand_ins["builtins.getattr"] = self._getattr
        stand_ins["_codecs.encode"] = _codecs_encode
        stand_ins["builtins.bytearray"] = _bytearray
        stand_ins["copyreg._reconstructor"] = self._reconstructor
        stand_ins["torch._tensor._rebuild_from_type_v2"] = self._rebuild_from_type
        for mod in NUMPY_CORE:
            stand_ins[f"{mod}._reconstruct"] = self._numpy_reconstruct
            stand_ins[f"{mod}.scalar"] = self._numpy_scalar
        for mod in NUMPY_NUMERIC:
            stand_ins[f"{mod}._frombuffer"] = self._numpy_frombuffer
        return {name: SafeCallable(fn, name) for name, fn in stand_ins.items()}

    def _getattr(self, obj: Any, name: Any, *default: Any) -> PlaceholderAttribute:
        """Only names attributes of placeholders; never reads a real attribute."""
        if not is_placeholder(obj) or not isinstance(name, str):
            raise UnsafeInputError(
                f"the pickle called getattr({_describe(obj)}, {name!r}); only attributes of inert "
                "placeholders are allowed",
                path=self.source,
            )
        owner = obj.args[0] if isinstance(obj, PlaceholderAttribute) and obj.args else obj.qualified_name
        return self.placeholder_class("builtins.getattr", base=PlaceholderAttribute)(f"{owner}.{name}")

    def _rebuild_from_type(self, func: Any, new_type: Any, args: Any, state: Any) -> torch.Tensor:
        """How torch pickles a tensor that carries Python attributes (ZeRO-3 tags its flat
        groups with ``ds_id``): rebuild the plain tensor with an allow-listed function and
        drop the attributes, which are bookkeeping, not weights."""
        tensor_type = isinstance(new_type, TensorTypeMarker) or (
            is_placeholder(new_type) and new_type.qualified_name in TENSOR_TYPE_NAMES
        )
        if not (isinstance(func, SafeCallable) and func._name in TENSOR_FUNCTIONS and tensor_type):
            raise UnsafeInputError(
                f"the pickle called torch._tensor._rebuild_from_type_v2 with {_describe(func)} and "
                f"{_describe(new_type)}; only tensor rebuilds of torch.Tensor/Parameter are allowed",
                path=self.source,
            )
        if not isinstance(args, tuple):
            raise pickle.UnpicklingError("malformed tensor record")
        tensor = func(*args)
        if not isinstance(tensor, torch.Tensor):
            raise pickle.UnpicklingError("malformed tensor record")
        return tensor

    def _reconstructor(self, cls: Any, base: Any, state: Any) -> Placeholder:
        """copyreg._reconstructor (protocol 0/1 objects), for placeholder classes only."""
        if not (isinstance(cls, type) and issubclass(cls, Placeholder)):
            raise UnsafeInputError(
                f"the pickle called copyreg._reconstructor on {_describe(cls)}; only inert placeholders "
                "may be rebuilt that way",
                path=self.source,
            )
        obj = cls()
        if state is not None:
            obj.__setstate__(state)
        return obj

    def _numpy_reconstruct(self, subtype: Any, shape: Any = None, dtype: Any = None) -> Placeholder:
        return self.placeholder_class("numpy.ndarray")()

    def _numpy_frombuffer(self, buf: Any, dtype: Any = None, shape: Any = None, order: Any = "C") -> Placeholder:
        arr = self.placeholder_class("numpy.ndarray")()
        shape = tuple(shape) if isinstance(shape, (list, tuple)) else (0,)
        arr.__setstate__((1, shape, dtype, order == "F", bytes(buf) if isinstance(buf, (bytes, bytearray)) else buf))
        return arr

    def _numpy_scalar(self, dtype: Any, data: Any = None) -> Placeholder:
        cls = self.placeholder_class("numpy.scalar", base=NumpyScalar)
        obj = cls(dtype, data)
        object.__setattr__(obj, "value", _decode_scalar(dtype, data))
        return obj


_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def _prescan(file: Any) -> None:
    """Walk the opcodes once before unpickling, then rewind.

    The C unpickler trusts counts in the stream: ``LONG_BINPUT 1265731345``
    makes it grow its memo table to gigabytes, and a ``BYTEARRAY8`` length is
    allocated before the bytes are read. A pickler numbers memo entries 0, 1,
    2, ... and every counted item is followed by its bytes, so a memo index
    beyond the number of opcodes seen, or a count beyond the end of the data,
    means a damaged or hostile file. With this pass, memory and time stay
    proportional to the file.
    """
    if not (hasattr(file, "seek") and hasattr(file, "tell")):
        return
    start = file.tell()
    depth = _NestingDepth()
    try:
        for count, (opcode, arg, _) in enumerate(pickletools.genops(file)):
            if opcode.name in _MEMO_PUTS and (not isinstance(arg, int) or not 0 <= arg <= count):
                raise pickle.UnpicklingError(f"pickle memo index {arg} out of range")
            depth.step(opcode, arg)
    except pickle.UnpicklingError:
        raise
    except ValueError as e:
        text = str(e)
        if "exhausted" in text or "remain" in text or "not enough data" in text:
            raise pickle.UnpicklingError(f"truncated: {text}") from None
        raise pickle.UnpicklingError(text) from None
    finally:
        file.seek(start)


_MAX_NESTING = 10_000
_IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}


class _NestingDepth:
    """Upper bound of how deeply the objects a pickle builds are nested, tracked per stack slot.

    A 1 MB pickle can build a tuple nested a million deep; CPython hashes or
    frees such an object with C recursion and crashes (SIGSEGV) before any
    policy runs. Real checkpoints nest a few dozen levels, so a generous limit
    refuses only the attack. The simulation stops quietly on anything it does
    not follow (the real unpickler then reports the damage).
    """

    def __init__(self) -> None:
        self.stack: list[int] = []
        self.marks: list[int] = []
        self.memo: dict[int, int] = {}
        self.lost = False

    def step(self, opcode: Any, arg: Any) -> None:
        if self.lost:
            return
        try:
            self._step(opcode, arg)
        except (IndexError, KeyError, TypeError):
            self.lost = True

    def _step(self, opcode: Any, arg: Any) -> None:
        name = opcode.name
        if name == "MARK":
            self.marks.append(len(self.stack))
            return
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[arg] = self.stack[-1]
            return
        if name == "MEMOIZE":
            self.memo[len(self.memo)] = self.stack[-1]
            return
        if name in ("GET", "BINGET", "LONG_BINGET"):
            self.stack.append(self.memo[arg])
            return
        before = opcode.stack_before
        popped: list[int] = []
        if pickletools.stackslice in before:
            cut = self.marks.pop()
            popped = self.stack[cut:]
            del self.stack[cut:]
        fixed = sum(1 for b in before if b is not pickletools.markobject and b is not pickletools.stackslice)
        for _ in range(fixed):
            popped.append(self.stack.pop())
        after = opcode.stack_after
        if not after:
            return
        if name in _IN_PLACE:  # the container (first of `before`) is modified, not wrapped
            container = popped[-1] if popped else 0
            inner = popped[:-1]
            level = max(container, (max(inner) + 1) if inner else 0)
        else:
            level = (max(popped) + 1) if popped else 0
        if level > _MAX_NESTING:
            raise pickle.UnpicklingError(f"objects nested more than {_MAX_NESTING} levels deep")
        self.stack.extend([level] * len(after))


def _base_for(qualified: str) -> type[Placeholder]:
    if qualified == "numpy.ndarray":
        return NumpyArray
    if qualified == "numpy.dtype" or qualified.startswith("numpy.dtypes."):
        return NumpyDtype
    return Placeholder


def _decode_scalar(dtype: Any, data: Any) -> Any:
    """Python number for a numeric numpy scalar, so meta/message_hub values read naturally."""
    if isinstance(dtype, NumpyDtype) and isinstance(data, (bytes, bytearray)):
        fmt = dtype.struct_format()
        if fmt is not None and len(data) == fmt[2]:
            return struct.unpack(fmt[0] + fmt[1], data)[0]
    if dtype is not None and isinstance(dtype, NumpyDtype) and dtype.args[:1] == ("O8",):
        return data  # object scalar: the object itself, already safely unpickled
    return None


def _codecs_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """Protocol-2 pickles spell bytes as ``_codecs.encode(str, 'latin1')``; nothing else."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeInputError(f"refused _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin-1")


def _bytearray(source: Any = b"", encoding: Any = None) -> bytearray:
    """Protocol-2 spells bytearray as ``bytearray(str, 'latin-1')``. The real type would also
    take an int and allocate that many bytes: a few bytes of pickle asking for gigabytes."""
    if isinstance(source, str) and encoding in ("latin1", "latin-1"):
        return bytearray(source.encode("latin-1"))
    if isinstance(source, (bytes, bytearray)) and encoding is None:
        return bytearray(source)
    raise UnsafeInputError("refused bytearray(...) with arguments other than pickle's own encoding")


def _check_allow_name(name: str) -> str:
    if not isinstance(name, str) or "." not in name.strip(".") or any(c.isspace() for c in name):
        raise InputError(
            f"--allow-global expects a qualified name like mmengine.logging.history_buffer.HistoryBuffer, got {name!r}"
        )
    return name


def printable(text: str) -> str:
    """Names come from the file: keep control characters and newlines out of the one-line error."""
    if text.isprintable() and len(text) <= 200:
        return text
    escaped = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return escaped if len(escaped) <= 200 else escaped[:197] + "..."


def _describe(obj: Any) -> str:
    if is_placeholder(obj):
        return obj.qualified_name
    if isinstance(obj, (SafeCallable, TensorTypeMarker)):
        return obj._name if isinstance(obj, SafeCallable) else obj.name
    return type(obj).__name__
