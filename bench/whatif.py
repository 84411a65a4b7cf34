#!/usr/bin/env python3
"""Run the sa2va-convert CLI with proposed changes to code outside the bench's remit, patched in memory.

    python bench/whatif.py reader_out,readback_fast,ckpt_release -- CKPT OUT --base BASE ...

Nothing on disk is modified: each patch replaces one function in this process
only, so the bench can show what a change would buy before its owner decides.
The patches are the proposals written up in BENCHMARKS.md:

* ``reader_out`` (read/hf_folder.py): ``SafetensorsSource.load(key, out=buffer)`` reads into a
  caller's buffer; the producer then reads every base tensor into recycled memory instead of a
  fresh zeroed ``bytearray`` (no page faults: ~1.2 GB/s -> memory speed on the 2-core VM).
* ``readback_fast`` (verify/structural.py): the read-back check reads each tensor with
  ``readinto`` (into one reused buffer) and tests it with ``aminmax`` instead of mapping the whole
  shard with ``safe_open`` (every page counts in RSS: up to a 5 GB shard) and ``isfinite().all()``
  (not vectorised for bf16: ~0.3 Gelem/s against ~9 for aminmax).
* ``ckpt_release`` (read/checkpoint.py or the producer): once a checkpoint tensor is used, its pages
  of the private read-only checkpoint mapping are dropped with ``madvise(MADV_DONTNEED)`` (they stay
  in the page cache; a later read faults them back in), so the checkpoint does not accumulate in RSS.
"""

from __future__ import annotations

import ctypes
import inspect
import math
import mmap
import sys
from pathlib import Path


def patch_reader_out() -> None:
    import torch

    from sa2va_convert.errors import InputError
    from sa2va_convert.read import hf_folder

    original = hf_folder.SafetensorsSource.load

    def load(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            return original(self, key)
        fpath = self._key_file[key]
        begin, end = self._offsets[key]
        info = self._info[key]
        n = end - begin
        if out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() < n:
            raise ValueError("out must be a contiguous CPU uint8 tensor of at least the tensor's bytes")
        view = memoryview(out.numpy())[:n]
        with open(fpath, "rb", buffering=0) as f:
            f.seek(begin)
            got = 0
            while got < n:
                k = f.readinto(view[got:])
                if not k:
                    raise InputError(f"file ended while reading tensor {key!r}", path=fpath,
                                     hint="re-copy or re-download this shard")
                got += k
        from sa2va_convert import dtypes

        return out[:n].view(dtypes.to_torch(info.dtype)).view(info.shape)

    hf_folder.SafetensorsSource.load = load


def patch_readback_fast() -> None:
    import torch

    from sa2va_convert.read.hf_folder import open_hf_folder
    from sa2va_convert.verify import structural

    def read_all_values(folder: Path, files) -> None:
        src = open_hf_folder(folder, label="output").weights
        buf = None
        for key in src.keys():  # noqa: SIM118 - a TensorSource, not a dict
            info = src.info(key)
            if "out" in inspect.signature(src.load).parameters:
                if buf is None or buf.numel() < info.nbytes:
                    buf = torch.empty(max(info.nbytes, 1), dtype=torch.uint8)
                t = src.load(key, out=buf)
            else:
                t = src.load(key)
            if t.is_floating_point() and t.numel():
                lo, hi = torch.aminmax(t)
                if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                    raise structural._fail(f"tensor {key} holds NaN/Inf", src.file_of(key), "re-run the conversion")
            del t

    structural._read_all_values = read_all_values


def patch_ckpt_release() -> None:
    from sa2va_convert.read import tensor_source
    from sa2va_convert.write import pipeline

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    ranges_by_path: dict[str, list[tuple[int, int]]] = {}

    def ranges(path: Path) -> list[tuple[int, int]]:
        key = str(Path(path).resolve())
        if key not in ranges_by_path:
            found = []
            with open("/proc/self/maps") as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].strip() == key:
                        lo, hi = (int(x, 16) for x in parts[0].split("-"))
                        found.append((lo, hi))
            ranges_by_path[key] = found
        return ranges_by_path[key]

    def release(t, path) -> None:
        if t is None or t.device.type != "cpu" or not t.numel():
            return
        ptr, n = t.data_ptr(), t.numel() * t.element_size()
        lo, hi = -(-ptr // page) * page, (ptr + n) // page * page
        if hi > lo and any(s <= lo and hi <= e for s, e in ranges(path)):
            libc.madvise(lo, hi - lo, 4)  # MADV_DONTNEED: private, never written -> refaults from the file

    # every checkpoint tensor is released after the writer has written the tensor that used it
    orig_get, orig_done = pipeline.TensorPipeline.get, pipeline.TensorPipeline.done

    def get(self, name):
        t = orig_get(self, name)
        pt = self._tensors[self._next - 1]
        used = getattr(self, "_whatif_used", {})
        refs = [pt.value] + ([pt.lora.a, pt.lora.b] if pt.lora is not None else [])
        srcs = getattr(self._produce, "sources", {})
        used[name] = [(srcs[r.layer], r.key) for r in refs if r.layer != "base" and r.layer in srcs]
        self._whatif_used = used
        return t

    def done(self, name):
        orig_done(self, name)
        for src, key in getattr(self, "_whatif_used", {}).pop(name, []):
            if isinstance(src, tensor_source.StateDictSource):
                release(src.load(key), src.path)

    pipeline.TensorPipeline.get, pipeline.TensorPipeline.done = get, done


PATCHES = {"reader_out": patch_reader_out, "readback_fast": patch_readback_fast, "ckpt_release": patch_ckpt_release}


def main() -> int:
    argv = sys.argv[1:]
    if not argv or "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    names = [n for n in argv[0].split(",") if n]
    for n in names:
        PATCHES[n]()
    cli_args = argv[argv.index("--") + 1:]
    from sa2va_convert import cli

    sys.argv = ["sa2va-convert", *cli_args]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
