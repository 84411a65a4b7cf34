"""The one interface every weight source (checkpoint, base folder, pretrained .pth) offers.

The planner needs names, shapes and dtypes without touching tensor bytes; the
writer needs one tensor at a time. Keeping those two needs behind a tiny
protocol lets a memory-mapped ``.pth``, a set of safetensors shards and a
DeepSpeed partition set all feed the same pipeline, and keeps peak memory at
about one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Protocol, runtime_checkable

import torch

from .. import dtypes
from .mapped_pages import MappedFilePages


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


@runtime_checkable
class TensorSource(Protocol):
    """A read-only, lazily loaded mapping of tensor names to tensors."""

    label: str  # "checkpoint", "base", "pretrained", ... (shown in plans and errors)
    path: Path

    def keys(self) -> Iterable[str]: ...

    def info(self, key: str) -> TensorInfo: ...

    def load(self, key: str) -> torch.Tensor:
        """Return the tensor; may be a view of a memory map: never modify it in place."""
        ...


class StateDictSource:
    """A TensorSource over an in-memory or memory-mapped state dict (e.g. from torch.load(mmap=True))."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, label: str, path: Path):
        self._tensors = tensors
        self.label = label
        self.path = Path(path)
        self._pages: MappedFilePages | bool | None = None

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
        return self._tensors[key]

    def load_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._tensors[key][start:stop]  # a view: memory-mapped rows are read only when used

    def release_rows(self, key: str, start: int = 0, stop: int | None = None) -> None:
        """Rows [start, stop) of ``key`` (default: all) are used: drop their pages from RSS if they live
        in the mapped checkpoint file (see mapped_pages)."""
        if self._pages is None:
            self._pages = MappedFilePages(self.path) if self.path.is_file() else False
        if self._pages:
            self._pages.release(self._tensors[key][start:stop])


def load_rows(src: TensorSource, key: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of ``key`` from any source: its own ``load_rows`` if it has one, else a slice."""
    own = getattr(src, "load_rows", None)
    return own(key, start, stop) if own is not None else src.load(key)[start:stop]


def release_rows(src: TensorSource, key: str, start: int = 0, stop: int | None = None) -> None:
    """Let ``src`` drop the memory rows [start, stop) of ``key`` hold, where it can (a no-op elsewhere)."""
    own = getattr(src, "release_rows", None)
    if own is not None:
        own(key, start, stop)
