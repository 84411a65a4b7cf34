"""An independent fp32 reference of what a conversion must produce.

Computed the plain way, with none of the converter's code: load the whole
base folder, ``torch.load`` the (fixture) checkpoint, turn training names into
HF names with hand-written string rules from FORMATS.md §3-4, overlay full
tensors, then add ``scale * B @ A`` in fp32. It loads everything into memory
and unpickles with ``weights_only=False``: fine for our own tiny fixtures,
never for user files. Conversion tests compare every output tensor with it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..formats import weight_files

SAM2_PREFIX = "grounding_encoder.sam2_model."
_LORA_A = ".lora_A.default.weight"
_LORA_B = ".lora_B.default.weight"


def training_name_to_hf(key: str) -> str:
    """HF name of a training key, PEFT decorations removed (LoRA suffixes kept).

    InternVL family: strip ``mllm.model.`` and the PEFT wrapper
    ``language_model.base_model.model.`` -> ``language_model.``. Qwen-VL
    family: PEFT wraps the whole VL model, ``mllm.model.base_model.model.`` ->
    ``model.``. Then ``modules_to_save.default`` and ``base_layer`` vanish and
    SAM2's ``.gamma`` becomes ``.g_weight``.
    """
    name = key
    if name.startswith("mllm.model.base_model.model."):
        name = "model." + name[len("mllm.model.base_model.model.") :]
    elif name.startswith("mllm.model."):
        name = name[len("mllm.model.") :]
        if name.startswith("language_model.base_model.model."):
            name = "language_model." + name[len("language_model.base_model.model.") :]
    name = name.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
    if name.endswith(".gamma"):
        name = name[: -len(".gamma")] + ".g_weight"
    return name


def load_checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a fixture checkpoint (any of our formats, or a DeepSpeed dir)."""
    path = Path(path)
    if path.is_dir():
        path = path / "mp_rank_00_model_states.pt"
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("module"), dict):
        obj = obj["module"]
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_base_folder(base_dir: str | Path) -> OrderedDict[str, torch.Tensor]:
    """Every tensor of a safetensors folder, in index order (shards in order)."""
    base = Path(base_dir)
    files = weight_files(base)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for f in files:
        with safe_open(str(base / f), framework="pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


def reference_output(
    base_dir: str | Path,
    checkpoint_path: str | Path,
    *,
    scale: float,
    sam2_checkpoint: str | Path | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, fp32 tensor) of the converted model.

    Value of T = checkpoint full tensor for T, else SAM2 .pt tensor (only with
    ``sam2_checkpoint``, for a raw InternVL base), else base tensor; plus
    ``scale * B @ A`` when a LoRA pair targets T. Base keys come first in base
    order, then keys only the checkpoint / SAM2 file supply (e.g.
    ``text_hidden_fcs`` on a raw InternVL base), sorted.
    """
    base = load_base_folder(base_dir)
    full: dict[str, torch.Tensor] = {}
    lora_a: dict[str, torch.Tensor] = {}
    lora_b: dict[str, torch.Tensor] = {}
    for key, t in load_checkpoint_state_dict(checkpoint_path).items():
        name = training_name_to_hf(key)
        if name.endswith(_LORA_A):
            lora_a[name[: -len(_LORA_A)] + ".weight"] = t
        elif name.endswith(_LORA_B):
            lora_b[name[: -len(_LORA_B)] + ".weight"] = t
        else:
            full[name] = t
    if set(lora_a) != set(lora_b):
        raise ValueError(f"unpaired LoRA factors: {sorted(set(lora_a) ^ set(lora_b))[:5]}")

    sam2: dict[str, torch.Tensor] = {}
    if sam2_checkpoint is not None:
        sd = torch.load(sam2_checkpoint, map_location="cpu", weights_only=False)["model"]
        sam2 = {training_name_to_hf(SAM2_PREFIX + k): v for k, v in sd.items()}

    names = list(base) + sorted((set(full) | set(sam2)) - set(base))
    missing = set(lora_a) - set(names)
    if missing:
        raise ValueError(f"LoRA targets with no tensor: {sorted(missing)[:5]}")
    for name in names:
        src = full.get(name)
        if src is None:
            src = sam2.get(name)
        if src is None:
            src = base[name]
        value = src.to(torch.float32).clone()
        if name in lora_a:
            value += scale * (lora_b[name].to(torch.float32) @ lora_a[name].to(torch.float32))
        yield name, value
