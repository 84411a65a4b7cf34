"""Hand-made DeepSpeed folders with plain ``torch.save`` (no DeepSpeed needed).

The real-library fixtures (``_deepspeed_writer.py``) cover world size 2 only,
need DeepSpeed and take ~25 s. These cover other world sizes, sizes large
enough to measure memory, and run everywhere. They follow DeepSpeed 0.19's
layout (ZeRO-1/2: groups padded to 2 x world size, equal partitions, tail
padding stripped from the saved partitions; ZeRO-3: each parameter cut into
``ceil(numel / world)`` pieces per rank) -- the real-library tests are what
prove that these rules match DeepSpeed.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch


def zero2_folder(folder: Path, groups: list[dict[str, torch.Tensor]], world: int, *,
                 module_dtype: torch.dtype = torch.bfloat16) -> None:
    """ZeRO-2 folder: ``groups`` are the trainable fp32 masters per param group, in flattening order."""
    folder.mkdir(parents=True)
    flats = []
    for group in groups:
        flat = torch.cat([t.reshape(-1) for t in group.values()])
        align = 2 * world
        padded = torch.zeros(math.ceil(flat.numel() / align) * align)
        padded[: flat.numel()] = flat
        flats.append((padded, flat.numel()))
    for rank in range(world):
        parts = []
        for padded, used in flats:
            size = padded.numel() // world
            lo, hi = rank * size, min((rank + 1) * size, used)
            parts.append(padded[lo:max(lo, hi)].clone())
        torch.save({"optimizer_state_dict": {
            "zero_stage": 2, "partition_count": [world] * len(groups),
            "single_partition_of_fp32_groups": parts,
            "param_alignment_paddings": [[0] * len(g) for g in groups],
        }, "ds_version": "0.19.8"}, folder / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    module = OrderedDict((k, v.to(module_dtype)) for g in groups for k, v in g.items())
    torch.save(_model_states(module, [OrderedDict((k, v.shape) for k, v in g.items()) for g in groups], world),
               folder / "mp_rank_00_model_states.pt")


def zero3_folder(folder: Path, groups: list[dict[str, torch.Tensor]], world: int) -> None:
    """ZeRO-3 folder: per rank, each parameter's ``ceil(numel/world)`` piece, zero-padded at the end."""
    folder.mkdir(parents=True)
    per_rank: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for group in groups:
        pieces: list[list[torch.Tensor]] = [[] for _ in range(world)]
        for t in group.values():
            flat = t.reshape(-1)
            part = math.ceil(flat.numel() / world)
            padded = torch.zeros(part * world)
            padded[: flat.numel()] = flat
            for rank in range(world):
                pieces[rank].append(padded[rank * part:(rank + 1) * part])
        for rank in range(world):
            per_rank[rank].append(torch.cat(pieces[rank]))
    shapes = [OrderedDict((k, v.shape) for k, v in g.items()) for g in groups]
    empty = OrderedDict((k, torch.empty(0, dtype=torch.bfloat16)) for g in groups for k in g)
    for rank in range(world):
        torch.save({"optimizer_state_dict": {"zero_stage": 3, "partition_count": world,
                                             "fp32_flat_groups": per_rank[rank]}},
                   folder / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        torch.save(_model_states(empty, shapes, world), folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")


def _model_states(module: dict, shapes: list, world: int) -> dict:
    return {"module": module, "buffer_names": [], "optimizer": None, "param_shapes": shapes,
            "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None,
            "global_steps": 10, "dp_world_size": world, "mp_world_size": 1, "ds_version": "0.19.8",
            "meta": {"iter": 10, "mmengine": "0.10.7"}}


def random_groups(sizes: list[list[tuple[int, ...]]], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {f"mllm.model.mlp1.{gi}.{i}.weight": torch.randn(*shape, generator=g) for i, shape in enumerate(group)}
        for gi, group in enumerate(sizes)
    ]
