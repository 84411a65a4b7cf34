#!/usr/bin/env python3
"""A/B of the shard writer alone: this tree's ``write_streamed`` against the one at another commit.

    .venv/bin/python bench/bench_writer.py --against ebecc69 --gib 2 --repeat 3

Issue 14 moved the shard's sha256 off the writer's thread: a full 16 MiB stage
goes to an IO thread (``os.write``, ``O_DIRECT``) and to a hashing thread at the
same time while the caller fills a second stage. This times exactly that part,
with the same tensors, in the same process, alternating old and new, so disk
and load drift hit both. Tensors are made in memory first (random bf16), so
nothing but staging, hashing and writing is timed; each file is fsync'ed by the
writer and deleted after. The two versions must produce identical files and
digests, which is checked.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODULE = "src/sa2va_convert/write/safetensors_stream.py"


def load_version(commit: str):
    """The writer module as it was at ``commit`` (relative imports made absolute), as a fresh module."""
    text = subprocess.run(["git", "show", f"{commit}:{MODULE}"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout
    text = text.replace("from .. import dtypes", "from sa2va_convert import dtypes")
    text = text.replace("from ..read.tensor_source", "from sa2va_convert.read.tensor_source")
    path = Path(tempfile.mkdtemp()) / f"safetensors_stream_{commit}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return ru.ru_utime + ru.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default="ebecc69", help="commit whose writer is the baseline")
    ap.add_argument("--gib", type=float, default=2.0, help="bytes written per file")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sa2va-bench-writer"))
    args = ap.parse_args()
    from sa2va_convert.read.tensor_source import TensorInfo
    from sa2va_convert.write import safetensors_stream as new

    old = load_version(args.against)
    n = 32
    per = int(args.gib * 2**30) // n // 2 * 2
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i:03d}": torch.randn(per // 2 - i, generator=g).to(torch.bfloat16) for i in range(n)}
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    digests = {}
    for rep in range(args.repeat):
        for name, mod in (("old " + args.against, old), ("new (this tree)", new)):
            entries = [mod.StreamEntry(k, TensorInfo(tuple(t.shape), "bf16")) for k, t in tensors.items()]
            path = args.dir / "shard.safetensors"
            digest = hashlib.sha256()
            os.sync()
            c0, t0 = cpu_seconds(), time.perf_counter()
            nbytes = mod.write_streamed(path, entries, lambda e: tensors[e.name], metadata={"format": "pt"},
                                        digest=digest)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            h = digest.hexdigest()
            on_disk = hashlib.sha256(path.read_bytes()).hexdigest() if rep == 0 else h
            assert on_disk == h, f"{name}: recorded digest differs from the file"
            digests.setdefault(rep, set()).add(h)
            path.unlink()
            rows.append({"version": name, "repeat": rep, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                         "gb": round(nbytes / 1e9, 3), "gb_per_s": round(nbytes / 1e9 / wall, 2),
                         "load1": os.getloadavg()[0]})
            print(json.dumps(rows[-1]), flush=True)
    assert all(len(d) == 1 for d in digests.values()), "old and new wrote different bytes"
    print("\n| version | wall s (median) | GB/s | CPU s (median) | load1 |\n|---|---|---|---|---|")
    for name in dict.fromkeys(r["version"] for r in rows):
        rs = sorted((r for r in rows if r["version"] == name), key=lambda r: r["wall_s"])
        m = rs[len(rs) // 2]
        cpu = sorted(r["cpu_s"] for r in rs)[len(rs) // 2]
        print(f"| {name} | {m['wall_s']:.2f} (of {', '.join(str(r['wall_s']) for r in rs)}) | {m['gb_per_s']:.2f} "
              f"| {cpu:.2f} | {m['load1']:.1f} |")
    print("identical files and digests: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
