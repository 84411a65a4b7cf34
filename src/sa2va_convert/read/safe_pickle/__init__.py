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

The package, one job a module: ``placeholders`` (inert stand-ins), ``allow_lists`` (the fixed
tables), ``policy`` (the unpickler policy and stream checks), ``torch_load`` (sniffing and
``safe_torch_load``), ``plain`` (``to_plain`` for reports).
"""

from __future__ import annotations

from .allow_lists import KNOWN_PLACEHOLDERS
from .placeholders import NumpyArray, NumpyDtype, NumpyScalar, Placeholder, PlaceholderAttribute, is_placeholder
from .plain import to_plain
from .policy import SafeUnpicklerPolicy
from .torch_load import SafeLoad, loads, safe_torch_load, sniff_file

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
