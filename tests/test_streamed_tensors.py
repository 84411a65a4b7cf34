"""Tensors too big for the writer's window are produced in row blocks, with the same result.

The 26B model's embedding and head are 1.1 GB each in bf16; held whole with their inputs they
would set the conversion's memory floor. ``TensorProducer.stream`` reads such a tensor's rows a
block at a time and the writer writes each block as it comes. Here the window is shrunk to almost
nothing so that every 2-D tensor of the fixtures is streamed, and the outputs must be the same
files, byte for byte, and still match the independent fp32 reference; then a model with one huge
tensor is converted in a subprocess and its peak RSS stays far below that tensor.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sa2va_convert.api import ConvertOptions, convert
from sa2va_convert.errors import PlanError
from sa2va_convert.testing.fixtures import write_base_folder, write_training_checkpoint
from sa2va_convert.testing.layouts import Sizes
from sa2va_convert.write import folder as write_folder
from test_convert import assert_matches_reference

_STREAM_EVERYTHING = 1  # bytes: every tensor exceeds it, so every 2-D tensor is streamed


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


@pytest.mark.parametrize("preset,dtype", [("sa2va-1b", "bf16"), ("sa2va-8b", "fp16"), ("sa2va-internvl3", "fp32"),
                                          ("sa2va-qwen2_5-vl", "bf16")])
def test_streamed_conversion_writes_the_same_files(preset, dtype, make_family, tmp_path, monkeypatch):
    fam = make_family(preset)
    convert(fam.ckpt.path, tmp_path / "whole", ConvertOptions(base=fam.base, dtype=dtype, roundtrip=False))
    streamed_calls: list[str] = []
    from sa2va_convert.transform import produce

    real_stream = produce.TensorProducer.stream

    def counting(self, pt):
        streamed_calls.append(pt.name)
        return real_stream(self, pt)

    monkeypatch.setattr(produce.TensorProducer, "stream", counting)
    monkeypatch.setattr(write_folder, "PIPELINE_BUDGET_BYTES", _STREAM_EVERYTHING)
    convert(fam.ckpt.path, tmp_path / "streamed", ConvertOptions(base=fam.base, dtype=dtype, roundtrip=False))
    assert len(streamed_calls) > 50  # merges, overlays and plain copies went through the streamed path
    whole, streamed = _shards(tmp_path / "whole"), _shards(tmp_path / "streamed")
    assert whole.keys() == streamed.keys()
    for name in whole:
        assert whole[name] == streamed[name], name
    report = lambda out: json.loads((out / "conversion_report.json").read_text())["lora_deltas"]  # noqa: E731
    assert report(tmp_path / "whole")["lora_pairs"] == report(tmp_path / "streamed")["lora_pairs"] > 0
    if dtype == "bf16":
        assert_matches_reference(tmp_path / "streamed", fam)


def test_nan_in_a_streamed_checkpoint_tensor_is_counted_over_the_whole_tensor(make_family, tmp_path, monkeypatch):
    fam = make_family("sa2va-1b")
    ck = torch.load(fam.ckpt.path, weights_only=False)
    emb = next(k for k in ck["state_dict"] if k.endswith("embed_tokens.weight"))
    t = ck["state_dict"][emb]
    t[0, 0] = float("nan")
    t[-1, -1] = float("inf")  # first and last row: different blocks
    bad = tmp_path / "iter_100.pth"
    torch.save(ck, bad)
    monkeypatch.setattr(write_folder, "PIPELINE_BUDGET_BYTES", _STREAM_EVERYTHING)
    from sa2va_convert.transform import produce

    monkeypatch.setattr(produce, "_STREAM_COPY_BYTES", 64)  # a few rows per block
    with pytest.raises(PlanError) as e:
        convert(bad, tmp_path / "out", ConvertOptions(base=fam.base, roundtrip=False))
    assert "contains 2 NaN/Inf value(s)" in e.value.message and emb in e.value.message
    assert not (tmp_path / "out").exists()


CHILD = """
import json, resource, sys
from sa2va_convert.api import ConvertOptions, convert
from sa2va_convert.write import folder
folder.PIPELINE_BUDGET_BYTES = 32 * 2**20
convert(sys.argv[1], sys.argv[2], ConvertOptions(base=sys.argv[3], dtype="fp32", roundtrip=False))
print(json.dumps({"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""
BASELINE = """
import json, resource
import sa2va_convert.api, tokenizers, torch
print(json.dumps({"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def test_one_huge_tensor_does_not_set_the_memory_floor(tmp_path):
    """A 400 MB embedding and a 400 MB LoRA-merged head (fp32): peak RSS stays far below either."""
    sizes = Sizes.tiny().with_(hidden=1024, vocab=100_000, lora_r=8, lora_alpha=16)
    base = write_base_folder(tmp_path / "base", "sa2va-8b", sizes, dtype="fp32", fill="fast")
    ckpt = write_training_checkpoint(tmp_path / "iter_1.pth", "sa2va-8b", sizes, base_dir=base, fill="fast")
    huge = 4 * 100_000 * 1024

    def peak(code: str, *args: str) -> int:
        p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
        return json.loads(p.stdout.strip().splitlines()[-1])["maxrss"]

    baseline = peak(BASELINE)
    used = peak(CHILD, str(ckpt.path), str(tmp_path / "out"), str(base)) - baseline
    assert used < huge / 2, (used, huge)


def test_nan_in_a_streamed_base_tensor_is_refused(make_family, tmp_path, monkeypatch):
    """A base tensor streamed in row blocks (no merge) is checked block by block as it is written."""
    from test_convert_errors import _base_with_nan

    from sa2va_convert.transform import produce

    fam = make_family("sa2va-1b")
    key = _base_with_nan(fam.base, tmp_path / "base")  # a vision weight: no LoRA, not in the checkpoint
    monkeypatch.setattr(write_folder, "PIPELINE_BUDGET_BYTES", _STREAM_EVERYTHING)
    monkeypatch.setattr(produce, "_STREAM_COPY_BYTES", 64)  # a few rows per block
    with pytest.raises(PlanError) as e:
        convert(fam.ckpt.path, tmp_path / "out", ConvertOptions(base=tmp_path / "base", roundtrip=False))
    assert "contains 1 NaN/Inf value(s)" in e.value.message and key in e.value.message
    assert not (tmp_path / "out").exists()
