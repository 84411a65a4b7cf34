"""The default command on bases that carry the REAL upstream remote code, in users' environments.

    python bench/upstream_check.py --fixtures DIR --env t2.6-tf4.57=/path/to/venv/bin/python [--env ...]
        [--family internvl-qwen2 ...] [--out bench/results/upstream_<date>.json]

DIR is what ``bench/upstream_fixtures.py`` wrote (DIR/<family>/base + work_dirs/exp). For each family and
each environment it runs ``sa2va-convert WORK_DIR OUT --base BASE --device cpu --python ENV_PYTHON --json``
with this interpreter's sa2va-convert: the conversion runs here, the round trip (the upstream code's
``from_pretrained`` + ``predict_forward``, forced ``[SEG]`` included) in the named environment's
interpreter, as ``--python`` does for a user whose Sa2VA environment is not this one. Each run's exit code
and one line (the round trip's summary, or the error with its fix) go to the JSON file and a Markdown table
on stdout. On a 2-core CPU the forced-``[SEG]`` step through upstream's SAM2 Hiera-L takes ~10 minutes a
run. Nothing here is timed for a claim; the seconds are recorded for planning.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(fixture: Path, python: str, out: Path, modules: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "sa2va_convert", str(fixture / "work_dirs" / "exp"), str(out),
           "--base", str(fixture / "base"), "--device", "cpu", "--python", python, "--json"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=3600,
                       env=dict(os.environ, HF_MODULES_CACHE=str(modules)))
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        doc = {}
    rt = doc.get("roundtrip") or {}
    err = doc.get("error") if isinstance(doc.get("error"), dict) else {}
    tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    line = rt.get("summary") or (f"{err.get('message')} (fix: {err.get('hint')})" if err else
                                 (tail[-1] if tail else ""))
    return {"exit": r.returncode, "line": line, "seconds": round(time.perf_counter() - t, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", required=True, type=Path)
    ap.add_argument("--env", action="append", required=True, metavar="NAME=PYTHON")
    ap.add_argument("--family", action="append", help="default: every folder under --fixtures")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "sa2va-upstream-check")
    ap.add_argument("--out", type=Path,
                    default=REPO / "bench" / "results" / f"upstream_{datetime.date.today()}.json")
    args = ap.parse_args(argv)
    envs = dict(e.split("=", 1) for e in args.env)
    families = args.family or sorted(p.name for p in args.fixtures.iterdir() if (p / "base").is_dir())
    commits = {f: json.loads((args.fixtures / f / "build_info.json").read_text()).get("upstream_commit")
               for f in families if (args.fixtures / f / "build_info.json").is_file()}
    rerun = {(f, n) for f in families for n in envs}
    try:  # rows of the same day's file that are not run again now: several calls add to one table
        earlier = json.loads(args.out.read_text())
        rows = [r for r in earlier["rows"] if (r["family"], r["env"]) not in rerun]
        commits = {**earlier.get("upstream_commits", {}), **commits}
    except (OSError, ValueError, KeyError, TypeError):
        rows = []
    for fam in families:
        for name, python in envs.items():
            print(f"== {fam} in {name}", file=sys.stderr, flush=True)
            res = one_run(args.fixtures / fam, python, args.work / name / fam, args.work / "modules" / name)
            rows.append({"family": fam, "env": name, "python": python, **res})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"date": str(datetime.date.today()), "machine": os.uname().nodename,
                                            "upstream_commits": commits, "rows": rows}, indent=1) + "\n")
    print("| upstream code | environment | exit | what the default command said |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['env']} | {r['exit']} | {r['line']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
