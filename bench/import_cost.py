"""What a conversion pays before its first byte of work: Python, our CLI, torch, in fresh processes.

Issue 26's remaining gaps (4B against ``cp``, 1B against the full-load baseline) are the fixed cost of
starting: the tool's own ``phase_seconds.start_and_imports``. This splits that cost, each step timed
in a fresh interpreter so that nothing is imported twice:

* ``python``: the interpreter alone (``-c pass``);
* ``cli``: what the console script imports before a command runs (``sa2va_convert.cli``, no torch);
* ``torch``: ``import torch`` alone;
* ``tool``: everything a conversion imports before it starts (``sa2va_convert.conversion``: torch,
  safetensors, our readers and writers);
* ``baseline``: what the full-load baseline (``bench_convert.py _baseline``) imports: torch and
  ``safetensors.torch``.

With ``--cache drop`` (root only) the page cache is dropped before every run, as the conversion bench
does for its ``dropped`` rows; ``warm`` runs each once first, untimed. Two figures per run: the
process's whole wall time, start to exit, as ``time`` reports it (with the interpreter's teardown of
torch, 0.5-1 s, which the console script skips), and the import alone, timed inside the process. The
JSON is rewritten after every step, so a run cut by a timeout keeps what it measured.

    python3 bench/import_cost.py --cache warm,drop --repeat 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

STEPS = {
    "python": "pass",
    "cli": "import sa2va_convert.cli",
    "torch": "import torch",
    "tool": "import sa2va_convert.conversion",
    "baseline": "import torch, safetensors.torch",
}


def drop_caches() -> None:
    """The page cache dropped, as bench_convert.py does (``sync; echo 3 > drop_caches``)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(code: str) -> tuple[float, float]:
    """Wall seconds of a fresh ``python -c code`` (start to exit), and of ``code`` alone inside it."""
    probe = f"import time as _t; _s = _t.perf_counter(); {code}; print(_t.perf_counter() - _s)"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return time.perf_counter() - started, float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="warm", help="warm, drop or both (comma-separated)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", default=",".join(STEPS), help=f"any of {', '.join(STEPS)}")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    caches = [c.strip() for c in a.cache.split(",") if c.strip()]
    steps = [s.strip() for s in a.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS] + [c for c in caches if c not in ("warm", "drop")]
    if unknown:
        ap.error(f"unknown: {', '.join(unknown)} (steps: {', '.join(STEPS)}; caches: warm, drop)")
    result: dict = {"python": sys.version.split()[0], "executable": sys.executable, "runs": {}}
    try:
        import torch

        result["torch"] = torch.__version__
    except ImportError:
        pass
    for cache in caches:
        for step in steps:
            code = STEPS[step]
            if cache == "warm":
                timed(code)
            walls, inside = [], []
            for _ in range(a.repeat):
                if cache == "drop":
                    drop_caches()
                wall, imported = timed(code)
                walls.append(round(wall, 3))
                inside.append(round(imported, 3))
            result["runs"][f"{step}.{cache}"] = {
                "code": code,
                "wall_s": walls,
                "median_s": statistics.median(walls),
                "import_s": inside,
            }
            print(
                f"{cache:5s} {step:9s} process {' '.join(f'{w:6.2f}' for w in walls)} s, "
                f"import {' '.join(f'{w:6.2f}' for w in inside)} s  ({code})",
                flush=True,
            )
            if a.json:
                a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
