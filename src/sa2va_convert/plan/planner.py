"""Build the conversion plan: every output tensor's name, shape, dtype and sources.

The plan is plain data decided before a single tensor byte is read, so that
``--dry-run`` can print it, tests can check it without tensors, and the writer
can execute it knowing every shard's header in advance. All the strictness
lives here: a plan that would produce a wrong folder is refused with the
reason, never written with a warning.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from .. import dtypes
from ..errors import PlanError
from ..read.embedded_config import EmbeddedConfig, LoraSettings
from ..read.tensor_source import TensorSource
from .keymap import Keymap, assign, lookup
from .shards import split_shards
from .types import (
    ConversionPlan,
    Layer,
    LoraRef,
    LoraSettingsUsed,
    PlannedTensor,
    PlanOptions,
    ShardNaming,
    SourceRef,
)
from .vocab import EDITED_TOKENIZER_FILES, TokenAddition, TokenizerState, plan_additions

WRITTEN_BY_THE_WRITER = (
    "config.json",
    "README.md",
    "conversion_report.json",
)  # never copied from the base; nor the index


# ------------------------------------------------------------------ helpers


def natural_key(name: str) -> list:
    """Sort layers.2 before layers.10, so shards and listings read in model order."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _ref(source: TensorSource, key: str) -> SourceRef:
    info = source.info(key)
    # the planner's sources are labelled with their layer: "base", "pretrained", "checkpoint" (conversion.py)
    return SourceRef(cast(Layer, source.label), key, info.shape, info.dtype)


@dataclass
class _Mapped:
    full: dict[str, SourceRef] = field(default_factory=dict)
    lora: dict[str, dict[str, SourceRef]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


def map_source(source: TensorSource, keymap: Keymap) -> _Mapped:
    """Classify and rename every key of a training-name source, refusing collisions."""
    out = _Mapped()
    for key in sorted(source.keys(), key=natural_key):
        role, hf = keymap.map_key(key)
        if role == "drop":
            out.dropped.append(key)
            continue
        ref = _ref(source, key)
        if role == "full":
            prev = out.full.get(hf)
            if prev is not None:
                raise PlanError(
                    f"two checkpoint keys map to one target {hf!r}: {prev.key!r} and {key!r}",
                    path=str(source.path),
                    hint=f"fix the keymap {keymap.source} so each target has one source",
                )
            out.full[hf] = ref
        else:
            slot = out.lora.setdefault(hf, {})
            part = "a" if role == "lora_a" else "b"
            if part in slot:
                raise PlanError(
                    f"two LoRA {part.upper()} tensors target {hf!r}: {slot[part].key!r} and {key!r}",
                    path=str(source.path),
                    hint=f"fix the keymap {keymap.source}",
                )
            slot[part] = ref
    for hf, slot in out.lora.items():
        if set(slot) != {"a", "b"}:
            have = next(iter(slot.values())).key
            raise PlanError(
                f"LoRA pair for {hf!r} is incomplete: only {have!r}",
                path=str(source.path),
                hint="the checkpoint is damaged or was written by a different PEFT layout",
            )
    return out


def _refuse_silent_override(
    what: str, flag: str, given: Any, embedded: Any, field: str, override: bool, ckpt_path: str
) -> None:
    """A flag documented as the fallback for a missing config value must not silently replace a
    different one: refuse and name both, unless the user says --override-lora-config."""
    if given is None or embedded is None or override:
        return
    same = (bool(given) == bool(embedded)) if isinstance(given, bool) else float(given) == float(embedded)
    if not same:
        raise PlanError(
            f"{what}: the checkpoint's training config says {field}={embedded!r} but {flag} gives {given!r}",
            path=ckpt_path,
            hint=f"drop {flag} to use the training config's value (it is only a fallback), or pass "
            "--override-lora-config if you really mean to merge with a different value",
        )


def _lora_settings(
    mapped: _Mapped, options: PlanOptions, cfg_lora: LoraSettings | None, ckpt_path: str, warnings: list[str]
) -> LoraSettingsUsed | None:
    if not mapped.lora:
        return None
    ranks = sorted({slot["a"].shape[0] for slot in mapped.lora.values()})
    cfg_alpha = getattr(cfg_lora, "lora_alpha", None) if cfg_lora is not None else None
    cfg_rslora = getattr(cfg_lora, "use_rslora", None) if cfg_lora is not None else None
    _refuse_silent_override(
        "LoRA alpha",
        "--lora-alpha",
        options.lora_alpha,
        cfg_alpha,
        "llm_lora.lora_alpha",
        options.override_lora_config,
        ckpt_path,
    )
    _refuse_silent_override(
        "rsLoRA",
        "--rslora/--no-rslora",
        options.rslora,
        cfg_rslora,
        "llm_lora.use_rslora",
        options.override_lora_config,
        ckpt_path,
    )
    if options.lora_alpha is not None and cfg_alpha is not None and float(cfg_alpha) == float(options.lora_alpha):
        alpha, alpha_src = float(cfg_alpha), "embedded config (llm_lora.lora_alpha), same as --lora-alpha"
    elif options.lora_alpha is not None:
        alpha, alpha_src = (
            float(options.lora_alpha),
            ("--lora-alpha (--override-lora-config)" if cfg_alpha is not None else "--lora-alpha"),
        )
    elif cfg_alpha is not None:
        alpha, alpha_src = float(cfg_alpha), "embedded config (llm_lora.lora_alpha)"
    else:
        raise PlanError(
            f"LoRA alpha is unknown: the checkpoint has {len(mapped.lora)} LoRA pairs "
            f"(rank {', '.join(map(str, ranks))}) but no readable training config with lora_alpha",
            path=ckpt_path,
            hint=f"pass --lora-alpha (upstream Sa2VA configs use alpha = 2*r, i.e. --lora-alpha {2 * ranks[0]})",
        )
    if options.rslora is not None:
        rslora, rs_src = bool(options.rslora), "--rslora/--no-rslora"
    elif cfg_lora is not None and getattr(cfg_lora, "use_rslora", None) is not None:
        rslora, rs_src = bool(cfg_lora.use_rslora), "embedded config (llm_lora.use_rslora)"
    else:
        rslora, rs_src = False, "PEFT default (use_rslora=False)"
    cfg_r = getattr(cfg_lora, "r", None) if cfg_lora is not None else None
    if cfg_r is not None and ranks != [int(cfg_r)]:
        warnings.append(
            f"config says LoRA r={cfg_r} but the tensors have rank {', '.join(map(str, ranks))}; "
            "the tensors' rank is used"
        )
    return LoraSettingsUsed(alpha, alpha_src, rslora, rs_src, tuple(ranks), len(mapped.lora))


def _out_dtype(policy: str, value: SourceRef, base_ref: SourceRef | None) -> str:
    if not dtypes.is_float(value.dtype):
        return value.dtype
    if policy == "auto":
        return base_ref.dtype if base_ref is not None else value.dtype
    return policy


def _shape_problems(name: str, value: SourceRef, base_ref: SourceRef | None, vocab_names: set[str]) -> str | None:
    if base_ref is None or value.shape == base_ref.shape:
        return None
    if name in vocab_names and len(value.shape) == 2 and value.shape[1:] == base_ref.shape[1:]:
        return None  # resized vocabulary: rows may differ, checked against the tokenizer
    return f"{name}: {value.layer} {list(value.shape)} vs base {list(base_ref.shape)}"


def _check_lora_shapes(name: str, target: tuple[int, ...], slot: dict[str, SourceRef]) -> str | None:
    a, b = slot["a"].shape, slot["b"].shape
    if len(a) != 2 or len(b) != 2 or len(target) != 2:
        return f"{name}: LoRA A {list(a)} / B {list(b)} cannot merge into {list(target)}"
    if a[0] != b[1] or b[0] != target[0] or a[1] != target[1]:
        return f"{name}: LoRA A {list(a)} / B {list(b)} do not fit weight {list(target)}"
    return None


def _raise_list(problems: list[str], what: str, path: str, hint: str) -> None:
    if problems:
        shown = "; ".join(problems[:10])
        more = f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""
        raise PlanError(f"{len(problems)} {what}: {shown}{more}", path=path, hint=hint)


# ------------------------------------------------------------------ the planner


def check_raw_base(base_config: dict, keymap: Keymap, base_path: str) -> None:
    if not keymap.supports_raw_base:
        raise PlanError(
            f"{keymap.name} has no raw-base recipe (--sam2/--code-from are for v1 fine-tunes of raw InternVL2.5)",
            path=base_path,
            hint="pass --base with the Sa2VA folder instead",
        )
    archs = base_config.get("architectures") or []
    if not set(archs) & set(keymap.raw_base_architectures):
        raise PlanError(
            f"--sam2/--code-from expect a raw {', '.join(keymap.raw_base_architectures)} folder as --base, "
            f"got {', '.join(archs) or 'no architectures'}",
            path=base_path,
            hint="pass the InternVL2.5 folder the fine-tune started from, or drop --sam2 for a Sa2VA base",
        )


def check_base(base_keys: Sequence[str], base_config: dict, keymap: Keymap, base_path: str) -> None:
    """Refuse a base that cannot be what the fine-tune was trained on (the v2 raw-model trap)."""
    missing = [p.pattern for p in keymap.require if not any(p.search(k) for k in base_keys)]
    archs = base_config.get("architectures") or []
    if missing:
        has_heads = any(k.startswith(("grounding_encoder.", "text_hidden_fcs.")) for k in base_keys)
        sam_or_fcs = not has_heads and any("grounding_encoder" in m or "text_hidden_fcs" in m for m in missing)
        why = (
            (
                "it has no SAM2 / text_hidden_fcs weights, so it is a raw InternVL/Qwen-VL model, not a Sa2VA model. "
                "The LoRA of a Sa2VA fine-tune was trained on top of the full Sa2VA weights; merging it onto the raw "
                "model gives a folder that loads and is wrong"
            )
            if sam_or_fcs
            else ("it is a different model family (a Sa2VA folder with another grounding encoder or MLLM?)")
        )
        raise PlanError(
            f"base folder does not fit {keymap.name}: no tensors match {', '.join(missing[:4])}; {why}",
            path=base_path,
            hint="pass --base with the Sa2VA HF folder the fine-tune started from "
            "(e.g. the released Sa2VA model of this family)",
        )
    if archs and not set(archs) & set(keymap.architectures):
        raise PlanError(
            f"base folder is a {', '.join(archs)} model but the checkpoint is {keymap.family_label} "
            f"({', '.join(keymap.architectures)})",
            path=base_path,
            hint="pass --base with a Sa2VA folder of the same family as the fine-tune",
        )


_DEFAULT_OPTIONS = PlanOptions()  # frozen: one shared default is safe


def build_plan(
    *,
    checkpoint: TensorSource,
    base: TensorSource,
    base_config: dict,
    base_files: Sequence[str] | Mapping[str, Path],
    tokenizer: TokenizerState,
    keymap: Keymap,
    out: Path,
    naming: ShardNaming,
    options: PlanOptions = _DEFAULT_OPTIONS,
    pretrained: TensorSource | None = None,
    embedded: EmbeddedConfig | None = None,
    checkpoint_meta: dict | None = None,
    raw_base: bool = False,
) -> ConversionPlan:
    """Decide the whole output; raises PlanError with the reason when it would be wrong.

    ``base_files`` maps each non-weight file to copy (relative name) to its
    source path; a plain list means "relative to the base folder".
    ``raw_base`` is the original Sa2VA recipe: ``base`` is a raw MLLM folder
    plus SAM2, and the keymap's ``raw_base.from_checkpoint`` parts come from
    the checkpoint alone. ``embedded`` is the training config found in the
    checkpoint (LoRA settings, special tokens, template), if any. ``naming`` is
    how the output format names its files (``ShardWriter.naming``).

    The steps, in the order their refusals are checked: the base fits; the checkpoint's keys
    are mapped to HF names; every one has a place; LoRA settings; each output tensor; the
    vocabulary; the tokenizer and template; then config, shards and files to copy.
    """
    warnings: list[str] = []
    ckpt_path, base_path = str(checkpoint.path), str(base.path)
    base_keys = list(base.keys())
    if not isinstance(base_files, Mapping):
        base_files = {f: Path(base.path) / f for f in base_files}
    _check_base_folder(base_keys, base_config, base_files, keymap, base_path, raw_base=raw_base)
    mapped = map_source(checkpoint, keymap)
    pre = map_source(pretrained, keymap) if pretrained is not None else None
    names = _output_names(base_keys, mapped, keymap, ckpt_path, raw_base=raw_base)
    if pretrained is not None and pre is not None and pre.lora:
        raise PlanError(
            "the --pretrained file holds LoRA tensors; it must hold full weights",
            path=str(pretrained.path),
            hint="pass the full-weights .pth (the config's pretrained_pth) or leave --pretrained out",
        )
    base_refs = {k: _ref(base, k) for k in base_keys}
    _add_untied_head(names, keymap, warnings)
    allowed = _check_every_tensor_has_a_place(names, [mapped, pre], options.allow_unused, ckpt_path)
    lora = _lora_settings(mapped, options, embedded.lora if embedded is not None else None, ckpt_path, warnings)
    planned = _plan_tensors(names, mapped, pre, base_refs, keymap, lora, options.dtype, ckpt_path, base_path)
    rows = _vocab_rows(planned, keymap, ckpt_path)
    special = embedded.special_tokens if embedded is not None else None
    additions = plan_additions(tokenizer, rows, special, where=ckpt_path)
    if additions.tokens:
        warnings.append("tokenizer grows by " + ", ".join(f"{t}={i}" for t, i in additions.tokens))
    template = _template(options, embedded, base_config, keymap, warnings)

    config = _output_config(base_config, keymap, rows, template, options.dtype)
    shards = split_shards(planned, options.max_shard_bytes, naming)
    copy_files = _files_to_copy(base_files, additions, naming)
    disk = sum(s.nbytes for s in shards) + 64 * 1024 * len(shards)
    return ConversionPlan(
        checkpoint=ckpt_path,
        base=base_path,
        pretrained=str(pretrained.path) if pretrained else None,
        out=str(out),
        keymap=keymap.name,
        keymap_source=keymap.source,
        family=keymap.family_label,
        codebase=keymap.codebase,
        dtype_policy=options.dtype,
        template=template,
        tensors=tuple(planned),
        shards=shards,
        config=config,
        vocab_rows=rows,
        tokenizer_additions=additions,
        copy_files=copy_files,
        lora=lora,
        dropped=tuple(mapped.dropped + (pre.dropped if pre else [])),
        allowed_unused=tuple(k for k, _ in allowed),
        warnings=tuple(warnings),
        peak_ram_bytes=0,  # the write stage estimates it (write.peak_ram), from constants the plan does not own
        disk_bytes=disk,
        checkpoint_meta=dict(checkpoint_meta or {}),
    )


# ------------------------------------------------------------------ the planner's steps


def _check_base_folder(
    base_keys: list[str],
    base_config: dict,
    base_files: Mapping[str, Path],
    keymap: Keymap,
    base_path: str,
    *,
    raw_base: bool,
) -> None:
    """The base is a model of the keymap's family and carries the remote code the output needs."""
    if not raw_base:  # a raw base's config was checked by check_raw_base before Sa2VA fields were merged in
        check_base(base_keys, base_config, keymap, base_path)
    missing_code = [f for f in keymap.remote_code if f not in base_files]
    if missing_code:
        raise PlanError(
            f"base folder lacks the remote-code file(s) {', '.join(missing_code)}",
            path=base_path,
            hint="copy them from the original Sa2VA model folder (the converter copies, never writes, model code)",
        )


def _output_names(base_keys: list[str], mapped: _Mapped, keymap: Keymap, ckpt_path: str, *, raw_base: bool) -> set[str]:
    """Every output tensor's name: the base's, plus (raw recipe) the parts only the checkpoint has."""
    names = set(base_keys)
    if raw_base:
        names |= {hf for hf in mapped.full if any(p.search(hf) for p in keymap.raw_base_from_checkpoint)}
        missing = [p.pattern for p in keymap.require if not any(p.search(n) for n in names)]
        if missing:
            raise PlanError(
                f"even with SAM2 and the checkpoint, no tensors match {', '.join(missing)}",
                path=ckpt_path,
                hint="pass the raw InternVL folder, --sam2 sam2_hiera_large.pt and the "
                "checkpoint of the same fine-tune",
            )
    return names


def _add_untied_head(names: set[str], keymap: Keymap, warnings: list[str]) -> None:
    """A tied base may store no head; the fine-tune's (or the embedding's) rows become an explicit head."""
    if keymap.vocab_head not in names:
        names.add(keymap.vocab_head)
        warnings.append(f"base stores no {keymap.vocab_head} (tied embeddings); writing it explicitly")


def _check_every_tensor_has_a_place(
    names: set[str], layers: Sequence[_Mapped | None], allow_unused: Sequence[str], ckpt_path: str
) -> list[tuple[str, str]]:
    """Refuse checkpoint tensors the output has no place for; returns the ones --allow-unused lets go."""
    allow = [re.compile(p) for p in allow_unused]
    unused: list[tuple[str, str]] = []
    allowed: list[tuple[str, str]] = []
    for layer_map in layers:
        if layer_map is None:
            continue
        for hf, ref in layer_map.full.items():
            if hf not in names:
                (allowed if any(p.search(ref.key) for p in allow) else unused).append((ref.key, hf))
        for hf, slot in layer_map.lora.items():
            if hf not in names:
                for ref in slot.values():
                    (allowed if any(p.search(ref.key) for p in allow) else unused).append((ref.key, hf))
    if unused:
        shown = ", ".join(f"{k} -> {h}" for k, h in unused[:5])
        more = f" (+{len(unused) - 5} more)" if len(unused) > 5 else ""
        raise PlanError(
            f"{len(unused)} checkpoint tensor(s) have no place in the base model: {shown}{more}",
            path=ckpt_path,
            hint="use the base the fine-tune started from, fix the keymap, "
            "or pass --allow-unused REGEX to drop them knowingly",
        )
    return allowed


def _plan_tensors(
    names: set[str],
    mapped: _Mapped,
    pre: _Mapped | None,
    base_refs: dict[str, SourceRef],
    keymap: Keymap,
    lora: LoraSettingsUsed | None,
    dtype_policy: str,
    ckpt_path: str,
    base_path: str,
) -> list[PlannedTensor]:
    """Each output tensor in model order: checkpoint over pretrained over base, LoRA laid on top."""
    vocab_names = {keymap.vocab_embedding, keymap.vocab_head}
    planned: list[PlannedTensor] = []
    shape_problems: list[str] = []
    for name in sorted(names, key=natural_key):
        base_ref = base_refs.get(name)
        value = mapped.full.get(name) or (pre.full.get(name) if pre else None) or base_ref
        if value is None:  # untied head with nothing to fill it: copy the embedding
            value = (
                mapped.full.get(keymap.vocab_embedding)
                or (pre.full.get(keymap.vocab_embedding) if pre else None)
                or base_refs.get(keymap.vocab_embedding)
            )
            if value is None:
                raise PlanError(f"nothing provides {name}", path=base_path, hint="pass a complete base folder")
        problem = _shape_problems(name, value, base_ref, vocab_names)
        if problem:
            shape_problems.append(problem)
        lref = None
        slot = mapped.lora.get(name)
        if slot is not None:
            problem = _check_lora_shapes(name, value.shape, slot)
            if problem:
                shape_problems.append(problem)
                continue
            assert lora is not None
            rank = slot["a"].shape[0]
            lref = LoraRef(slot["a"], slot["b"], rank, lora.scale_for(rank))
        planned.append(PlannedTensor(name, value.shape, _out_dtype(dtype_policy, value, base_ref), value, lref))
    _raise_list(
        shape_problems,
        "shape mismatch(es) between the checkpoint and the base",
        ckpt_path,
        "pass --base with the Sa2VA folder of the same size the fine-tune started from",
    )
    return planned


def _vocab_rows(planned: Sequence[PlannedTensor], keymap: Keymap, ckpt_path: str) -> int:
    """The output vocabulary: the embedding's rows, which the head must match."""
    by_name = {t.name: t for t in planned}
    rows = by_name[keymap.vocab_embedding].shape[0]
    head_rows = by_name[keymap.vocab_head].shape[0]
    if rows != head_rows:
        raise PlanError(
            f"embedding has {rows} rows but the head has {head_rows}",
            path=ckpt_path,
            hint="the checkpoint's vocabulary tensors disagree; it cannot be converted as is",
        )
    return rows


def _template(
    options: PlanOptions, embedded: EmbeddedConfig | None, base_config: dict, keymap: Keymap, warnings: list[str]
) -> str:
    """The chat template written to config.json: --template, else training's, else the base's, else the keymap's."""
    trained = embedded.template if embedded is not None else None
    template = options.template or trained or base_config.get("template") or keymap.template_default
    if trained and base_config.get("template") and trained != base_config.get("template") and not options.template:
        warnings.append(
            f"training used template {trained!r}, the base config says "
            f"{base_config.get('template')!r}; writing the training one"
        )
    return template


def _files_to_copy(
    base_files: Mapping[str, Path], additions: TokenAddition, naming: ShardNaming
) -> tuple[tuple[str, str], ...]:
    """The base's non-weight files, less those the writer writes itself (config, index, edited tokenizer)."""
    rewritten = set(EDITED_TOKENIZER_FILES) if additions.tokens else set()
    not_copied = {*WRITTEN_BY_THE_WRITER, naming.index_file}
    return tuple((f, str(src)) for f, src in sorted(base_files.items()) if f not in not_copied and f not in rewritten)


def _output_config(base_config: dict, keymap: Keymap, rows: int, template: str, dtype: str) -> dict:
    cfg = copy.deepcopy(base_config)
    cfg["architectures"] = list(keymap.architectures)
    cfg["auto_map"] = dict(keymap.auto_map)
    cfg["template"] = template
    assign(cfg, keymap.vocab_config_field, rows)
    for f in keymap.untie_fields:
        parent = f.rsplit(".", 1)[0] if "." in f else None
        if parent is None:
            cfg[f] = False
        else:
            try:
                container = lookup(cfg, parent)
            except KeyError:
                continue
            if isinstance(container, dict):
                container[f.rsplit(".", 1)[1]] = False
    if dtype != "auto":
        _name_dtype(cfg, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype])
    return cfg


_SUB_CONFIGS = ("llm_config", "vision_config", "text_config")


def _name_dtype(cfg: dict, name: str) -> None:
    """Make every dtype field name the written dtype.

    transformers >= 4.56 reads ``dtype`` before the deprecated ``torch_dtype`` (FORMATS.md §8), at
    the top level and in sub-configs: a base saved by 4.57 says ``"dtype": "bfloat16"`` there, and
    leaving it would load an fp32 conversion as bf16 under ``dtype="auto"``. ``torch_dtype`` is
    always written at the top level (what older transformers read); ``dtype`` wherever the base
    already has it."""
    cfg["torch_dtype"] = name
    if "dtype" in cfg:
        cfg["dtype"] = name
    for key in _SUB_CONFIGS:
        sub = cfg.get(key)
        if isinstance(sub, dict):
            for field_name in ("torch_dtype", "dtype"):
                if field_name in sub:
                    sub[field_name] = name
