"""Will the model fit? Host RAM checked before the model process loads anything.

A model that cannot fit is refused in a second, with the numbers, instead of after minutes of
loading or by the kernel's OOM killer (a child killed by signal 9 says nothing). Only the
safetensors headers are read: the tensors' shapes and dtypes give the bytes they load in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import VerifyEnvironmentError
from ..formats import weight_files
from ..machine import available_ram
from .failure import memory_hint

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_LOAD_OVERHEAD = 1.15  # loader bookkeeping, a shard's worth of mapped pages, activations
_PROCESS_BASE = 1 << 30  # torch + transformers + the remote code, imported


def estimate_load_ram(folder: Path, load_dtype: str | None = None) -> int:
    """Host RAM the model process needs to load ``folder``: its tensors in the dtype they load in, plus
    the loader's overhead and the imported libraries. Read from the safetensors headers only."""
    from ..read.safetensors_header import read_safetensors_header

    files = weight_files(folder)
    load_bytes = _DTYPE_BYTES.get({"fp32": "F32", "fp16": "F16", "bf16": "BF16"}.get(load_dtype or "", ""), 0)
    total = 0
    for name in files:
        for key, entry in read_safetensors_header(folder / name).items():
            if key == "__metadata__":
                continue
            n = 1
            for d in entry["shape"]:
                n *= int(d)
            size = _DTYPE_BYTES.get(entry["dtype"], 4)
            total += n * (load_bytes if load_bytes and entry["dtype"] in ("F32", "F16", "BF16") else size)
    return int(total * _LOAD_OVERHEAD) + _PROCESS_BASE


def check_fits(folder: Path, device: str, what: str = "round trip") -> dict[str, Any]:
    """Refuse before loading when the model cannot fit in host RAM (the child loads on the CPU
    first, then moves to the GPU, unless several GPUs take it with device_map). An adapter folder is
    sized by its recorded base (the adapter itself is small beside it)."""
    from ..read.adapter_folder import find_base, is_adapter_folder, read_record

    if is_adapter_folder(folder):
        folder = find_base(Path(folder), read_record(Path(folder)))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype = config.get("dtype") or config.get("torch_dtype")
    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(str(dtype))
    need = estimate_load_ram(folder, short)
    have, source = available_ram()
    info = {"estimated_bytes": need, "available_bytes": have, "available_from": source}
    if have is not None and need > have:
        gib = 1 << 30
        raise VerifyEnvironmentError(
            f"the {what} needs about {need / gib:.1f} GiB of RAM to load this model ({device}) but only "
            f"{have / gib:.1f} GiB is available ({source})",
            path=folder,
            hint=memory_hint(what),
        )
    return info


__all__ = ["check_fits", "estimate_load_ram"]
