"""The compatibility matrix: sa2va-convert installed as users install it, run as they run it.

    python bench/compat.py                      # every environment below (about an hour the first time)
    python bench/compat.py --only t2.6-tf4.57   # one row
    python bench/compat.py --list
    python bench/compat.py --table              # the table of today's results file, nothing run

For each environment a fresh venv is built the way a user's would be: first what they already have
(torch + torchvision, a transformers/peft pair: upstream Sa2VA's ``latest`` or ``legacy`` install, or
a newer transformers), then ``pip install -e '.[verify]'`` (or the plain package). ``pip freeze``
before and after tells whether the install changed any of torch, torchvision, transformers or peft.
Then, in that venv:

- the reader tests (``tests/test_checkpoint_reader.py``, ``test_safe_pickle.py``,
  ``test_embedded_config.py``; pytest, hypothesis and mmengine-lite are added for them, after the
  freeze);
- for each family's test model (``tests/remote_code``, which behaves like upstream's code where users
  get hurt): the default command ``sa2va-convert CKPT OUT --base BASE`` (convert, then the round trip
  on the CPU) on fixtures written once beforehand by this repository's own environment; the
  ``sa2va-1b`` fixture is the README's tiny example (a fine-tune that answers with ``[SEG]``).

Each row's exit code and one line (the round trip's summary, or the error) go to
``bench/results/compat_<date>.json`` and a Markdown table on stdout (the README's "Compatibility"
table is this output). Nothing here is timed.

Downloads (several GB the first time: CUDA builds of torch 2.6.0 and 2.14.1) go to pip's cache under
``--cache`` (default ``~/.cache/sa2va-convert-compat``); each venv is removed after its row unless
``--keep``. Needs the package registry; the machine's pip configuration (extra indexes, caps) applies.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WATCHED = ("torch", "torchvision", "transformers", "peft")
FAMILIES = ("sa2va-1b", "sa2va-8b", "sa2va-internvl3", "sa2va-qwen2_5-vl", "sa2va-qwen3-vl-sam3", "sa2va-llava-1.5")
READER_TESTS = ("tests/test_checkpoint_reader.py", "tests/test_safe_pickle.py", "tests/test_embedded_config.py")
HARNESS = ("pytest", "hypothesis", "mmengine-lite==0.10.7", "packaging")

# upstream Sa2VA's two installs (pyproject.toml of bytedance/Sa2VA): `latest` and `legacy`
LATEST = ("transformers==4.57.0", "peft==0.17.1")
LEGACY = ("transformers==4.49.0", "peft==0.11.1")
NEWEST_5 = ("transformers==5.25.0",)
TORCH_26 = ("torch==2.6.0", "torchvision==0.21.0")  # upstream's floor (torch>=2.6.0)
TORCH_NEW = ("torch==2.14.1", "torchvision==0.29.1")  # newest torch with a matching torchvision on PyPI (2026-12-07)


@dataclass
class Env:
    name: str
    what: str
    preinstall: tuple[str, ...]
    install: str  # the pip requirement for this repository
    extra_after: tuple[str, ...] = ()  # installed with the package (e.g. the verify extra's packages but transformers)


ENVS = [
    Env("t2.6-tf4.57", "upstream Sa2VA `latest` env: torch 2.6.0, transformers 4.57.0", TORCH_26 + LATEST, ".[verify]"),
    Env("t2.6-tf4.49", "upstream Sa2VA `legacy` env: torch 2.6.0, transformers 4.49.0", TORCH_26 + LEGACY, ".[verify]"),
    Env("t2.6-tf5", "torch 2.6.0 with transformers 5.x kept (package + timm, qwen-vl-utils; no verify extra)",
        TORCH_26 + NEWEST_5, ".", ("timm", "qwen-vl-utils")),
    Env("t2.14-tf4.57", "newest torch 2.14.1, transformers 4.57.0", TORCH_NEW + LATEST, ".[verify]"),
    Env("t2.14-tf4.49", "newest torch 2.14.1, transformers 4.49.0", TORCH_NEW + LEGACY, ".[verify]"),
    Env("t2.14-tf5", "newest torch 2.14.1 with transformers 5.x kept (no verify extra)",
        TORCH_NEW + NEWEST_5, ".", ("timm", "qwen-vl-utils")),
    Env("fresh-verify", "fresh venv: pip install '.[verify]' (the registry's torch)", (), ".[verify]"),
    Env("fresh-plain", "fresh venv: pip install . (no verify extra)", (), "."),
    # A local CPU build of torch (here 2.13.0+cpu) and the README's install line, which pins the user's torch:
    # pip keeps it and takes the registry's torchvision for 2.13.0, a build made against the CUDA torch.
    Env("mixed", "local CPU torch 2.13.0+cpu, then pip install '.[verify]' torch==2.13.0 (as the README says)",
        ("torch==2.13.0",), ".[verify]", ("torch==2.13.0",)),
    # The same without the pin: pip picks the newest torchvision, which requires a newer torch.
    Env("mixed-unpinned", "local CPU torch 2.13.0+cpu, then pip install '.[verify]' (no torch pin)",
        ("torch==2.13.0",), ".[verify]"),
]


@dataclass
class Row:
    env: str
    what: str
    versions: dict[str, str | None] = field(default_factory=dict)
    install_changed: dict[str, list[str | None]] = field(default_factory=dict)
    install_ok: bool = False
    install_error: str = ""
    reader_tests: str = ""
    families: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0


def run(cmd: list[str], *, env: dict | None = None, timeout: int = 3600, cwd: Path | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd,
                          stdin=subprocess.DEVNULL)


def freeze(python: Path) -> dict[str, str]:
    out = run([str(python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"])
    try:
        return {p["name"].lower(): p["version"] for p in json.loads(out.stdout)}
    except (ValueError, KeyError):
        return {}


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    return lines[-1][:400] if lines else ""


def make_fixtures(root: Path) -> dict[str, Path]:
    """Base folder + work_dir per family, written once by this repository's own environment."""
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for fam in FAMILIES:
        d = root / fam
        if not (d / "work_dirs" / "exp" / "last_checkpoint").exists():
            shutil.rmtree(d, ignore_errors=True)
            cmd = ([sys.executable, "-m", "sa2va_convert.testing", "tiny-example", str(d)] if fam == "sa2va-1b" else
                   [sys.executable, "-m", "sa2va_convert.testing", "generate", "--preset", fam, "--out", str(d)])
            r = run(cmd, timeout=1800)
            if r.returncode != 0:
                raise SystemExit(f"fixture {fam}: {last_line(r.stderr)}")
        out[fam] = d  # DIR/base and DIR/work_dirs/exp (tiny-example and generate write the same tree)
    return out


def env_row(e: Env, fixtures: dict[str, Path], cache: Path, keep: bool) -> Row:
    started = time.perf_counter()
    row = Row(e.name, e.what)
    venv = cache / "venvs" / e.name
    shutil.rmtree(venv, ignore_errors=True)
    py = venv / "bin" / "python"
    pipenv = dict(os.environ, PIP_CACHE_DIR=str(cache / "pip"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    try:
        r = run([sys.executable, "-m", "venv", str(venv)])
        if r.returncode != 0:
            row.install_error = "venv: " + last_line(r.stderr)
            return row
        if e.preinstall:
            r = run([str(py), "-m", "pip", "install", "-q", *e.preinstall], env=pipenv)
            if r.returncode != 0:
                row.install_error = "pre-install: " + last_line(r.stderr)
                return row
        before = freeze(py)
        req = f"{REPO}{e.install[1:]}" if e.install.startswith(".") else e.install
        r = run([str(py), "-m", "pip", "install", "-q", "-e", req, *e.extra_after], env=pipenv)
        if r.returncode != 0:
            row.install_error = "install: " + last_line(r.stderr)
            return row
        after = freeze(py)
        row.install_ok = True
        row.versions = {k: after.get(k) for k in WATCHED + ("timm", "qwen-vl-utils")}
        row.install_changed = {k: [before.get(k), after.get(k)] for k in WATCHED
                               if k in before and before.get(k) != after.get(k)}
        run([str(py), "-m", "pip", "install", "-q", *HARNESS], env=pipenv)  # after the freeze: not the user's
        r = run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *READER_TESTS],
                cwd=REPO, timeout=1800)
        row.reader_tests = last_line(r.stdout) or last_line(r.stderr)
        exe = venv / "bin" / "sa2va-convert"
        shutil.rmtree(cache / "out" / e.name, ignore_errors=True)
        (cache / "out" / e.name).mkdir(parents=True)
        for fam, d in fixtures.items():
            out = cache / "out" / e.name / fam
            t = time.perf_counter()
            r = run([str(exe), str(d / "work_dirs" / "exp"), str(out), "--base", str(d / "base"), "--device", "cpu",
                     "--json"], timeout=1800, env=dict(os.environ, HF_MODULES_CACHE=str(cache / "modules" / e.name)))
            try:
                doc = json.loads(r.stdout)
            except ValueError:
                doc = {}
            rt = doc.get("roundtrip") or {}
            err = (doc.get("error") or {}) if isinstance(doc.get("error"), dict) else {}
            line = rt.get("summary") or (f"{err.get('message')} (fix: {err.get('hint')})" if err else last_line(r.stderr))
            row.families[fam] = {"exit": r.returncode, "line": line, "seconds": round(time.perf_counter() - t, 1)}
    finally:
        row.seconds = round(time.perf_counter() - started, 1)
        if not keep:
            shutil.rmtree(venv, ignore_errors=True)
    return row


def short(fam: dict | None) -> str:
    if not fam:
        return "-"
    line = fam["line"]
    if fam["exit"] == 0:
        own = "own [SEG]" if "answered with [SEG]: yes" in line else ("forced [SEG]" if "forced [SEG]: 1 mask" in line
                                                                        else "?")
        return f"0 (mask, {own})"
    return f"{fam['exit']}"


def table(rows: list[Row]) -> str:
    head = "| environment | installed (torch / torchvision / transformers / peft) | install changed | reader tests | " \
           + " | ".join(FAMILIES) + " |"
    sep = "|" + "---|" * (4 + len(FAMILIES))
    lines = [head, sep]
    for r in rows:
        v = r.versions
        inst = " / ".join(str(v.get(k)) for k in WATCHED) if r.install_ok else f"failed: {r.install_error[:80]}"
        changed = ", ".join(f"{k} {a}→{b}" for k, (a, b) in r.install_changed.items()) or "nothing"
        fams = " | ".join(short(r.families.get(f)) for f in FAMILIES)
        tests = re.sub(r"(, \d+ warnings?)? in [\d.]+s.*$", "", r.reader_tests) or "-"  # counts, not timings
        lines.append(f"| {r.env} | {inst} | {changed if r.install_ok else '-'} | {tests} | {fams} |")
    return "\n".join(lines)


def earlier_rows(out: Path, rerun: set[str]) -> list[dict]:
    """Rows of the same day's file for environments not run again now (``--only`` adds to a table)."""
    try:
        return [r for r in json.loads(out.read_text())["rows"] if r.get("env") not in rerun]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("SA2VA_COMPAT_CACHE",
                                                                       Path.home() / ".cache" / "sa2va-convert-compat")))
    ap.add_argument("--only", action="append", help="environment name (repeatable); see --list")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the Markdown table of --out's rows, run nothing")
    ap.add_argument("--keep", action="store_true", help="keep each venv (about 5 GB each)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"compat_{datetime.date.today()}.json")
    args = ap.parse_args(argv)
    if args.list:
        for e in ENVS:
            print(f"{e.name:14s} {e.what}")
        return 0
    if args.table:
        order = [e.name for e in ENVS]
        done = sorted(earlier_rows(args.out, set()), key=lambda d: order.index(d["env"]) if d["env"] in order else 99)
        print(table([Row(**d) for d in done]))
        return 0
    chosen = [e for e in ENVS if not args.only or e.name in args.only]
    fixtures = make_fixtures(args.cache / "fixtures")
    rows: list[Row] = []
    kept = earlier_rows(args.out, {e.name for e in chosen})
    for e in chosen:
        print(f"== {e.name}: {e.what}", file=sys.stderr, flush=True)
        row = env_row(e, fixtures, args.cache, args.keep)
        rows.append(row)
        print(json.dumps(row.__dict__, default=str), file=sys.stderr, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"date": str(datetime.date.today()), "machine": os.uname().nodename,
                                        "rows": kept + [r.__dict__ for r in rows]}, indent=1, default=str) + "\n")
    print(table([Row(**d) for d in kept] + rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
