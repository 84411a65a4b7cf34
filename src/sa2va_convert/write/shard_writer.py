"""The seam for output formats: what the writer needs from a format to write the planned shards.

The plan's shard split is format-neutral plain data (``plan.shards``: which tensors go to which
file, named by the format's ``ShardNaming``); a format writes one shard at a time from tensors
handed over in order (several shards may be open at once), and says what its index file holds. Safetensors
(``safetensors_writer.py``) is the one implementation; another output format is one new module
beside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from ..plan.types import ShardNaming, ShardPlan
from ..read.tensor_source import TensorInfo
from .stage_times import StageTimes


class ShardSink(Protocol):
    """One shard file being written, tensors in its planned order."""

    def write(self, name: str, t: torch.Tensor | Iterable[torch.Tensor]) -> Any:
        """Write the next planned tensor, whole or as consecutive row blocks."""
        ...

    def close(self) -> int:
        """Every planned tensor is written: finish the file (on disk, fsync'ed) and return its bytes."""
        ...

    def abort(self) -> None:
        """Give the file's resources back after an error (the caller removes the partial folder)."""
        ...


class ShardWriter(Protocol):
    """One output format."""

    naming: ShardNaming

    def open_shard(
        self,
        path: Path,
        tensors: Sequence[tuple[str, TensorInfo]],
        *,
        digest: Any = None,
        times: StageTimes | None = None,
    ) -> ShardSink:
        """Start writing ``tensors`` (name, planned shape and dtype) to ``path``, in that order. ``digest``
        (a hashlib object) sees exactly the bytes written; ``times`` receives the writer's seconds
        (``stage_times``). Several shards may be open at once."""
        ...

    def index_document(self, shards: Sequence[ShardPlan], total_bytes: int) -> dict[str, Any]:
        """The index file's content (``naming.index_file``): which shard holds each tensor."""
        ...


__all__ = ["ShardSink", "ShardWriter"]
