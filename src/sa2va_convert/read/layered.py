"""Compose weight sources: rename one, or lay several side by side as one base.

The original Sa2VA recipe has no single base folder: the MLLM comes from a raw
InternVL2.5 folder and SAM2 from ``sam2_hiera_large.pt`` under SAM2's own
names. Wrapping them as one TensorSource lets the planner treat that case like
any other base.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from ..errors import InputError, PlanError
from .safe_pickle import safe_torch_load
from .tensor_source import SourceAbilities, SourceDefaults, StateDictSource, TensorInfo, TensorSource

# A composed source hands row reads and releases to the source that holds the tensor (which falls back where
# it cannot): it declares both, as it always did, but never reads into a caller's buffer.
_PASSED_THROUGH = SourceAbilities(reads_rows=True, releases_pages=True)


class RenamedSource(SourceDefaults):
    """Another source's tensors under new names (a bijection, checked)."""

    abilities = _PASSED_THROUGH

    def __init__(self, inner: TensorSource, rename: Callable[[str], str], *, label: str | None = None):
        self.inner = inner
        self.label = label or inner.label
        self.path = inner.path
        self._to_inner: dict[str, str] = {}
        for key in inner.keys():
            new = rename(key)
            if new in self._to_inner:
                raise PlanError(
                    f"two tensors are renamed to {new!r}: {self._to_inner[new]!r} and {key!r}",
                    path=str(inner.path),
                    hint="fix the keymap's sam2 rename rules",
                )
            self._to_inner[new] = key

    def keys(self) -> Iterable[str]:
        return self._to_inner.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._to_inner

    def info(self, key: str) -> TensorInfo:
        return self.inner.info(self._to_inner[key])

    def load(self, key: str) -> torch.Tensor:
        return self.inner.load(self._to_inner[key])

    def load_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self.inner.load_rows(self._to_inner[key], start, stop)

    def release_rows(self, key: str, start: int = 0, stop: int | None = None) -> None:
        self.inner.release_rows(self._to_inner[key], start, stop)


class UnionSource(SourceDefaults):
    """Several sources with disjoint key sets, seen as one (label and path of the first)."""

    abilities = _PASSED_THROUGH

    def __init__(self, sources: Sequence[TensorSource], *, label: str = "base"):
        self.sources = list(sources)
        self.label = label
        self.path = self.sources[0].path
        self._owner: dict[str, TensorSource] = {}
        for src in self.sources:
            for key in src.keys():
                if key in self._owner:
                    raise PlanError(
                        f"tensor {key!r} is provided by both {self._owner[key].path} and {src.path}",
                        path=str(src.path),
                        hint="pass sources whose weights do not overlap",
                    )
                self._owner[key] = src

    def keys(self) -> Iterable[str]:
        return self._owner.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._owner

    def info(self, key: str) -> TensorInfo:
        return self._owner[key].info(key)

    def load(self, key: str) -> torch.Tensor:
        return self._owner[key].load(key)

    def load_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._owner[key].load_rows(key, start, stop)

    def release_rows(self, key: str, start: int = 0, stop: int | None = None) -> None:
        self._owner[key].release_rows(key, start, stop)


def open_sam2_checkpoint(path: str | Path, *, allow_globals: Sequence[str] = ()) -> StateDictSource:
    """The original SAM2 release file: ``{'model': state_dict}`` under SAM2's own names."""
    path = Path(path)
    loaded = safe_torch_load(path, allow_globals=allow_globals)
    obj = loaded.obj
    sd = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(
            "not a SAM2 checkpoint (expected {'model': state_dict} as in sam2_hiera_large.pt)",
            path=path,
            hint="pass the original sam2_hiera_large.pt from the SAM2 release",
        )
    return StateDictSource(sd, label="sam2", path=path, records=loaded.records)
