"""The `--dry-run` estimate for a model too big to write here (26B), with the CLI itself.

    .venv/bin/python bench/estimate_sparse.py --models sa2va-8b,sa2va-26b
    .venv/bin/python bench/estimate_sparse.py --models sa2va-26b --env SA2VA_MERGE_WORKERS=8 --env SA2VA_PARALLEL_SHARDS=4

A dry run reads safetensors headers and the checkpoint, never a base tensor's bytes, so the base
folder here is *sparse*: every shard has its real header (``write.safetensors_stream.build_header``,
the tool's own) and a hole of the tensors' size (``truncate``), costing no disk. The checkpoint is
the real fixture (``fill='fast'``, a few GB at 26B). The estimate then comes from the same code
path a user's ``sa2va-convert CKPT OUT --dry-run --json`` takes, on this machine (its own RSS is
the estimate's baseline; ``--env`` sets the machine-dependent counts, e.g. a 16-core machine's
8 merge workers and 4 open shards). The baseline of the same run is the 8B estimate, which
``bench_convert.py`` has compared with measured peaks (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import sa2va_convert.testing.fixtures as fixtures
from sa2va_convert.testing.fixtures import write_base_folder
from sa2va_convert.testing.layouts import Sizes
from sa2va_convert.testing.training_checkpoint import write_training_checkpoint
from sa2va_convert.write.safetensors_stream import build_header


def write_sparse_shard(path: Path, entries, produce, *, metadata=None, **_ignored) -> int:
    """Stand-in for ``write_streamed`` in fixture generation only: header, then a hole."""
    header = build_header(entries, metadata)
    size = len(header) + sum(e.info.nbytes for e in entries)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)
    return size


AS_DEVICE = r"""
import json, sys
from pathlib import Path
from sa2va_convert.conversion import open_inputs, plan_from_inputs
from sa2va_convert.options import ConvertOptions
from sa2va_convert.write.peak_ram import process_baseline

ckpt, base, out, device = sys.argv[1:5]
options = ConvertOptions(base=base, merge_device=device, roundtrip=False)  # not validated: no GPU here
baseline = process_baseline()  # before the inputs are opened, where the conversion and the dry run take it
plan = plan_from_inputs(open_inputs(Path(ckpt), options), Path(out), options, baseline_bytes=baseline)
print(json.dumps({f"{device}_peak_ram_gib": plan.peak_ram_bytes / 2**30, f"{device}_window_mib": plan.window_bytes >> 20}))
"""


def as_merge_device(ckpt: Path, base: Path, out: Path, device: str, env: dict) -> dict:
    """The plan's peak estimate and writer window as a conversion merging on ``device`` would choose them
    (``conversion.plan_from_inputs``), in a fresh process as the CLI's (its RSS is the estimate's baseline)."""
    r = subprocess.run([sys.executable, "-c", AS_DEVICE, str(ckpt), str(base), str(out), device],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"estimate as {device} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="sa2va-8b,sa2va-26b")
    ap.add_argument("--work", default="/tmp/sa2va-sparse")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the CLI's environment")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--as-merge-device", metavar="DEVICE",
                    help="also the estimate and window for this merge device (e.g. cuda), computed in-process: "
                         "the CLI refuses a GPU merge where torch sees none")
    args = ap.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.env)
    env = dict(os.environ, **overrides)
    cli = [sys.executable, "-m", "sa2va_convert"]
    fixtures.write_streamed = write_sparse_shard  # this process only: the bases' bytes are holes
    rows = []
    for model in args.models.split(","):
        work = Path(args.work) / model
        shutil.rmtree(work, ignore_errors=True)
        base = write_base_folder(work / "base", model, Sizes.real(model), fill="fast")
        ckpt = write_training_checkpoint(work / "work_dirs" / "exp" / "iter_100.pth", model, Sizes.real(model),
                                         base_dir=base, fill="fast")
        disk = sum(p.stat().st_blocks * 512 for p in (work / "base").glob("*.safetensors"))
        r = subprocess.run(cli + [str(ckpt.path), str(work / "out"), "--base", str(base), "--dry-run", "--json"],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.exit(f"{model}: dry run failed ({r.returncode}): {r.stderr[-2000:]}")
        plan = json.loads(r.stdout)["plan"]
        est = {"peak_ram_gib": plan["estimates"]["peak_ram_bytes"] / 2**30,
               "disk_gib": plan["estimates"]["disk_bytes"] / 2**30, "shards": len(plan["shards"]),
               "lora_pairs": plan["lora"]["pairs"], "tensor_count": plan["tensor_count"]}
        if args.as_merge_device:  # a GPU merge's estimate and window, on a machine without one (in-process)
            est.update(as_merge_device(ckpt.path, base, work / "out", args.as_merge_device, env))
        rows.append({"model": model, "base_disk_bytes_used": disk, "estimate": est})
        print(f"{model}: peak RAM {est['peak_ram_gib']:.2f} GiB, disk {est['disk_gib']:.2f} GiB, "
              f"{est['shards']} shards, {est['lora_pairs']} LoRA pairs (sparse base: {disk / 2**20:.1f} MiB "
              "on disk)", flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"env": overrides, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
