"""The file names of a HuggingFace folder's weights, spelled once for every stage.

Reading a base, planning, writing, checking a folder and sizing the model process all need to
know which files hold the weights: the index (``model.safetensors.index.json``, whose
``weight_map`` names each tensor's shard) or, for an unsharded model, the one file
(``model.safetensors``). These names are transformers' (``SAFE_WEIGHTS_INDEX_NAME`` and
``SAFE_WEIGHTS_NAME``), so they sit on the ground floor, below ``read/`` and ``write/``; the output
format's ``ShardNaming`` (``write/safetensors_writer.py``) is built from them. The model process
(``runner/child.py``) cannot import this module: it is handed the list of files instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_SHARDS = "model-{index:05d}-of-{count:05d}.safetensors"  # str.format() with index (from 1) and count
# --format adapter: PEFT's own file names (peft.utils.constants CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME) and our
# record of the base the adapter belongs to (read/adapter_folder.py).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_RECORD = "sa2va_adapter.json"


def index_weight_map(folder: Path) -> dict[str, str] | None:
    """tensor name -> shard file from the folder's index; None when the folder has no index.

    Only the index is read (``read/hf_folder.py`` is the careful reader of a whole folder); one
    that cannot be read, or has no ``weight_map``, is an InputError naming it."""
    index = Path(folder) / SAFETENSORS_INDEX
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"cannot read the index ({type(e).__name__}: {e})", path=index, hint="restore or re-write the folder"
        ) from None
    return {str(k): str(v) for k, v in weight_map.items()}


def weight_files(folder: Path) -> list[str]:
    """The folder's weight files, by name: the shards its index names (sorted, once each), else the one file."""
    weight_map = index_weight_map(folder)
    return sorted(set(weight_map.values())) if weight_map is not None else [SAFETENSORS_SINGLE]


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_RECORD",
    "ADAPTER_WEIGHTS",
    "SAFETENSORS_INDEX",
    "SAFETENSORS_SINGLE",
    "SAFETENSORS_SHARDS",
    "index_weight_map",
    "weight_files",
]
