"""What one merge worker spends per LoRA-merged block, op by op, on this machine.

    .venv/bin/python bench/bench_merge_ops.py                    # an 8B MLP projection (18944 x 3584), rank 128
    .venv/bin/python bench/bench_merge_ops.py --rows 4096 --cols 4096 --rank 64

The conversion's merge (``transform.produce.TensorProducer._merge_blocks``) does, per block of
rows, exactly these ops on one torch thread: upcast the base rows to fp32, ``B[rows] @ A``, the
two norms of the delta report, the add, the one rounding to the output dtype and the NaN/Inf
check; the writer then hashes the bytes (sha256). This script times each op on a block of the
size the tool uses (``TensorProducer``'s default ``block_elems``), beside the baseline of the same run: a plain
copy of the block's output bytes (what a merge-free conversion of that tensor would cost). It
answers "is the merge bounded by arithmetic we cannot drop (the bit-exact fp32 matmul) or by
something we could make cheaper?" -- on the 2-core VM the matmul is ~80 % of it (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import torch

from sa2va_convert.transform.produce import _BLOCK_ELEMS as BLOCK_ELEMS  # the default TensorProducer uses


def timed(fn, repeat: int) -> float:
    fn()  # warm-up: first-touch page faults and kernel selection are not the steady state
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=18944)
    ap.add_argument("--cols", type=int, default=3584)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one merge worker = one torch thread (transform.produce.merge_workers)

    step = max(1, min(args.rows, BLOCK_ELEMS // args.cols))
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(step, args.cols, generator=gen).to(torch.bfloat16)
    a = torch.randn(args.rank, args.cols, generator=gen) * 0.01
    b = torch.randn(step, args.rank, generator=gen) * 0.01
    w = torch.empty(step, args.cols)
    d = torch.empty(step, args.cols)
    out = torch.empty(step, args.cols, dtype=torch.bfloat16)
    copy_dst = torch.empty_like(out)
    out_bytes = out.view(torch.uint8).numpy()

    ops = {
        "baseline: copy of the output bytes": lambda: copy_dst.copy_(out),
        "upcast bf16 -> fp32": lambda: w.copy_(base),
        "B[rows] @ A (fp32 mm)": lambda: torch.mm(b, a, out=d),
        "two norms (delta report)": lambda: (torch.linalg.vector_norm(w), torch.linalg.vector_norm(d)),
        "add": lambda: w.add_(d),
        "round to bf16": lambda: out.copy_(w),
        "NaN/Inf check (aminmax)": lambda: torch.aminmax(out),
        "sha256 (writer's hash thread)": lambda: hashlib.sha256(out_bytes).digest(),
    }
    secs = {name: timed(fn, args.repeat) for name, fn in ops.items()}
    merge = sum(v for k, v in secs.items() if not k.startswith(("baseline", "sha256")))
    gb = out.numel() * out.element_size() / 1e9
    result = {"rows_per_block": step, "cols": args.cols, "rank": args.rank, "block_gb": gb,
              "torch": torch.__version__, "seconds": secs, "merge_seconds": merge,
              "merge_cpu_s_per_gb": merge / gb, "matmul_share": secs["B[rows] @ A (fp32 mm)"] / merge,
              "matmul_gflops": 2 * step * args.cols * args.rank / secs["B[rows] @ A (fp32 mm)"] / 1e9}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"block {step} x {args.cols} (bf16 out, {gb * 1e3:.1f} MB), rank {args.rank}, one torch thread, "
          f"torch {torch.__version__}")
    for name, s in secs.items():
        print(f"  {name:36s} {s * 1e3:8.2f} ms  {s / gb:6.2f} s/GB")
    print(f"  merge ops together: {merge * 1e3:.2f} ms = {merge / gb:.2f} CPU-s per GB written; the matmul is "
          f"{result['matmul_share']:.0%} of it ({result['matmul_gflops']:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
