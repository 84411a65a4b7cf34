"""The fixed tables the unpickler policy answers every global from; nothing else is admitted.

Known checkpoint objects (placeholders), torch dtypes, immutable builtin types, the functions
torch needs to rebuild tensors (behind wrappers a pickle cannot modify), and markers standing
for torch classes a pickle must not reach.
"""

from __future__ import annotations

import _compat_pickle
import collections
import re
from collections.abc import Callable
from typing import Any

import torch

from ...errors import UnsafeInputError

KNOWN_PLACEHOLDERS: frozenset[str] = frozenset(
    {
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
    }
)
NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
NUMPY_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")
NUMPY_DTYPE_CLASS = re.compile(r"^[A-Z][A-Za-z0-9]*DType$")


def python3_name(module: str, name: str) -> tuple[str, str]:
    """Protocol<3 pickles use Python 2 names (``__builtin__.getattr``, ``copy_reg``,
    ``commands.call`` for subprocess.call); the default find_class renames them before
    importing, so we judge -- and report -- the Python 3 name that would have been used."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


# torch dtypes by attribute name, read once from torch's namespace (no lazy attribute hooks).
TORCH_DTYPES: dict[str, torch.dtype] = {k: v for k, v in vars(torch).items() if isinstance(v, torch.dtype)}

# Immutable types returned as themselves (NEWOBJ needs a real type, e.g. for complex).
# Each is harmless to call with pickle-supplied arguments and rejects attribute writes.
SAFE_TYPES: dict[str, type] = {
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
TENSOR_FUNCTIONS: dict[str, Callable] = {
    f"torch._utils.{name}": getattr(torch._utils, name)
    for name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter", "_rebuild_parameter_with_state")
    if hasattr(torch._utils, name)
}


class SafeCallable:
    """A function from the allow-list, behind a wrapper the pickle cannot modify.

    Real Python functions have writable ``__defaults__``/``__dict__``; a
    ``BUILD`` on one would change torch for the rest of the process.
    """

    __slots__ = ("_fn", "_name")
    _fn: Callable
    _name: str

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


UNTYPED_STORAGE = _UntypedStorageMarker()


class TensorTypeMarker:
    """Stands for ``torch.Tensor`` / ``Parameter`` as the ``new_type`` argument of
    ``_rebuild_from_type_v2``. The real classes are mutable Python classes; a pickle must
    not be able to BUILD on them."""

    __slots__ = ("name",)
    name: str

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)

    def __setstate__(self, state: Any) -> None:
        raise UnsafeInputError(f"the pickle tried to modify {self.name}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafeInputError(f"the pickle tried to modify {self.name}")


TENSOR_TYPE_NAMES = ("torch._tensor.Tensor", "torch.Tensor", "torch.nn.parameter.Parameter")
TENSOR_TYPES = {name: TensorTypeMarker(name) for name in TENSOR_TYPE_NAMES}
