"""``sa2va-convert eval``: Dice/IoU of converted fine-tunes on the user's own images (see run.py)."""

from .run import EvalReport, check_failures, evaluate, resolve_models

__all__ = ["evaluate", "check_failures", "resolve_models", "EvalReport"]
