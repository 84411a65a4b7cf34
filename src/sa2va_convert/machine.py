"""Facts about the machine and this process, for sizing threads and checking memory."""

from __future__ import annotations

import os
import time
from pathlib import Path

RAM_LIMIT_ENV = "SA2VA_CONVERT_RAM_LIMIT"


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


def process_rss() -> int | None:
    """This process's resident bytes now (``VmRSS``), or None where ``/proc`` cannot tell."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_age() -> float | None:
    """Seconds since this process started (``/proc/self/stat``), or None where that cannot be read:
    how long the interpreter's start and the imports took, when asked as the work begins."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, in ticks after boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def available_ram() -> tuple[int | None, str]:
    """Bytes this process tree may still use, and where the figure comes from.

    The smallest of: MemAvailable, the cgroup's memory.max minus its usage (containers, Slurm),
    and ``SA2VA_CONVERT_RAM_LIMIT`` (a size such as ``8GB``, for a machine shared with others)."""
    figures: list[tuple[int, str]] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    figures.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            figures.append((max(int(limit) - used, 0), "cgroup memory.max"))
    except (OSError, ValueError):
        pass
    env = os.environ.get(RAM_LIMIT_ENV)
    if env:
        from .sizes import parse_size

        figures.append((parse_size(env, what=RAM_LIMIT_ENV), RAM_LIMIT_ENV))
    if not figures:
        return None, "unknown"
    return min(figures)


__all__ = ["RAM_LIMIT_ENV", "available_ram", "env_count", "process_age", "process_rss", "usable_cores"]
