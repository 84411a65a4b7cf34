"""The seam for output formats: what the writer needs from a format to write the planned shards.

The plan's shard split is format-neutral plain data (``plan.shards``: which tensors go to which
file, named by the format's ``ShardNaming``); a format writes one shard at a time from tensors
handed over in order, and says what its index file holds. Safetensors
(``safetensors_writer.py``) is the one implementation; another output format is one new module
beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch

from ..plan.types import ShardNaming, ShardPlan
from ..read.tensor_source import TensorInfo
from .stage_times import StageTimes

class ShardWriter(Protocol):
    """One output format."""

    naming: ShardNaming

    def write_shard(self, path: Path, tensors: Sequence[tuple[str, TensorInfo]],
                    get: Callable[[str], torch.Tensor | Iterable[torch.Tensor]], *,
                    on_tensor: Callable[[str], None], digest: Any = None, times: StageTimes | None = None) -> int:
        """Write ``tensors`` (name, planned shape and dtype), in order, to ``path``; ``get(name)`` hands each
        over (whole, or as row blocks), ``on_tensor(name)`` is called once it is written. ``digest`` (a
        hashlib object) sees exactly the bytes written. Returns the bytes written; the file is on disk
        (fsync'ed) at return. ``times`` receives the writer's seconds (``stage_times``)."""
        ...

    def index_document(self, shards: Sequence[ShardPlan], total_bytes: int) -> dict[str, Any]:
        """The index file's content (``naming.index_file``): which shard holds each tensor."""
        ...


__all__ = ["ShardWriter"]
