#!/usr/bin/env python3
"""``--format adapter`` against the merged folder: output size and conversion time, at a real shape.

    .venv/bin/python bench/bench_adapter.py --model sa2va-4b --repeats 2 --json bench/results/adapter.json
    .venv/bin/python bench/bench_adapter.py --model sa2va-1b --checkpoints 3 --repeats 1   # --all over a run

Inputs are ``bench_convert.generate``'s (the project's fixture generator at ``Sizes.real`` shapes,
``fill='fast'`` values; the checkpoint has the published LoRA rank and the trained heads). Each run is
``sa2va-convert CKPT OUT --base BASE --no-verify`` with and without ``--format adapter``, alternated
(merged, adapter, merged, adapter, ...) in fresh processes, each measured by ``bench_convert.measure``
(wall including a final ``sync``, CPU seconds, peak RSS) after a page-cache drop where the machine allows
one. The output folder's bytes are read back from disk after each run; the outputs are deleted after
each run (the shared disk), the generated inputs at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import (  # noqa: E402 - the sibling bench's machinery, one way to measure
    can_drop_caches,
    cli_cmd,
    generate,
    machine_info,
    measure,
    prepare_cache,
    tree_bytes,
)

GIB = 1024**3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sa2va-4b", help="a Sizes.real name (sa2va-1b, sa2va-4b, ...)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sa2va-bench-adapter"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--base-dtype", default="bf16")
    ap.add_argument(
        "--checkpoints",
        type=int,
        default=1,
        help="N > 1: convert a work_dir of N checkpoints with --all (iter_100 hard-linked as iter_200, ...: "
        "the same bytes, N outputs), as a training run is kept",
    )
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    args = ap.parse_args(argv)

    work = args.work
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    gen = generate(args.model, work, args.base_dtype, logs / f"generate.{args.model}")
    drop = can_drop_caches()
    res: dict = {"machine": machine_info(work), "model": args.model, "inputs": gen, "caches_dropped": drop, "runs": []}
    base, ckpt = gen["base"], gen["checkpoint"]
    if args.checkpoints > 1:
        first = Path(ckpt)
        for k in range(2, args.checkpoints + 1):
            link = first.with_name(f"iter_{100 * k}.pth")
            if not link.exists():
                os.link(first, link)
        (first.parent / "last_checkpoint").unlink(missing_ok=True)
        ckpt = str(first.parent)  # the work_dir, converted with --all
    res["checkpoints"] = args.checkpoints
    try:
        for rep in range(args.repeats):
            for fmt in ("folder", "adapter"):
                out = work / f"out-{fmt}"
                shutil.rmtree(out, ignore_errors=True)
                prepare_cache(drop, [Path(base), Path(ckpt)])
                cmd = [*cli_cmd(), ckpt, str(out), "--base", base, "--no-verify", "--format", fmt, "--json"]
                if args.checkpoints > 1:
                    cmd.append("--all")
                m = measure(cmd, log=logs / f"{args.model}.{fmt}.{rep}")
                m.update(format=fmt, repeat=rep, out_bytes=tree_bytes(out) if out.exists() else None)
                m["files"] = (
                    sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else []
                )
                res["runs"].append(m)
                print(
                    f"{fmt:8s} rep {rep}: rc {m['rc']}, wall {m['wall_s']} s, CPU {m['user_s'] + m['sys_s']:.1f} s, "
                    f"peak RSS {m['maxrss_bytes'] / GIB:.2f} GiB, out {(m['out_bytes'] or 0) / GIB:.3f} GiB",
                    flush=True,
                )
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=1))
        if not args.keep:
            shutil.rmtree(work / args.model, ignore_errors=True)
    return 0 if all(r["rc"] == 0 for r in res["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
