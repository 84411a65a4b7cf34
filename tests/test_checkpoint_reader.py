"""open_checkpoint: the shapes training writes, memory mapping, and every way input can be wrong."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _ckpt_helpers import (
    CFG_V1,
    CFG_V2,
    deepspeed_files,
    file_fingerprint,
    forbidden_events,
    mmengine_checkpoint,
    save,
    v1_state_dict,
    v2_state_dict,
    write_torch_zip,
)
from sa2va_convert.errors import ConvertError, InputError, UnsafeInputError
from sa2va_convert.read.checkpoint import TrainingCheckpoint, open_checkpoint
from sa2va_convert.read.tensor_source import TensorSource

HB = "mmengine.logging.history_buffer.HistoryBuffer"


def _assert_same_tensors(ck: TrainingCheckpoint, sd: dict) -> None:
    assert sorted(ck.weights.keys()) == sorted(sd)
    for key, tensor in sd.items():
        info = ck.weights.info(key)
        assert info.shape == tuple(tensor.shape) and info.dtype == "bf16"
        assert torch.equal(ck.weights.load(key), tensor)


# --------------------------------------------------------------------------------------------
# The shapes training writes
# --------------------------------------------------------------------------------------------


def test_v1_mmengine_checkpoint(tmp_path: Path) -> None:
    sd = v1_state_dict()
    path = save(mmengine_checkpoint(sd, cfg=CFG_V1), tmp_path / "iter_500.pth")
    ck = open_checkpoint(path)
    assert ck.kind == "mmengine" and ck.path == path
    assert isinstance(ck.weights, TensorSource) and ck.weights.label == "checkpoint"
    _assert_same_tensors(ck, sd)
    assert ck.top_level_keys == ["meta", "message_hub", "state_dict", "param_schedulers"]
    assert ck.meta["iter"] == 500 and ck.meta["epoch"] == 0 and ck.meta["seed"] == 42
    assert ck.meta["experiment_name"].startswith("sa2va_1b")
    assert ck.meta["time"] == "20250101_010203"
    assert ck.meta["mmengine_version"] == "0.10.7"
    assert ck.meta["cfg"] == CFG_V1
    assert ck.meta["runtime_info"]["eta"] == 123.5
    assert ck.meta["dataset_meta"] == {"classes": ["vessel"]}
    json.dumps(ck.meta)  # plain data all the way down
    assert ck.placeholders[HB] == 3
    assert ck.config is not None and ck.config.error is None
    assert ck.config.template == "qwen_chat" and ck.config.lora.r == 4


def test_v2_mmengine_checkpoint(tmp_path: Path) -> None:
    sd = v2_state_dict()
    ck = open_checkpoint(save(mmengine_checkpoint(sd, cfg=CFG_V2), tmp_path / "iter_10.pth"))
    _assert_same_tensors(ck, sd)
    assert ck.config.pretrained_pth == "./pretrained/sa2va_internvl3_8b/pytorch_model.pth"
    assert ck.config.lora.use_rslora is True and ck.config.lora.modules_to_save == ["embed_tokens", "lm_head"]


def test_plain_state_dict(tmp_path: Path) -> None:
    sd = v1_state_dict()
    ck = open_checkpoint(save(sd, tmp_path / "weights.pth"))
    assert ck.kind == "state_dict" and ck.meta == {} and ck.config is None and ck.placeholders == {}
    _assert_same_tensors(ck, sd)


def test_parameters_become_plain_tensors(tmp_path: Path) -> None:
    param = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.bfloat16))
    param.custom = "attribute"  # pickled through _rebuild_parameter_with_state
    ck = open_checkpoint(save({"state_dict": {"w": param}}, tmp_path / "p.pth"))
    t = ck.weights.load("w")
    assert type(t) is torch.Tensor and not t.requires_grad and torch.equal(t, param.detach())
    assert not hasattr(t, "custom")


def test_deepspeed_model_states_file(tmp_path: Path) -> None:
    sd = v1_state_dict()
    model_states, optim_states = deepspeed_files(tmp_path / "iter_500.pth", sd)
    ck = open_checkpoint(model_states)
    assert ck.kind == "deepspeed-model-states"
    _assert_same_tensors(ck, sd)
    assert ck.meta["iter"] == 500 and ck.config is not None
    assert "ds_version" in ck.top_level_keys
    with pytest.raises(InputError, match="optimizer-states file"):
        open_checkpoint(optim_states)


def test_allow_globals_reaches_the_loader(tmp_path: Path) -> None:
    import collections

    ckpt = mmengine_checkpoint(v1_state_dict())
    ckpt["meta"]["counter"] = collections.Counter(x=1)
    path = save(ckpt, tmp_path / "iter_500.pth")
    with pytest.raises(UnsafeInputError, match="collections.Counter"):
        open_checkpoint(path)
    ck = open_checkpoint(path, allow_globals=["collections.Counter"])
    assert ck.placeholders["collections.Counter"] == 1
    assert ck.meta["counter"] == {"__type__": "collections.Counter", "args": [{"x": 1}]}


def test_broken_embedded_config_keeps_checkpoint_usable(tmp_path: Path) -> None:
    ck = open_checkpoint(save(mmengine_checkpoint(v1_state_dict(), cfg="model = dict(\n"), tmp_path / "c.pth"))
    assert ck.config is not None and ck.config.error and len(list(ck.weights.keys())) > 0


# --------------------------------------------------------------------------------------------
# Memory mapping and read-only access
# --------------------------------------------------------------------------------------------

_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from sa2va_convert.read.checkpoint import open_checkpoint

    def rss_kb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    before = rss_kb()
    ck = open_checkpoint(sys.argv[1])
    nbytes = sum(ck.weights.info(k).nbytes for k in ck.weights.keys())
    shapes = [tuple(ck.weights.load(k).shape) for k in ck.weights.keys()]
    print(json.dumps({"before": before, "after": rss_kb(), "nbytes": nbytes}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_open_is_memory_mapped(tmp_path: Path) -> None:
    chunk = 25 * 1024 * 1024  # 4 x 50 MB of bf16
    sd = {f"layer.{i}.weight": torch.full((chunk,), float(i), dtype=torch.bfloat16) for i in range(4)}
    path = save(mmengine_checkpoint(sd), tmp_path / "big.pth")
    del sd
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["nbytes"] >= 200 * 1024 * 1024
    grown_mb = (result["after"] - result["before"]) / 1024
    assert grown_mb < 64, f"opening a 200 MB checkpoint grew RSS by {grown_mb:.0f} MB"


def test_input_is_never_modified(tmp_path: Path) -> None:
    path = save(mmengine_checkpoint(v1_state_dict()), tmp_path / "iter_500.pth")
    os.chmod(path, 0o444)
    before = file_fingerprint(path)
    ck = open_checkpoint(path)
    for key in ck.weights.keys():
        ck.weights.load(key).add_(1)  # private mapping: writes stay in this process
    del ck
    assert file_fingerprint(path) == before


# --------------------------------------------------------------------------------------------
# Bad input: one line, naming the file, with a fix
# --------------------------------------------------------------------------------------------


def _bad(path: Path, match: str, **kwargs) -> InputError:
    with pytest.raises(InputError, match=match) as err:
        open_checkpoint(path, **kwargs)
    text = str(err.value)
    assert str(path) in text, text
    assert "\n" not in text
    assert err.value.hint and err.value.exit_code == 3
    return err.value


def test_missing_path(tmp_path: Path) -> None:
    _bad(tmp_path / "nope.pth", "no such file")


def test_directory_that_is_not_deepspeed(tmp_path: Path) -> None:
    _bad(tmp_path, "not a DeepSpeed checkpoint directory")


def test_work_dir_hint_names_last_checkpoint(tmp_path: Path) -> None:
    work_dir = tmp_path / "work_dirs" / "run"
    work_dir.mkdir(parents=True)
    save(v1_state_dict(), work_dir / "iter_500.pth")
    (work_dir / "last_checkpoint").write_text("/somewhere/else/work_dirs/run/iter_500.pth")  # work_dir moved
    err = _bad(work_dir, "not a DeepSpeed checkpoint directory")
    assert str(work_dir / "iter_500.pth") in err.hint


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "iter_1.pth"
    path.write_bytes(b"")
    _bad(path, "empty")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_file(tmp_path: Path, legacy: bool) -> None:
    full = save(mmengine_checkpoint(v1_state_dict()), tmp_path / "full.pth",
                _use_new_zipfile_serialization=not legacy)
    data = full.read_bytes()
    path = tmp_path / "iter_500.pth"
    path.write_bytes(data[: len(data) // 2] if not legacy else data[:400])
    _bad(path, "truncated")


@pytest.mark.parametrize(
    "obj, match",
    [([1, 2, 3], "holds a list"), ({"a": 1, "b": "x"}, "dict without tensors"), ({}, "dict without tensors"),
     ({"state_dict": [1]}, "'state_dict' but it is a list"), ({"state_dict": {}}, "empty 'state_dict'")],
    ids=["list", "dict-no-tensors", "empty-dict", "state_dict-list", "state_dict-empty"],
)
def test_pickle_that_is_not_a_checkpoint(tmp_path: Path, obj, match: str) -> None:
    _bad(save(obj, tmp_path / "x.pth"), match)


def test_non_string_keys_and_non_tensor_values(tmp_path: Path) -> None:
    sd = OrderedDict([("ok", torch.ones(1)), (3, torch.ones(1)), ("n", 5), ("s", "text"), ("c", torch.ones(1, dtype=torch.complex64))])
    err = _bad(save({"state_dict": sd}, tmp_path / "x.pth"), "4 entries that are not named tensors")
    for part in ("key 3 (int) is not a string", "'n' is a int", "'s' is a str", "'c' has dtype complex64"):
        assert part in err.message


def test_expanded_view_is_refused(tmp_path: Path) -> None:
    huge = torch.zeros(1, dtype=torch.bfloat16).expand(10**9)
    _bad(save({"state_dict": {"w": huge, "ok": torch.ones(2, 2).t()}}, tmp_path / "x.pth"),
         "1 entries .*'w' claims shape")


def test_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.pth"  # the extension lies; the header tells
    save_file({"a": torch.ones(2)}, str(path))
    _bad(path, "is a safetensors file")


def test_zip_that_is_not_torch(tmp_path: Path) -> None:
    path = tmp_path / "x.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hi")
    _bad(path, "zip archive")


def test_recompressed_zip(tmp_path: Path) -> None:
    """torch.load(mmap=True) would read compressed bytes as numbers; refuse instead."""
    src = save(mmengine_checkpoint(v1_state_dict()), tmp_path / "orig.pth")
    path = tmp_path / "repacked.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    _bad(path, "compressed entries")


def test_torchscript_archive(tmp_path: Path) -> None:
    path = write_torch_zip(tmp_path / "script.pth", {"data.pkl": pickle.dumps({}, protocol=2),
                                                     "constants.pkl": pickle.dumps((), protocol=2)})
    _bad(path, "TorchScript")


def test_plain_python_pickle(tmp_path: Path) -> None:
    path = tmp_path / "x.pth"
    path.write_bytes(pickle.dumps({"state_dict": {}}, protocol=2))
    _bad(path, "not a PyTorch checkpoint")


def test_random_bytes_and_tar(tmp_path: Path) -> None:
    import tarfile

    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(64) + b"not a checkpoint")
    _bad(junk, "not a PyTorch checkpoint")
    tar_path = tmp_path / "old.pth"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(junk, arcname="storages")
    _bad(tar_path, "tar archive")


def test_permission_denied(tmp_path: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix="sa2va-perm-"))
    try:
        os.chmod(folder, 0o755)
        path = save(v1_state_dict(), folder / "iter_500.pth")
        os.chmod(path, 0o000)
        if os.geteuid() != 0:
            _bad(path, "permission denied")
            return
        os.seteuid(65534)  # root reads anything; check as 'nobody'
        try:
            _bad(path, "permission denied")
        finally:
            os.seteuid(0)
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


# --------------------------------------------------------------------------------------------
# Fuzz: damaged files give ConvertError subclasses only, and never run anything
# --------------------------------------------------------------------------------------------

def _fuzz_base(legacy: bool) -> bytes:
    import io

    sd = OrderedDict((k, v) for k, v in list(v1_state_dict().items())[:3])
    buf = io.BytesIO()
    torch.save(mmengine_checkpoint(sd), buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


_BASES = {False: _fuzz_base(False), True: _fuzz_base(True)}


@settings(max_examples=600, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.data(), legacy=st.booleans())
def test_fuzz_checkpoint_files(tmp_path: Path, data: st.DataObject, legacy: bool) -> None:
    base = bytearray(_BASES[legacy])
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), min_size=1, max_size=8))
    for pos, byte in edits:
        base[pos] = byte
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(base))))
    if cut is not None:
        base = base[:cut]
    path = tmp_path / "fuzz.pth"  # same file each example: the fixture is shared on purpose
    path.write_bytes(bytes(base))
    with forbidden_events() as events:
        try:
            ck = open_checkpoint(path)
            for key in ck.weights.keys():
                ck.weights.info(key)
        except ConvertError as e:
            assert "\n" not in str(e)
    assert events == []
