"""Peak memory of a conversion stays near one tensor plus the interpreter, far below the model size.

Measured in subprocesses with ru_maxrss (which counts mapped file pages too);
no timing assertions.
"""

from __future__ import annotations

import json
import subprocess
import sys

from sa2va_convert.testing.fixtures import write_base_folder, write_training_checkpoint
from sa2va_convert.testing.layouts import Sizes, hf_layout

CHILD_BASELINE = """
import resource, json
import sa2va_convert.api, sa2va_convert.cli, tokenizers, torch
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

CHILD_CONVERT = """
import resource, json, sys
from sa2va_convert.api import ConvertOptions, convert
convert(sys.argv[1], sys.argv[2], ConvertOptions(roundtrip=False, base=sys.argv[3], dtype="fp32", max_shard_bytes=64 * 2**20))
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _run(code: str, *args: str) -> int:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_kib"] * 1024


def test_peak_rss_is_about_one_tensor_not_the_model(tmp_path):
    sizes = Sizes.tiny().with_(hidden=512, intermediate=2048, layers=24, heads=8, kv_heads=4, vocab=4000,
                               lora_r=16, lora_alpha=32)
    layout = hf_layout("sa2va-1b", sizes)
    model_bytes = 4 * sum(_numel(s) for s in layout.values())
    largest = 4 * max(_numel(s) for s in layout.values())
    base = write_base_folder(tmp_path / "base", "sa2va-1b", sizes, dtype="fp32", fill="fast",
                             max_shard_bytes=128 * 2**20)
    ckpt = write_training_checkpoint(tmp_path / "iter_1.pth", "sa2va-1b", sizes, base_dir=base, fill="fast")
    baseline = _run(CHILD_BASELINE)
    peak = _run(CHILD_CONVERT, str(ckpt.path), str(tmp_path / "out"), str(base))
    assert model_bytes > 350 * 2**20  # the model is big compared with what we allow below
    assert peak - baseline < 12 * largest + 64 * 2**20, (peak, baseline, largest)
    assert peak < baseline + model_bytes / 3, (peak, baseline, model_bytes)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
