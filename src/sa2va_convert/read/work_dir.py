"""A training run's work_dir: which checkpoints it holds and which one the user means.

``work_dirs/exp/`` holds ``iter_N.pth`` files (or DeepSpeed ``iter_N.pth/`` folders) and
``last_checkpoint``, a text file with the ABSOLUTE path of the newest one, which is stale once
the folder has moved or been copied; its basename beside the file is then used, and said so. Lives in the read stage so
that the CLI, the API and batch mode resolve a work_dir the same way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .checkpoint_kind import is_deepspeed_dir

_ITER = re.compile(r"^iter_(\d+)\.pth$")


def iteration_of(path: Path) -> int | None:
    m = _ITER.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(work_dir: Path) -> list[Path]:
    found = [p for p in work_dir.iterdir() if _ITER.match(p.name) and (p.is_file() or is_deepspeed_dir(p))]
    return sorted(found, key=lambda p: iteration_of(p) or 0)


def is_work_dir(path: Path) -> bool:
    return (
        path.is_dir()
        and not is_deepspeed_dir(path)
        and ((path / "last_checkpoint").is_file() or bool(list_checkpoints(path)))
    )


@dataclass(frozen=True)
class CheckpointChoice:
    """The checkpoint a work_dir means, and, when that took a decision, a note saying which file and why."""

    path: Path
    note: str | None = None


def _inside(path: Path, folder: Path) -> bool:
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return real == root or root in real.parents


def choose_checkpoint(work_dir: Path) -> CheckpointChoice:
    """The checkpoint named by last_checkpoint, else the highest iter_N.

    ``last_checkpoint`` holds an absolute path written by the run. In a copied or moved work_dir it
    still names the original run's file, which may exist and be another checkpoint entirely; so when
    it lies outside the work_dir the user named, the file of that name beside ``last_checkpoint`` wins,
    and the note says which one is used."""
    work_dir = Path(work_dir)
    marker = work_dir / "last_checkpoint"
    if marker.is_file():
        named = marker.read_text(encoding="utf-8").strip()
        if named:
            p = Path(named) if Path(named).is_absolute() else work_dir / named
            beside = work_dir / p.name
            if p.exists() and _inside(p, work_dir):
                return CheckpointChoice(p)
            if beside.exists():
                if p.exists():
                    return CheckpointChoice(
                        beside,
                        f"{marker} names {p}, outside this work_dir (a copied or moved "
                        f"run?): using the file beside it, {beside}",
                    )
                return CheckpointChoice(beside, f"{marker} names {p}, which does not exist: using {beside}")
            if p.exists():
                return CheckpointChoice(
                    p, f"{marker} names {p}, outside this work_dir, and no {p.name} is beside it: using {p}"
                )
    ckpts = list_checkpoints(work_dir)
    if not ckpts:
        raise InputError(
            "work_dir holds no iter_N.pth checkpoint",
            path=work_dir,
            hint="pass the checkpoint file itself, or the work_dir of a run that saved one",
        )
    return CheckpointChoice(ckpts[-1])


def latest_checkpoint(work_dir: Path) -> Path:
    """The checkpoint named by last_checkpoint (copied and moved work_dirs handled), else the highest iter_N."""
    return choose_checkpoint(work_dir).path


def checkpoint_note(path: Path) -> str | None:
    """What ``resolve_checkpoint(path)`` decided and why, when it had to decide (see ``choose_checkpoint``)."""
    return choose_checkpoint(Path(path)).note if is_work_dir(Path(path)) else None


def resolve_checkpoint(path: Path) -> Path:
    """What the user meant by PATH: a checkpoint, or the newest one of a work_dir."""
    path = Path(path)
    if is_work_dir(path):
        return latest_checkpoint(path)
    return path


__all__ = [
    "is_deepspeed_dir",
    "is_work_dir",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "iteration_of",
    "choose_checkpoint",
    "checkpoint_note",
    "CheckpointChoice",
]
