"""``python -m sa2va_convert``: the same command as ``sa2va-convert``.

Useful where the console script is not on PATH (a venv not activated, ``pipx run``-less CI images)
and to pin the interpreter explicitly. ``prog_name`` keeps help and errors saying ``sa2va-convert``.
"""

from .cli import main

if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess in tests
    main(prog_name="sa2va-convert")
