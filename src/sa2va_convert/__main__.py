"""``python -m sa2va_convert``: the same command as the ``sa2va-convert`` script.

Useful where the console script is not on PATH (a venv not activated, CI images) and to pin the
interpreter explicitly. Ctrl-C while Python imports us is one line and exit 130 (see ``_entry``).
"""

import sys

if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess in tests
    try:
        from ._entry import main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted while starting; nothing was read or written\n")
        sys.exit(130)
    main()
