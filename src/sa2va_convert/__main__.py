"""``python -m sa2va_convert``: the same command as the ``sa2va-convert`` script."""

import sys

try:
    from ._entry import main
except KeyboardInterrupt:  # Ctrl-C while Python imports us: one line, exit 130 (see _entry)
    sys.stderr.write("error: interrupted while starting; nothing was read or written\n")
    sys.exit(130)

main()
