"""Readahead hints for the inputs while torch imports (issue 14): bounded, read-only, best-effort."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import threading

from sa2va_convert.read.prefetch import Prefetcher, input_files, prefetch, prefetch_budget


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_inputs_are_the_checkpoint_file_then_the_base_shards_in_order(tmp_path):
    ckpt = tmp_path / "iter_5.pth"
    ckpt.write_bytes(b"x" * 100)
    base = tmp_path / "base"
    base.mkdir()
    for name in ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors", "config.json"):
        (base / name).write_bytes(b"y" * 10)
    assert input_files(ckpt, base) == [
        ckpt,
        base / "model-00001-of-00002.safetensors",
        base / "model-00002-of-00002.safetensors",
    ]
    assert input_files(tmp_path, "org/name") == []  # a work_dir and a Hub id: decided later, not guessed here


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux/Unix only")
def test_prefetch_stays_in_its_budget_and_leaves_the_files_as_they_were(tmp_path):
    files = []
    for i, size in enumerate((3000, 5000, 7000)):
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(size))
        files.append(p)
    before = [(_sha(p), p.stat().st_mtime_ns) for p in files]
    assert prefetch(files, budget=10**9) == 15000  # everything fits: each file whole
    assert prefetch(files, budget=4000) == 4000  # front to back: the first file, then 1000 bytes of the next
    assert prefetch([tmp_path / "missing", *files], budget=10**9) == 15000  # a missing file is skipped
    assert prefetch(files, budget=0) == 0
    stopped = threading.Event()
    stopped.set()
    assert prefetch(files, budget=10**9, stop=stopped) == 0  # a stopped prefetch advises nothing more
    bg = Prefetcher(files, budget=10**9)  # the conversion's way: in a daemon thread, stopped at the end
    assert bg._thread is not None
    bg._thread.join(30)
    bg.stop()
    assert bg.advised == 15000 and not any(t.name == "sa2va-prefetch" for t in threading.enumerate())
    assert [(_sha(p), p.stat().st_mtime_ns) for p in files] == before


def test_prefetch_can_be_turned_off_for_benchmarks(monkeypatch):
    monkeypatch.setenv("SA2VA_PREFETCH", "0")
    assert prefetch_budget() == 0
    monkeypatch.delenv("SA2VA_PREFETCH")
    assert 0 < prefetch_budget() <= 2 << 30  # 2 GiB at most (more was measured slower), a quarter of the RAM
    monkeypatch.setenv("SA2VA_PREFETCH", "0.001")  # a cap in GiB, for the benchmark's A/B
    assert 0 < prefetch_budget() <= int(0.001 * (1 << 30))
