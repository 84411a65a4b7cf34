#!/usr/bin/env python3
"""The blocked CPU merge equals the plain fp32 reference bit for bit, on random data.

    .venv/bin/python bench/check_merge_exact.py

For several shapes, input/output dtypes, LoRA scales (power of two, rsLoRA's
alpha/sqrt(r), 1.0) and block sizes (1 row to the whole tensor), compares
``TensorProducer`` with ``(W.float() + scale * (B.float() @ A.float())).to(out)``,
the formula of ``sa2va_convert.testing.reference``. Prints the mismatches; exits 1 if any.
"""

from __future__ import annotations

import math
import sys

import torch

from sa2va_convert.plan.types import LoraRef, PlannedTensor, SourceRef
from sa2va_convert.read.tensor_source import StateDictSource
from sa2va_convert.transform.produce import TensorProducer


def main() -> int:
    torch.manual_seed(0)
    bad = 0
    for rows, cols, r in [(896, 896, 128), (4864, 896, 128), (256, 2048, 64), (1000, 37, 4), (3, 5, 2)]:
        for vdt in (torch.bfloat16, torch.float32, torch.float16):
            for tgt, tname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32"), (torch.float16, "fp16")):
                for scale in (2.0, 256 / math.sqrt(128), 0.5, 1.0):
                    v = (torch.randn(rows, cols) * 0.02).to(vdt)
                    a = (torch.randn(r, cols) * 0.05).bfloat16()
                    b = (torch.randn(rows, r) * 0.05).bfloat16()
                    src = StateDictSource({"v": v, "a": a, "b": b}, label="checkpoint", path="x")
                    ref = (v.float() + scale * (b.float() @ a.float())).to(tgt)

                    def sr(k, t):
                        return SourceRef("checkpoint", k, tuple(t.shape), "bf16")

                    pt = PlannedTensor("m.weight", (rows, cols), tname, sr("v", v),
                                       LoraRef(sr("a", a), sr("b", b), r, scale))
                    for blk in (1 << 20, 1000, 1):
                        out = TensorProducer({"checkpoint": src}, block_elems=blk)(pt)
                        if not torch.equal(out, ref):
                            bad += 1
                            print("DIFF", rows, cols, r, vdt, tname, scale, blk,
                                  float((out.float() - ref.float()).abs().max()))
    print("mismatches:", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
