"""One pickled checkpoint file, already safely unpickled, as a :class:`TrainingCheckpoint`.

An mmengine ``iter_N.pth`` (``state_dict`` + ``meta``), a DeepSpeed model-states file
(``module``) and a bare state dict differ only in where the tensors sit inside the top-level
dict; this module finds them, checks every entry is a dense named tensor of a supported dtype,
and turns mmengine's meta into plain data. The DeepSpeed directory reader builds its
checkpoint from the same pieces (``plain_meta``); ``checkpoint.py`` chooses which reader runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .. import dtypes
from ..errors import InputError
from .embedded_config import EmbeddedConfig, parse_embedded_config
from .safe_pickle import SafeLoad, to_plain
from .tensor_source import StateDictSource, TensorSource

__all__ = ["CheckpointKind", "TrainingCheckpoint", "checkpoint_from_loaded", "plain_meta"]

CheckpointKind = Literal["mmengine", "state_dict", "deepspeed-model-states", "deepspeed-dir"]
_PROBLEMS_SHOWN = 5


@dataclass
class TrainingCheckpoint:
    path: Path  # what the user passed
    kind: CheckpointKind
    weights: TensorSource  # label "checkpoint"; memory-mapped tensors under training names
    meta: dict  # plain data: iter, epoch, seed, time, experiment_name, mmengine_version, cfg, ...
    config: EmbeddedConfig | None
    placeholders: dict[str, int]  # "module.Name" of inert objects met while unpickling -> count
    top_level_keys: list[str] = field(default_factory=list)


def checkpoint_from_loaded(path: Path, loaded: SafeLoad, *, kind: CheckpointKind | None = None) -> TrainingCheckpoint:
    """Build a TrainingCheckpoint from one safely loaded file (also used by the DeepSpeed reader)."""
    top = loaded.obj
    if not isinstance(top, Mapping):
        raise InputError(
            f"holds a {_type_name(top)}, not a checkpoint (expected the dict torch.save writes for a model)",
            path=path,
            hint="pass the iter_N.pth from the training work_dir",
        )
    found_kind, state_dict = _find_state_dict(path, top)
    weights = StateDictSource(
        _validated_tensors(path, state_dict), label="checkpoint", path=path, records=loaded.records
    )
    meta = plain_meta(top) if found_kind != "state_dict" else {}
    cfg_text = meta.get("cfg")
    config = parse_embedded_config(cfg_text) if isinstance(cfg_text, str) else None
    return TrainingCheckpoint(
        path=path,
        kind=kind or found_kind,
        weights=weights,
        meta=meta,
        config=config,
        placeholders=dict(loaded.placeholders),
        top_level_keys=[k if isinstance(k, str) else repr(k) for k in top],
    )


def _find_state_dict(path: Path, top: Mapping) -> tuple[CheckpointKind, Mapping]:
    if "state_dict" in top:
        return "mmengine", _require_mapping(path, top["state_dict"], "state_dict")
    if "module" in top:
        return "deepspeed-model-states", _require_mapping(path, top["module"], "module")
    if any(isinstance(v, torch.Tensor) for v in top.values()):
        return "state_dict", top
    if "optimizer_state_dict" in top:
        raise InputError(
            "is a DeepSpeed optimizer-states file, not the model weights",
            path=path,
            hint="pass the checkpoint directory that contains it (or its mp_rank_00_model_states.pt)",
        )
    keys = ", ".join(repr(k) for k in list(top)[:8]) or "none"
    raise InputError(
        f"holds a dict without tensors (top-level keys: {keys}); it is not a model checkpoint",
        path=path,
        hint="pass the iter_N.pth from the training work_dir (its work_dir/last_checkpoint names it)",
    )


def _require_mapping(path: Path, value: Any, key: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise InputError(
            f"has '{key}' but it is a {_type_name(value)}, not a dict of tensors",
            path=path,
            hint="the file is not a checkpoint this tool understands; pass the iter_N.pth from the work_dir",
        )
    if not value:
        raise InputError(
            f"has an empty '{key}' (no weights were saved)",
            path=path,
            hint="check the training run's checkpoint settings; use another checkpoint",
        )
    return value


def _validated_tensors(path: Path, state_dict: Mapping) -> dict[str, torch.Tensor]:
    """Plain tensors keyed by str; every problem listed at once so one fix round is enough."""
    tensors: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, value in state_dict.items():
        shown = repr(key) if isinstance(key, str) else f"{key!r} ({_type_name(key)})"
        if not isinstance(key, str):
            problems.append(f"key {shown} is not a string")
        elif not isinstance(value, torch.Tensor):
            problems.append(f"{shown} is a {_type_name(value)}, not a tensor")
        elif value.layout != torch.strided:
            problems.append(f"{shown} is a {value.layout} tensor; only dense tensors are supported")
        elif not dtypes.is_supported_torch(value.dtype):
            problems.append(f"{shown} has dtype {str(value.dtype).removeprefix('torch.')}, which is not supported")
        elif _overlapping(value):
            problems.append(
                f"{shown} claims shape {tuple(value.shape)} but its storage holds fewer elements (an expanded view)"
            )
        else:
            # Tensor.detach on the class, not the instance: a Parameter pickled with state can
            # carry instance attributes; the detached view shares the mapped storage, drops them.
            tensors[key] = torch.Tensor.detach(value)
    if problems:
        more = f" (and {len(problems) - _PROBLEMS_SHOWN} more)" if len(problems) > _PROBLEMS_SHOWN else ""
        raise InputError(
            f"the state dict has {len(problems)} entries that are not named tensors: "
            + "; ".join(problems[:_PROBLEMS_SHOWN])
            + more,
            path=path,
            hint="the weights must be a {name: tensor} dict as torch.save(model.state_dict()) writes it, "
            "with float (fp32/fp16/bf16/fp64), integer or bool dense tensors",
        )
    return tensors


def _overlapping(t: torch.Tensor) -> bool:
    """Zero/overlapping strides let a few stored bytes pose as a huge tensor; the writer
    would then materialise all of it. Training never saves such views."""
    if t.numel() <= 1 or t.is_contiguous():
        return False
    return t.numel() * t.element_size() > t.untyped_storage().nbytes()


def plain_meta(top: Mapping) -> dict:
    """mmengine's meta as plain data, plus the runtime info the message hub kept."""
    raw = top.get("meta")
    meta = to_plain(raw) if isinstance(raw, Mapping) else {}
    if not isinstance(meta, dict):
        meta = {}
    # the classic Runner writes 'mmengine_version', the DeepSpeed strategy writes 'mmengine'
    version = meta.get("mmengine_version", meta.get("mmengine"))
    if isinstance(version, str):
        meta["mmengine_version"] = version
    hub = top.get("message_hub")
    if isinstance(hub, Mapping) and isinstance(hub.get("runtime_info"), Mapping):
        meta["runtime_info"] = to_plain(hub["runtime_info"])
    return meta


def _type_name(value: Any) -> str:
    qualified = getattr(value, "qualified_name", None)
    if isinstance(qualified, str):
        return qualified
    return type(value).__name__
