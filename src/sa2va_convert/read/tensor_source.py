"""The one interface every weight source (checkpoint, base folder, pretrained .pth) offers.

The planner needs names, shapes and dtypes without touching tensor bytes; the
writer needs one tensor at a time. Keeping those two needs behind a tiny
protocol lets a memory-mapped ``.pth``, a set of safetensors shards and a
DeepSpeed partition set all feed the same pipeline, and keeps peak memory at
about one tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch

from .. import dtypes
from .mapped_pages import MappedFilePages
from .zip_records import RecordCheck


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # short name, see sa2va_convert.dtypes

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


@dataclass(frozen=True)
class SourceAbilities:
    """What a source can do beyond the required interface, declared by the source itself.

    Consumers (the producer, the peak-RAM estimate) read these flags; they never probe a source
    for methods. A source without an ability still offers the method, with the plain fallback
    of :class:`SourceDefaults`, and everything works, with more memory.
    """

    reads_into: bool = False  # load(key, out=uint8 buffer) fills a caller's recycled buffer (BufferedLoad)
    reads_rows: bool = False  # load_rows reads only those rows (without: a slice of the whole tensor)
    releases_pages: bool = False  # release_rows gives back the RSS pages of a used (memory-mapped) tensor


@runtime_checkable
class TensorSource(Protocol):
    """A read-only, lazily loaded mapping of tensor names to tensors.

    Required: ``label``, ``path``, ``abilities``, ``keys``, ``in``, ``info``, ``load``, and the
    row-wise pair ``load_rows``/``release_rows`` (inherit :class:`SourceDefaults` for their
    fallbacks). What is more than a fallback is said by ``abilities``.
    """

    label: str  # "checkpoint", "base", "pretrained", ... (shown in plans and errors)
    path: Path
    abilities: SourceAbilities

    def keys(self) -> Iterable[str]: ...

    def __contains__(self, key: str) -> bool: ...

    def info(self, key: str) -> TensorInfo: ...

    def load(self, key: str) -> torch.Tensor:
        """Return the tensor; may be a view of a memory map: never modify it in place."""
        ...

    def load_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of ``key`` (along its first dimension)."""
        ...

    def release_rows(self, key: str, start: int = 0, stop: int | None = None) -> None:
        """Rows [start, stop) of ``key`` (default: all) are used: drop the memory they hold, where possible."""
        ...


class BufferedLoad(Protocol):
    """The ``reads_into`` ability: ``load`` fills ``out`` (a contiguous CPU uint8 tensor of at least the
    tensor's bytes) and returns a view of it."""

    def load(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor: ...


class SourceDefaults:
    """The fallbacks of the optional abilities, for sources to inherit: no ability declared, a row range is a
    slice of the whole tensor, and releasing rows does nothing."""

    abilities = SourceAbilities()

    def load(self, key: str) -> torch.Tensor:  # pragma: no cover - every source defines its own
        raise NotImplementedError

    def load_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self.load(key)[start:stop]

    def release_rows(self, key: str, start: int = 0, stop: int | None = None) -> None:
        return None


class StateDictSource(SourceDefaults):
    """A TensorSource over an in-memory or memory-mapped state dict (e.g. from torch.load(mmap=True))."""

    abilities = SourceAbilities(reads_rows=True, releases_pages=True)

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], *, label: str, path: Path, records: RecordCheck | None = None
    ):
        self._tensors = tensors
        self.label = label
        self.path = Path(path)
        self._pages: MappedFilePages | Literal[False] | None = None  # False: not a file, nothing to release
        self._records = records  # a torch.save zip's CRC-32 checks: each tensor's record checked as it is read

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, key: str) -> TensorInfo:
        t = self._tensors[key]
        return TensorInfo(tuple(t.shape), dtypes.from_torch(t.dtype))

    def load(self, key: str) -> torch.Tensor:
        t = self._tensors[key]
        if self._records is not None:
            self._records.verify_tensor(key, t)
        return t

    def load_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        t = self._tensors[key]
        if self._records is not None:
            self._records.verify_tensor(key, t)  # the whole record once, before its first rows are used
        return t[start:stop]  # a view: memory-mapped rows are read only when used

    def release_rows(self, key: str, start: int = 0, stop: int | None = None) -> None:
        """Rows [start, stop) of ``key`` (default: all) are used: drop their pages from RSS if they live
        in the mapped checkpoint file (see mapped_pages)."""
        if self._pages is None:
            self._pages = MappedFilePages(self.path) if self.path.is_file() else False
        if self._pages:
            self._pages.release(self._tensors[key][start:stop])
