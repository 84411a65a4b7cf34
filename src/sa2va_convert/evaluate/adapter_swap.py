"""Which models of one ``eval`` can share one model process: adapters recorded on the same base.

``convert --all --format adapter`` writes one small adapter per checkpoint, every one on the same base.
Evaluated one process each, every adapter loads the whole base again (at Sa2VA-4B, 7 GiB read and
moved to the GPU per checkpoint). Adapters whose records name the same base (the same folder, with the
same sha256 of every weight file) are instead evaluated in one process that loads the base once and,
per adapter, merges it, evaluates its images and puts the base back exactly (``runner/child.py``,
``run_eval_adapters``). This module only decides the groups, from the adapters' records and the base's
files (no torch); ``run.py`` runs them.

An adapter stays in a process of its own when merging it casts the whole model (its conversion's
``--dtype`` is not the dtype the base loads in, and eval's ``--dtype`` does not override it): undoing
that cast bit for bit would need a second copy of the whole model, so it is not attempted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConvertError
from ..formats import weight_files
from ..machine import available_ram
from ..read.adapter_folder import is_adapter_folder, resolve_adapter
from ..read.safetensors_header import read_safetensors_header
from ..runner.memory import estimate_load_ram

_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}
_HEADER_SHORT = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64"}


class _Model(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def folder(self) -> Path: ...


@dataclass
class SwapPlan:
    """Groups of two or more models (in the order given) that share a process, and why others do not."""

    groups: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def group_of(self, name: str) -> list[Any] | None:
        return next((g for g in self.groups if any(m.name == name for m in g)), None)


def base_load_dtype(base: Path) -> str:
    """The dtype the model process loads ``base`` in when eval gets no ``--dtype``: config ``torch_dtype``
    (or ``dtype``), else the shards' most common float dtype; the same rule as the child's
    ``config_dtype_name`` (``runner/child.py``), which cannot import this package."""
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    for key in ("torch_dtype", "dtype"):
        value = _SHORT.get(str(config.get(key)).replace("torch.", ""), str(config.get(key)))
        if value in _HEADER_SHORT.values():
            return value
    counts: dict[str, int] = {}
    for name in weight_files(base):
        for key, entry in read_safetensors_header(base / name).items():
            short = _HEADER_SHORT.get(entry.get("dtype", "")) if key != "__metadata__" else None
            if short:
                counts[short] = counts.get(short, 0) + 1
    return max(counts, key=lambda d: counts[d]) if counts else "fp32"


def plan_swaps(models: Sequence[_Model], dtype: str | None) -> SwapPlan:
    """Group the adapter folders among ``models`` by base (resolved path and every weight file's sha256).

    A base is read here once per group (config and safetensors headers), after ``resolve_adapter`` has
    checked its files against the record, as loading it would. A model that cannot be grouped (not an
    adapter, a record that does not resolve, a cast) is evaluated in a process of its own, as before:
    whatever is wrong with it is then reported by that process, in the usual words."""
    plan = SwapPlan()
    by_base: dict[tuple[str, tuple[tuple[str, str], ...]], list[Any]] = {}
    cast: list[str] = []
    load_dtypes: dict[str, str] = {}
    for model in models:
        if not is_adapter_folder(model.folder):
            continue
        try:
            found = resolve_adapter(model.folder)
            if found is None:
                continue
            base_key = str(found.base.resolve())
            if base_key not in load_dtypes:
                load_dtypes[base_key] = base_load_dtype(found.base)
        except (ConvertError, OSError, ValueError):
            continue
        if dtype is None and found.dtype in ("fp32", "fp16", "bf16") and found.dtype != load_dtypes[base_key]:
            cast.append(f"{model.name} ({load_dtypes[base_key]} -> {found.dtype})")
            continue
        digests = tuple(sorted((str(k), str(v)) for k, v in found.record["base"]["weight_files"].items()))
        by_base.setdefault((base_key, digests), []).append(model)
    for (base_key, _), members in by_base.items():
        if len(members) < 2:
            continue
        have, _source = available_ram()
        need = 2 * estimate_load_ram(Path(base_key))  # the base, and at most its size again in kept copies
        if have is not None and need > have:
            plan.notes.append(
                f"adapters on {base_key} evaluated one process each: keeping the base's changed tensors for "
                f"restoring it could need {need / 2**30:.1f} GiB of RAM, {have / 2**30:.1f} GiB is available"
            )
            continue
        plan.groups.append(members)
    if cast:
        plan.notes.append(
            "adapters whose merge casts the whole model were evaluated one process each (a cast cannot be undone "
            "bit for bit without a second copy of the model; eval --dtype avoids the cast): " + ", ".join(cast)
        )
    return plan


__all__ = ["SwapPlan", "base_load_dtype", "plan_swaps"]
