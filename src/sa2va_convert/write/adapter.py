"""``--format adapter``: the fine-tune as a PEFT LoRA adapter on the released base, not a merged model.

The plan (``plan/``) already says, for every tensor of the merged model, where its value comes from:
the base as it is, the base plus a LoRA pair, or a tensor the checkpoint replaces. An adapter stores
only what differs from the base, in PEFT's own layout, so that
``PeftModel.from_pretrained(AutoModel.from_pretrained(BASE), OUT)`` gives the merged model:

- a LoRA pair on a base weight that training left frozen is a LoRA target (the factors are copied
  as the checkpoint holds them, in its dtype; rank, alpha and rsLoRA go into ``LoraConfig``);
- every other tensor that differs from the base (mask decoder, ``text_hidden_fcs``, projector,
  embeddings and head) makes its owning module a module to save, written whole (PEFT saves and loads
  a module to save as its full state dict) with the value the merged folder would hold, after the
  same cast;
- a LoRA pair on a weight that was itself trained (InternLM2's ``output``: trained ``base_layer``
  plus LoRA, FORMATS.md §3), or on a module whose bias was trained, cannot be a PEFT LoRA target
  (PEFT's LoRA adds to the *base's* weight): it is folded, i.e. that module is saved whole with the
  merged value.

What PEFT cannot express is refused before anything is written (PlanError, exit 5), never dropped:
a tensor of the model's root module (PEFT saves submodules only), a LoRA on a tensor that is not a
2-D Linear weight, a vocabulary that grows (PEFT loads a saved module into the base's shape; the
adapter would need the tokenizer and a resize before loading), a config that differs from the base's
in anything but its dtype fields, and layers from ``--pretrained`` or the raw-InternVL recipe (the
adapter's base must be one HF folder that ``from_pretrained`` loads).

The key names are PEFT's (``peft.utils.save_and_load``): ``base_model.model.<module>.lora_A.weight``
for a LoRA factor (the adapter name removed), ``base_model.model.<module>.<tensor>`` for a module to
save. The tests load every family's adapter with PEFT and compare it with the merged folder.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import PlanError
from ..formats import ADAPTER_RECORD, ADAPTER_WEIGHTS
from ..plan.types import ConversionPlan, PlannedTensor
from ..progress import Progress, Silent
from ..read.tensor_source import TensorInfo, TensorSource
from . import atomic, guard
from .safetensors_stream import StreamEntry, write_streamed

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the model: how PEFT names every saved key
# config fields that follow the written dtype (FORMATS.md §8), or the writing library: not the model's shape
_DTYPE_FIELDS = {"torch_dtype", "dtype", "transformers_version"}


@dataclass(frozen=True)
class AdapterTensor:
    """One tensor of ``adapter_model.safetensors``: a LoRA factor copied as is (``source``), or a full
    tensor of a module to save (``planned``: the merged folder's value for it)."""

    name: str
    info: TensorInfo
    source: tuple[str, str] | None = None  # (layer, key) in the conversion's sources
    planned: PlannedTensor | None = None


@dataclass(frozen=True)
class AdapterLayout:
    """What the adapter holds and how PEFT is told about it."""

    targets: tuple[str, ...]  # LoRA target modules, HF names
    modules_to_save: tuple[str, ...]
    rank: int
    rank_pattern: dict[str, int]
    alpha: float
    rslora: bool
    tensors: tuple[AdapterTensor, ...]
    folded: tuple[str, ...] = field(default=())  # LoRA pairs written merged inside a module to save

    @property
    def nbytes(self) -> int:
        return sum(t.info.nbytes for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lora_targets": len(self.targets),
            "rank": self.rank,
            "rank_pattern": dict(self.rank_pattern),
            "alpha": self.alpha,
            "rslora": self.rslora,
            "modules_to_save": list(self.modules_to_save),
            "folded": list(self.folded),
            "tensors": len(self.tensors),
            "bytes": self.nbytes,
        }


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _inside(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def _config_differences(merged: Any, base: Any, where: str = "") -> list[str]:
    """Fields where the merged folder's config.json differs from the base's, dtype fields aside."""
    if isinstance(merged, dict) and isinstance(base, dict):
        out: list[str] = []
        for key in sorted(set(merged) | set(base)):
            if key in _DTYPE_FIELDS:
                continue
            out += _config_differences(merged.get(key), base.get(key), f"{where}{key}.")
        return out
    return [] if merged == base else [where.rstrip(".")]


def plan_adapter(plan: ConversionPlan, base_config: Mapping[str, Any]) -> AdapterLayout:
    """The adapter for ``plan``, or PlanError (exit 5) saying what PEFT cannot express; reads no tensor."""
    where = plan.checkpoint

    def refuse(what: str, hint: str = "convert with --format folder (the merged model) instead") -> PlanError:
        return PlanError(f"--format adapter cannot hold this fine-tune: {what}", path=where, hint=hint)

    if plan.tokenizer_additions.tokens:
        added = ", ".join(t for t, _ in plan.tokenizer_additions.tokens[:3])
        raise refuse(
            f"it adds tokens to the vocabulary ({added}): PEFT loads a saved embedding into the base's shape, "
            "so the base would need the new tokenizer and a resize before loading"
        )
    diffs = _config_differences(plan.config, dict(base_config))
    if diffs:
        raise refuse(
            f"its config.json differs from the base's in {', '.join(diffs[:3])}; an adapter loads with the "
            "base's config"
        )
    changed = [t for t in plan.tensors if t.lora is not None or t.value.layer != "base"]
    layers = sorted({t.value.layer for t in changed if t.value.layer not in ("base", "checkpoint")})
    if layers:
        raise refuse(f"tensors come from the {', '.join(layers)} layer, not from the base folder and the checkpoint")
    lora = {_owner(t.name): t for t in changed if t.lora is not None and t.value.layer == "base"}
    for t in lora.values():
        if not t.name.endswith(".weight") or len(t.shape) != 2:
            raise refuse(f"a LoRA pair on {t.name} {list(t.shape)}, which is not a 2-D Linear weight")
    owners = {_owner(t.name) for t in changed if not (t.lora is not None and t.value.layer == "base")}
    if "" in owners:
        root = next(t.name for t in changed if _owner(t.name) == "")
        raise refuse(f"{root} belongs to the model's root module; PEFT saves whole submodules only")
    # each owner is lifted to its topmost ancestor whose every tensor differs from the base and is no
    # LoRA target (the whole mask decoder, text_hidden_fcs, mlp1): fewer, larger modules to save, and
    # the same bytes, as a module to save is written whole either way
    full = {t.name for t in changed if not (t.lora is not None and t.value.layer == "base")}
    names_under: dict[str, list[str]] = {}
    for t in plan.tensors:
        parts = t.name.split(".")
        for k in range(1, len(parts)):
            names_under.setdefault(".".join(parts[:k]), []).append(t.name)
    lifted = set()
    for module in owners:
        parts = module.split(".")
        top = module
        for k in range(1, len(parts) + 1):
            candidate = ".".join(parts[:k])
            if all(n in full for n in names_under.get(candidate, ())):
                top = candidate
                break
        lifted.add(top)
    saved: list[str] = []
    for module in sorted(lifted, key=lambda m: (m.count("."), m)):
        if not any(_inside(module, outer) for outer in saved):
            saved.append(module)
    saved.sort()
    folded = sorted(m for m in lora if any(_inside(m, s) for s in saved))
    targets = sorted(m for m in lora if m not in folded)
    if not targets:
        raise refuse("it holds no LoRA pair on a frozen base weight: there is nothing for a LoRA adapter to carry")
    # PEFT wraps every module whose name ENDS WITH a module-to-save entry (no dot rule), and LoRA-targets
    # every module equal to or ending in "." + a target: a name that another module's name ends with would
    # make PEFT wrap that module too
    modules = {n.rpartition(".")[0] for n in (t.name for t in plan.tensors)}
    modules |= {m.rsplit(".", k)[0] for m in list(modules) for k in range(1, m.count(".") + 1)}
    for m in saved:
        other = next((x for x in sorted(modules) if x != m and x.endswith(m)), None)
        if other is not None:
            raise refuse(f"PEFT would save module {other} as well as {m} (it matches modules to save by suffix)")
    settings = plan.lora
    assert settings is not None, "a plan with LoRA pairs has LoRA settings"
    ranks = {m: lora[m].lora.rank for m in targets}  # type: ignore[union-attr]
    rank = Counter(ranks.values()).most_common(1)[0][0]
    for m in targets:
        ref = lora[m].lora
        assert ref is not None
        if abs(ref.scale - settings.scale_for(ref.rank)) > 1e-12 * max(1.0, abs(ref.scale)):
            raise refuse(f"the LoRA scale of {m} ({ref.scale}) is not alpha/r of the run's settings")
    by_name = plan.by_name()
    tensors: list[AdapterTensor] = []
    for m in targets:
        ref = lora[m].lora
        assert ref is not None
        for part, factor in (("lora_A", ref.a), ("lora_B", ref.b)):
            tensors.append(
                AdapterTensor(
                    f"{PEFT_PREFIX}{m}.{part}.weight",
                    TensorInfo(tuple(factor.shape), factor.dtype),
                    source=(factor.layer, factor.key),
                )
            )
    for m in saved:
        for name in sorted(n for n in by_name if n.startswith(m + ".")):
            pt = by_name[name]
            tensors.append(AdapterTensor(PEFT_PREFIX + name, pt.info, planned=pt))
    return AdapterLayout(
        targets=tuple(targets),
        modules_to_save=tuple(saved),
        rank=rank,
        rank_pattern={m: r for m, r in ranks.items() if r != rank},
        alpha=float(settings.alpha),
        rslora=bool(settings.rslora),
        tensors=tuple(tensors),
        folded=tuple(folded),
    )


def lora_config_dict(layout: AdapterLayout, base_ref: str) -> dict[str, Any]:
    """``adapter_config.json`` as PEFT's own ``LoraConfig`` writes it (so any PEFT version reads its fields)."""
    import re

    from peft import LoraConfig  # imported on use: PEFT imports transformers (seconds), only adapters need it

    # PEFT types alpha as int; a fractional alpha (rare, --lora-alpha 12.5) is kept as given, PEFT scales with it
    alpha: Any = int(layout.alpha) if float(layout.alpha).is_integer() else layout.alpha
    config = LoraConfig(
        r=layout.rank,
        lora_alpha=alpha,
        use_rslora=layout.rslora,
        target_modules=list(layout.targets),
        modules_to_save=list(layout.modules_to_save) or None,
        rank_pattern={re.escape(m): r for m, r in layout.rank_pattern.items()},
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=base_ref,
        inference_mode=True,
    )
    return config.to_dict()


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def write_adapter(
    plan: ConversionPlan,
    layout: AdapterLayout,
    sources: Mapping[str, TensorSource],
    produce: Callable[[PlannedTensor], torch.Tensor],
    *,
    adapter_config: Callable[[], dict[str, Any]],
    extra_files: Callable[[], dict[str, str]],
    force: bool = False,
    replace_foreign: bool = False,
    protected: Sequence[guard.NamedInput] = (),
    progress: Progress | None = None,
) -> tuple[int, list[str]]:
    """Write the adapter folder atomically (hidden partial folder, published when complete): (bytes, files).

    ``adapter_config()`` (``lora_config_dict``, which imports PEFT: seconds, so the caller computes it
    beside the write) and ``extra_files()`` (the base record, the conversion report) are called once the
    tensors are written."""
    progress = progress or Silent()
    out = Path(plan.out)
    guard.check_out(out, protected)
    guard.check_replaceable(out, force=force, replace_foreign=replace_foreign)
    atomic.check_destination(out, force or replace_foreign)
    entries = [StreamEntry(t.name, t.info) for t in layout.tensors]
    by_name = {t.name: t for t in layout.tensors}

    def value(e: StreamEntry) -> torch.Tensor:
        t = by_name[e.name]
        if t.planned is not None:
            return produce(t.planned)
        assert t.source is not None
        layer, key = t.source
        factor = sources[layer].load(key)
        if factor.is_floating_point() and factor.numel():
            # aminmax propagates NaN and has +-Inf as extremes (as transform/produce.py checks merged values);
            # on a float32 copy of the (small) factor: bf16 aminmax / isfinite are not vectorised on CPU
            # (19 / 73 ms against 1 ms for a 4864x128 factor; 8 s for Sa2VA-1B's 336 factors)
            lo, hi = torch.aminmax(factor.float())
            if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                raise PlanError(
                    f"LoRA factor {key} contains NaN/Inf value(s)",
                    path=str(sources[layer].path),
                    hint="the training diverged or the file is damaged; use an earlier checkpoint",
                )
        return factor.contiguous()

    release_planned = getattr(produce, "release_inputs", None)

    def release(e: StreamEntry) -> None:
        """The tensor is on disk: its inputs' memory (mapped checkpoint pages) may go, as the merged writer does."""
        t = by_name[e.name]
        if t.source is not None:
            sources[t.source[0]].release_rows(t.source[1])
        elif t.planned is not None and release_planned is not None:
            release_planned(t.planned)

    with atomic.staged_output(out, progress.stage) as staging:
        tmp = staging.tmp
        progress.stage(
            f"writing the adapter to {out}: {len(layout.targets)} LoRA targets, "
            f"{len(layout.modules_to_save)} modules to save"
        )
        # one torch thread: the tensors are small (LoRA factors) or plain copies, and the base and
        # checkpoint are hashed (and PEFT imported) in threads beside this one; with two OpenMP threads
        # spinning against them on a 2-core machine, Sa2VA-1B's adapter took 26 s instead of 17 s
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            written = write_streamed(
                tmp / ADAPTER_WEIGHTS, entries, value, metadata={"format": "pt"}, on_tensor=release
            )
            text = json.dumps(adapter_config(), indent=2, sort_keys=True, default=_json_default) + "\n"
            (tmp / "adapter_config.json").write_text(text, encoding="utf-8")
            for name, body in extra_files().items():
                (tmp / name).write_text(body, encoding="utf-8")
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
        except OSError as e:
            raise atomic.describe_os_error(e, out) from None
        finally:
            torch.set_num_threads(threads)
        staging.publish(force=force, replace_foreign=replace_foreign, protected=protected)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert ADAPTER_RECORD in files, "the base record is part of every adapter folder"
    return written, files


__all__ = ["AdapterLayout", "AdapterTensor", "PEFT_PREFIX", "lora_config_dict", "plan_adapter", "write_adapter"]
