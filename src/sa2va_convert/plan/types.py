"""The plan's data types: plain, frozen where they can be, no behaviour beyond describing.

The plan stage produces them (``planner.build_plan``); transform, write and verify read them.
They live apart from the planner so that a stage needing a type does not import the planner.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .._version import __version__
from ..read.tensor_source import TensorInfo
from .vocab import TokenAddition

Layer = Literal["base", "pretrained", "checkpoint"]
"""The source layers an output tensor can come from (``TensorSource.label``), last wins: a checkpoint
tensor over a pretrained one over the base's."""

__all__ = [
    "Layer",
    "SourceRef",
    "LoraRef",
    "PlannedTensor",
    "ShardNaming",
    "ShardPlan",
    "LoraSettingsUsed",
    "PlanOptions",
    "ConversionPlan",
]


@dataclass(frozen=True)
class SourceRef:
    """Where one input tensor is: which layer of sources, under which key, with what shape and dtype."""

    layer: Layer
    key: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class LoraRef:
    """A LoRA pair merged onto a tensor: ``W + scale * (B @ A)``."""

    a: SourceRef
    b: SourceRef
    rank: int
    scale: float


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its name, shape and dtype, the tensor it starts from and the LoRA laid on it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    value: SourceRef
    lora: LoraRef | None = None

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.shape, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    @property
    def origin(self) -> str:
        return self.value.layer + ("+lora" if self.lora else "")


@dataclass(frozen=True)
class ShardNaming:
    """How an output format names its files. The format decides (``write.safetensors_writer``), the plan
    only fills the names in, so the plan knows no format."""

    shard_pattern: str  # str.format() with ``index`` (from 1) and ``count``
    index_file: str  # the file mapping every tensor to its shard

    def shard_file(self, index: int, count: int) -> str:
        return self.shard_pattern.format(index=index, count=count)


@dataclass(frozen=True)
class ShardPlan:
    """One output file and the tensors it holds, in order."""

    filename: str
    tensors: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True)
class LoraSettingsUsed:
    """The LoRA alpha and rsLoRA choice the merge uses, and where each came from."""

    alpha: float
    alpha_source: str
    rslora: bool
    rslora_source: str
    ranks: tuple[int, ...]
    pairs: int

    def scale_for(self, rank: int) -> float:
        return self.alpha / (math.sqrt(rank) if self.rslora else rank)


@dataclass(frozen=True)
class PlanOptions:
    """What the user chose that shapes the plan (``ConvertOptions.plan_options()``)."""

    dtype: str = "bf16"  # bf16 | fp16 | fp32 | auto
    max_shard_bytes: int = 5 * 10**9
    lora_alpha: float | None = None
    rslora: bool | None = None
    override_lora_config: bool = False  # --lora-alpha/--rslora win over a different embedded value
    allow_unused: tuple[str, ...] = ()
    template: str | None = None


@dataclass
class ConversionPlan:
    """The whole output, decided before any tensor byte is read; ``to_dict()`` is what --dry-run prints."""

    checkpoint: str
    base: str
    pretrained: str | None
    out: str
    keymap: str
    keymap_source: str
    family: str
    codebase: str
    dtype_policy: str
    template: str
    tensors: tuple[PlannedTensor, ...]
    shards: tuple[ShardPlan, ...]
    config: dict[str, Any]
    vocab_rows: int
    tokenizer_additions: TokenAddition
    copy_files: tuple[tuple[str, str], ...]  # (relative name in OUT, absolute source path)
    lora: LoraSettingsUsed | None
    dropped: tuple[str, ...]
    allowed_unused: tuple[str, ...]
    warnings: tuple[str, ...]
    peak_ram_bytes: int  # filled in by the write stage's estimate (write.peak_ram), 0 until then
    disk_bytes: int
    tool_version: str = __version__
    window_bytes: int = 0  # the writer's in-flight window, chosen with the estimate (write.peak_ram); 0: default
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def by_name(self) -> dict[str, PlannedTensor]:
        return {t.name: t for t in self.tensors}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.origin] = out.get(t.origin, 0) + 1
        return out

    def to_dict(self, *, tensors: bool = True) -> dict[str, Any]:
        d = {
            "checkpoint": self.checkpoint,
            "base": self.base,
            "pretrained": self.pretrained,
            "out": self.out,
            "keymap": self.keymap,
            "keymap_source": self.keymap_source,
            "family": self.family,
            "codebase": self.codebase,
            "dtype": self.dtype_policy,
            "template": self.template,
            "vocab_rows": self.vocab_rows,
            "tokenizer_additions": self.tokenizer_additions.to_dict(),
            "lora": asdict(self.lora) if self.lora else None,
            "counts": self.counts(),
            "tensor_count": len(self.tensors),
            "tensor_bytes": self.tensor_bytes,
            "shards": [{"file": s.filename, "tensors": len(s.tensors), "bytes": s.nbytes} for s in self.shards],
            "copy_files": [rel for rel, _ in self.copy_files],
            "dropped": list(self.dropped),
            "allowed_unused": list(self.allowed_unused),
            "warnings": list(self.warnings),
            "estimates": {
                "peak_ram_bytes": self.peak_ram_bytes,
                "disk_bytes": self.disk_bytes,
                "window_bytes": self.window_bytes,
            },
            "tool_version": self.tool_version,
        }
        if tensors:
            d["tensors"] = [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "dtype": t.dtype,
                    "origin": t.origin,
                    "source": f"{t.value.layer}:{t.value.key}",
                    **(
                        {"lora": {"a": t.lora.a.key, "b": t.lora.b.key, "rank": t.lora.rank, "scale": t.lora.scale}}
                        if t.lora
                        else {}
                    ),
                }
                for t in self.tensors
            ]
        return d
