"""Bounded fuzzing of the two parsers that read untrusted text and bytes.

Only ``ConvertError`` subclasses may come out (the CLI turns those into one
line and a documented exit code; anything else would be exit 1, "a bug"), and
nothing planted may ever run. Runs are derandomized (same examples on every
machine) with no per-example deadline and a bounded example count, each test
well under 25 s on the 2-core CI machine.

``tests/test_checkpoint_reader.py::test_fuzz_checkpoint_files`` and
``tests/test_safe_pickle.py::test_fuzz_pickle_bytes`` already flip and cut the
bytes of one real file; the checkpoint fuzz here is structure-aware instead:
it builds whole ``torch.save`` files from random Python structures (tensors of
every dtype and layout, numpy values, odd keys, hostile reductions placed
anywhere) and also splices random opcodes into them.
"""

from __future__ import annotations

import atexit
import builtins
import os
import pickle
import shutil
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import yaml
from _ckpt_helpers import forbidden_events
from _reliability import RawOps, Reduce, save_with_raw_ops
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sa2va_convert.errors import ConvertError
from sa2va_convert.plan.keymap import Keymap, builtin_dir, load_keymap
from sa2va_convert.read.checkpoint import open_checkpoint

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

_DIR = Path(tempfile.mkdtemp(prefix="sa2va-reliability-fuzz-"))
atexit.register(shutil.rmtree, _DIR, True)
MARKER = _DIR / "PWNED"

# ------------------------------------------------------------------ checkpoints from structures

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int8,
           torch.uint8, torch.bool, torch.complex64, torch.uint16]


@st.composite
def tensors(draw) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    dtype = draw(st.sampled_from(_DTYPES))
    t = torch.zeros(shape, dtype=dtype) if dtype != torch.bool else torch.zeros(shape, dtype=torch.float32) > 0
    kind = draw(st.sampled_from(["plain", "parameter", "view", "transposed", "sparse", "special"]))
    if kind == "parameter" and t.is_floating_point():
        return torch.nn.Parameter(t, requires_grad=draw(st.booleans()))
    if kind == "view" and t.numel() > 1:
        return t.reshape(-1)[1:]
    if kind == "transposed" and t.dim() == 2:
        return t.t()
    if kind == "sparse" and t.dim() == 2 and t.dtype == torch.float32:
        return t.to_sparse()
    if kind == "special" and t.is_floating_point() and t.numel():
        return t.fill_(draw(st.sampled_from([float("nan"), float("inf"), -0.0, 1e38])))
    return t


def _hostile() -> st.SearchStrategy:
    return st.sampled_from([
        Reduce(os.system, f"touch '{MARKER}'"),
        Reduce(builtins.eval, f"open({str(MARKER)!r}, 'w').close()"),
        Reduce(builtins.getattr, os, "system"),
        Reduce(shutil.rmtree, str(_DIR)),
        Reduce(torch.storage._load_from_bytes, b"junk"),
        RawOps(b"cos\nsystem\n(X" + len(f"touch {MARKER}").to_bytes(4, "little") + f"touch {MARKER}".encode() + b"tR"),
    ])


_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=20),
    st.binary(max_size=20), tensors(), st.builds(np.float64, st.floats()), st.builds(np.int64, st.integers(-9, 9)),
    st.builds(lambda n: np.arange(n, dtype=np.float32), st.integers(0, 5)), _hostile(),
)
_keys = st.one_of(st.text(max_size=30), st.integers(), st.tuples(st.integers(), st.text(max_size=3)))
structures = st.recursive(
    _leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4),
                            st.tuples(inner, inner), st.builds(OrderedDict, st.dictionaries(st.text(max_size=8),
                                                                                            inner, max_size=3))),
    max_leaves=12,
)
state_dicts = st.one_of(
    st.dictionaries(st.text(min_size=1, max_size=30), tensors(), min_size=1, max_size=6),  # well-formed
    st.dictionaries(st.text(min_size=1, max_size=30), tensors(), min_size=1, max_size=6),
    st.dictionaries(_keys, st.one_of(tensors(), structures), max_size=6),  # odd keys and values
)


@st.composite
def checkpoints(draw):
    sd = draw(state_dicts)
    shape = draw(st.sampled_from(["mmengine", "deepspeed", "bare", "other"]))
    if shape == "mmengine":
        return {"state_dict": sd, "meta": draw(structures), "message_hub": draw(structures)}
    if shape == "deepspeed":
        return {"module": sd, "ds_version": "0.19.8", "buffer_names": draw(structures)}
    if shape == "bare":
        return sd
    return draw(structures)


def _warm_up() -> None:
    """torch.load imports some of its modules on first use; the audit hook would report those imports
    as 'exec' events, so one load per container format happens before anything is recorded."""
    for zip_format in (True, False):
        path = _DIR / f"warm-{zip_format}.pth"
        torch.save({"state_dict": {"a": torch.ones(1)}}, path, _use_new_zipfile_serialization=zip_format)
        open_checkpoint(path)


_warm_up()
_INSTALLED = tuple({sys.base_prefix, sys.prefix, os.path.dirname(os.__file__)})


def _unexpected(events: list) -> list:
    """Forbidden audit events, minus lazy imports of installed modules (stdlib codecs, torch internals).

    An import of a module file outside the interpreter's own prefix (a planted module) still counts."""
    out = []
    for name, args in events:
        lazy_import = (name == "exec" and "code object <module>" in args
                       and any(f'file "{p}' in args for p in _INSTALLED))
        if not lazy_import:
            out.append((name, args))
    return out


@settings(FUZZ, max_examples=250)
@given(obj=checkpoints(), protocol=st.sampled_from([2, 4, 5]), zip_format=st.booleans(),
       splice=st.one_of(st.none(), st.none(), st.none(),
                        st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=6))))
def test_fuzz_open_checkpoint_on_generated_files(obj, protocol, zip_format, splice):
    path = _DIR / "fuzz.pth"
    try:
        if zip_format:
            save_with_raw_ops(obj, path, protocol=protocol)
        else:
            torch.save(obj, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    except (pickle.PicklingError, RuntimeError, TypeError, ValueError, AttributeError):
        event("not representable by torch.save")
        return  # not representable as a torch.save file: nothing to read
    if splice is not None:
        data = bytearray(path.read_bytes())
        pos, junk = splice
        pos %= len(data)
        data[pos:pos + len(junk)] = junk
        path.write_bytes(bytes(data))
    with forbidden_events() as events:
        try:
            ck = open_checkpoint(path)
            for key in ck.weights.keys():  # noqa: SIM118 - a TensorSource, not a dict
                ck.weights.info(key)
            event("opened")
        except ConvertError as e:
            event(f"refused: {type(e).__name__} (exit {e.exit_code})")
            assert "\n" not in e.one_line()
    assert _unexpected(events) == [], events
    assert not MARKER.exists(), "a planted payload ran"
    assert _DIR.is_dir(), "a planted payload deleted the fuzz folder"


# ------------------------------------------------------------------ keymaps

GOOD_TEXT = (builtin_dir() / "sa2va-v1-internvl-qwen2.yaml").read_text()
GOOD_LINES = GOOD_TEXT.splitlines(keepends=True)
_SNIPPETS = ["&a ", "*a", "!!python/object/apply:os.system ['true']", "!!binary aGk=", "[", "]", "{", "}", "'", '"',
             ": ", "- ", "\t", "\x00", "? ", "<<: *a", "1e999", "~", "{a: 1}", "x" * 300, "(", ")", "\\1", "(?P<x>",
             "[[[[[[[[", "2001-13-45", "9" * 5000, "\ufeff", "---\n", "...\n", "%YAML 1.1\n", "\\g<9>", "*"]


@st.composite
def edited_keymaps(draw) -> str:
    lines = list(GOOD_LINES)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "replace_value"]))
        i = draw(st.integers(0, len(lines) - 1))
        if op == "delete" and len(lines) > 1:
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "insert":
            line = lines[i]
            pos = draw(st.integers(0, len(line)))
            lines[i] = line[:pos] + draw(st.sampled_from(_SNIPPETS)) + line[pos:]
        elif ":" in lines[i]:
            head = lines[i].split(":", 1)[0]
            lines[i] = f"{head}: {draw(st.sampled_from(_SNIPPETS))}\n"
    return "".join(lines)


_yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=15),
              st.sampled_from(["(", "^mllm\\.", "\\1.weight", "lora_a", "full", "v1", "sa2va", ""])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)


@st.composite
def restructured_keymaps(draw) -> str:
    """The good keymap as data with one random path replaced, deleted or given an extra field."""
    data = yaml.safe_load(GOOD_TEXT)
    node, path = data, []
    while isinstance(node, (dict, list)) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append(key)
        node = node[key]
    action = draw(st.sampled_from(["replace", "delete", "extra"]))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if not path:
        return yaml.safe_dump(draw(_yaml_values))
    if action == "replace":
        parent[path[-1]] = draw(_yaml_values)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=8))] = draw(_yaml_values)
    else:
        parent.append(draw(_yaml_values))
    return yaml.safe_dump(data, sort_keys=False)


@settings(FUZZ, max_examples=400)
@given(text=st.one_of(edited_keymaps(), restructured_keymaps(), st.text(max_size=200)))
def test_fuzz_load_keymap(text):
    with forbidden_events() as events:
        try:
            km = load_keymap("fuzz.yaml", text=text)
            assert isinstance(km, Keymap)
            event("loaded")
        except ConvertError as e:
            event(f"refused: {e.message.split(':')[0][:40]}")
            assert e.path and e.path.startswith("fuzz.yaml") and "\n" not in e.one_line()
    assert events == [], events
