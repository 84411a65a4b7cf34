"""Facts about the machine the conversion runs on, for sizing its threads."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, as a container or ``taskset`` limits it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def env_count(name: str) -> int | None:
    """A positive integer from the environment variable ``name`` (benchmark overrides), else None."""
    env = os.environ.get(name, "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else None


__all__ = ["env_count", "usable_cores"]
