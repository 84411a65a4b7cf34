"""Defaults of ``eval`` that the CLI shows in ``--help``: a module with no imports, so registering
``eval`` (``cli_eval.py``) can read them without loading the runner (numpy)."""

DEFAULT_IMAGE_TIMEOUT = 600.0  # seconds per image, and as much again for loading, before the model process is killed

__all__ = ["DEFAULT_IMAGE_TIMEOUT"]
