"""Safetensors, the output format: HF's shard names and index, each shard streamed header first.

The streaming itself (header from the plan, tensor bytes as they come, direct IO where the
filesystem allows) is ``safetensors_stream.py``; this module is the ``ShardWriter`` over it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..formats import SAFETENSORS_INDEX, SAFETENSORS_SHARDS
from ..plan.types import ShardNaming, ShardPlan
from ..read.tensor_source import TensorInfo
from .safetensors_stream import StreamedShard, StreamEntry
from .stage_times import StageTimes

SHARD_METADATA = {"format": "pt"}  # what transformers' save_pretrained writes; from_pretrained accepts it


class SafetensorsWriter:
    """The ``ShardWriter`` for safetensors (``model-00001-of-00002.safetensors`` + ``model.safetensors.index.json``)."""

    naming = ShardNaming(shard_pattern=SAFETENSORS_SHARDS, index_file=SAFETENSORS_INDEX)

    def open_shard(
        self,
        path: Path,
        tensors: Sequence[tuple[str, TensorInfo]],
        *,
        digest: Any = None,
        times: StageTimes | None = None,
    ) -> StreamedShard:
        return StreamedShard(
            path,
            [StreamEntry(name, info) for name, info in tensors],
            metadata=SHARD_METADATA,
            digest=digest,
            times=times,
        )

    def index_document(self, shards: Sequence[ShardPlan], total_bytes: int) -> dict[str, Any]:
        weight_map = {name: shard.filename for shard in shards for name in shard.tensors}
        return {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}


SAFETENSORS = SafetensorsWriter()

__all__ = ["SAFETENSORS", "SafetensorsWriter", "SHARD_METADATA"]
