"""The shard split: which tensors go to which file, decided before anything is written, as plain data.

Format-neutral, like huggingface_hub's ``split_state_dict_into_shards_factory``: sizes and order
decide the groups, the output format only names the files (``ShardNaming``).
"""

from __future__ import annotations

from collections.abc import Sequence

from .types import PlannedTensor, ShardNaming, ShardPlan

__all__ = ["split_shards"]


def split_shards(tensors: Sequence[PlannedTensor], max_bytes: int, naming: ShardNaming) -> tuple[ShardPlan, ...]:
    """Tensors in plan order, cut into files of at most ``max_bytes`` (a tensor larger than that has a file of
    its own), named by the output format's ``naming``."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    return tuple(
        ShardPlan(naming.shard_file(i + 1, n), tuple(t.name for t in g), sum(t.nbytes for t in g))
        for i, g in enumerate(groups)
    )
