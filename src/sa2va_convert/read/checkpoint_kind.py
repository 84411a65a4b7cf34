"""Whether a folder is a DeepSpeed checkpoint, by the names of its files alone.

Its own module, free of torch, so that a work_dir can be resolved, and OUT checked against the
checkpoint it names, before torch is imported (``preflight``): a wrong OUT is refused at once.
"""

from __future__ import annotations

from pathlib import Path

_DS_MODEL_STATES = ("mp_rank_00_model_states.pt",)
_DS_ZERO3_GLOB = "*zero_pp_rank_*_model_states.pt"


def is_deepspeed_dir(path: Path) -> bool:
    """A DeepSpeed ``save_checkpoint`` tag folder (ZeRO-1/2 or ZeRO-3 model-states files).

    The one test for it: ``work_dir`` lists such folders as checkpoints with it too."""
    path = Path(path)
    if not path.is_dir():
        return False
    return any((path / name).is_file() for name in _DS_MODEL_STATES) or any(path.glob(_DS_ZERO3_GLOB))


__all__ = ["is_deepspeed_dir"]
