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

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_SHARDS = "model-{index:05d}-of-{count:05d}.safetensors"  # str.format() with index (from 1) and count


def index_weight_map(folder: Path) -> dict[str, str] | None:
    """tensor name -> shard file from the folder's index; None when the folder has no index.

    Plain reads with no checks of their own (``read/hf_folder.py`` is the careful reader of an
    input folder): a broken index raises what ``json`` or the missing key raises."""
    index = Path(folder) / SAFETENSORS_INDEX
    if not index.is_file():
        return None
    weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    return weight_map


def weight_files(folder: Path) -> list[str]:
    """The folder's weight files, by name: the shards its index names (sorted, once each), else the one file."""
    weight_map = index_weight_map(folder)
    return sorted(set(weight_map.values())) if weight_map is not None else [SAFETENSORS_SINGLE]


__all__ = ["SAFETENSORS_INDEX", "SAFETENSORS_SINGLE", "SAFETENSORS_SHARDS", "index_weight_map", "weight_files"]
