#!/usr/bin/env python3
"""Quick check of ``--merge-device``: small fixtures of every family converted on CPU and on DEVICE.

    python bench/merge_device_check.py [cuda]

Exits non-zero if a conversion fails or a CUDA-merged tensor differs from the
CPU one by more than one bf16 rounding step (the two BLAS libraries sum the
rank-r products in different orders, so the fp32 sums can differ in the last
bits and, rarely, round to neighbouring bf16 values); prints the count of
differing elements per family. Runs in seconds (tiny sizes, r=16).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from sa2va_convert.api import ConvertOptions, convert
from sa2va_convert.testing.fixtures import write_base_folder, write_training_checkpoint
from sa2va_convert.testing.layouts import Sizes


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    sizes = Sizes.tiny().with_(hidden=256, intermediate=512, lora_r=16, lora_alpha=32)
    bad = 0
    with tempfile.TemporaryDirectory() as d:
        for preset in ("sa2va-1b", "sa2va-8b", "sa2va-qwen2_5-vl"):
            root = Path(d) / preset
            base = write_base_folder(root / "base", preset, sizes)
            ckpt = write_training_checkpoint(root / "iter_1.pth", preset, sizes, base_dir=base)
            outs = {}
            for i, dev in enumerate(("cpu", device)):
                out = root / f"out-{i}"
                convert(ckpt.path, out, ConvertOptions(roundtrip=False, base=base, merge_device=dev))
                outs[i] = {}
                for f in sorted(out.glob("*.safetensors")):
                    outs[i].update(load_file(str(f)))
            a, b = outs[0], outs[1]
            assert set(a) == set(b)
            diff_elems, worst = 0, 0.0
            for k in a:
                if not torch.equal(a[k], b[k]):
                    d_ = (a[k].float() - b[k].float()).abs()
                    ulp = a[k].float().abs().clamp_min(1e-30) * 2.0**-7  # one bf16 step (8-bit significand)
                    worst = max(worst, float((d_ / ulp).max()))
                    diff_elems += int((d_ > 0).sum())
            ok = worst <= 1.0 + 1e-6
            bad += not ok
            print(f"{preset}: {len(a)} tensors; {diff_elems} element(s) differ cpu vs {device}; "
                  f"worst {worst:.2f} bf16 steps -> {'ok' if ok else 'FAIL'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
