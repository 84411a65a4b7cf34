#!/usr/bin/env python3
"""Issue 23: what the integrity checks cost, against the unchecked path, in the same run.

    .venv/bin/python bench/bench_integrity.py --model sa2va-1b --repeats 3 --json bench/results/x.json

Two checks were added to the read stage (issue 23, items 1 and 2):

* the CRC-32 of every ``torch.save`` zip record the conversion reads (``read/zip_records.py``):
  ``data.pkl`` before unpickling, each tensor record at its first read, on the reader thread;
* every safetensors header of the base checked by the library's rules (``read/safetensors_check.py``)
  and by ``safetensors.safe_open`` itself (``safetensors_header.library_check``).

Inputs are the realistic-size synthetic model of ``bench_convert.py`` (``Sizes.real``, bf16 base, LoRA
r=128 on every LLM linear). Measured, each repetition in a fresh child process, checked and unchecked
alternating (A B A B ...), page cache dropped before each run when the machine lets us (else warm, and
said so):

(a) the parts, in one child: reading every checkpoint tensor's bytes through the mapping (what any
    conversion pays) vs the CRC-32 pass over the same records; parsing the base's headers with a bare
    ``json.loads`` (the unchecked path) vs our rules vs ``safe_open``;
(b) the whole command, ``sa2va-convert CKPT OUT --base BASE --no-verify``: as shipped vs with the
    checks switched off inside the child (``_UNCHECKED`` below: the benchmark's own patch, not an option).

Machine, load average, commands and every figure go to stdout (markdown) and ``--json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_convert as bc  # noqa: E402 - the fixture generator and the measuring of bench_convert

MIB = 1024**2

# The unchecked path, for comparison only: the child replaces the two checks by what ran before them
# (a bare header parse; no CRC pass, no safe_open) before the CLI starts.
_UNCHECKED = r"""
import json, sys
import sa2va_convert.read.zip_records as zr
import sa2va_convert.read.hf_folder as hf
zr.RecordCheck.verify_metadata = lambda self: None
zr.RecordCheck.verify_tensor = lambda self, *a, **k: None
def plain_header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))
hf.read_safetensors_header = plain_header
hf.library_check = lambda path, names: None
from sa2va_convert._entry import main
main(sys.argv[1:])
"""

# Part (a), run in a child so that this process stays small (a child's ru_maxrss starts from its parent's).
_PARTS = r"""
import json, sys, time, os
from pathlib import Path
import torch
from sa2va_convert.read.safe_pickle import safe_torch_load
from sa2va_convert.read.zip_records import RecordCheck
from sa2va_convert.read.safetensors_check import read_and_validate
from sa2va_convert.read.safetensors_header import library_check
ckpt, base, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
out = {}
if what == "read":   # every tensor's bytes through the mapping, as the conversion reads them
    loaded = safe_torch_load(ckpt)
    sd = loaded.obj.get("state_dict", loaded.obj)
    t0 = time.perf_counter(); n = 0
    for t in sd.values():
        if isinstance(t, torch.Tensor) and t.numel():
            u8 = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
            n += u8.clone().numel()
    out = {"seconds": time.perf_counter() - t0, "bytes": n}
elif what == "crc":  # the CRC-32 pass over the same records (zipfile's machinery), as the sources run it
    loaded = safe_torch_load(ckpt)
    sd = loaded.obj.get("state_dict", loaded.obj)
    check = RecordCheck(ckpt)
    t0 = time.perf_counter()
    for k, t in sd.items():
        if isinstance(t, torch.Tensor):
            check.verify_tensor(k, t)
    out = {"seconds": time.perf_counter() - t0, "bytes": check.checked_bytes}
elif what == "headers":  # per base: bare json.loads vs our rules vs safe_open, best of 20
    shards = sorted(base.glob("*.safetensors"))
    def best(fn):
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            for s in shards:
                fn(s)
            times.append(time.perf_counter() - t0)
        return min(times)
    def bare(p):
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little"); return json.loads(f.read(n))
    names = {s: [k for k in bare(s) if k != "__metadata__"] for s in shards}
    out = {"shards": len(shards), "tensors": sum(len(v) for v in names.values()),
           "bare_json_s": best(bare), "our_rules_s": best(read_and_validate),
           "safe_open_s": best(lambda s: library_check(s, names[s]))}
print(json.dumps(out))
"""


def _child(code: str, *args: str) -> dict:
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sa2va-1b", help="a Sizes.real name (sa2va-1b, sa2va-4b, ...)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sa2va-bench")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs (reused by a later run)")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    logs = args.work / "logs-integrity"
    logs.mkdir(exist_ok=True)
    drop = bc.can_drop_caches()
    res: dict = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": bc.machine_info(args.work),
                 "command": " ".join([Path(sys.executable).name, *sys.argv]), "cache": "dropped" if drop else "warm",
                 "load1_start": bc.loadavg()}
    gen = bc.generate(args.model, args.work, "bf16", logs / f"generate-{args.model}")
    res["inputs"] = gen
    ckpt, base = gen["checkpoint"], gen["base"]

    parts: dict[str, list] = {"read": [], "crc": [], "read_warm": [], "crc_warm": []}
    for i in range(args.repeats):
        for what in ("read", "crc"):
            bc.prepare_cache(drop, [Path(ckpt)])
            parts[what].append(_child(_PARTS, ckpt, base, what))
            bc.prepare_cache(False, [Path(ckpt)])  # in the page cache: the CPU cost alone
            parts[f"{what}_warm"].append(_child(_PARTS, ckpt, base, what))
    res["crc_parts"] = parts
    res["header_parts"] = _child(_PARTS, ckpt, base, "headers")

    runs: dict[str, list] = {"checked": [], "unchecked": []}
    for i in range(args.repeats):
        for mode in ("checked", "unchecked"):
            out = args.work / f"out-integrity-{mode}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            bc.prepare_cache(drop, [Path(ckpt), Path(base)])
            head = [sys.executable, "-m", "sa2va_convert"] if mode == "checked" else [sys.executable, "-c", _UNCHECKED]
            cmd = [*head, ckpt, str(out), "--base", base, "--no-verify"]
            runs[mode].append(bc.measure(cmd, log=logs / f"{mode}-{i}", env={**os.environ, "CI": "1"}))
            assert runs[mode][-1]["rc"] == 0, runs[mode][-1].get("stderr_tail")
    res["commands"] = runs
    res["load1_end"] = bc.loadavg()
    if not args.keep:
        subprocess.run(["rm", "-rf", str(args.work / args.model)], check=False)

    md = summarize(res)
    print(md)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


def summarize(res: dict) -> str:
    m, gen = res["machine"], res["inputs"]
    med = statistics.median
    read = [r["seconds"] for r in res["crc_parts"]["read"]]
    crc = [r["seconds"] for r in res["crc_parts"]["crc"]]
    read_w = [r["seconds"] for r in res["crc_parts"]["read_warm"]]
    crc_w = [r["seconds"] for r in res["crc_parts"]["crc_warm"]]
    nbytes = res["crc_parts"]["crc"][0]["bytes"]
    h = res["header_parts"]
    wall = {k: [r["wall_s"] for r in v] for k, v in res["commands"].items()}
    cpu = {k: [r["user_s"] + r["sys_s"] for r in v] for k, v in res["commands"].items()}
    lines = [
        f"machine: {m['cpu']}, {m['nproc']} cores, {m['mem_total_gib']} GiB, {m['disk']}; torch {m.get('torch')}; "
        f"page cache {res['cache']}; load average {res['load1_start']} -> {res['load1_end']}",
        f"inputs: {res['inputs']['key']['model']} (Sizes.real): checkpoint {gen['checkpoint_bytes'] / MIB:.0f} MiB, "
        f"base {gen['base_bytes'] / MIB:.0f} MiB",
        f"command: {res['command']}",
        "",
        "| what | unchecked | checked | cost |",
        "|---|---|---|---|",
        f"| checkpoint tensors, {nbytes / MIB:.0f} MiB, {res['cache']} cache: read through the mapping / CRC-32 "
        f"pass (median of {len(read)}) | {med(read):.2f} s | +{med(crc):.2f} s ({nbytes / MIB / med(crc):.0f} MiB/s) "
        f"| {med(crc) / med(read) * 100:.0f} % of the read |",
        f"| the same, in the page cache (CPU alone) | {med(read_w):.2f} s | +{med(crc_w):.2f} s "
        f"({nbytes / MIB / med(crc_w):.0f} MiB/s) | {med(crc_w) / med(read_w) * 100:.0f} % of the read |",
        f"| base headers, {h['shards']} shard(s), {h['tensors']} tensors (best of 20) | {h['bare_json_s'] * 1e3:.1f} ms"
        f" (json.loads) | {h['our_rules_s'] * 1e3:.1f} ms (our rules) + {h['safe_open_s'] * 1e3:.1f} ms (safe_open) "
        f"| +{(h['our_rules_s'] + h['safe_open_s'] - h['bare_json_s']) * 1e3:.1f} ms |",
        f"| `sa2va-convert --no-verify`, wall (median of {len(wall['checked'])}; runs "
        f"{', '.join(f'{x:.1f}' for x in wall['unchecked'])} / {', '.join(f'{x:.1f}' for x in wall['checked'])}) | "
        f"{med(wall['unchecked']):.2f} s | {med(wall['checked']):.2f} s | "
        f"{med(wall['checked']) - med(wall['unchecked']):+.2f} s |",
        f"| the same, CPU user+sys (median) | {med(cpu['unchecked']):.2f} s | {med(cpu['checked']):.2f} s | "
        f"{med(cpu['checked']) - med(cpu['unchecked']):+.2f} s |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
