"""Base safetensors headers that lie while staying inside their file (issue 23, item 2).

Each case edits one entry of a copy of the base shard's header and rewrites the file with the same
tensor bytes: a span that is not shape x dtype size, two spans overlapping, a span that ends before it
begins, a negative dimension. Read as they claim, the first three converted with exit 0 and a wrong
tensor, and the last was an "internal error". Each must be refused before anything is written: exit 3,
one line naming the shard, the tensor and the rule, nothing published; ``verify`` of a folder holding
such a shard fails (exit 7) naming it. A last test checks that our rules refuse exactly what the
safetensors library refuses, on a few hundred derandomized mutations.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
from pathlib import Path

import pytest
from _reliability import Guard, assert_one_error_line, assert_refused

from sa2va_convert.read.safetensors_check import DTYPE_BITS, HeaderProblem, read_and_validate

SHARD = "model-00001-of-00001.safetensors"


def rewrite_header(path: Path, edit) -> None:
    """Replace ``path``'s header by ``edit(header)`` (padded to 8 bytes as writers do); tensor bytes unchanged."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _in_file_order(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _two_dims(header: dict) -> str:
    """The first tensor (in file order) with a 2-D shape whose first dimension is even."""
    return next(k for k in _in_file_order(header) if len(header[k]["shape"]) == 2 and header[k]["shape"][0] % 2 == 0)


def span_not_shape(header: dict) -> str:
    key = _two_dims(header)
    header[key]["shape"][0] //= 2  # half the elements, the same bytes
    return key


def overlapping(header: dict) -> str:
    keys = _in_file_order(header)
    a, b = next((a, b) for a, b in zip(keys, keys[1:]) if header[a]["data_offsets"][1] > header[a]["data_offsets"][0])
    half = (header[a]["data_offsets"][1] - header[a]["data_offsets"][0]) // 2 or 1
    begin, end = header[b]["data_offsets"]
    header[b]["data_offsets"] = [begin - half, end - half]  # b now starts inside a
    return b


def ends_before_it_begins(header: dict) -> str:
    key = _two_dims(header)
    header[key]["data_offsets"].reverse()
    return key


def negative_dimension(header: dict) -> str:
    key = _two_dims(header)
    header[key]["shape"][0] = -header[key]["shape"][0]
    return key


CASES = {
    "span-not-shape-x-dtype": (span_not_shape, "bytes but"),
    "overlapping-spans": (overlapping, "overlap"),
    "span-ends-before-it-begins": (ends_before_it_begins, "ends (byte"),
    "negative-dimension": (negative_dimension, "negative dimension"),
}


@pytest.fixture
def lying_base(tiny, tmp_path):
    def make(case: str) -> tuple[Path, str, str]:
        base = tmp_path / f"base-{case}"
        shutil.copytree(tiny.base, base)
        edit, needle = CASES[case]
        box = []
        rewrite_header(base / SHARD, lambda h: box.append(edit(h)))
        (key,) = box
        return base, key, needle

    return make


@pytest.mark.parametrize("case", list(CASES))
def test_a_lying_base_header_is_refused_before_any_work(sa2va, tiny, lying_base, case):
    from safetensors import safe_open

    base, key, needle = lying_base(case)
    with pytest.raises(Exception):  # noqa: B017 - the control: the library refuses this file too
        safe_open(str(base / SHARD), framework="pt")
    guard = Guard((tiny.ckpt.path, base), tiny.out)
    r = sa2va(tiny.ckpt.path, tiny.out, "--base", base)
    assert_refused(r, 3, guard, base / SHARD, "bad safetensors header", repr(key), needle, "re-copy")


def test_verify_refuses_a_folder_whose_shard_header_lies(sa2va, lying_base):
    base, key, _ = lying_base("span-not-shape-x-dtype")
    r = sa2va("verify", base, "--no-roundtrip")
    assert_one_error_line(r, 7, base / SHARD, "bad safetensors header", repr(key))


def test_our_rules_refuse_exactly_what_the_library_refuses(tmp_path):
    """Derandomized mutations of a small valid file: every header we accept, safetensors opens, and every
    header it refuses, we refuse (our messages are ours; the verdicts must be the library's)."""
    from safetensors import safe_open

    rng = random.Random(23)
    base = {f"t{i}": {"dtype": d, "shape": s} for i, (d, s) in
            enumerate([("F32", [2, 3]), ("BF16", [4]), ("I64", [1]), ("F32", [0]), ("U8", [3]), ("F4", [2, 2])])}

    def valid() -> tuple[dict, int]:
        header, at = {"__metadata__": {"format": "pt"}}, 0
        for k, e in base.items():
            size = math.prod(e["shape"]) * DTYPE_BITS[e["dtype"]] // 8
            header[k] = {**e, "shape": list(e["shape"]), "data_offsets": [at, at + size]}
            at += size
        return header, at

    mutations = [
        lambda h, k: h[k]["shape"].__setitem__(0, h[k]["shape"][0] + rng.choice([-1, 1, 2])) if h[k]["shape"] else None,
        lambda h, k: h[k]["data_offsets"].__setitem__(rng.randrange(2), h[k]["data_offsets"][0] + rng.randrange(-3, 4)),
        lambda h, k: h[k]["data_offsets"].reverse(),
        lambda h, k: h[k].__setitem__("dtype", rng.choice(["F16", "F64", "BOOL", "F33", "F6_E2M3"])),
        lambda h, k: h[k].__setitem__("shape", [-1] + h[k]["shape"]),
        lambda h, k: h[k].__setitem__("shape", h[k]["shape"] + [1]),
        lambda h, k: h.__setitem__("__metadata__", {"x": rng.choice(["y", 1, None])}),
        lambda h, k: h[k].pop(rng.choice(["dtype", "shape", "data_offsets"])),
        lambda h, k: h[k].__setitem__("data_offsets", h[k]["data_offsets"] + [0]),
    ]
    verdicts = {"both accept": 0, "both refuse": 0}
    for i in range(300):
        header, total = valid()
        for _ in range(rng.choice([0, 1, 1, 2])):
            mutations[rng.randrange(len(mutations))](header, rng.choice(list(base)))
        extra = rng.choice([0, 0, 0, 1, -1])
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path = tmp_path / f"m{i}.safetensors"
        path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(range(256))[:max(0, total + extra)])
        try:
            read_and_validate(path)
            ours = None
        except HeaderProblem as e:
            ours = e.message
        try:
            with safe_open(str(path), framework="pt") as f:
                list(f.keys())
            theirs = None
        except Exception as e:  # noqa: BLE001 - the library's own error types
            theirs = str(e)
        assert (ours is None) == (theirs is None), (header, total + extra, ours, theirs)
        verdicts["both accept" if ours is None else "both refuse"] += 1
    assert verdicts["both accept"] > 20 and verdicts["both refuse"] > 100, verdicts
