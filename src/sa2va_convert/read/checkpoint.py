"""Open a Sa2VA training checkpoint: weights (memory-mapped), meta, embedded config.

What a "checkpoint" is depends on how training saved it (FORMATS.md §2): one
``iter_N.pth`` file from mmengine, a DeepSpeed model-states file, a bare state
dict someone extracted, or a DeepSpeed checkpoint *directory*. This module
is the one place that decides which reader a path goes to:

=============================  ====================================================
a file                         ``checkpoint_file`` (mmengine, DeepSpeed model states,
                               bare state dict: told apart by what the pickle holds)
a DeepSpeed directory          ``deepspeed.open_deepspeed_dir`` (``is_deepspeed_dir``)
a work_dir                     ``work_dir.resolve_checkpoint`` first (the caller's
                               choice); given here, it is refused with the checkpoint it names
=============================  ====================================================

Every reader hands the rest of the pipeline one :class:`TrainingCheckpoint`; every way the input
can be wrong becomes one InputError line that names the file and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from .checkpoint_file import TrainingCheckpoint, checkpoint_from_loaded
from .checkpoint_kind import is_deepspeed_dir
from .deepspeed import open_deepspeed_dir
from .safe_pickle import safe_torch_load

__all__ = ["TrainingCheckpoint", "open_checkpoint", "is_deepspeed_dir"]


def open_checkpoint(path: str | Path, *, allow_globals: Sequence[str] = ()) -> TrainingCheckpoint:
    """Open a checkpoint file or DeepSpeed checkpoint directory without executing anything in it.

    Tensors stay memory-mapped (private, read-only mapping) so opening a
    multi-GB file costs almost no memory; the input is never modified.
    """
    path = Path(path)
    if path.is_dir():
        return _open_directory(path, allow_globals)
    loaded = safe_torch_load(path, allow_globals=allow_globals)
    return checkpoint_from_loaded(path, loaded)


def _open_directory(path: Path, allow_globals: Sequence[str]) -> TrainingCheckpoint:
    """Dispatch point for checkpoint directories: DeepSpeed folders go to ``read.deepspeed``."""
    if not is_deepspeed_dir(path):
        raise InputError(
            "is a directory but not a DeepSpeed checkpoint directory (no mp_rank_00_model_states.pt or "
            "*zero_pp_rank_*_model_states.pt inside)",
            path=path,
            hint=_directory_hint(path),
        )
    return open_deepspeed_dir(path, allow_globals=allow_globals)


def _directory_hint(path: Path) -> str:
    """Point at the checkpoint a work_dir names, since that is the usual mistake."""
    last = path / "last_checkpoint"
    if last.is_file():
        try:
            named = Path(last.read_text(encoding="utf-8", errors="replace")[:4096].strip())
        except OSError:
            named = None
        if named is not None and named.name:
            candidate = named if named.exists() else path / named.name
            return f"this looks like an mmengine work_dir; pass the checkpoint it names: {candidate}"
    found = sorted(p.name for p in path.glob("*.pth"))[:3]
    if found:
        return f"pass a checkpoint file, e.g. {path / found[-1]}"
    return "pass a checkpoint file (iter_N.pth) or a DeepSpeed checkpoint directory"
