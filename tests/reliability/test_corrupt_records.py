"""Checkpoint bytes are checked against the CRC-32 of their zip records (issue 23, item 1).

A ``torch.save`` file is a zip whose directory holds each record's CRC-32; ``torch.load`` never checks
them, so one flipped byte inside a tensor's storage converted with exit 0 and a wrong value. Each case
flips one byte of a real fixture checkpoint (a single file, a DeepSpeed folder's model states, a
DeepSpeed optimizer partition, the pickle itself) and expects exit 3, one line naming the file, the
record and the tensor, and nothing published. The tensor a flipped record holds is found independently
of the converter: plain ``torch.load`` (the control, which accepts the damaged file) and the values that
changed.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from _reliability import NO_VERIFY, Guard, assert_refused

from sa2va_convert.errors import InputError
from sa2va_convert.testing.fixtures import write_training_checkpoint


def _data_start(path: Path, info: zipfile.ZipInfo) -> int:
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    return info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")


def flip_in_record(path: Path, pick) -> str:
    """Flip one byte in the middle of the record ``pick(infos)`` chooses; returns its name."""
    with zipfile.ZipFile(path) as z:
        info = pick(z.infolist())
    data = bytearray(path.read_bytes())
    data[_data_start(path, info) + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))
    return info.filename


def largest_tensor_record(infos):
    return max((i for i in infos if "/data/" in i.filename), key=lambda i: i.file_size)


def _state_dict(obj: dict) -> dict:
    return obj.get("state_dict") or obj.get("module") or obj


def changed_tensors(before: dict, path: Path) -> list[str]:
    """Tensors whose values differ after the flip, as plain torch.load reads them (it does not notice)."""
    after = _state_dict(torch.load(path, weights_only=False))
    return [k for k, v in _state_dict(before).items() if isinstance(v, torch.Tensor) and not torch.equal(v, after[k])]


def test_a_flipped_byte_in_a_tensor_record_is_refused(sa2va, tiny):
    ckpt = tiny.ckpt.path
    before = torch.load(ckpt, weights_only=False)
    record = flip_in_record(ckpt, largest_tensor_record)
    (tensor,) = changed_tensors(before, ckpt)
    guard = Guard((ckpt, tiny.base), tiny.out)
    r = sa2va(ckpt, tiny.out, "--base", tiny.base, *NO_VERIFY)
    assert_refused(r, 3, guard, ckpt, f"zip record {record}, which holds tensor {tensor!r}, fails its CRC-32 check",
                   "copy it again")


def test_a_flipped_byte_in_the_pickle_is_refused_before_it_is_read(sa2va, tiny):
    ckpt = tiny.ckpt.path
    flip_in_record(ckpt, lambda infos: next(i for i in infos if i.filename.endswith("/data.pkl")))
    guard = Guard((ckpt, tiny.base), tiny.out)
    r = sa2va(ckpt, tiny.out, "--base", tiny.base, *NO_VERIFY)
    assert_refused(r, 3, guard, ckpt, "data.pkl, the pickle, fails its CRC-32 check")


def test_a_flipped_byte_in_a_deepspeed_folder_is_refused(sa2va, tiny, tmp_path):
    folder = tmp_path / "work_dirs" / "ds" / "iter_100.pth"
    states = folder / "mp_rank_00_model_states.pt"
    write_training_checkpoint(states, "sa2va-1b", base_dir=tiny.base, fmt="deepspeed-module")
    before = torch.load(states, weights_only=False)
    record = flip_in_record(states, largest_tensor_record)
    (tensor,) = changed_tensors(before, states)
    guard = Guard((folder, tiny.base), tiny.out)
    r = sa2va(folder, tiny.out, "--base", tiny.base, *NO_VERIFY)
    assert_refused(r, 3, guard, states, f"zip record {record}, which holds tensor {tensor!r}, fails its CRC-32")


def test_a_flipped_byte_in_a_deepspeed_optimizer_partition_is_refused(tmp_path):
    """ZeRO-2 fp32 master weights: the rank file's flat partition is one record, checked at its first read."""
    from _deepspeed_synth import random_groups, zero2_folder

    from sa2va_convert.read.checkpoint import open_checkpoint

    folder = tmp_path / "iter_10.pth"
    groups = random_groups([[(64, 32), (16,)], [(8, 8)]])
    zero2_folder(folder, groups, world=2)
    rank1 = folder / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    record = flip_in_record(rank1, largest_tensor_record)
    ck = open_checkpoint(folder)
    first = next(iter(groups[0]))  # group 0's flat buffer is cut in two; rank 1 holds its second half
    for name in groups[1]:
        ck.weights.load(name)  # other records read fine
    with pytest.raises(InputError) as e:
        for name in groups[0]:
            ck.weights.load(name)
    assert e.value.path == str(rank1)
    assert f"zip record {record}, which holds part of tensor " in e.value.message and "CRC-32" in e.value.message
    assert repr(first) in e.value.message
