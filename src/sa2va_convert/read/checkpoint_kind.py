"""Whether a folder is a DeepSpeed checkpoint, by the names of its files alone.

Its own module, free of torch, so that a work_dir can be resolved, and OUT checked against the
checkpoint it names, before torch is imported (``preflight``): a wrong OUT is refused at once.
"""

from __future__ import annotations

from pathlib import Path

DS_MODEL_STATES = ("mp_rank_00_model_states.pt",)
DS_ZERO3_GLOB = "*zero_pp_rank_*_model_states.pt"


def is_deepspeed_dir(path: Path) -> bool:
    """A DeepSpeed ``save_checkpoint`` tag folder (ZeRO-1/2 or ZeRO-3 model-states files).

    The one test for it: ``work_dir`` lists such folders as checkpoints with it too."""
    path = Path(path)
    return path.is_dir() and (any((path / name).is_file() for name in DS_MODEL_STATES) or any(path.glob(DS_ZERO3_GLOB)))


__all__ = ["DS_MODEL_STATES", "DS_ZERO3_GLOB", "is_deepspeed_dir"]
