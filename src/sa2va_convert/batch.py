"""Work directories: convert the newest checkpoint, or every checkpoint, of a training run.

``work_dirs/exp/`` holds ``iter_N.pth`` files (or DeepSpeed ``iter_N.pth/``
folders) and ``last_checkpoint``, a text file with the ABSOLUTE path of the
newest one, which is stale once the folder has moved; its basename beside the
file is the fallback. Batch mode opens the base model once, skips checkpoints
already converted from the same bytes (the sha256 recorded in each output's
``conversion_report.json``), carries on past a failure and reports them all.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BatchError, ConvertError, InputError
from .progress import Progress, Silent

_ITER = re.compile(r"^iter_(\d+)\.pth$")
DS_MARKERS = ("mp_rank_00_model_states.pt",)


def is_deepspeed_dir(path: Path) -> bool:
    return path.is_dir() and (any((path / m).is_file() for m in DS_MARKERS)
                              or any(path.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")))


def is_work_dir(path: Path) -> bool:
    return path.is_dir() and not is_deepspeed_dir(path) and (
        (path / "last_checkpoint").is_file() or bool(list_checkpoints(path)))


def list_checkpoints(work_dir: Path) -> list[Path]:
    found = [p for p in work_dir.iterdir() if _ITER.match(p.name) and (p.is_file() or is_deepspeed_dir(p))]
    return sorted(found, key=lambda p: int(_ITER.match(p.name).group(1)))


def latest_checkpoint(work_dir: Path) -> Path:
    """The checkpoint named by last_checkpoint (moved work_dirs handled), else the highest iter_N."""
    marker = work_dir / "last_checkpoint"
    if marker.is_file():
        named = marker.read_text(encoding="utf-8").strip()
        if named:
            p = Path(named)
            if p.exists():
                return p
            beside = work_dir / p.name
            if beside.exists():
                return beside
    ckpts = list_checkpoints(work_dir)
    if not ckpts:
        raise InputError("work_dir holds no iter_N.pth checkpoint", path=work_dir,
                         hint="pass the checkpoint file itself, or the work_dir of a run that saved one")
    return ckpts[-1]


def resolve_checkpoint(path: Path) -> Path:
    """What the user meant by PATH: a checkpoint, or the newest one of a work_dir."""
    path = Path(path)
    if is_work_dir(path):
        return latest_checkpoint(path)
    return path


@dataclass
class BatchItem:
    checkpoint: str
    out: str
    status: str  # converted | skipped | failed
    seconds: float = 0.0
    error: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class BatchResult:
    work_dir: str
    out_root: str
    items: list[BatchItem] = field(default_factory=list)

    @property
    def failed(self) -> list[BatchItem]:
        return [i for i in self.items if i.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for i in self.items:
            counts[i.status] = counts.get(i.status, 0) + 1
        return {"ok": not self.failed, "work_dir": self.work_dir, "out_root": self.out_root, "counts": counts,
                "items": [i.to_dict() for i in self.items]}


def recorded_sha256(out: Path) -> str | None:
    try:
        report = json.loads((out / "conversion_report.json").read_text(encoding="utf-8"))
        return report["source"]["checkpoint_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def convert_all(work_dir: Path, out_root: Path, options, *, progress: Progress | None = None) -> BatchResult:
    """Convert every iter_N of ``work_dir`` into ``out_root/iter_N``; raise BatchError at the end if any failed."""
    from . import api
    from .plan.base_discovery import resolve_base
    from .read.hf_folder import open_hf_folder

    progress = progress or Silent()
    work_dir, out_root = Path(work_dir), Path(out_root)
    if not work_dir.is_dir():
        raise InputError("work_dir does not exist", path=work_dir, hint="pass the training run's work_dir")
    ckpts = list_checkpoints(work_dir)
    if not ckpts:
        raise InputError("work_dir holds no iter_N.pth checkpoint", path=work_dir, hint="pass the training run's work_dir")
    out_root.mkdir(parents=True, exist_ok=True)
    result = BatchResult(str(work_dir), str(out_root))
    base_folder = open_hf_folder(resolve_base(options.base)) if options.base else None
    for ckpt in ckpts:
        name = ckpt.name.removesuffix(".pth")
        out = out_root / name
        started = time.perf_counter()
        try:
            digest = api.sha256_path(ckpt)
            if out.exists() and recorded_sha256(out) == digest:
                progress.stage(f"{ckpt.name}: already converted from the same bytes, skipped")
                result.items.append(BatchItem(str(ckpt), str(out), "skipped"))
                continue
            progress.stage(f"{ckpt.name}: converting")
            res = api.convert(ckpt, out, options, progress=progress, base_folder=base_folder)
            if base_folder is None:  # discovered from the first checkpoint's config; reuse it
                base_folder = open_hf_folder(res.plan.base)
            result.items.append(BatchItem(str(ckpt), str(out), "converted", time.perf_counter() - started))
        except ConvertError as e:
            progress.stage(f"{ckpt.name}: failed: {e.one_line()}")
            result.items.append(BatchItem(str(ckpt), str(out), "failed", time.perf_counter() - started, e.to_dict()))
    if result.failed:
        err = BatchError(f"{len(result.failed)} of {len(result.items)} checkpoint(s) failed: "
                         + ", ".join(Path(i.checkpoint).name for i in result.failed), path=work_dir,
                         hint="see the per-checkpoint errors above; fix them and re-run (converted ones are skipped)")
        err.result = result  # type: ignore[attr-defined]
        raise err
    return result
