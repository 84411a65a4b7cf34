"""Read ``torch.save`` files without running anything the file asks for.

A pickle is a small program: ``GLOBAL`` names any importable callable and
``REDUCE`` calls it, so ``torch.load(weights_only=False)`` on a downloaded
checkpoint is arbitrary code execution. ``weights_only=True`` is safe but
refuses every real Sa2VA checkpoint (mmengine's ``HistoryBuffer``, numpy
scalars, DeepSpeed enums and loss scalers ride along with the tensors).

So we hand ``torch.load`` our own ``pickle_module`` whose ``find_class`` never
imports anything. It answers each global from three fixed tables:

* harmless callables needed to rebuild tensors (wrapped so a pickle cannot
  mutate the real functions), immutable builtin types, and torch dtypes;
* stand-ins for the few functions real checkpoints use as plumbing
  (``getattr``, ``_codecs.encode``, ``bytearray``, ``copyreg._reconstructor``,
  numpy's ``_reconstruct`` / ``scalar``, torch's ``_rebuild_from_type_v2``)
  that accept only the arguments picklers write and only build plain values
  or inert placeholders;
* *inert placeholder classes* for the known objects (and for names the user
  admits with ``--allow-global``): real ``type`` objects that accept any
  arguments and store state, but have no behaviour.

Anything else raises :class:`UnsafeInputError` naming ``module.Name``. Before
unpickling, one pass over the opcodes rejects memo indices and byte counts that
the C unpickler would otherwise allocate blindly (see :func:`_prescan`).

torch's loader (checked against torch 2.13 ``serialization._load`` and
``_legacy_load``) subclasses ``pickle_module.Unpickler``, answers names
containing ``"Storage"`` itself (a dtype lookup, no import) and sends every
other global to ``super().find_class`` -- i.e. to us. The legacy non-zip format
also calls ``pickle_module.load`` for its header pickles; the legacy *tar*
format extracts files to a temporary folder, so we refuse it before torch sees
it, as we refuse TorchScript zips (``torch.load`` would hand them to
``torch.jit.load``).
"""

from __future__ import annotations

import _compat_pickle
import collections
# The codecs pickle opcodes decode with (UNICODE: raw-unicode-escape; STRING/BINSTRING with an
# encoding: latin-1/ascii), loaded now: a codec is imported on first use, and reading an
# untrusted file must never be what runs module code, even stdlib code (the fuzz tests audit it).
import encodings.ascii  # noqa: F401
import encodings.latin_1  # noqa: F401
import encodings.raw_unicode_escape  # noqa: F401
import encodings.unicode_escape  # noqa: F401
import encodings.utf_8  # noqa: F401
import contextlib
import math
import mmap as _mmap
import os
import pickle
import pickletools
import re
import struct
import tarfile
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping

import torch

from ..errors import ConvertError, InputError, UnsafeInputError

__all__ = [
    "Placeholder",
    "PlaceholderAttribute",
    "NumpyArray",
    "NumpyDtype",
    "NumpyScalar",
    "SafeLoad",
    "SafeUnpicklerPolicy",
    "KNOWN_PLACEHOLDERS",
    "safe_torch_load",
    "loads",
    "sniff_file",
    "to_plain",
    "is_placeholder",
]

# --------------------------------------------------------------------------------------------
# Inert placeholders
# --------------------------------------------------------------------------------------------


class _PlaceholderMeta(type):
    """Freezes placeholder classes.

    A pickle can ``BUILD`` on any object it holds, including a class it got from
    ``find_class``; without this it could overwrite ``__setstate__`` or
    ``__new__`` of a placeholder class and change how later objects load.
    """

    def __setattr__(cls, name: str, value: Any) -> None:
        raise UnsafeInputError(f"the pickle tried to set attribute {name!r} on placeholder class {cls.__qualname__}")

    def __delattr__(cls, name: str) -> None:
        raise UnsafeInputError(f"the pickle tried to delete attribute {name!r} of placeholder class {cls.__qualname__}")


class Placeholder(metaclass=_PlaceholderMeta):
    """An object the checkpoint carried, kept as data and never brought to life.

    It must be a real class: pickle's ``NEWOBJ`` opcode calls ``cls.__new__``
    and refuses non-types. Every entry point pickle uses (``__new__``,
    ``__init__``, ``__setstate__``, ``__setitem__``, ``append``/``extend``)
    only records what it was given.
    """

    __slots__ = ("args", "kwargs", "state", "mapping", "sequence")
    qualified_name: ClassVar[str] = "?"
    _counter: ClassVar[collections.Counter | None] = None

    def __new__(cls, *args: Any, **kwargs: Any) -> "Placeholder":
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
        if self.mapping is None:
            object.__setattr__(self, "mapping", {})
        self.mapping[key] = value

    def append(self, value: Any) -> None:  # APPEND on list subclasses
        if self.sequence is None:
            object.__setattr__(self, "sequence", [])
        self.sequence.append(value)

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
    "b1": "?", "i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I",
    "i8": "q", "u8": "Q", "f2": "e", "f4": "f", "f8": "d",
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
        dims = shape[:k] if fortran else shape[k + 1:]
        strides.append(math.prod(dims))

    def build(dim: int, offset: int) -> Any:
        if dim == len(shape):
            return flat[offset]
        return [build(dim + 1, offset + i * strides[dim]) for i in range(shape[dim])]

    return build(0, 0)


def is_placeholder(obj: Any) -> bool:
    return isinstance(obj, Placeholder) or (isinstance(obj, type) and issubclass(obj, Placeholder))


# --------------------------------------------------------------------------------------------
# The allow-lists
# --------------------------------------------------------------------------------------------

KNOWN_PLACEHOLDERS: frozenset[str] = frozenset({
    # mmengine: message_hub log_scalars; MessageHub/ConfigDict in case a hook stores one
    "mmengine.logging.history_buffer.HistoryBuffer",
    "mmengine.logging.message_hub.MessageHub",
    "mmengine.config.config.ConfigDict",
    # numpy (1.x and 2.x module names)
    "numpy.ndarray",
    "numpy.dtype",
    # DeepSpeed optimizer / model-states files
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.zero.offload_config.OffloadDeviceEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScalerBase",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")
_NUMPY_DTYPE_CLASS = re.compile(r"^[A-Z][A-Za-z0-9]*DType$")


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Protocol<3 pickles use Python 2 names (``__builtin__.getattr``, ``copy_reg``,
    ``commands.call`` for subprocess.call); the default find_class renames them before
    importing, so we judge -- and report -- the Python 3 name that would have been used."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


# torch dtypes by attribute name, read once from torch's namespace (no lazy attribute hooks).
_TORCH_DTYPES: dict[str, torch.dtype] = {k: v for k, v in vars(torch).items() if isinstance(v, torch.dtype)}

# Immutable types returned as themselves (NEWOBJ needs a real type, e.g. for complex).
# Each is harmless to call with pickle-supplied arguments and rejects attribute writes.
_SAFE_TYPES: dict[str, type] = {
    "collections.OrderedDict": collections.OrderedDict,  # every state dict
    "torch.Size": torch.Size,  # tensor shapes, DeepSpeed param_shapes
    "torch.device": torch.device,  # device fields in DeepSpeed / optimizer state
    "builtins.set": set,  # protocol-2 encoding of set / frozenset
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,  # protocol-2 encoding of complex numbers
    "builtins.slice": slice,  # plain immutable value (protocol-2 REDUCE); cheap to allow
    "builtins.object": object,  # the ``base`` argument of copyreg._reconstructor
}

# Functions torch needs to rebuild tensors. They only make tensor views over storages that
# torch's own persistent_load produced (or Parameters/attributes on those new objects).
_TENSOR_FUNCTIONS: dict[str, Callable] = {
    f"torch._utils.{name}": getattr(torch._utils, name)
    for name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter", "_rebuild_parameter_with_state")
    if hasattr(torch._utils, name)
}


class _SafeCallable:
    """A function from the allow-list, behind a wrapper the pickle cannot modify.

    Real Python functions have writable ``__defaults__``/``__dict__``; a
    ``BUILD`` on one would change torch for the rest of the process.
    """

    __slots__ = ("_fn", "_name")

    def __init__(self, fn: Callable, name: str):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setstate__(self, state: Any) -> None:
        raise UnsafeInputError(f"the pickle tried to modify the function {self._name}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafeInputError(f"the pickle tried to modify the function {self._name}")

    def __repr__(self) -> str:
        return f"<allowed {self._name}>"


class _UntypedStorageMarker:
    """Stands for ``torch.storage.UntypedStorage`` in uint8-storage tensors (torch>=2.x for
    uint16/float8...). torch's persistent_load only needs ``.dtype``; handing out the real
    class would let a pickle allocate storages or set attributes on a mutable torch class."""

    __slots__ = ()
    dtype = torch.uint8
    _dtype = torch.uint8

    def __setstate__(self, state: Any) -> None:
        raise UnsafeInputError("the pickle tried to modify torch.storage.UntypedStorage")


_UNTYPED_STORAGE = _UntypedStorageMarker()


class _TensorTypeMarker:
    """Stands for ``torch.Tensor`` / ``Parameter`` as the ``new_type`` argument of
    ``_rebuild_from_type_v2``. The real classes are mutable Python classes; a pickle must
    not be able to BUILD on them."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)

    def __setstate__(self, state: Any) -> None:
        raise UnsafeInputError(f"the pickle tried to modify {self.name}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafeInputError(f"the pickle tried to modify {self.name}")


_TENSOR_TYPE_NAMES = ("torch._tensor.Tensor", "torch.Tensor", "torch.nn.parameter.Parameter")
_TENSOR_TYPES = {name: _TensorTypeMarker(name) for name in _TENSOR_TYPE_NAMES}


# --------------------------------------------------------------------------------------------
# The policy: one per load, so placeholder counts and classes do not leak between files
# --------------------------------------------------------------------------------------------


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
        module, name = _python3_name(module, name)
        qualified = f"{module}.{name}"
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        if qualified in _SAFE_TYPES:
            return _SAFE_TYPES[qualified]
        if qualified in self._functions:
            return self._functions[qualified]
        if qualified == "torch.storage.UntypedStorage" or qualified == "torch.UntypedStorage":
            return _UNTYPED_STORAGE
        if qualified in _TENSOR_TYPES:
            return _TENSOR_TYPES[qualified]
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
            cls = _PlaceholderMeta(name, (base,), namespace)
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
            or (module == "numpy.dtypes" and bool(_NUMPY_DTYPE_CLASS.match(name)))
        )

    def _refuse(self, qualified: str) -> UnsafeInputError:
        qualified = _printable(qualified)
        return UnsafeInputError(
            f"refused to load {qualified}: the checkpoint asks to import and call it, and sa2va-convert "
            "never runs code from a checkpoint",
            path=self.source,
            hint=(
                f"if you trust this file and {qualified} only holds data, pass --allow-global {qualified} "
                "to keep it as an inert placeholder (it is still never imported or called)"
            ),
        )

    def _make_functions(self) -> dict[str, _SafeCallable]:
        stand_ins: dict[str, Callable] = dict(_TENSOR_FUNCTIONS)
        stand_ins["builtins.getattr"] = self._getattr
        stand_ins["_codecs.encode"] = _codecs_encode
        stand_ins["builtins.bytearray"] = _bytearray
        stand_ins["copyreg._reconstructor"] = self._reconstructor
        stand_ins["torch._tensor._rebuild_from_type_v2"] = self._rebuild_from_type
        for mod in _NUMPY_CORE:
            stand_ins[f"{mod}._reconstruct"] = self._numpy_reconstruct
            stand_ins[f"{mod}.scalar"] = self._numpy_scalar
        for mod in _NUMPY_NUMERIC:
            stand_ins[f"{mod}._frombuffer"] = self._numpy_frombuffer
        return {name: _SafeCallable(fn, name) for name, fn in stand_ins.items()}

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
        tensor_type = isinstance(new_type, _TensorTypeMarker) or (
            is_placeholder(new_type) and new_type.qualified_name in _TENSOR_TYPE_NAMES
        )
        if not (isinstance(func, _SafeCallable) and func._name in _TENSOR_FUNCTIONS and tensor_type):
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


def _printable(text: str) -> str:
    """Names come from the file: keep control characters and newlines out of the one-line error."""
    if text.isprintable() and len(text) <= 200:
        return text
    escaped = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return escaped if len(escaped) <= 200 else escaped[:197] + "..."


def _describe(obj: Any) -> str:
    if is_placeholder(obj):
        return obj.qualified_name
    if isinstance(obj, (_SafeCallable, _TensorTypeMarker)):
        return obj._name if isinstance(obj, _SafeCallable) else obj.name
    return type(obj).__name__


# --------------------------------------------------------------------------------------------
# Loading files
# --------------------------------------------------------------------------------------------


@dataclass
class SafeLoad:
    obj: Any
    placeholders: dict[str, int]
    mmapped: bool  # tensors are views of a private read-only file mapping
    format: str  # "zip" (torch>=1.6 default) | "legacy" (_use_new_zipfile_serialization=False)


def loads(data: bytes, *, allow_globals: Iterable[str] = (), source: str | None = None) -> tuple[Any, dict[str, int]]:
    """Unpickle plain pickle bytes (no torch storages) under the same policy.

    Useful for pickles outside torch containers and for testing the policy itself.
    """
    import io

    policy = SafeUnpicklerPolicy(allow_globals=allow_globals, source=source)
    with _converting_errors(source or "<bytes>"):
        obj = policy.pickle_module().Unpickler(io.BytesIO(data), encoding="utf-8").load()
    return obj, dict(policy.placeholders)


def sniff_file(path: Path) -> str:
    """Classify a file by its first bytes: empty, zip, safetensors, tar, pickle or unknown."""
    size = path.stat().st_size
    if size == 0:
        return "empty"
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= size - 8:
            return "safetensors"
    if _is_tar(path):
        return "tar"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    return "unknown"


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError, ValueError):
        return False


def safe_torch_load(path: str | os.PathLike, *, allow_globals: Iterable[str] = ()) -> SafeLoad:
    """``torch.load`` of one file under the restricted policy, memory-mapped when possible.

    Raises InputError (one line, naming the file) for anything that is not a
    readable ``torch.save`` file, UnsafeInputError for refused globals.
    """
    path = Path(path)
    _check_readable_file(path)
    kind = sniff_file(path)
    if kind != "zip" and kind != "pickle":
        raise _wrong_kind(path, kind)
    if kind == "zip":
        _check_torch_zip(path)
    if os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        raise InputError(
            "TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, which makes torch refuse sa2va-convert's restricted loader",
            path=path,
            hint="unset TORCH_FORCE_WEIGHTS_ONLY_LOAD for this command (the restricted loader never runs code "
            "from the file)",
        )
    policy = SafeUnpicklerPolicy(allow_globals=allow_globals, source=path)
    use_mmap = kind == "zip"
    with _converting_errors(path), _private_mmap():
        obj = torch.load(
            os.fspath(path),
            map_location="cpu",
            pickle_module=policy.pickle_module(),
            weights_only=False,
            mmap=use_mmap,
        )
    return SafeLoad(obj, dict(policy.placeholders), mmapped=use_mmap, format="zip" if use_mmap else "legacy")


def _check_readable_file(path: Path) -> None:
    if not os.path.lexists(path):
        raise InputError("no such file or directory", path=path, hint="check the path")
    if not path.exists():
        raise InputError("is a broken symbolic link", path=path, hint="point it at the checkpoint file")
    if path.is_dir():
        raise InputError("is a directory, expected a file", path=path, hint="pass the checkpoint file inside it")
    if not path.is_file():
        raise InputError("is not a regular file", path=path, hint="pass a checkpoint file written by torch.save")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise InputError("permission denied", path=path, hint="make the file readable (chmod +r) or run as its owner") from None
    except OSError as e:
        raise InputError(f"cannot open: {e.strerror or e}", path=path, hint="check the file and its folder") from None


def _wrong_kind(path: Path, kind: str) -> InputError:
    messages = {
        "empty": ("is empty (0 bytes)", "the save was probably interrupted; use an earlier checkpoint"),
        "safetensors": (
            "is a safetensors file, not a training checkpoint written by torch.save",
            "pass the iter_N.pth from the training work_dir; safetensors files belong to HuggingFace folders "
            "(pass the folder, not the file, where a base model is expected)",
        ),
        "tar": (
            "is a tar archive (PyTorch's pre-1.6 legacy tar format or not a checkpoint at all); it is not supported",
            "load and re-save it with a current torch in a trusted environment",
        ),
        "unknown": (
            "is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)",
            "pass the iter_N.pth from the training work_dir",
        ),
    }
    message, hint = messages[kind]
    return InputError(message, path=path, hint=hint)


def _check_torch_zip(path: Path) -> None:
    """Check with torch's own zip reader (the one torch.load uses) before unpickling."""
    try:
        with open(path, "rb") as f:
            records = set(torch._C.PyTorchFileReader(f).get_all_records())
    except Exception as e:  # torch raises RuntimeError with miniz messages
        if not _python_sees_zip(path):
            raise InputError(
                "is truncated or corrupt (its zip directory cannot be read)",
                path=path,
                hint="the copy or the save was probably interrupted; copy it again or use an earlier checkpoint",
            ) from None
        raise InputError(
            f"is a damaged zip archive or one not written by torch.save ({_first_line(e)})",
            path=path,
            hint="copy it again, or pass the iter_N.pth from the training work_dir",
        ) from None
    if "constants.pkl" in records or any(r.startswith("code/") for r in records):
        raise InputError(
            "is a TorchScript archive (it contains code), not a training checkpoint; it is not loaded",
            path=path,
            hint="pass the iter_N.pth from the training work_dir",
        )
    if "data.pkl" not in records:
        raise InputError(
            "is a zip archive but not one written by torch.save (no data.pkl inside)",
            path=path,
            hint="pass the iter_N.pth from the training work_dir",
        )
    if _has_compressed_entries(path):
        # torch.load(mmap=True) slices raw bytes at the entry offsets: compressed entries
        # would load as garbage numbers without any error.
        raise InputError(
            "is a zip archive with compressed entries; torch.save never compresses, so it was re-packed "
            "by another tool and its tensors cannot be memory-mapped",
            path=path,
            hint="use the original file written by training (unzip/zip tools change the layout)",
        )


def _has_compressed_entries(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(info.compress_type != zipfile.ZIP_STORED for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return False  # torch's reader accepted it; this check is only about compression


def _python_sees_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


@contextlib.contextmanager
def _private_mmap() -> Iterator[None]:
    """Force MAP_PRIVATE so that writes to loaded tensors can never reach the input file."""
    setter = getattr(torch.serialization, "set_default_mmap_options", None)
    if setter is None or os.name == "nt":
        yield
        return
    with setter(_mmap.MAP_PRIVATE):
        yield


@contextlib.contextmanager
def _converting_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn whatever a damaged file makes torch/pickle raise into one InputError line."""
    try:
        yield
    except ConvertError as e:
        if e.path is None:
            e.path = str(path)
        raise
    except (EOFError, pickle.UnpicklingError) as e:
        text = _first_line(e)
        if isinstance(e, EOFError) or "truncated" in text:
            raise InputError(
                "is truncated or corrupt (the pickle ends early)",
                path=path,
                hint="the copy or the save was probably interrupted; copy it again or use an earlier checkpoint",
            ) from None
        raise _corrupt(path, e) from None
    except RecursionError:
        raise InputError("is corrupt (nesting too deep to read)", path=path, hint="use another checkpoint") from None
    except MemoryError:
        raise InputError("cannot be read: out of memory while unpickling", path=path,
                         hint="the file may be corrupt; check it or use another checkpoint") from None
    except Exception as e:
        text = _first_line(e)
        if "Invalid magic number" in text:
            raise InputError(
                "is a pickle but not a PyTorch checkpoint (no torch.save header)",
                path=path,
                hint="pass the iter_N.pth from the training work_dir",
            ) from None
        raise _corrupt(path, e) from None


def _corrupt(path: str | os.PathLike, e: BaseException) -> InputError:
    return InputError(
        f"is corrupt or not a PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})",
        path=path,
        hint="copy it again or use an earlier checkpoint",
    )


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return _printable(lines[0] if lines else type(e).__name__)


# --------------------------------------------------------------------------------------------
# Plain data for reports
# --------------------------------------------------------------------------------------------


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
