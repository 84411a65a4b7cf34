"""The three things that keep a conversion's RSS near the pipeline window (BENCHMARKS.md, issue 7).

* base tensors can be read into a caller's (recycled) buffer: same values, no fresh memory;
* the read-back check streams values in fixed chunks instead of mapping whole shards, and still
  finds a NaN anywhere, including past the first chunk;
* pages of the memory-mapped checkpoint are given back once used, and only those: a tensor in
  ordinary memory is never touched, and a released tensor reads back identical.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sa2va_convert.errors import InputError, VerifyError
from sa2va_convert.read.checkpoint import open_checkpoint
from sa2va_convert.read.hf_folder import SafetensorsSource, open_hf_folder
from sa2va_convert.read.mapped_pages import MappedFilePages
from sa2va_convert.verify import structural


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(33, 65, generator=g).bfloat16(),
        "w.fp32": torch.randn(7, 3, generator=g),
        "w.fp16": torch.randn(5, generator=g).half(),
        "ids": torch.arange(11, dtype=torch.int64),
        "empty": torch.empty(0, 4),
    }


def test_load_into_a_callers_buffer_gives_the_same_values_in_that_buffer(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = _tensors()
    save_file(tensors, str(path))
    src = SafetensorsSource({"model.safetensors": path}, label="base", path=tmp_path)
    buf = torch.full((8192,), 0xAB, dtype=torch.uint8)  # stale bytes from an earlier tensor
    for key, want in tensors.items():
        got = src.load(key, out=buf)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), key
        if want.numel():
            assert got.data_ptr() == buf.data_ptr()  # read in place, no new memory
        assert torch.equal(src.load(key), want)
    with pytest.raises(ValueError):
        src.load("w.bf16", out=torch.empty(10, dtype=torch.uint8))  # too small
    with pytest.raises(ValueError):
        src.load("w.bf16", out=torch.empty(8192, dtype=torch.float32))  # not bytes


def _data_start(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _folder_with(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    return folder


@pytest.mark.parametrize("where", ["first_chunk", "last_chunk_of_a_later_tensor"])
def test_read_back_finds_nan_in_any_chunk(tmp_path, monkeypatch, where):
    monkeypatch.setattr(structural, "READ_BACK_CHUNK_BYTES", 4096)  # many chunks per tensor
    tensors = {"a": torch.ones(4000, dtype=torch.bfloat16), "b": torch.ones(3001, dtype=torch.bfloat16)}
    folder = _folder_with(tmp_path, tensors)
    structural._read_all_values(open_hf_folder(folder, label="output"))  # clean: passes

    shard = folder / "model.safetensors"
    header = json.loads(shard.read_bytes()[8:_data_start(shard)])
    key = "a" if where == "first_chunk" else "b"
    begin, end = header[key]["data_offsets"]
    at = _data_start(shard) + (begin + 2 if where == "first_chunk" else end - 2)
    data = bytearray(shard.read_bytes())
    data[at:at + 2] = b"\xc0\x7f"  # bf16 NaN, little-endian
    shard.write_bytes(bytes(data))
    with pytest.raises(VerifyError) as e:
        structural._read_all_values(open_hf_folder(folder, label="output"))
    assert f"tensor {key} holds NaN/Inf" in e.value.message and "model.safetensors" in str(e.value.path)


def test_a_shard_the_library_cannot_open_is_refused_by_our_reader_and_by_verify(tmp_path):
    """Both tensors claim the same bytes: safetensors refuses the file, and our own reader does too (it used
    to accept it, leaving the refusal to the read-back's ``safe_open``; issue 23)."""
    folder = _folder_with(tmp_path, {"a": torch.ones(4), "b": torch.ones(4)})
    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["b"]["data_offsets"] = header["a"]["data_offsets"]  # both tensors claim the same bytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw))
    assert len(raw) == n
    data[8:8 + n] = raw
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError) as e:
        open_hf_folder(folder, label="output")
    assert "'a' and 'b' overlap" in e.value.message and e.value.path == str(shard)
    with pytest.raises(VerifyError) as v:
        structural.check_folder(folder, read_values=False)
    assert "overlap" in v.value.message and v.value.path == str(shard)


def _resident_bytes_of(path: Path) -> int:
    """Rss of this process's mappings of ``path`` (kB in /proc/self/smaps)."""
    total, inside = 0, False
    name = str(path.resolve())
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                inside = line.rstrip("\n").endswith(name)
            elif inside and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_mapped_checkpoint_pages_are_given_back_and_read_back_identical(tmp_path):
    path = tmp_path / "iter_1.pth"
    g = torch.Generator().manual_seed(1)
    original = {"state_dict": {"mllm.big": torch.randn(2048, 1024, generator=g),
                               "mllm.small": torch.randn(3, 3, generator=g)}}
    torch.save(original, path)
    ckpt = open_checkpoint(path)
    src = ckpt.weights
    big = src.load("mllm.big")
    assert torch.equal(big, original["state_dict"]["mllm.big"])  # touches every page
    before = _resident_bytes_of(path)
    assert before >= 7 * 2**20, before  # the 8 MiB tensor is resident and counted as ours
    src.release_rows("mllm.big")
    after = _resident_bytes_of(path)
    assert after < before - 7 * 2**20, (before, after)
    assert torch.equal(src.load("mllm.big"), original["state_dict"]["mllm.big"])  # faults back, same bytes


def test_release_never_touches_ordinary_memory(tmp_path):
    path = tmp_path / "some.pth"
    torch.save({"x": torch.zeros(1)}, path)
    pages = MappedFilePages(path)
    t = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB of anonymous memory
    keep = t.clone()
    assert pages.release(t) is False
    assert torch.equal(t, keep)


def test_release_during_a_real_conversion_changes_no_output_byte(tmp_path, monkeypatch):
    from sa2va_convert.api import ConvertOptions, convert
    from sa2va_convert.read import mapped_pages, tensor_source
    from sa2va_convert.testing.fixtures import write_base_folder, write_training_checkpoint
    from sa2va_convert.testing.layouts import Sizes

    sizes = Sizes.tiny().with_(hidden=256, intermediate=1024, vocab=1000, lora_r=16, lora_alpha=32)
    base = write_base_folder(tmp_path / "base", "sa2va-1b", sizes, dtype="bf16", fill="fast")
    ckpt = write_training_checkpoint(tmp_path / "iter_1.pth", "sa2va-1b", sizes, base_dir=base, fill="fast")
    released: list[int] = []
    real_release = mapped_pages.MappedFilePages.release

    def counting(self, t):
        done = real_release(self, t)
        released.append(done)
        return done

    monkeypatch.setattr(mapped_pages.MappedFilePages, "release", counting)
    convert(ckpt.path, tmp_path / "released", ConvertOptions(base=base, roundtrip=False))
    assert sum(released) > 10, released  # checkpoint pages really were dropped during the run
    monkeypatch.setattr(tensor_source.StateDictSource, "release_rows", lambda self, key, start=0, stop=None: None)
    convert(ckpt.path, tmp_path / "kept", ConvertOptions(base=base, roundtrip=False))
    shards = sorted(p.name for p in (tmp_path / "released").glob("*.safetensors"))
    assert shards
    for name in shards:
        assert (tmp_path / "released" / name).read_bytes() == (tmp_path / "kept" / name).read_bytes(), name


_AUDIT_CHILD = """
import runpy, sys, traceback
def hook(event, args):
    if event in ("subprocess.Popen", "os.posix_spawn", "os.exec", "os.fork", "os.system"):
        stack = traceback.extract_stack()
        ours = [i for i, f in enumerate(stack) if "sa2va_convert" in f.filename]
        # a library's own import (torch's looks for libdl the same way) is not ours to change
        importing = ours and any("importlib" in f.filename for f in stack[ours[-1]:])
        if ours and not importing:  # printed at once: the CLI may leave through os._exit
            where = stack[ours[-1]]
            print("STARTED", event, str(args[0]), f"{where.filename}:{where.lineno}", file=sys.stderr, flush=True)
sys.addaudithook(hook)
print("HOOKED", file=sys.stderr, flush=True)
sys.argv = ["sa2va-convert"] + sys.argv[1:]
runpy.run_module("sa2va_convert", run_name="__main__")
"""


def test_a_conversion_without_the_round_trip_starts_no_process_of_its_own(tmp_path):
    """The page release looked libc up with ``ctypes.util.find_library``, which runs ``/sbin/ldconfig -p``:
    a child in the middle of the write (and, vfork'd, a second copy of the converter to anyone summing
    the process tree). Only the round trip may start a process."""
    import subprocess
    import sys

    from sa2va_convert.testing.fixtures import write_base_folder, write_training_checkpoint
    from sa2va_convert.testing.layouts import Sizes

    sizes = Sizes.tiny().with_(hidden=256, intermediate=1024, vocab=1000, lora_r=16, lora_alpha=32)
    base = write_base_folder(tmp_path / "base", "sa2va-1b", sizes, dtype="bf16", fill="fast")
    ckpt = write_training_checkpoint(tmp_path / "iter_1.pth", "sa2va-1b", sizes, base_dir=base, fill="fast")
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-c", _AUDIT_CHILD, str(ckpt.path), str(out), "--base", str(base), "--no-verify", "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(out.glob("*.safetensors"))  # a real write, with pages released (the test above)
    assert "HOOKED" in run.stderr.splitlines()
    started = [s for s in run.stderr.splitlines() if s.startswith("STARTED ")]
    assert started == [], started
