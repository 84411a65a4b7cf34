"""The model runner: a converted folder's own code, loaded and run in a process of its own.

``process.py`` starts the child (``child.py``, a standalone script) under the chosen interpreter
and reads its report; ``report.py`` holds that report to the contract every mode shares;
``failure.py`` (with ``environment.py``) turns a failed child into one error with its fix;
``memory.py`` and ``device_check.py`` refuse, before any work, what cannot run. The round trip
(``verify/``), ``predict`` and ``eval`` are its callers; none of them starts a process itself.
"""
