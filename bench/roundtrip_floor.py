#!/usr/bin/env python3
"""What the round trip costs against its floor (issue 26): the default command WITH the round trip,
against ``cp -r`` + a bare ``AutoModel.from_pretrained(OUT, trust_remote_code=True)`` + one
``predict_forward`` in a fresh process, on the same generated inputs, in one run.

    python3 bench/roundtrip_floor.py --model sa2va-4b --work /tmp/sb --json $OUT/rt.json   # GPU machine

The floor is what any round trip must pay at least: the bytes on disk (``cp``) and one load of them
plus one prediction. The tool's round trip does the conversion, then loads OUT in a child process
(``runner/child.py``) and predicts once. Inputs come from ``bench_convert.generate`` (the published
shapes, the fixture's remote code, which predicts); the page cache is left warm for every run (the
inputs were just generated, or read by the run before), so the ratio compares work, not cold reads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_convert  # noqa: E402  (the generator and tree_bytes of the conversion bench)

# The bare load and one prediction: what a user would type, nothing of this project imported.
BARE = r"""
import inspect, json, sys, time
t0 = time.perf_counter()
import torch
from PIL import Image
from transformers import AutoModel, AutoTokenizer
t_import = time.perf_counter() - t0
folder = sys.argv[1]
device = "cuda" if torch.cuda.is_available() else "cpu"
if device == "cpu":  # the model's code calls .cuda() (as upstream's does): on a CPU-only machine, keep it on the CPU
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
t = time.perf_counter()
model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).to(device).eval()
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
if hasattr(model, "preparing_for_generation"):  # the same answer length as the tool's round trip (16 new tokens);
    model.preparing_for_generation(tok, max_new_tokens=16)  # predict_forward's own default is 2048
t_load = time.perf_counter() - t
kwargs = {"image": Image.new("RGB", (448, 448), (110, 90, 60)), "text": "<image>Please segment the object.",
          "tokenizer": tok}
if "processor" in inspect.signature(model.predict_forward).parameters:
    from transformers import AutoProcessor
    kwargs["processor"] = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
t = time.perf_counter()
with torch.no_grad():
    out = model.predict_forward(**kwargs)
if device == "cuda":
    torch.cuda.synchronize()
t_predict = time.perf_counter() - t
print(json.dumps({"import_s": round(t_import, 3), "load_s": round(t_load, 3), "predict_s": round(t_predict, 3),
                  "device": device, "keys": sorted(out)}))
"""


def timed(cmd: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return time.perf_counter() - t0, p


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sa2va-4b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sa2va-bench"))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-no-verify", action="store_true", help="time only the default command (round trip)")
    ap.add_argument("--early-child-ab", action="store_true",
                    help="also time the round trip with its child started after the write (SA2VA_EARLY_CHILD=0)")
    args = ap.parse_args()
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    gen = bench_convert.generate(args.model, args.work, "bf16", logs / f"{args.model}.generate")
    base, ckpt = gen["base"], gen["checkpoint"]
    out_c, out_a = args.work / args.model / "rt_floor", args.work / args.model / "rt_tool"
    cli = bench_convert.cli_cmd()
    rows = []
    for rep in range(args.repeat):
        shutil.rmtree(out_c, ignore_errors=True)
        t_cp, p = timed(["bash", "-c", f'cp -r "{base}" "{out_c}" && sync'])
        assert p.returncode == 0, p.stderr
        t_bare, p = timed([sys.executable, "-c", BARE, str(out_c)])
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            return 1
        bare = json.loads(p.stdout.strip().splitlines()[-1])
        floor = t_cp + t_bare
        row = {"repeat": rep, "cp_s": round(t_cp, 2), "bare_process_s": round(t_bare, 2), "bare": bare,
               "floor_s": round(floor, 2)}
        runs = [("tool, round trip (default)", [], {})]
        if args.early_child_ab:  # the same command with the round trip's child started only after the write
            runs.append(("tool, round trip, child started after the write (SA2VA_EARLY_CHILD=0)", [],
                         {"SA2VA_EARLY_CHILD": "0"}))
        if not args.skip_no_verify:
            runs.append(("tool, --no-verify", ["--no-verify"], {}))
        for label, extra, env in runs:
            shutil.rmtree(out_a, ignore_errors=True)
            t_tool, p = timed([*cli, ckpt, str(out_a), "--base", base, "--json", "-q", "--force", *extra],
                              env={**os.environ, **env})
            rep_json = json.loads(p.stdout) if p.returncode == 0 else {"rc": p.returncode, "stderr": p.stderr[-2000:]}
            rt = rep_json.get("roundtrip") or rep_json.get("verify") or {}
            row[label] = {"wall_s": round(t_tool, 2), "x_floor": round(t_tool / floor, 2), "rc": p.returncode,
                          "phase_seconds": rep_json.get("phase_seconds"),
                          "roundtrip": {k: rt.get(k) for k in ("ok", "seconds", "timings", "device", "started_early",
                                                               "versions", "summary") if k in rt}}
            if p.returncode:
                print(f"{label}: rc {p.returncode}: {p.stderr[-1500:]}", file=sys.stderr, flush=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"model": args.model, "inputs": gen, "machine": bench_convert.machine_info(args.work), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    print("| run | wall s | x floor |\n|---|---|---|")
    for row in rows:
        print(f"| floor: cp -r && sync ({row['cp_s']} s) + bare load ({row['bare']['load_s']} s) + one predict_forward "
              f"({row['bare']['predict_s']} s), fresh process {row['bare_process_s']} s | {row['floor_s']} | 1.00 |")
        for label in [k for k in row if k.startswith("tool")]:
            print(f"| {label} | {row[label]['wall_s']} | {row[label]['x_floor']} |")
            print(f"|   phases {row[label].get('phase_seconds')} | child {row[label]['roundtrip'].get('timings')} |")
    shutil.rmtree(out_a, ignore_errors=True)
    shutil.rmtree(out_c, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
