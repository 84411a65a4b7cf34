"""The original Sa2VA recipe: a raw InternVL2.5 folder + SAM2's release file + a Sa2VA code folder.

Sa2VA v1 was trained from raw InternVL2.5 and ``sam2_hiera_large.pt``; users
who followed that recipe have no Sa2VA base folder of their own. The output's
config is the InternVL one (its sizes are the fine-tune's) with the Sa2VA
fields taken from ``--code-from`` (any Sa2VA folder of the family, possibly of
another size), and the key set is checked against that folder's index with
layer numbers ignored, so every weight of the Sa2VA architecture is known to
come from some source.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, PlanError
from ..formats import SAFETENSORS_INDEX
from ..read.folder_files import list_model_files
from .planner import ConversionPlan

# Size-specific sub-configs always come from the raw base: they describe the fine-tuned model.
_SIZED = ("llm_config", "vision_config", "text_config")


@dataclass
class CodeFolder:
    path: Path
    config: dict
    files: list[str]
    weight_keys: list[str] | None


def read_code_folder(path: str | Path) -> CodeFolder:
    root = Path(path)
    if not root.is_dir():
        raise InputError(
            "--code-from must be a Sa2VA HF folder",
            path=root,
            hint="pass any Sa2VA model folder of this family (only its code and config are used)",
        )
    files = list_model_files(root, role="--code-from folder")  # its .py files are copied into OUT
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(
            f"cannot read config.json ({e})", path=root / "config.json", hint="pass a complete Sa2VA model folder"
        ) from None
    keys = None
    index = root / SAFETENSORS_INDEX
    if index.is_file():
        try:
            keys = sorted(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        except (OSError, ValueError, KeyError) as e:
            raise InputError(
                f"cannot read the index ({e})", path=index, hint="pass a complete Sa2VA model folder"
            ) from None
    return CodeFolder(root, config, files, keys)


def merge_raw_config(raw: dict, code: dict) -> dict:
    """InternVL's config (sizes of the fine-tune) + the Sa2VA-only fields of the code folder."""
    out = copy.deepcopy(raw)
    for key, value in code.items():
        if key in _SIZED or key in out:
            continue
        out[key] = copy.deepcopy(value)
    for key in ("model_type", "architectures", "auto_map"):
        if key in code:
            out[key] = copy.deepcopy(code[key])
    return out


def key_family(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".N", name)


def check_key_families(plan: ConversionPlan, code_keys: list[str], code_path: str) -> None:
    """The output must have the same kinds of weights as a real Sa2VA folder (layer counts aside)."""
    ours = {key_family(t.name) for t in plan.tensors}
    theirs = {key_family(k) for k in code_keys}
    missing, extra = sorted(theirs - ours), sorted(ours - theirs)
    if missing or extra:
        raise PlanError(
            f"the assembled model differs from the Sa2VA architecture of --code-from: missing {missing[:5]}"
            f"{f' (+{len(missing) - 5} more)' if len(missing) > 5 else ''}, unexpected {extra[:5]}",
            path=code_path,
            hint="check --sam2 is the SAM2 release file and --code-from is a Sa2VA folder of the same family",
        )
