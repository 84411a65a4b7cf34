"""Provenance written into the output: a model card for people, a JSON report for machines.

A converted folder travels far from the training run; the card answers "what
is this, where did it come from, did the fine-tune actually land" without the
original files at hand.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from ..plan.types import ConversionPlan


CHECKSUM_KEY = "shard_sha256"  # the report's {shard: sha256}, what `verify` compares the shards with

# Where the card points people for the tool: the project's README until a package page exists.
PROJECT_README = "the sa2va-convert README (README.md in the project's repository)"
PIPELINE_TAG = "image-text-to-text"  # what the released Sa2VA cards declare
TAGS = ("sa2va", "referring-segmentation", "sa2va-convert")
_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")


def _absolute(path: str | None) -> str | None:
    """Provenance paths are absolute: the card travels away from the directory the tool ran in."""
    return os.path.abspath(path) if path else None  # normalises "..", keeps the user's symlinks


def base_card_metadata(base: str | Path) -> dict[str, Any]:
    """The YAML front matter of the base folder's README.md, or {} (absent, unreadable, not a mapping)."""
    try:
        text = (Path(base) / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_repo_id(base: str | Path, card: dict[str, Any] | None = None) -> str | None:
    """The Hub repo id of the base folder when it can be known: its HF cache path
    (``models--ORG--NAME/snapshots/REV``), else a ``repo_id``/``model_id`` its own card declares."""
    m = _CACHE_SNAPSHOT.search(Path(base).absolute().as_posix())
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    card = base_card_metadata(base) if card is None else card
    for key in ("repo_id", "model_id"):
        value = card.get(key)
        if isinstance(value, str) and value.count("/") == 1:
            return value
    return None


def front_matter(plan: ConversionPlan) -> dict[str, Any]:
    """Hub metadata: ``base_model`` (the Hub builds its model tree from it), ``license`` (the base's)."""
    card = base_card_metadata(plan.base)
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": PIPELINE_TAG, "tags": list(TAGS)}
    repo = base_repo_id(plan.base, card)
    if repo:
        meta["base_model"] = repo
        meta["base_model_relation"] = "finetune"
    for key in ("license", "license_name", "license_link"):
        if card.get(key):
            meta[key] = card[key]
    return meta


def _report_dict(
    plan: ConversionPlan, checkpoint_sha256: str | None, lora_deltas: dict[str, Any] | None
) -> dict[str, Any]:
    meta = plan.checkpoint_meta or {}
    return {
        "tool": "sa2va-convert",
        "tool_version": __version__,
        "source": {
            "checkpoint": _absolute(plan.checkpoint),
            "checkpoint_sha256": checkpoint_sha256,
            "iteration": meta.get("iter"),
            "epoch": meta.get("epoch"),
            "experiment_name": meta.get("experiment_name"),
            "base": _absolute(plan.base),
            "pretrained": _absolute(plan.pretrained),
        },
        "keymap": {"name": plan.keymap, "source": plan.keymap_source, "family": plan.family, "codebase": plan.codebase},
        "dtype": plan.dtype_policy,
        "template": plan.template,
        "vocab_rows": plan.vocab_rows,
        "tokenizer_additions": plan.tokenizer_additions.to_dict(),
        "lora": {
            "alpha": plan.lora.alpha,
            "alpha_source": plan.lora.alpha_source,
            "rslora": plan.lora.rslora,
            "rslora_source": plan.lora.rslora_source,
            "ranks": list(plan.lora.ranks),
            "pairs": plan.lora.pairs,
            "scales": sorted({plan.lora.scale_for(r) for r in plan.lora.ranks}),
        }
        if plan.lora
        else None,
        "lora_deltas": lora_deltas,
        "tensors": {"count": len(plan.tensors), "bytes": plan.tensor_bytes, "by_origin": plan.counts()},
        "shards": [s.filename for s in plan.shards],
        "dropped": list(plan.dropped),
        "allowed_unused": list(plan.allowed_unused),
        "warnings": list(plan.warnings),
    }


def conversion_report(
    plan: ConversionPlan,
    *,
    checkpoint_sha256: str | None,
    lora_deltas: dict[str, Any] | None,
    shard_sha256: dict[str, str] | None = None,
    recipe: dict[str, Any] | None = None,
) -> str:
    """JSON provenance; ``shard_sha256`` lets ``verify`` detect bit rot that still decodes as numbers;
    ``recipe`` (``sa2va_convert.recipe``) is what ``--all`` compares before it skips a finished folder.

    Takes plain data (the checkpoint's sha256, ``TransformReport.to_dict()``), not the API's result
    object, so the write stage knows nothing of the layer that drives it."""
    report = _report_dict(plan, checkpoint_sha256, lora_deltas)
    if shard_sha256:
        report[CHECKSUM_KEY] = dict(sorted(shard_sha256.items()))
    if recipe is not None:
        report["recipe"] = recipe
    return json.dumps(report, indent=2, sort_keys=True) + "\n"


def model_card(plan: ConversionPlan, *, checkpoint_sha256: str | None, lora_deltas: dict[str, Any] | None) -> str:
    """README.md of the output: Hub front matter, provenance, LoRA update sizes, how to load it."""
    r = _report_dict(plan, checkpoint_sha256, lora_deltas)
    src = r["source"]
    meta = yaml.safe_dump(front_matter(plan), sort_keys=False, allow_unicode=True).strip()
    lines = [
        "---",
        meta,
        "---",
        "",
        f"# Sa2VA fine-tune ({plan.family})",
        "",
        f"Converted from a Sa2VA training checkpoint by sa2va-convert {__version__} (see {PROJECT_README}).",
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
        lines.append(
            f"- LoRA: {lo['pairs']} pairs, rank {', '.join(map(str, lo['ranks']))}, alpha {lo['alpha']:g} "
            f"({lo['alpha_source']}), rsLoRA {lo['rslora']}, scale {', '.join(f'{s:g}' for s in lo['scales'])}"
        )
    if r["tokenizer_additions"]:
        lines.append("- tokens added: " + ", ".join(f"`{t['token']}`={t['id']}" for t in r["tokenizer_additions"]))
    deltas = r["lora_deltas"]
    if deltas and deltas["groups"]:
        lines += [
            "",
            "## LoRA update size (|B·A·scale| / |W|)",
            "",
            "| module | tensors | mean | max | all-zero B |",
            "|---|---|---|---|---|",
        ]
        for g, s in deltas["groups"].items():
            lines.append(
                f"| {g} | {s['tensors']} | {s['mean_relative_delta']:.3g} | {s['max_relative_delta']:.3g} "
                f"| {s['zero_b']} |"
            )
    if plan.warnings:
        lines += ["", "## Notes", ""] + [f"- {w}" for w in plan.warnings]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModel, AutoTokenizer",
        "model = AutoModel.from_pretrained(PATH, trust_remote_code=True, dtype='auto').eval()",
        "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
        "out = model.predict_forward(image=image, text='<image>Please segment the object.', tokenizer=tokenizer)",
        "```",
        "",
        "Machine-readable details: `conversion_report.json`.",
        "",
    ]
    return "\n".join(lines)
