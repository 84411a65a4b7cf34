"""What is inside a training checkpoint, for ``sa2va-convert inspect``.

Reads the checkpoint the same safe, lazy way conversion does (only headers and
metadata are touched, apart from dtype counts), groups tensors the way users
think about a Sa2VA fine-tune, and says where each LoRA setting came from.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import api_errors
from .plan.family import detect_family
from .plan.keymap import Keymap, load_all_builtin, resolve_keymap
from .read.checkpoint import open_checkpoint

_GROUPS: tuple[tuple[str, re.Pattern], ...] = (
    ("embeddings / head", re.compile(r"(embed_tokens|tok_embeddings|lm_head|(^|\.)output)\.weight$")),
    ("mlp1 (projector)", re.compile(r"(^|\.)mlp1\.")),
    ("SAM2 mask decoder", re.compile(r"sam_mask_decoder\.")),
    # the SAM3 tracker (kept under SAM2's attribute name sam2_model): a full dump carries these
    ("SAM3 tracker (ViT backbone)", re.compile(r"^grounding_encoder\.sam2_model\.backbone\.vision_backbone\.")),
    ("SAM3 tracker (memory)", re.compile(r"^grounding_encoder\.sam2_model\.(maskmem_backbone|transformer)\.")),
    ("SAM2 (other)", re.compile(r"^grounding_encoder\.")),
    ("text_hidden_fcs", re.compile(r"^text_hidden_fcs\.")),
    ("vision encoder", re.compile(r"(^|\.)(vision_model|visual)\.")),
    ("LLM (full weights)", re.compile(r"(^|\.)(language_model|model\.layers|model\.norm)\.")),
)


@dataclass
class GroupRow:
    group: str
    tensors: int = 0
    bytes: int = 0
    detail: str = ""

    def to_dict(self) -> dict:
        return {"group": self.group, "tensors": self.tensors, "bytes": self.bytes, "detail": self.detail}


@dataclass
class InspectReport:
    path: str
    kind: str
    meta: dict[str, Any]
    tensor_count: int
    total_bytes: int
    dtypes: dict[str, int]
    groups: list[GroupRow]
    lora: dict[str, Any] | None
    config: dict[str, Any] | None
    family: dict[str, Any] | None
    unrecognised: list[str] = field(default_factory=list)
    placeholders: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": True,
            "path": self.path,
            "kind": self.kind,
            "meta": self.meta,
            "tensor_count": self.tensor_count,
            "total_bytes": self.total_bytes,
            "dtypes": self.dtypes,
            "groups": [g.to_dict() for g in self.groups],
            "lora": self.lora,
            "config": self.config,
            "family": self.family,
            "unrecognised": self.unrecognised,
            "placeholders": self.placeholders,
        }


def _plain_meta(meta: dict) -> dict:
    keep = ("iter", "epoch", "seed", "time", "experiment_name", "mmengine_version", "mmengine")
    return {k: meta[k] for k in keep if k in meta}


def _config_summary(cfg) -> dict[str, Any] | None:
    if cfg is None:
        return None
    lora = getattr(cfg, "lora", None)
    out = {
        "path": cfg.path,
        "pretrained_pth": cfg.pretrained_pth,
        "template": cfg.template,
        "special_tokens": cfg.special_tokens,
        "lora": None
        if lora is None
        else {
            "r": lora.r,
            "lora_alpha": lora.lora_alpha,
            "use_rslora": lora.use_rslora,
            "modules_to_save": lora.modules_to_save,
            "target_modules": lora.target_modules,
        },
        "sources": dict(getattr(cfg, "sources", {}) or {}),
    }
    err = getattr(cfg, "error", None)
    if err:
        out["error"] = err
    return out


@api_errors
def inspect_checkpoint(
    path: str | Path, *, keymap: str | None = None, allow_globals: Sequence[str] = ()
) -> InspectReport:
    """What ``sa2va-convert inspect`` shows. ``path`` may be a work_dir: its newest checkpoint, as convert picks it."""
    from .read.work_dir import resolve_checkpoint

    ckpt = open_checkpoint(resolve_checkpoint(Path(path)), allow_globals=tuple(allow_globals))
    keys = sorted(ckpt.weights.keys())
    config_text = ckpt.config.text if ckpt.config is not None else None
    km: Keymap | None
    family: dict[str, Any]
    if keymap:
        km = resolve_keymap(keymap)
        family = {
            "keymap": km.name,
            "family": km.family_label,
            "codebase": km.codebase,
            "note": "keymap given by the user",
        }
    else:
        detection = detect_family(keys, load_all_builtin(), config_text)
        km = detection.chosen
        family = detection.to_dict()

    dtype_counts: dict[str, int] = {}
    rows: dict[str, GroupRow] = {}
    lora_modules: dict[str, int] = {}
    ranks: set[int] = set()
    unrecognised: list[str] = []
    total = 0
    for key in keys:
        info = ckpt.weights.info(key)
        total += info.nbytes
        dtype_counts[info.dtype] = dtype_counts.get(info.dtype, 0) + 1
        role, name = km.map_key(key) if km else ("full", key)
        if role in ("lora_a", "lora_b"):
            group = "LoRA adapters"
            if role == "lora_a":
                kind = re.sub(r"\.weight$", "", name).rsplit(".", 1)[-1]
                lora_modules[kind] = lora_modules.get(kind, 0) + 1
                ranks.add(info.shape[0])
        elif role == "drop":
            group = "dropped by keymap"
        else:
            found = next((g for g, p in _GROUPS if p.search(name)), None)
            if found is None:
                found = "unrecognised"
                unrecognised.append(key)
            group = found
        row = rows.setdefault(group, GroupRow(group))
        row.tensors += 1
        row.bytes += info.nbytes
    if "LoRA adapters" in rows:
        rows["LoRA adapters"].detail = ", ".join(f"{k}×{v}" for k, v in sorted(lora_modules.items()))

    lora = None
    if ranks:
        cfg_lora = getattr(ckpt.config, "lora", None) if ckpt.config else None
        alpha = getattr(cfg_lora, "lora_alpha", None)
        rslora = getattr(cfg_lora, "use_rslora", None)
        r = min(ranks)
        scale = None
        if alpha is not None:
            scale = alpha / (r**0.5 if rslora else r)
        lora = {
            "pairs": sum(lora_modules.values()),
            "ranks": sorted(ranks),
            "rank_source": "tensor shapes",
            "alpha": alpha,
            "alpha_source": "embedded config" if alpha is not None else "unknown (pass --lora-alpha)",
            "rslora": bool(rslora) if rslora is not None else False,
            "rslora_source": "embedded config" if rslora is not None else "PEFT default",
            "scale": scale,
            "modules": lora_modules,
        }
    order = ["LoRA adapters"] + [g for g, _ in _GROUPS] + ["dropped by keymap", "unrecognised"]
    groups = [rows[g] for g in order if g in rows]
    return InspectReport(
        path=str(ckpt.path),
        kind=ckpt.kind,
        meta=_plain_meta(ckpt.meta),
        tensor_count=len(keys),
        total_bytes=total,
        dtypes=dtype_counts,
        groups=groups,
        lora=lora,
        config=_config_summary(ckpt.config),
        family=family,
        unrecognised=unrecognised[:50],
        placeholders=dict(ckpt.placeholders),
    )
