"""``sa2va-convert eval``: Dice/IoU of converted fine-tunes on the user's own images (see run.py).

The names below load on first use: the CLI (``cli_eval.py``) registers ``eval`` without the runner,
and ``--help``/completion must not pay for numpy and the runner.
"""

from typing import Any

__all__ = ["evaluate", "check_failures", "resolve_models", "EvalReport"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import run

        return getattr(run, name)
    raise AttributeError(name)
