"""Damaged inputs: truncated, empty, wrong magic, wrong kind, unreadable, symlink loops.

Every case ends in exit 3 (input missing, unreadable, truncated or of the wrong
kind), one error line naming the damaged file and the fix, untouched inputs
and no OUT. The base folder is copied per test before it is damaged (the
session's shared base stays pristine). API-level cases of the checkpoint
reader are in ``tests/test_checkpoint_reader.py``; these go through the CLI.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from _reliability import Guard, assert_refused, permission_preexec, run_fresh

SHARD = "model-00001-of-00001.safetensors"


def _base_copy(tiny, tmp_path: Path) -> Path:
    base = tmp_path / "base"
    shutil.copytree(tiny.base, base)
    assert (base / SHARD).is_file()
    return base


def _run(sa2va, tiny, ckpt: Path, base: Path, *extra_inputs: Path):
    guard = Guard((ckpt, base, *extra_inputs), tiny.out)
    return sa2va(ckpt, tiny.out, "--base", base), guard


# ------------------------------------------------------------------ the checkpoint


def test_truncated_checkpoint(sa2va, tiny):
    ckpt = tiny.ckpt.path
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    r, guard = _run(sa2va, tiny, ckpt, tiny.base)
    assert_refused(r, 3, guard, ckpt, "truncated", "use an earlier checkpoint")


def test_checkpoint_with_wrong_magic(sa2va, tiny):
    ckpt = tiny.ckpt.path
    data = bytearray(ckpt.read_bytes())
    assert data[:4] == b"PK\x03\x04"
    data[:4] = b"SA2V"
    ckpt.write_bytes(bytes(data))
    r, guard = _run(sa2va, tiny, ckpt, tiny.base)
    assert_refused(r, 3, guard, ckpt, "not a PyTorch checkpoint", "iter_N.pth")


def test_zero_byte_checkpoint(sa2va, tiny):
    ckpt = tiny.ckpt.path
    ckpt.write_bytes(b"")
    r, guard = _run(sa2va, tiny, ckpt, tiny.base)
    assert_refused(r, 3, guard, ckpt, "empty")


def test_directory_where_the_checkpoint_file_is_expected(sa2va, tiny, tmp_path):
    ckpt = tmp_path / "iter_300.pth"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("not a DeepSpeed folder")
    r, guard = _run(sa2va, tiny, ckpt, tiny.base)
    assert_refused(r, 3, guard, ckpt, "directory")


def test_symlink_loop_as_checkpoint(sa2va, tiny, tmp_path):
    a, b = tmp_path / "loop_a.pth", tmp_path / "loop_b.pth"
    a.symlink_to(b)
    b.symlink_to(a)
    r, guard = _run(sa2va, tiny, a, tiny.base, b)
    assert_refused(r, 3, guard, a, "symbolic link")


def test_unreadable_checkpoint(tiny, tmp_path):
    """Mode 000 must be refused with 'permission denied' (as root: DAC capabilities dropped in the child)."""
    preexec = permission_preexec(tmp_path)
    ckpt = tiny.ckpt.path
    ckpt.chmod(0)
    guard = Guard((ckpt, tiny.base), tiny.out)
    r = run_fresh(ckpt, tiny.out, "--base", tiny.base, preexec_fn=preexec)
    assert_refused(r, 3, guard, ckpt, "permission denied", "chmod")


# ------------------------------------------------------------------ the base folder


def test_truncated_safetensors_shard_in_base(sa2va, tiny, tmp_path):
    base = _base_copy(tiny, tmp_path)
    shard = base / SHARD
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 2 // 3])
    r, guard = _run(sa2va, tiny, tiny.ckpt.path, base)
    assert_refused(r, 3, guard, shard, "truncated", "re-copy")


def test_safetensors_shard_with_garbage_header(sa2va, tiny, tmp_path):
    base = _base_copy(tiny, tmp_path)
    shard = base / SHARD
    data = bytearray(shard.read_bytes())
    data[:8] = (2**63).to_bytes(8, "little")  # an impossible header length
    shard.write_bytes(bytes(data))
    r, guard = _run(sa2va, tiny, tiny.ckpt.path, base)
    assert_refused(r, 3, guard, shard, "header")


def test_zero_byte_safetensors_shard_in_base(sa2va, tiny, tmp_path):
    base = _base_copy(tiny, tmp_path)
    shard = base / SHARD
    shard.write_bytes(b"")
    r, guard = _run(sa2va, tiny, tiny.ckpt.path, base)
    assert_refused(r, 3, guard, shard, "too short")


def test_directory_where_config_json_is_expected(sa2va, tiny, tmp_path):
    base = _base_copy(tiny, tmp_path)
    (base / "config.json").unlink()
    (base / "config.json").mkdir()
    r, guard = _run(sa2va, tiny, tiny.ckpt.path, base)
    assert_refused(r, 3, guard, base / "config.json", "config.json")


def test_symlink_loop_as_base_shard(sa2va, tiny, tmp_path):
    base = _base_copy(tiny, tmp_path)
    shard = base / SHARD
    shard.unlink()
    other = base / "loop.safetensors"
    shard.symlink_to(other)
    other.symlink_to(shard)
    r, guard = _run(sa2va, tiny, tiny.ckpt.path, base)
    line = assert_refused(r, 3, guard, None, "symbolic link loop")  # named when the folder is listed (issue 23)
    assert line.startswith((f"error: {shard}:", f"error: {other}:")), line


def test_unreadable_base_shard(tiny, tmp_path):
    preexec = permission_preexec(tmp_path)
    base = _base_copy(tiny, tmp_path)
    shard = base / SHARD
    shard.chmod(0)
    guard = Guard((tiny.ckpt.path, base), tiny.out)
    r = run_fresh(tiny.ckpt.path, tiny.out, "--base", base, preexec_fn=preexec)
    assert_refused(r, 3, guard, shard, "permission denied")
    os.chmod(shard, 0o644)
