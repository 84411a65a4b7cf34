"""Provenance written into the output: a model card for people, a JSON report for machines.

A converted folder travels far from the training run; the card answers "what
is this, where did it come from, did the fine-tune actually land" without the
original files at hand.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .. import __version__

if TYPE_CHECKING:  # pragma: no cover
    from ..api import ConversionResult
    from ..plan.planner import ConversionPlan


def _report_dict(plan: "ConversionPlan", result: "ConversionResult") -> dict[str, Any]:
    meta = plan.checkpoint_meta or {}
    return {
        "tool": "sa2va-convert", "tool_version": __version__,
        "source": {
            "checkpoint": plan.checkpoint, "checkpoint_sha256": result.checkpoint_sha256,
            "iteration": meta.get("iter"), "epoch": meta.get("epoch"),
            "experiment_name": meta.get("experiment_name"),
            "base": plan.base, "pretrained": plan.pretrained,
        },
        "keymap": {"name": plan.keymap, "source": plan.keymap_source, "family": plan.family,
                   "codebase": plan.codebase},
        "dtype": plan.dtype_policy, "template": plan.template, "vocab_rows": plan.vocab_rows,
        "tokenizer_additions": plan.tokenizer_additions.to_dict(),
        "lora": {
            "alpha": plan.lora.alpha, "alpha_source": plan.lora.alpha_source, "rslora": plan.lora.rslora,
            "rslora_source": plan.lora.rslora_source, "ranks": list(plan.lora.ranks), "pairs": plan.lora.pairs,
            "scales": sorted({plan.lora.scale_for(r) for r in plan.lora.ranks}),
        } if plan.lora else None,
        "lora_deltas": result.transform.to_dict() if result.transform else None,
        "tensors": {"count": len(plan.tensors), "bytes": plan.tensor_bytes, "by_origin": plan.counts()},
        "shards": [s.filename for s in plan.shards],
        "dropped": list(plan.dropped), "allowed_unused": list(plan.allowed_unused),
        "warnings": list(plan.warnings),
    }


def conversion_report(plan: "ConversionPlan", result: "ConversionResult", *,
                      shard_sha256: dict[str, str] | None = None) -> str:
    """JSON provenance; ``shard_sha256`` lets ``verify`` detect bit rot that still decodes as numbers."""
    report = _report_dict(plan, result)
    if shard_sha256:
        report["shard_sha256"] = dict(sorted(shard_sha256.items()))
    return json.dumps(report, indent=2, sort_keys=True) + "\n"


def model_card(plan: "ConversionPlan", result: "ConversionResult") -> str:
    r = _report_dict(plan, result)
    src = r["source"]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [sa2va, referring-segmentation, sa2va-convert]",
        "---",
        "",
        f"# Sa2VA fine-tune ({plan.family})",
        "",
        "Converted from a Sa2VA training checkpoint by "
        f"[sa2va-convert](https://pypi.org/project/sa2va-convert/) {__version__}.",
        "",
        "## Provenance",
        "",
        f"- checkpoint: `{src['checkpoint']}`",
        f"- checkpoint sha256: `{src['checkpoint_sha256']}`",
        f"- iteration: {src['iteration']}  (experiment: {src['experiment_name']})",
        f"- base folder: `{src['base']}`",
    ]
    if src["pretrained"]:
        lines.append(f"- pretrained weights: `{src['pretrained']}`")
    lines += [
        f"- keymap: `{plan.keymap}` ({plan.keymap_source})",
        f"- dtype: {plan.dtype_policy}; template: `{plan.template}`; vocabulary: {plan.vocab_rows} tokens",
    ]
    if r["lora"]:
        lo = r["lora"]
        lines.append(f"- LoRA: {lo['pairs']} pairs, rank {', '.join(map(str, lo['ranks']))}, alpha {lo['alpha']:g} "
                     f"({lo['alpha_source']}), rsLoRA {lo['rslora']}, scale {', '.join(f'{s:g}' for s in lo['scales'])}")
    if r["tokenizer_additions"]:
        lines.append("- tokens added: " + ", ".join(f"`{t['token']}`={t['id']}" for t in r["tokenizer_additions"]))
    deltas = r["lora_deltas"]
    if deltas and deltas["groups"]:
        lines += ["", "## LoRA update size (|B·A·scale| / |W|)", "", "| module | tensors | mean | max | all-zero B |",
                  "|---|---|---|---|---|"]
        for g, s in deltas["groups"].items():
            lines.append(f"| {g} | {s['tensors']} | {s['mean_relative_delta']:.3g} | {s['max_relative_delta']:.3g} "
                         f"| {s['zero_b']} |")
    if plan.warnings:
        lines += ["", "## Notes", ""] + [f"- {w}" for w in plan.warnings]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModel, AutoTokenizer",
        "model = AutoModel.from_pretrained(PATH, trust_remote_code=True, torch_dtype='auto').eval()",
        "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
        "out = model.predict_forward(image=image, text='<image>Please segment the object.', tokenizer=tokenizer)",
        "```",
        "",
        "Machine-readable details: `conversion_report.json`.",
        "",
    ]
    return "\n".join(lines)
