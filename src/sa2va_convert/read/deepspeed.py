"""Read DeepSpeed checkpoint directories (``iter_N.pth/``) one parameter at a time.

With ``save_optimizer=True`` or ZeRO-3, mmengine's DeepSpeed strategy saves a
*folder* (FORMATS.md §2). The trained weights then live in two places:

* the model-states file(s): ``module`` holds 16-bit copies (ZeRO-1/2) or empty
  placeholders (ZeRO-3), next to ``param_shapes`` (the names and shapes of the
  optimizer's flat buffers, in flattening order), ``frozen_param_shapes`` /
  ``frozen_param_fragments``, ``shared_params`` and ``buffer_names``;
* one optimizer file per data-parallel rank holding that rank's slice of the
  fp32 master weights.

We prefer the fp32 master weights (they are what the optimizer updated; the
16-bit copies are rounded) and fall back to ``module`` when the optimizer
files were not kept. DeepSpeed's own ``zero_to_fp32`` needs DeepSpeed
installed, unpickles with ``weights_only=False`` and concatenates every
partition in memory; here each optimizer file is opened memory-mapped through
the restricted unpickler, and ``load(key)`` copies only the few slices that
make up one parameter.

Layout rules (read from DeepSpeed 0.19's ``stage_1_and_2.py``, ``stage3.py``,
``bf16_optimizer.py`` and ``zero_to_fp32.py``; checked against files the real
library wrote, see tests/test_deepspeed.py):

ZeRO-1/2
    Per param group, the trainable parameters are flattened in
    ``param_shapes[g]`` order, each followed by ``param_alignment_paddings[g][i]``
    zeros (absent before 0.16: no padding); the group is padded to a multiple
    of 2 x world size and cut into equal consecutive partitions. Rank r saves
    its partition in ``single_partition_of_fp32_groups[g]`` with the tail padding
    removed (the BF16_Optimizer used for ZeRO-1 + bf16 + fp32 gradient
    accumulation keeps it, and writes no ``zero_stage``). Either way the
    concatenation of the saved partitions in rank order is the group's flat
    buffer, so a parameter at offset o is ``concat[o : o + numel]``: we only
    need each rank's saved length.
ZeRO-3
    Every parameter is partitioned by itself: rank r holds elements
    ``[r*p, (r+1)*p)`` with ``p = ceil(numel / world_size)`` (the last rank
    zero-padded). Each rank's ``fp32_flat_groups`` (one tensor per sub-group)
    concatenate, in ``param_shapes`` order (all groups merged), exactly those
    ``p``-sized pieces, so a parameter's piece sits at the same local offset on
    every rank. Frozen parameters are partitioned the same way in each rank's
    ``frozen_param_fragments``.

Facts checked on files DeepSpeed 0.19.8 wrote (CPU, gloo, world size 2):

* ``zero_stage`` is a ZeroStageEnum object (an inert placeholder here, value in
  ``args[0]``); ``partition_count`` is a list per group for ZeRO-1/2, an int
  for ZeRO-3. ZeRO-1 + bf16 + fp32 gradient accumulation uses BF16_Optimizer:
  no ``zero_stage``, no loss scaler, unstripped partitions -- DeepSpeed's own
  zero_to_fp32 refuses it ("is not a zero checkpoint").
* ZeRO-3 ``fp32_flat_groups`` are pickled via ``torch._tensor._rebuild_from_type_v2``
  (they carry a ``ds_id`` attribute); ``param_shapes`` has one dict per
  sub-group, matching the flat groups.
* ``shared_params`` is filled in rank 0's model-states file only; ZeRO-3's
  ``module`` holds empty 16-bit tensors; buffers are saved whole, in their own
  dtype; ``frozen_param_fragments`` is whole tensors (ZeRO-2), per-rank pieces
  (ZeRO-3) or None together with ``frozen_param_shapes`` (ZeRO-1, whatever
  ``exclude_frozen_parameters`` says).

The reader never imports DeepSpeed: its objects in these files (ZeroStageEnum,
LossScaler, fragment_address) become inert placeholders.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import torch

from .. import dtypes
from ..errors import InputError
from .checkpoint_file import CheckpointKind, TrainingCheckpoint, plain_meta
from .embedded_config import parse_embedded_config
from .safe_pickle import SafeLoad, is_placeholder, safe_torch_load
from .safe_pickle.allow_lists import SafeCallable
from .tensor_source import SourceDefaults, TensorInfo
from .zip_records import RecordCheck

__all__ = ["open_deepspeed_dir", "DeepSpeedSource", "WeightsChoice"]

WeightsChoice = Literal["auto", "master", "module"]

KIND: CheckpointKind = "deepspeed-dir"
_MODEL_STATES_Z12 = "mp_rank_00_model_states.pt"
_MODEL_STATES_Z3 = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_OTHER_MP = re.compile(r"_mp_rank_(?!00_)\d+_|^mp_rank_(?!00_)\d+_")
_MOE = re.compile(r"^(expp_rank_\d+|layer_\d+_expert_\d+)")
_PIPELINE = re.compile(r"^layer_\d+-model_\d+-model_states\.pt$|^layer_\d+-model_states\.pt$")

# torch pickles a tensor that carries Python attributes (ZeRO-3 tags its fp32 flat
# groups with ``ds_id``) as ``_rebuild_from_type_v2(_rebuild_tensor_v2, Tensor, args,
# {'ds_id': ...})``. Until safe_pickle rebuilds those itself, we admit the two names
# as inert placeholders and rebuild the plain tensor with the allow-listed function
# the pickle named (see _plain_tensor); nothing else from the pickle is called.
_TYPED_TENSOR = "torch._tensor._rebuild_from_type_v2"
_TYPED_TENSOR_GLOBALS = (_TYPED_TENSOR, "torch._tensor.Tensor", "torch.Tensor", "torch.nn.parameter.Parameter")
_TENSOR_TYPES = ("torch._tensor.Tensor", "torch.Tensor", "torch.nn.parameter.Parameter")
_REBUILD_FUNCTIONS = ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3")

# DeepSpeed aligns each ZeRO-1/2 group to nccl_start_alignment_factor (2) x world size.
_DP_ALIGNMENT_FACTOR = 2
_COPY_HINT = (
    "the folder is incomplete or mixes two saves; copy the whole iter_N.pth folder again or use another checkpoint"
)
_TRUNCATED_HINT = "the file is truncated or comes from another save; copy it again or use another checkpoint"


# --------------------------------------------------------------------------------------------
# The TensorSource
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """``store[rank][slot][start : start + length]``: one contiguous run of a parameter."""

    rank: int
    slot: int
    start: int
    length: int


@dataclass(frozen=True, eq=False)
class _Entry:
    """How to produce one tensor: from pieces of a partition store, or a tensor as saved."""

    info: TensorInfo
    store: str  # "master" | "frozen" | "saved"
    pieces: tuple[_Piece, ...] = ()
    tensor: torch.Tensor | None = None  # store == "saved": the (memory-mapped) tensor itself


@dataclass
class _Store:
    """Flat tensors per rank (memory-mapped views), and the file each rank's came from."""

    files: list[Path]
    tensors: list[list[torch.Tensor]]

    def piece(self, p: _Piece) -> torch.Tensor:
        return self.tensors[p.rank][p.slot].narrow(0, p.start, p.length)


class DeepSpeedSource(SourceDefaults):
    """TensorSource over a DeepSpeed folder; ``load`` assembles one parameter from its slices.

    No optional ability: a row range is a slice of the assembled parameter, and pages of the
    partition files, once read, stay in RSS (the peak-RAM estimate counts them).

    ``info`` comes from ``param_shapes`` and the partition dtypes, so planning
    reads no tensor data. A parameter kept whole on one rank is returned as a
    view of the memory map; one split across ranks is a fresh tensor of its
    own size. Either way peak memory is about one parameter.
    """

    def __init__(
        self,
        path: Path,
        entries: dict[str, _Entry],
        stores: dict[str, _Store],
        saved_file: Path,
        records: Mapping[Path, RecordCheck] | None = None,
    ):
        self.label = "checkpoint"
        self.path = Path(path)
        self._entries = entries
        self._stores = stores
        self._saved_path = Path(saved_file)
        self._saved_file = self._saved_path.name  # the model-states file that "saved" entries come from
        self._records = dict(records or {})  # file -> its zip records' CRC-32 checks, run as tensors are read

    def _verify(self, file: Path, key: str, tensor: torch.Tensor, what: str) -> None:
        check = self._records.get(file)
        if check is not None:
            check.verify_tensor(key, tensor, what=what)

    def keys(self) -> Iterable[str]:
        return self._entries.keys()

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def info(self, key: str) -> TensorInfo:
        return self._entries[key].info

    def load(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        if entry.tensor is not None:
            self._verify(self._saved_path, key, entry.tensor, "tensor")
            return entry.tensor
        shape, dtype = entry.info.shape, dtypes.to_torch(entry.info.dtype)
        if not entry.pieces:  # zero-element parameter
            return torch.empty(shape, dtype=dtype)
        store = self._stores[entry.store]
        for p in entry.pieces:  # each rank's flat partition is one record, checked whole at its first use
            self._verify(store.files[p.rank], key, store.tensors[p.rank][p.slot], "part of tensor")
        parts = [store.piece(p) for p in entry.pieces]
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        return flat.view(shape)

    def location(self, key: str) -> list[tuple[str, int, int]]:
        """Where the tensor's bytes are: ``(file name, element offset, element count)`` per slice.

        For reports and debugging ("which rank file holds this?"). Offsets
        count elements within the file's fp32 master weights, its param groups
        (ZeRO-3: sub-groups) taken as one run.
        """
        entry = self._entries[key]
        if entry.tensor is not None:
            return [(self._saved_file, 0, entry.info.numel)]
        store = self._stores[entry.store]
        out = []
        for p in entry.pieces:
            before = sum(t.numel() for t in store.tensors[p.rank][: p.slot]) if entry.store == "master" else 0
            out.append((store.files[p.rank].name, before + p.start, p.length))
        return out


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def open_deepspeed_dir(
    path: str | Path,
    *,
    allow_globals: Sequence[str] = (),
    weights: WeightsChoice = "auto",
    include_frozen: bool = False,
) -> TrainingCheckpoint:
    """Open a DeepSpeed ``save_checkpoint`` folder as a TrainingCheckpoint (kind "deepspeed-dir").

    weights: "auto" uses the fp32 master weights when the optimizer files are
    there, else the 16-bit ``module`` copies (ZeRO-1/2 only); "master" / "module"
    insist on one. ``meta['deepspeed']['weights']`` says which was used.

    include_frozen: also expose the frozen parameters (vision encoder, LoRA
    ``base_layer`` weights, ...). Off by default: they are 16-bit copies of the
    base model, and a single-file Sa2VA checkpoint does not carry them either,
    so exposing them would make the converter overwrite the base model's
    (possibly fp32) tensors with rounded copies.
    """
    path = Path(path)
    files = _scan(path)
    records: dict[Path, RecordCheck] = {}
    rank0 = _load(files.model_states[0], allow_globals, records)
    top = _mapping(rank0.obj, files.model_states[0], "the model-states file")
    model = _ModelStates.read(files.model_states[0], top)
    placeholders: Counter[str] = Counter(rank0.placeholders)
    optim = _read_optimizer_files(files, allow_globals, placeholders, records) if files.optim else None
    stage = _check_stages(files, model, optim)
    notes: list[str] = []
    use_master = _choose_weights(path, files, stage, optim, weights, notes)

    module = _saved_tensors(model.module)
    entries, stores = _weight_entries(files, model, module, optim if use_master else None, stage, notes)
    frozen = _frozen_names(model, module)
    if include_frozen:
        frozen_entries, frozen_store = _frozen_entries(
            files, model, module, stage, allow_globals, placeholders, records
        )
        entries.update({k: v for k, v in frozen_entries.items() if k not in entries})
        if frozen_store is not None:
            stores["frozen"] = frozen_store
    _add_shared(entries, model.shared_params)

    source = DeepSpeedSource(path, entries, stores, files.model_states[0], records)
    meta = plain_meta(top)
    meta["deepspeed"] = _summary(files, model, optim, stage, use_master, entries, frozen, include_frozen, notes)
    cfg_text = meta.get("cfg")
    for name in _TYPED_TENSOR_GLOBALS:  # rebuilt into tensors, not left inert
        placeholders.pop(name, None)
    return TrainingCheckpoint(
        path=path,
        kind=KIND,
        weights=source,
        meta=meta,
        config=parse_embedded_config(cfg_text) if isinstance(cfg_text, str) else None,
        placeholders=dict(placeholders),
        top_level_keys=[k if isinstance(k, str) else repr(k) for k in top],
    )


def _weight_entries(
    files: _Files,
    model: _ModelStates,
    module: dict[str, torch.Tensor],
    master: _Optim | None,
    stage: int,
    notes: list[str],
) -> tuple[dict[str, _Entry], dict[str, _Store]]:
    """Trainable parameters (fp32 master pieces, or the saved 16-bit module) plus persistent buffers."""
    entries: dict[str, _Entry] = {}
    stores: dict[str, _Store] = {}
    if master is not None:
        stores["master"] = master.store
        layout = _zero3_master if stage == 3 else _zero12_master
        entries.update(layout(files, model, master))
    else:
        entries.update(_module_entries(files.model_states[0], model, module, notes))
    _add_buffers(entries, model, module)
    return entries, stores


# --------------------------------------------------------------------------------------------
# The folder: which files, which ranks
# --------------------------------------------------------------------------------------------


@dataclass
class _Files:
    folder: Path
    model_states: dict[int, Path]  # rank -> file; ZeRO-1/2: {0: mp_rank_00_model_states.pt}
    zero3_layout: bool  # model states saved per rank (zero_pp_rank_*)
    optim: dict[int, Path]  # rank -> optimizer file
    optim_prefix: str  # "bf16_" or ""


def _scan(path: Path) -> _Files:
    """Classify the folder's files; refuse layouts we cannot read before unpickling anything."""
    if not path.is_dir():
        raise InputError("is not a directory", path=path, hint="pass the iter_N.pth folder DeepSpeed wrote")
    try:
        names = sorted(p.name for p in path.iterdir() if p.is_file())
    except PermissionError:
        raise InputError("permission denied", path=path, hint="make the folder readable") from None
    _refuse_unsupported(path, names)
    z3_states = {int(m.group(1)): path / n for n in names if (m := _MODEL_STATES_Z3.match(n))}
    has_z12 = _MODEL_STATES_Z12 in names
    optim_by_prefix: dict[str, dict[int, Path]] = {}
    for n in names:
        if m := _OPTIM.match(n):
            optim_by_prefix.setdefault(m.group(1) or "", {})[int(m.group(2))] = path / n
    if has_z12 and z3_states:
        raise InputError(
            f"mixed ZeRO stages: both {_MODEL_STATES_Z12} (ZeRO-1/2) "
            f"and {min(z3_states.values()).name} (ZeRO-3) are here",
            path=path,
            hint="two saves went into one folder; keep the files of one training run only",
        )
    if len(optim_by_prefix) > 1:
        raise InputError(
            "mixed optimizer files: both bf16_zero_pp_rank_* (bf16) and zero_pp_rank_* (fp16/fp32) partitions are here",
            path=path,
            hint="two saves went into one folder; keep the files of one training run only",
        )
    prefix, optim = next(iter(optim_by_prefix.items()), ("", {}))
    if not has_z12 and not z3_states:
        found = ", ".join(names[:4]) or "no files"
        raise InputError(
            f"no DeepSpeed model-states file ({_MODEL_STATES_Z12} or zero_pp_rank_0_mp_rank_00_model_states.pt); "
            f"found: {found}",
            path=path,
            hint="the model-states file holds the parameter names; copy the whole iter_N.pth folder",
        )
    if z3_states and 0 not in z3_states:
        raise InputError(
            f"ZeRO-3 folder without zero_pp_rank_0_mp_rank_00_model_states.pt (found ranks {sorted(z3_states)})",
            path=path,
            hint=_COPY_HINT,
        )
    model_states = {0: path / _MODEL_STATES_Z12} if has_z12 else dict(sorted(z3_states.items()))
    return _Files(path, model_states, bool(z3_states), dict(sorted(optim.items())), prefix)


def _refuse_unsupported(path: Path, names: list[str]) -> None:
    """Model/pipeline/expert parallel saves split tensors in ways this reader does not join."""
    for n in names:
        if _MOE.match(n):
            raise InputError(
                f"holds mixture-of-experts files ({n}); expert-parallel checkpoints are not supported",
                path=path,
                hint="consolidate it with DeepSpeed's ds_to_universal.py, then convert the result",
            )
        if _PIPELINE.match(n):
            raise InputError(
                f"holds pipeline-parallel layer files ({n}); those are not supported",
                path=path,
                hint="consolidate it with DeepSpeed tools into one state dict, then convert that",
            )
        if n.endswith(".pt") and _OTHER_MP.search(n):
            raise InputError(
                f"holds tensor/model-parallel files ({n}); only mp_rank_00 (no model parallelism) is supported",
                path=path,
                hint="consolidate the model-parallel shards first (e.g. DeepSpeed's ds_to_universal.py)",
            )


def _load(file: Path, allow_globals: Sequence[str], records: dict[Path, RecordCheck]) -> SafeLoad:
    loaded = safe_torch_load(file, allow_globals=tuple(allow_globals) + _TYPED_TENSOR_GLOBALS)
    if loaded.records is not None:
        records[file] = loaded.records
    return loaded


def _mapping(obj: Any, file: Path, what: str) -> Mapping:
    if not isinstance(obj, Mapping):
        raise InputError(f"is not a DeepSpeed {what} (holds a {type(obj).__name__})", path=file, hint=_COPY_HINT)
    return obj


# --------------------------------------------------------------------------------------------
# Model-states file
# --------------------------------------------------------------------------------------------


@dataclass
class _ModelStates:
    """What the rank-0 model-states file says about names and shapes."""

    file: Path
    module: Mapping
    param_shapes: list[dict[str, tuple[int, ...]]] | None  # None: no ZeRO optimizer
    frozen_shapes: dict[str, tuple[int, ...]] | None
    shared_params: dict[str, str]
    buffer_names: list[str]
    frozen_fragments: dict[str, torch.Tensor]  # ZeRO-2: whole tensors; ZeRO-3: this rank's pieces
    ds_version: str | None
    global_steps: int | None
    dp_world_size: int | None

    @classmethod
    def read(cls, file: Path, top: Mapping) -> _ModelStates:
        if "module" not in top or not isinstance(top["module"], Mapping):
            raise InputError(
                "has no 'module' state dict; it is not a DeepSpeed model-states file",
                path=file,
                hint=_COPY_HINT,
            )
        raw_shapes = top.get("param_shapes")
        return cls(
            file=file,
            module=top["module"],
            param_shapes=None if raw_shapes is None else _group_shapes(file, raw_shapes),
            frozen_shapes=_shape_map(file, top.get("frozen_param_shapes"), "frozen_param_shapes"),
            shared_params=_str_map(top.get("shared_params")),
            buffer_names=[b for b in (top.get("buffer_names") or []) if isinstance(b, str)],
            frozen_fragments=_fragments(top),
            ds_version=top.get("ds_version") if isinstance(top.get("ds_version"), str) else None,
            global_steps=_as_int(top.get("global_steps")),
            dp_world_size=_as_int(top.get("dp_world_size")),
        )

    def trainable(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        for group in self.param_shapes or []:
            yield from group.items()


def _group_shapes(file: Path, raw: Any) -> list[dict[str, tuple[int, ...]]]:
    """``param_shapes``: a list (one per param group) of {name: shape}; older saves wrote one dict."""
    groups = [raw] if isinstance(raw, Mapping) else raw
    if not isinstance(groups, (list, tuple)):
        raise InputError(
            f"has param_shapes of type {type(raw).__name__}, expected a list of dicts", path=file, hint=_COPY_HINT
        )
    out = [_shape_map(file, g, "param_shapes") or {} for g in groups]
    seen: set[str] = set()
    for group in out:
        for name in group:
            if name in seen:
                raise InputError(f"param_shapes names {name!r} twice", path=file, hint=_COPY_HINT)
            seen.add(name)
    return out


def _shape_map(file: Path, raw: Any, what: str) -> dict[str, tuple[int, ...]] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InputError(f"has {what} of type {type(raw).__name__}, expected a dict", path=file, hint=_COPY_HINT)
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in raw.items():
        dims = tuple(shape) if isinstance(shape, (tuple, list)) else None
        if not isinstance(name, str) or dims is None or not all(isinstance(d, int) and d >= 0 for d in dims):
            raise InputError(f"has a malformed {what} entry {name!r}: {shape!r}", path=file, hint=_COPY_HINT)
        out[name] = dims
    return out


def _str_map(raw: Any) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


def _saved_tensors(module: Mapping) -> dict[str, torch.Tensor]:
    """The real tensors in ``module`` (ZeRO-3 leaves empty placeholders there; they are skipped later)."""
    out = {}
    for key, value in module.items():
        tensor = _plain_tensor(value)
        if isinstance(key, str) and tensor is not None and dtypes.is_supported_torch(tensor.dtype):
            out[key] = torch.Tensor.detach(tensor)
    return out


# --------------------------------------------------------------------------------------------
# Optimizer files
# --------------------------------------------------------------------------------------------


@dataclass
class _Optim:
    stage: int | None  # None: BF16_Optimizer (ZeRO-1 + bf16), which writes no zero_stage
    world_size: int
    store: _Store  # per rank: the flat fp32 groups
    flavour: str  # "DeepSpeedZeroOptimizer" | "BF16_Optimizer" | "DeepSpeedZeroOptimizer_Stage3"
    paddings: list[list[int]] | None  # ZeRO-1/2 param_alignment_paddings (rank 0)


def _read_optimizer_files(
    files: _Files, allow_globals: Sequence[str], placeholders: Counter, records: dict[Path, RecordCheck]
) -> _Optim:
    """Unpickle each rank's optimizer file (memory-mapped) and keep only its flat master groups."""
    per_rank: dict[int, tuple[int | None, int, list[torch.Tensor], Any]] = {}
    for rank, file in files.optim.items():
        loaded = _load(file, allow_globals, records)
        placeholders.update(loaded.placeholders)
        osd = _mapping(
            _mapping(loaded.obj, file, "optimizer-states file").get("optimizer_state_dict"),
            file,
            "optimizer-states file (no 'optimizer_state_dict')",
        )
        stage = _as_int(osd.get("zero_stage"))
        key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
        groups = _flat_groups(file, osd.get(key), key)
        per_rank[rank] = (
            stage,
            _partition_count(file, osd.get("partition_count")),
            groups,
            osd.get("param_alignment_paddings"),
        )
        del loaded, osd
    first = next(iter(per_rank))
    stages = {r: v[0] for r, v in per_rank.items()}
    if len(set(stages.values())) > 1:
        listing = ", ".join(f"{files.optim[r].name}: {_stage_name(s)}" for r, s in stages.items())
        raise InputError(
            f"mixed ZeRO stages among the optimizer files ({listing})",
            path=files.folder,
            hint="two saves went into one folder; keep the files of one training run only",
        )
    counts = {r: v[1] for r, v in per_rank.items()}
    if len(set(counts.values())) > 1:
        raise InputError(
            f"the optimizer files disagree on partition_count ({counts})", path=files.folder, hint=_COPY_HINT
        )
    world = counts[first]
    _check_ranks(files, world)
    stage = stages[first]
    flavour = (
        "DeepSpeedZeroOptimizer_Stage3"
        if stage == 3
        else "BF16_Optimizer"
        if stage is None
        else "DeepSpeedZeroOptimizer"
    )
    store = _Store([files.optim[r] for r in range(world)], [per_rank[r][2] for r in range(world)])
    return _Optim(stage, world, store, flavour, _paddings(files.optim[0], per_rank[0][3]))


def _flat_groups(file: Path, raw: Any, key: str) -> list[torch.Tensor]:
    if not isinstance(raw, (list, tuple)) or not raw:
        raise InputError(f"has no '{key}' (the fp32 master weights)", path=file, hint=_TRUNCATED_HINT)
    out = []
    for i, value in enumerate(raw):
        tensor = _plain_tensor(value)
        if tensor is None or tensor.dim() != 1 or not tensor.is_floating_point():
            raise InputError(f"'{key}'[{i}] is not a flat float tensor", path=file, hint=_TRUNCATED_HINT)
        out.append(torch.Tensor.detach(tensor))
    return out


def _partition_count(file: Path, raw: Any) -> int:
    """ZeRO-1/2 write one count per param group (they differ only with expert parallelism)."""
    values = raw if isinstance(raw, (list, tuple)) else [raw]
    counts = {_as_int(v) for v in values}
    count = counts.pop() if len(counts) == 1 else None
    if count is None or count < 1:
        raise InputError(
            f"has partition_count {raw!r}; per-group partition counts that differ (expert parallelism) "
            "are not supported",
            path=file,
            hint="consolidate it with DeepSpeed's ds_to_universal.py, then convert the result",
        )
    return count


def _paddings(file: Path, raw: Any) -> list[list[int]] | None:
    if raw is None:
        return None
    if not isinstance(raw, (list, tuple)) or not all(
        isinstance(g, (list, tuple)) and all(isinstance(x, int) and x >= 0 for x in g) for g in raw
    ):
        raise InputError("has malformed param_alignment_paddings", path=file, hint=_TRUNCATED_HINT)
    return [list(g) for g in raw]


def _check_ranks(files: _Files, world: int) -> None:
    """Every rank 0..N-1 present, nothing beyond: a partial copy must not convert silently."""
    present = set(files.optim)
    missing = [r for r in range(world) if r not in present]
    prefix = files.optim_prefix
    if missing:
        names = ", ".join(f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise InputError(
            f"missing optimizer partition file(s) {names}{more}: partition_count is {world} but "
            f"{len(present)} rank file(s) are present",
            path=files.folder,
            hint=_COPY_HINT,
        )
    extra = sorted(present - set(range(world)))
    if extra:
        raise InputError(
            f"{files.optim[extra[0]].name} is beyond partition_count {world} (ranks 0..{world - 1})",
            path=files.folder,
            hint="a save with more ranks left files behind; keep the files of one training run only",
        )


def _check_stages(files: _Files, model: _ModelStates, optim: _Optim | None) -> int:
    """The ZeRO stage, from the optimizer files when present, and consistent with the file layout."""
    layout_stage = 3 if files.zero3_layout else None
    if optim is None:
        if model.param_shapes is None:
            return 0
        return layout_stage or 2  # 1 and 2 store the same; without optimizer files we cannot tell
    stage = optim.stage if optim.stage is not None else 1
    if (stage == 3) != files.zero3_layout:
        ms = files.model_states[0].name
        raise InputError(
            f"mixed ZeRO stages: the optimizer files are ZeRO-{stage} but the model-states file {ms} is "
            f"ZeRO-{'3' if files.zero3_layout else '1/2'}",
            path=files.folder,
            hint="two saves went into one folder; keep the files of one training run only",
        )
    if model.param_shapes is None:
        raise InputError(
            "has no param_shapes, so the optimizer partitions cannot be split into parameters",
            path=files.model_states[0],
            hint=_COPY_HINT,
        )
    return stage


def _choose_weights(
    path: Path, files: _Files, stage: int, optim: _Optim | None, weights: str, notes: list[str]
) -> bool:
    """True: read fp32 master weights from the optimizer partitions; False: the saved module."""
    if weights not in ("auto", "master", "module"):
        raise ValueError(f"weights must be 'auto', 'master' or 'module', not {weights!r}")
    if weights == "module" or (weights == "auto" and optim is None):
        if stage == 3:
            raise InputError(
                "ZeRO-3 folder without usable optimizer partitions: the model-states files hold only empty "
                "placeholders, the weights are in the *_optim_states.pt files"
                if optim is None
                else "ZeRO-3 saves no 16-bit weights in the model-states files; "
                "only the fp32 master weights can be read",
                path=path,
                hint="copy the *_optim_states.pt files too" if optim is None else "use the fp32 master weights",
            )
        if optim is None and stage != 0:
            notes.append(
                "no optimizer partition files: using the 16-bit weights saved in 'module' "
                "(the fp32 master weights were not kept)"
            )
        return False
    if optim is None:
        raise InputError(
            "has no *_optim_states.pt files, so there are no fp32 master weights",
            path=path,
            hint="copy the optimizer files too, or read the 16-bit module weights instead",
        )
    return True


# --------------------------------------------------------------------------------------------
# Flat layouts -> pieces
# --------------------------------------------------------------------------------------------


def _zero12_master(files: _Files, model: _ModelStates, optim: _Optim) -> dict[str, _Entry]:
    """ZeRO-1/2: each group is the concatenation of the rank partitions (see module docstring)."""
    assert model.param_shapes is not None
    store, world = optim.store, optim.world_size
    n_groups = {len(ts) for ts in store.tensors}
    if n_groups != {len(model.param_shapes)}:
        raise InputError(
            f"the optimizer files hold {sorted(n_groups)} param group(s) but param_shapes in "
            f"{model.file.name} lists {len(model.param_shapes)}",
            path=files.folder,
            hint=_COPY_HINT,
        )
    entries: dict[str, _Entry] = {}
    for g, group in enumerate(model.param_shapes):
        pads = _group_paddings(files, optim, g, len(group))
        lengths = [store.tensors[r][g].numel() for r in range(world)]
        starts = [sum(lengths[:r]) for r in range(world)]
        offset = 0
        for (name, shape), pad in zip(group.items(), pads, strict=True):
            numel = math.prod(shape)
            pieces = _split(offset, numel, starts, lengths, slot=g)
            entries[name] = _Entry(TensorInfo(shape, _dtype_of(store, g)), "master", pieces)
            offset += numel + pad
        _check_zero12_sizes(files, model, g, offset, lengths, world)
    return entries


def _group_paddings(files: _Files, optim: _Optim, g: int, n: int) -> list[int]:
    if optim.paddings is None:
        return [0] * n
    if g >= len(optim.paddings) or len(optim.paddings[g]) != n:
        raise InputError(
            f"param_alignment_paddings of group {g} does not match the {n} parameters of param_shapes",
            path=files.optim[0],
            hint=_COPY_HINT,
        )
    return optim.paddings[g]


def _split(offset: int, numel: int, starts: list[int], lengths: list[int], slot: int) -> tuple[_Piece, ...]:
    """Cut ``[offset, offset+numel)`` of a concatenation of per-rank runs into per-rank pieces."""
    pieces = []
    end = offset + numel
    for rank, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        lo, hi = max(offset, start), min(end, start + length)
        if lo < hi:
            pieces.append(_Piece(rank, slot, lo - start, hi - lo))
    return tuple(pieces)


def _check_zero12_sizes(
    files: _Files, model: _ModelStates, g: int, needed: int, lengths: list[int], world: int
) -> None:
    """Saved partitions must cover the group, with at most DeepSpeed's alignment slack beyond it.

    Valid sets look like [P, P, ..., P, tail, 0, ...] (tail padding stripped)
    or [P, ..., P] (BF16_Optimizer keeps it).
    """
    total = sum(lengths)
    slack = _DP_ALIGNMENT_FACTOR * world
    ordered = all(a >= b for a, b in pairwise(lengths)) and all(
        lengths[r] == lengths[0] for r in range(world - 1) if lengths[r + 1] > 0
    )
    if needed <= total < needed + slack and ordered:
        return
    part = 2 * math.ceil(needed / (_DP_ALIGNMENT_FACTOR * world))  # DeepSpeed >= 0.10 partition size
    expected = [max(0, min(part, needed - r * part)) for r in range(world)]
    bad = next((r for r in range(world) if lengths[r] not in (expected[r], part)), world - 1)
    raise InputError(
        f"fp32 partition of param group {g} holds {lengths[bad]} elements, "
        f"expected {expected[bad]} (param_shapes in {model.file.name} need {needed} elements over {world} ranks; "
        f"the ranks hold {lengths})",
        path=files.optim[bad],
        hint=_TRUNCATED_HINT,
    )


def _zero3_master(files: _Files, model: _ModelStates, optim: _Optim) -> dict[str, _Entry]:
    """ZeRO-3: piece r of every parameter sits at the same local offset on each rank."""
    store, world = optim.store, optim.world_size
    params = list(model.trainable())
    local = [math.ceil(math.prod(shape) / world) for _, shape in params]
    _check_zero3_sizes(files, model, store, sum(local))
    slot_lengths = [t.numel() for t in store.tensors[0]]
    entries: dict[str, _Entry] = {}
    offset = 0
    for (name, shape), part in zip(params, local, strict=True):
        numel = math.prod(shape)
        pieces: list[_Piece] = []
        for rank in range(world):
            take = min(part, numel - rank * part)
            if take <= 0:
                break
            pieces.extend(_split_slots(rank, offset, take, slot_lengths))
        dtype = _dtype_of(store, pieces[0].slot if pieces else 0)
        entries[name] = _Entry(TensorInfo(shape, dtype), "master", tuple(pieces))
        offset += part
    return entries


def _split_slots(rank: int, offset: int, length: int, slot_lengths: list[int]) -> list[_Piece]:
    """A run of one rank's concatenated sub-groups, cut at sub-group boundaries."""
    starts = [sum(slot_lengths[:i]) for i in range(len(slot_lengths))]
    out = []
    for slot, (start, size) in enumerate(zip(starts, slot_lengths, strict=True)):
        lo, hi = max(offset, start), min(offset + length, start + size)
        if lo < hi:
            out.append(_Piece(rank, slot, lo - start, hi - lo))
    return out


def _check_zero3_sizes(files: _Files, model: _ModelStates, store: _Store, needed: int) -> None:
    reference = [t.numel() for t in store.tensors[0]]
    for rank, tensors in enumerate(store.tensors):
        lengths = [t.numel() for t in tensors]
        if sum(lengths) != needed or lengths != reference:
            raise InputError(
                f"fp32 partition holds {sum(lengths)} elements in {len(lengths)} "
                f"sub-group(s) {lengths}, but param_shapes in {model.file.name} need {needed} per rank",
                path=store.files[rank],
                hint=_TRUNCATED_HINT,
            )


def _dtype_of(store: _Store, slot: int) -> str:
    return dtypes.from_torch(store.tensors[0][min(slot, len(store.tensors[0]) - 1)].dtype)


# --------------------------------------------------------------------------------------------
# Module (16-bit), buffers, shared and frozen parameters
# --------------------------------------------------------------------------------------------


def _module_entries(
    file: Path, model: _ModelStates, module: dict[str, torch.Tensor], notes: list[str]
) -> dict[str, _Entry]:
    """Trainable parameters as saved in ``module``; without param_shapes (no ZeRO), all of module."""
    if model.param_shapes is None:
        return {k: _saved(t) for k, t in module.items()}
    entries: dict[str, _Entry] = {}
    missing = []
    for name, shape in model.trainable():
        tensor = module.get(name)
        if tensor is None:
            missing.append(name)
            continue
        if tuple(tensor.shape) != shape:
            raise InputError(
                f"module[{name!r}] has shape {tuple(tensor.shape)} but param_shapes says {shape}",
                path=file,
                hint=_TRUNCATED_HINT,
            )
        entries[name] = _saved(tensor)
    if missing:
        notes.append(
            f"{len(missing)} trainable parameter(s) are not in 'module' and have no 16-bit copy, e.g. {missing[0]}"
        )
    return entries


def _saved(tensor: torch.Tensor) -> _Entry:
    return _Entry(TensorInfo(tuple(tensor.shape), dtypes.from_torch(tensor.dtype)), "saved", tensor=tensor)


def _add_shared(entries: dict[str, _Entry], shared: Mapping[str, str]) -> None:
    """Tied parameters are stored once; the alias reads its owner's data."""
    for alias, owner in shared.items():
        if owner in entries and alias not in entries:
            entries[alias] = entries[owner]


def _add_buffers(entries: dict[str, _Entry], model: _ModelStates, module: dict[str, torch.Tensor]) -> None:
    """Persistent buffers are saved whole in ``module`` under every stage."""
    for name in model.buffer_names:
        if name in module and name not in entries:
            entries[name] = _saved(module[name])


def _frozen_names(model: _ModelStates, module: Mapping[str, torch.Tensor]) -> list[str]:
    if model.frozen_shapes is not None:
        return list(model.frozen_shapes)
    known = {n for n, _ in model.trainable()} | set(model.buffer_names) | set(model.shared_params)
    return [k for k, t in module.items() if k not in known and t.numel() > 0] if model.param_shapes else []


def _frozen_entries(
    files: _Files,
    model: _ModelStates,
    module: dict[str, torch.Tensor],
    stage: int,
    allow_globals: Sequence[str],
    placeholders: Counter,
    records: dict[Path, RecordCheck],
) -> tuple[dict[str, _Entry], _Store | None]:
    """Frozen parameters: whole in ``frozen_param_fragments``/``module`` (ZeRO-1/2), per rank (ZeRO-3)."""
    if stage == 3:
        return _zero3_frozen(files, model, allow_globals, placeholders, records)
    entries = {}
    for name in _frozen_names(model, module):
        tensor = model.frozen_fragments.get(name, module.get(name))
        if tensor is not None:
            entries[name] = _saved(tensor)
    return entries, None


def _fragments(top: Mapping) -> dict[str, torch.Tensor]:
    raw = top.get("frozen_param_fragments")
    if not isinstance(raw, Mapping):
        return {}
    return {
        k: torch.Tensor.detach(t)
        for k, v in raw.items()
        if isinstance(k, str) and (t := _plain_tensor(v)) is not None and dtypes.is_supported_torch(t.dtype)
    }


def _zero3_frozen(
    files: _Files,
    model: _ModelStates,
    allow_globals: Sequence[str],
    placeholders: Counter,
    records: dict[Path, RecordCheck],
) -> tuple[dict[str, _Entry], _Store | None]:
    shapes = model.frozen_shapes or {}
    if not shapes:
        return {}, None
    world = len(files.model_states)
    missing = [r for r in range(world) if r not in files.model_states]
    if missing or (model.dp_world_size and world != model.dp_world_size):
        raise InputError(
            f"ZeRO-3 frozen parameters need zero_pp_rank_{{0..{(model.dp_world_size or world) - 1}}}"
            f"_mp_rank_00_model_states.pt; found ranks {sorted(files.model_states)}",
            path=files.folder,
            hint=_COPY_HINT,
        )
    names = list(shapes)
    per_rank: list[list[torch.Tensor]] = []
    for rank in range(world):
        file = files.model_states[rank]
        if rank == 0:
            fragments = model.frozen_fragments
        else:
            loaded = _load(file, allow_globals, records)
            placeholders.update(loaded.placeholders)
            fragments = _fragments(_mapping(loaded.obj, file, "model-states file"))
        row = []
        for name in names:
            part = math.ceil(math.prod(shapes[name]) / world)
            tensor = fragments.get(name)
            if tensor is None or tensor.numel() != part:
                got = "missing" if tensor is None else f"{tensor.numel()} elements"
                raise InputError(
                    f"frozen_param_fragments[{name!r}] is {got}, expected {part}", path=file, hint=_TRUNCATED_HINT
                )
            row.append(tensor.reshape(-1))
        per_rank.append(row)
    store = _Store([files.model_states[r] for r in range(world)], per_rank)
    entries = {}
    for slot, name in enumerate(names):
        numel = math.prod(shapes[name])
        part = math.ceil(numel / world)
        pieces = tuple(_Piece(r, slot, 0, min(part, numel - r * part)) for r in range(world) if numel - r * part > 0)
        entries[name] = _Entry(TensorInfo(shapes[name], dtypes.from_torch(per_rank[0][slot].dtype)), "frozen", pieces)
    return entries, store


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _plain_tensor(value: Any) -> torch.Tensor | None:
    """A tensor, also when torch pickled it with Python attributes (see _TYPED_TENSOR_GLOBALS)."""
    if isinstance(value, torch.Tensor):
        return value
    if not (is_placeholder(value) and getattr(value, "qualified_name", None) == _TYPED_TENSOR):
        return None
    args: tuple[Any, ...] = getattr(value, "args", ())
    if len(args) != 4:
        return None
    func, new_type, rebuild_args, _state = args
    if not (isinstance(func, SafeCallable) and getattr(func, "_name", None) in _REBUILD_FUNCTIONS):
        return None
    if not (is_placeholder(new_type) and getattr(new_type, "qualified_name", None) in _TENSOR_TYPES):
        return None
    if not isinstance(rebuild_args, tuple):
        return None
    tensor = func(*rebuild_args)  # the same allow-listed rebuild torch.load would have called
    return tensor if isinstance(tensor, torch.Tensor) else None


def _as_int(value: Any) -> int | None:
    """An int, or the value of an inert enum placeholder such as ZeroStageEnum(2)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if is_placeholder(value):
        args: tuple[Any, ...] = getattr(value, "args", ())
        if len(args) == 1 and isinstance(args[0], int) and not isinstance(args[0], bool):
            return args[0]
    return None


def _stage_name(stage: int | None) -> str:
    return "ZeRO-1 (BF16_Optimizer)" if stage is None else f"ZeRO-{stage}"


def _summary(
    files: _Files,
    model: _ModelStates,
    optim: _Optim | None,
    stage: int,
    use_master: bool,
    entries: dict[str, _Entry],
    frozen: list[str],
    include_frozen: bool,
    notes: list[str],
) -> dict:
    """Plain data for ``meta['deepspeed']``: what was read and from where (shown by inspect)."""
    trainable = [n for n, _ in model.trainable()]
    weight_dtypes = sorted({entries[n].info.dtype for n in trainable if n in entries})
    return {
        "zero_stage": stage,
        "optimizer": optim.flavour if optim else None,
        "world_size": optim.world_size if optim else model.dp_world_size,
        "weights": "master" if use_master else "module",
        "weights_dtype": weight_dtypes[0] if len(weight_dtypes) == 1 else weight_dtypes,
        "ds_version": model.ds_version,
        "global_steps": model.global_steps,
        "trainable_params": len(trainable),
        "frozen_params": len(frozen),
        "frozen_included": include_frozen,
        "buffers": sum(1 for b in model.buffer_names if b in entries),
        "shared_params": {k: v for k, v in model.shared_params.items() if k in entries},
        "model_states_files": [p.name for p in files.model_states.values()],
        "optimizer_files": [p.name for p in files.optim.values()],
        "notes": notes,
    }
