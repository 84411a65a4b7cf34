"""The restricted unpickler: what it loads, what it refuses, and that it never runs anything."""

from __future__ import annotations

import builtins
import codecs
import collections
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _ckpt_helpers import (
    Reduce,
    deepspeed_files,
    forbidden_events,
    message_hub_state,
    mmengine_checkpoint,
    rewrite_data_pkl,
    save,
    v1_state_dict,
    write_legacy_raw,
    write_raw_data_pkl,
    zip_records,
)
from sa2va_convert.errors import ConvertError, InputError, UnsafeInputError
from sa2va_convert.read.safe_pickle.allow_lists import SAFE_TYPES
from sa2va_convert.read.safe_pickle import (
    NumpyArray,
    Placeholder,
    loads,
    safe_torch_load,
    to_plain,
)

HB = "mmengine.logging.history_buffer.HistoryBuffer"


# --------------------------------------------------------------------------------------------
# Real checkpoints load; tensors intact; known objects become counted placeholders
# --------------------------------------------------------------------------------------------


def test_mmengine_checkpoint_loads_with_placeholders(tmp_path: Path) -> None:
    sd = v1_state_dict()
    path = save(mmengine_checkpoint(sd), tmp_path / "iter_500.pth")
    with forbidden_events() as events:
        loaded = safe_torch_load(path)
    assert events == []
    assert loaded.mmapped and loaded.format == "zip"
    for k, t in sd.items():
        assert torch.equal(loaded.obj["state_dict"][k], t)
        assert loaded.obj["state_dict"][k].dtype == torch.bfloat16
    assert loaded.placeholders[HB] == 3  # train/loss, train/lr, train/time
    assert loaded.placeholders["numpy.ndarray"] >= 7
    assert loaded.placeholders["numpy.scalar"] == 4
    hb = loaded.obj["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(hb, Placeholder) and type(hb).__name__ == "HistoryBuffer"
    for method in ("update", "mean", "current", "statistics"):
        assert not hasattr(hb, method), "placeholders must have no behaviour"


def test_message_hub_values_become_plain_data(tmp_path: Path) -> None:
    path = save(mmengine_checkpoint(v1_state_dict()), tmp_path / "iter_500.pth")
    hub = to_plain(safe_torch_load(path).obj["message_hub"])
    info = hub["runtime_info"]
    assert info["iter"] == 500 and info["loop_stage"] == "train"
    assert info["eta"] == 123.5 and isinstance(info["eta"], float)
    assert info["best_score"] == 0.75
    assert info["seen"] == 4000 and isinstance(info["seen"], int)
    assert info["flag"] is True
    assert info["window"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    loss = hub["log_scalars"]["train/loss"]
    assert loss["__type__"] == HB
    assert loss["_log_history"] == [2.0, 1.75, 1.5, 1.25, 1.0]
    assert loss["statistics_methods"]["mean"] == f"{HB}.mean"
    assert hub["resumed_keys"]["train/loss"] is True


def test_numpy1_module_names_load(tmp_path: Path) -> None:
    """Files written under numpy 1 name numpy.core.multiarray; we must read both spellings."""
    src = save(mmengine_checkpoint(v1_state_dict()), tmp_path / "np2.pth")
    assert b"numpy._core.multiarray" in zip_records(src)["data.pkl"]
    dst = rewrite_data_pkl(src, tmp_path / "np1.pth",
                           lambda b: b.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy._core" not in zip_records(dst)["data.pkl"]
    a, b = safe_torch_load(src), safe_torch_load(dst)
    assert a.placeholders == b.placeholders
    assert to_plain(a.obj["message_hub"]) == to_plain(b.obj["message_hub"])
    for k, t in a.obj["state_dict"].items():
        assert torch.equal(b.obj["state_dict"][k], t)


def test_legacy_non_zip_format_loads_without_mmap(tmp_path: Path) -> None:
    sd = v1_state_dict()
    path = save(mmengine_checkpoint(sd), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    loaded = safe_torch_load(path)
    assert not loaded.mmapped and loaded.format == "legacy"
    for k, t in sd.items():
        assert torch.equal(loaded.obj["state_dict"][k], t)
    assert loaded.placeholders[HB] == 3


def test_deepspeed_objects_load_without_deepspeed(tmp_path: Path) -> None:
    model_states, optim_states = deepspeed_files(tmp_path / "iter_500.pth", v1_state_dict())
    # In a fresh interpreter (this one may have imported deepspeed through accelerate/transformers):
    probe = subprocess.run([sys.executable, "-c", (
        "import sys; from sa2va_convert.read.safe_pickle import safe_torch_load; "
        f"safe_torch_load({str(optim_states)!r}); safe_torch_load({str(model_states)!r}); "
        "print('deepspeed' in sys.modules)")], capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0 and probe.stdout.strip() == "False", probe.stderr
    with forbidden_events() as events:
        optim = safe_torch_load(optim_states)
        model = safe_torch_load(model_states)
    assert events == []
    counts = optim.placeholders
    assert counts["deepspeed.runtime.zero.config.ZeroStageEnum"] == 1
    assert counts["deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"] == 1
    assert counts["deepspeed.utils.tensor_fragment.fragment_address"] == len(v1_state_dict())
    osd = to_plain(optim.obj["optimizer_state_dict"])
    assert osd["zero_stage"] == {"__type__": "deepspeed.runtime.zero.config.ZeroStageEnum", "args": [2]}
    assert osd["loss_scaler"]["cur_scale"] == 65536.0
    first = next(iter(osd["param_slice_mappings"][0].values()))
    assert first == {"__type__": "deepspeed.utils.tensor_fragment.fragment_address", "numel": 32, "start": 0}
    assert model.obj["param_shapes"][0]["text_hidden_fcs.0.weight"] == torch.Size([8, 8])


def test_tensor_with_python_attributes_loads_as_plain_tensor(tmp_path: Path) -> None:
    """ZeRO-3 tags tensors with ds_id; torch then pickles them through _rebuild_from_type_v2."""
    tagged = torch.arange(6, dtype=torch.float32)
    tagged.ds_id = 7
    path = save({"fp32_flat_groups": [tagged]}, tmp_path / "z3.pt")
    assert b"_rebuild_from_type_v2" in zip_records(path)["data.pkl"]
    loaded = safe_torch_load(path)
    t = loaded.obj["fp32_flat_groups"][0]
    assert type(t) is torch.Tensor and torch.equal(t, tagged) and not hasattr(t, "ds_id")
    assert loaded.placeholders == {}


def test_rebuild_from_type_only_rebuilds_tensors(tmp_path: Path) -> None:
    payload = Reduce(torch._tensor._rebuild_from_type_v2, getattr, torch.Tensor, (torch.ones(1), "x"), {})
    path = save({"x": payload}, tmp_path / "r.pt")
    with pytest.raises(UnsafeInputError, match="only tensor rebuilds"):
        safe_torch_load(path)
    data = b"ctorch._tensor\nTensor\n(dS'__setstate__'\nI1\nsb."  # BUILD on torch.Tensor itself
    with pytest.raises(UnsafeInputError, match="modify"):
        loads(data)
    assert callable(torch.Tensor.__setstate__)


def test_placeholder_counts_are_per_load(tmp_path: Path) -> None:
    path = save({"hub": message_hub_state()}, tmp_path / "a.pth")
    assert safe_torch_load(path).placeholders == safe_torch_load(path).placeholders


# --------------------------------------------------------------------------------------------
# Hostile pickles: refused, named, and nothing runs
# --------------------------------------------------------------------------------------------


def _hostile(kind: str, marker: Path) -> tuple[Reduce, str]:
    m = str(marker)
    return {
        "os.system": (Reduce(os.system, f"touch '{m}'"), f"{os.system.__module__}.system"),
        "subprocess.call": (Reduce(subprocess.call, ["touch", m]), "subprocess.call"),
        "exec": (Reduce(builtins.exec, f"open({m!r}, 'w').close()"), "builtins.exec"),
        "eval": (Reduce(builtins.eval, f"open({m!r}, 'w').close()"), "builtins.eval"),
        "__import__": (Reduce(builtins.__import__, "os"), "builtins.__import__"),
        "os.popen": (Reduce(os.popen, f"touch '{m}'"), "os.popen"),
    }[kind]


@pytest.mark.parametrize("kind", ["os.system", "subprocess.call", "exec", "eval", "__import__", "os.popen"])
@pytest.mark.parametrize("where", ["meta", "message_hub", "top", "state_dict"])
def test_hostile_pickle_is_refused(tmp_path: Path, kind: str, where: str) -> None:
    marker = tmp_path / "pwned"
    payload, name = _hostile(kind, marker)
    ckpt = mmengine_checkpoint(v1_state_dict())
    if where == "meta":
        ckpt["meta"]["dataset_meta"]["extra"] = [payload]
    elif where == "message_hub":
        ckpt["message_hub"]["runtime_info"]["evil"] = {"nested": payload}
    elif where == "state_dict":
        ckpt["state_dict"]["evil"] = payload
    else:
        ckpt["evil"] = payload
    path = save(ckpt, tmp_path / "iter_500.pth")
    with forbidden_events() as events, pytest.raises(UnsafeInputError) as err:
        safe_torch_load(path)
    assert not marker.exists()
    assert events == []
    message = str(err.value)
    assert name in message and str(path) in message
    assert f"--allow-global {name}" in message
    assert "\n" not in message
    assert err.value.exit_code == 4


def test_hostile_fixture_is_live_under_plain_torch_load(tmp_path: Path) -> None:
    """Control: the same file does run its payload when loaded the usual unsafe way."""
    marker = tmp_path / "pwned"
    payload, _ = _hostile("os.system", marker)
    path = save({"state_dict": {"a": torch.ones(1)}, "meta": {"x": payload}}, tmp_path / "c.pth")
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_hostile_legacy_format_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload, name = _hostile("os.system", marker)
    path = save({"state_dict": {"a": torch.ones(1)}, "meta": payload}, tmp_path / "legacy.pth",
                _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeInputError, match=name):
        safe_torch_load(path)
    assert not marker.exists()


def test_real_getattr_is_never_available(tmp_path: Path) -> None:
    """getattr on a real object would reach __globals__ and from there everything."""
    payload = Reduce(getattr, torch._utils._rebuild_tensor_v2, "__globals__")
    path = save({"state_dict": {"a": torch.ones(1)}, "meta": payload}, tmp_path / "g.pth")
    with pytest.raises(UnsafeInputError, match="getattr"):
        safe_torch_load(path)


def test_dotted_global_on_real_function_is_refused() -> None:
    # protocol 4 STACK_GLOBAL 'torch._utils' '_rebuild_tensor_v2.__globals__'
    def short_str(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()

    data = b"\x80\x04" + short_str("torch._utils") + short_str("_rebuild_tensor_v2.__globals__") + b"\x93."
    with pytest.raises(UnsafeInputError, match=r"torch\._utils\._rebuild_tensor_v2\.__globals__"):
        loads(data)


def test_build_cannot_modify_allowed_functions() -> None:
    before = torch._utils._rebuild_tensor_v2.__defaults__
    data = b"ctorch._utils\n_rebuild_tensor_v2\n(dS'__defaults__'\n(I1\ntsb."
    with pytest.raises(UnsafeInputError, match="modify"):
        loads(data)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == before
    # slot-state form: BUILD with (None, {...})
    data = b"ctorch._utils\n_rebuild_tensor_v2\n(N(dS'__defaults__'\n(I1\ntstb."
    with pytest.raises(UnsafeInputError):
        loads(data)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == before


def test_build_cannot_modify_placeholder_classes() -> None:
    data = f"c{HB.rpartition('.')[0]}\n{HB.rpartition('.')[2]}\n(dS'__setstate__'\nI1\nsb.".encode()
    with pytest.raises(ConvertError):
        loads(data)


def test_allowed_types_are_immutable() -> None:
    for name, typ in SAFE_TYPES.items():
        with pytest.raises((TypeError, AttributeError)):
            setattr(typ, "sa2va_probe", 1)
        assert not hasattr(typ, "sa2va_probe"), name


def test_untyped_storage_class_is_not_handed_out() -> None:
    data = b"ctorch.storage\nUntypedStorage\n(I10\ntR."
    with pytest.raises(ConvertError):
        loads(data)


def test_reconstructor_only_for_placeholders() -> None:
    data = pickle.dumps(_history_buffer(), protocol=1)
    assert b"copy_reg\n_reconstructor" in data
    with forbidden_events() as events:
        obj, counts = loads(data)
    assert events == [] and counts[HB] == 1
    assert to_plain(obj)["_log_history"] == [1.0, 2.0]
    data = b"ccopy_reg\n_reconstructor\n(ccollections\nOrderedDict\nc__builtin__\nobject\nNtR."
    with pytest.raises(UnsafeInputError, match="_reconstructor"):
        loads(data)


def test_codecs_encode_only_latin1() -> None:
    assert loads(pickle.dumps(b"\x00\xffabc", protocol=2))[0] == b"\x00\xffabc"
    with pytest.raises(UnsafeInputError, match="rot13"):
        loads(pickle.dumps(Reduce(codecs.encode, "abc", "rot13"), protocol=2))


def test_bytearray_only_as_pickle_encodes_it() -> None:
    assert loads(pickle.dumps(bytearray(b"\x00\xfe"), protocol=2))[0] == bytearray(b"\x00\xfe")
    with pytest.raises(UnsafeInputError, match="bytearray"):
        loads(b"c__builtin__\nbytearray\n(I1000000000000\ntR.")  # would allocate 1 TB


def test_unknown_global_names_module_and_name() -> None:
    with pytest.raises(UnsafeInputError) as err:
        loads(pickle.dumps(collections.Counter(a=1), protocol=2), source="x.pkl")
    assert "collections.Counter" in str(err.value) and "x.pkl" in str(err.value)


# --------------------------------------------------------------------------------------------
# allow_globals
# --------------------------------------------------------------------------------------------


def test_allow_globals_admits_inert_placeholders(tmp_path: Path) -> None:
    path = save({"state_dict": {"a": torch.ones(1)}, "meta": {"c": collections.Counter(a=1)}}, tmp_path / "c.pth")
    with pytest.raises(UnsafeInputError, match="collections.Counter"):
        safe_torch_load(path)
    loaded = safe_torch_load(path, allow_globals=["collections.Counter"])
    counter = loaded.obj["meta"]["c"]
    assert isinstance(counter, Placeholder) and not isinstance(counter, collections.Counter)
    assert loaded.placeholders == {"collections.Counter": 1}
    assert to_plain(counter) == {"__type__": "collections.Counter", "args": [{"a": 1}]}


def test_allowing_a_dangerous_global_still_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload, name = _hostile("os.system", marker)
    path = save({"state_dict": {"a": torch.ones(1)}, "meta": payload}, tmp_path / "c.pth")
    with forbidden_events() as events:
        loaded = safe_torch_load(path, allow_globals=[name])
    assert events == [] and not marker.exists()
    assert loaded.placeholders == {name: 1}


def test_allow_globals_rejects_malformed_names() -> None:
    with pytest.raises(InputError, match="--allow-global"):
        loads(pickle.dumps(1), allow_globals=["Counter"])


# --------------------------------------------------------------------------------------------
# numpy decoding details
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        np.arange(3, dtype=">i4"),
        np.array([True, False]),
        np.array(7.5),
    ],
    ids=["c-order", "fortran", "big-endian", "bool", "0-d"],
)
def test_numpy_arrays_decode(array: np.ndarray, protocol: int) -> None:
    obj, counts = loads(pickle.dumps(array, protocol=protocol))
    assert isinstance(obj, NumpyArray)
    assert to_plain(obj) == array.tolist()
    assert counts["numpy.ndarray"] == 1


@pytest.mark.parametrize("value", [np.float64(1.25), np.float32(-2.5), np.int32(-7), np.uint8(200),
                                   np.bool_(False), np.float16(0.5)])
def test_numpy_scalars_decode(value: np.generic) -> None:
    obj, _ = loads(pickle.dumps(value, protocol=2))
    assert to_plain(obj) == value.item()


def test_large_array_is_summarised() -> None:
    obj, _ = loads(pickle.dumps(np.zeros((10, 10), dtype=np.float32), protocol=2))
    assert to_plain(obj) == {"__type__": "numpy.ndarray", "shape": [10, 10], "dtype": "f4"}


def test_to_plain_survives_cycles() -> None:
    obj, _ = loads(b"]q\x00h\x00a.")  # a list that contains itself
    assert to_plain(obj) == ["<cycle>"]


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x02]r\xff\xff\xff\x7f.",  # LONG_BINPUT 2**31-1: the C unpickler would size its memo to it
        b"\x80\x05\x96" + (2**60).to_bytes(8, "little") + b".",  # BYTEARRAY8 asking for an exabyte
        b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b"abc.",  # BINBYTES8, 1 TB
    ],
    ids=["memo-index", "bytearray8", "binbytes8"],
)
def test_counts_in_the_stream_are_checked_before_allocating(data: bytes) -> None:
    with pytest.raises(InputError, match="memo index|truncated"):
        loads(data)


# --------------------------------------------------------------------------------------------
# Fuzz: damaged pickles give ConvertError subclasses only, and never reach pickle's importer
# --------------------------------------------------------------------------------------------

_HUB_PICKLE = pickle.dumps(message_hub_state(), protocol=2)


@settings(max_examples=1000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    edits=st.lists(st.tuples(st.integers(0, len(_HUB_PICKLE) - 1), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(1, len(_HUB_PICKLE))),
)
def test_fuzz_pickle_bytes(edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(_HUB_PICKLE)
    for pos, byte in edits:
        data[pos] = byte
    if cut is not None:
        data = data[:cut]
    with forbidden_events() as events:
        try:
            loads(bytes(data))
        except ConvertError:
            pass
    assert events == []


# --------------------------------------------------------------------------------------------
# Crafted torch containers
# --------------------------------------------------------------------------------------------


def test_crafted_zip_and_legacy_containers_use_the_policy(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Reduce(os.system, f"touch '{marker}'"), protocol=2)
    for path in (write_raw_data_pkl(tmp_path / "z.pth", evil), write_legacy_raw(tmp_path / "l.pth", evil)):
        with pytest.raises(UnsafeInputError):
            safe_torch_load(path)
    assert not marker.exists()
    ok = pickle.dumps({"x": np.float64(2.0)}, protocol=2)
    assert to_plain(safe_torch_load(write_raw_data_pkl(tmp_path / "ok.pth", ok)).obj) == {"x": 2.0}
    assert to_plain(safe_torch_load(write_legacy_raw(tmp_path / "ok2.pth", ok)).obj) == {"x": 2.0}


def _history_buffer():
    from mmengine.logging import HistoryBuffer

    hb = HistoryBuffer()
    hb.update(1.0)
    hb.update(2.0)
    return hb
