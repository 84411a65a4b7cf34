"""A training run's work_dir: which checkpoints it holds and which one the user means.

``work_dirs/exp/`` holds ``iter_N.pth`` files (or DeepSpeed ``iter_N.pth/`` folders) and
``last_checkpoint``, a text file with the ABSOLUTE path of the newest one, which is stale once
the folder has moved; its basename beside the file is the fallback. Lives in the read stage so
that the CLI, the API and batch mode resolve a work_dir the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import InputError
from .checkpoint import is_deepspeed_dir

_ITER = re.compile(r"^iter_(\d+)\.pth$")


def iteration_of(path: Path) -> int | None:
    m = _ITER.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(work_dir: Path) -> list[Path]:
    found = [p for p in work_dir.iterdir() if _ITER.match(p.name) and (p.is_file() or is_deepspeed_dir(p))]
    return sorted(found, key=lambda p: iteration_of(p) or 0)


def is_work_dir(path: Path) -> bool:
    return path.is_dir() and not is_deepspeed_dir(path) and (
        (path / "last_checkpoint").is_file() or bool(list_checkpoints(path)))


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


__all__ = ["is_deepspeed_dir", "is_work_dir", "list_checkpoints", "latest_checkpoint", "resolve_checkpoint",
           "iteration_of"]
