"""Produce each planned output tensor: overlay, LoRA merge in fp32, one cast at the end.

This is the only stage that does arithmetic. It works on one tensor at a time
(what the writer asks for next), so its memory is bounded by the largest
tensor, not the model. It also watches the numbers: NaN/Inf in inputs or
results, fp16 overflow, and LoRA adapters whose B is all zero (an adapter that
never trained: the "converted model is just the base" report).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .. import dtypes
from ..errors import PlanError
from ..plan.planner import PlannedTensor
from ..read.tensor_source import TensorSource

FP16_MAX = 65504.0
_CHUNK_ELEMS = 16 * 1024 * 1024  # finite checks walk big tensors in slices to bound memory


@dataclass
class DeltaStats:
    """Per-tensor size of the LoRA update relative to the weight it lands on."""

    name: str
    group: str
    rank: int
    base_norm: float
    delta_norm: float
    zero_b: bool

    @property
    def relative(self) -> float:
        return self.delta_norm / self.base_norm if self.base_norm > 0 else float("inf")


@dataclass
class TransformReport:
    deltas: list[DeltaStats] = field(default_factory=list)

    def groups(self) -> dict[str, dict]:
        """Aggregate per module kind (q_proj, wqkv, output, ...): mean/max relative delta, zero-B count."""
        out: dict[str, dict] = {}
        for d in self.deltas:
            g = out.setdefault(d.group, {"tensors": 0, "mean_relative_delta": 0.0, "max_relative_delta": 0.0,
                                         "zero_b": 0})
            g["tensors"] += 1
            g["mean_relative_delta"] += d.relative
            g["max_relative_delta"] = max(g["max_relative_delta"], d.relative)
            g["zero_b"] += int(d.zero_b)
        for g in out.values():
            g["mean_relative_delta"] /= max(g["tensors"], 1)
        return dict(sorted(out.items()))

    @property
    def zero_b(self) -> list[str]:
        return [d.name for d in self.deltas if d.zero_b]

    def to_dict(self) -> dict:
        return {"lora_pairs": len(self.deltas), "zero_b_count": len(self.zero_b), "zero_b": self.zero_b[:20],
                "groups": self.groups()}


def module_group(name: str) -> str:
    """``language_model.model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj``."""
    stem = re.sub(r"\.(weight|bias)$", "", name)
    parts = re.split(r"\.\d+\.", stem)
    return parts[-1] if len(parts) > 1 else stem.rsplit(".", 1)[-1]


def _check_finite(t: torch.Tensor, what: str, path: str) -> None:
    if not t.is_floating_point():
        return
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK_ELEMS):
        part = flat[start:start + _CHUNK_ELEMS]
        if not torch.isfinite(part).all():
            bad = int((~torch.isfinite(part)).sum())
            raise PlanError(f"{what} contains {bad} NaN/Inf value(s)", path=path,
                            hint="the training diverged or the file is damaged; use an earlier checkpoint")


def _check_fp16(t: torch.Tensor, name: str, path: str) -> None:
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK_ELEMS):
        part = flat[start:start + _CHUNK_ELEMS]
        m = float(part.abs().max()) if part.numel() else 0.0
        if m > FP16_MAX:
            raise PlanError(f"{name} has values up to {m:.4g}, beyond fp16's {FP16_MAX:g}", path=path,
                            hint="use --dtype bf16 (the training dtype) or --dtype fp32")


class TensorProducer:
    """Callable the writer uses: PlannedTensor -> the exact tensor to store."""

    def __init__(self, sources: Mapping[str, TensorSource], *, merge_device: str = "cpu",
                 check_finite: bool = True):
        self.sources = dict(sources)
        self.merge_device = torch.device(merge_device)
        self.check_finite = check_finite
        self.report = TransformReport()

    def _load(self, layer: str, key: str) -> torch.Tensor:
        return self.sources[layer].load(key)

    def __call__(self, pt: PlannedTensor) -> torch.Tensor:
        src = self.sources[pt.value.layer]
        value = self._load(pt.value.layer, pt.value.key)
        if self.check_finite and pt.value.layer != "base":
            _check_finite(value, f"{pt.value.layer} tensor {pt.value.key}", str(src.path))
        target = dtypes.to_torch(pt.dtype)
        if pt.lora is None:
            out = value if value.dtype == target else value.to(target)
        else:
            out = self._merge(pt, value, target)
        if pt.dtype == "fp16" and value.dtype != torch.float16 and pt.lora is None:
            _check_fp16(value, pt.name, str(src.path))
        if tuple(out.shape) != pt.shape:
            raise PlanError(f"{pt.name}: produced shape {list(out.shape)}, planned {list(pt.shape)}",
                            path=str(src.path), hint="this is a bug; please report it")
        return out

    def _merge(self, pt: PlannedTensor, value: torch.Tensor, target: torch.dtype) -> torch.Tensor:
        assert pt.lora is not None
        ckpt = self.sources[pt.lora.a.layer]
        dev = self.merge_device
        a = self._load(pt.lora.a.layer, pt.lora.a.key).to(dev, torch.float32)
        b = self._load(pt.lora.b.layer, pt.lora.b.key).to(dev, torch.float32)
        if self.check_finite:
            _check_finite(a, f"LoRA tensor {pt.lora.a.key}", str(ckpt.path))
            _check_finite(b, f"LoRA tensor {pt.lora.b.key}", str(ckpt.path))
        w = value.to(dev, torch.float32, copy=True)
        base_norm = float(torch.linalg.vector_norm(w))
        delta = b @ a
        delta.mul_(pt.lora.scale)
        delta_norm = float(torch.linalg.vector_norm(delta))
        w.add_(delta)
        del delta, a
        zero_b = not bool(b.any())
        del b
        self.report.deltas.append(DeltaStats(pt.name, module_group(pt.name), pt.lora.rank, base_norm, delta_norm, zero_b))
        if self.check_finite:
            _check_finite(w, f"merged tensor {pt.name}", str(ckpt.path))
        if pt.dtype == "fp16":
            _check_fp16(w, pt.name, str(ckpt.path))
        out = w.to(target)
        del w
        return out.cpu() if out.device.type != "cpu" else out
