"""Realistic-size round trip on GPU machines: convert an 8B-shaped fixture, then verify it on
one GPU (`--device cuda`) and spread over every visible GPU (`device_map="auto"`, bf16).

Runs where only the GPU machine's own Python is available: no mmengine there, so the checkpoint
is written as a bare state dict and LoRA alpha is passed on the command line. Prints one JSON
line per step; BENCHMARKS.md records the figures.

    PYTHONPATH=src python3 bench/gpu_roundtrip.py --preset sa2va-8b --work /tmp/gv
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run(step: str, argv: list[str], env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    out: dict = {"step": step, "rc": p.returncode, "wall_s": round(wall, 1)}
    try:
        out["report"] = json.loads(p.stdout)
    except ValueError:
        out["stdout_tail"] = p.stdout[-2000:]
    if p.returncode:
        out["stderr_tail"] = p.stderr[-3000:]
    print(json.dumps(out, default=str)[:20000], flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="sa2va-8b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gv"))
    args = ap.parse_args()

    from sa2va_convert.testing.fixtures import write_base_folder, write_training_checkpoint
    from sa2va_convert.testing.layouts import Sizes

    sizes = Sizes.real(args.preset)
    t0 = time.perf_counter()
    base = write_base_folder(args.work / "base", args.preset, sizes, dtype="bf16", fill="fast")
    ck = write_training_checkpoint(args.work / "iter_100.pth", args.preset, sizes, fmt="state_dict", fill="fast")
    print(json.dumps({"step": "generate", "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)

    cli = [sys.executable, "-m", "sa2va_convert.cli"]
    out = args.work / "out"
    run("convert (merge on cuda)", [*cli, ck.path, out, "--base", base, "--lora-alpha", str(ck.lora_alpha),
                                    "--merge-device", "cuda", "--no-verify", "--json", "--force"])
    import torch

    n = torch.cuda.device_count()
    run("verify --device cuda (1 GPU)", [*cli, "verify", out, "--device", "cuda", "--json"],
        env={"CUDA_VISIBLE_DEVICES": "0"})
    if n > 1:
        run(f"verify --device auto ({n} GPUs, device_map=auto)", [*cli, "verify", out, "--device", "auto", "--json"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
