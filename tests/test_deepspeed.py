"""DeepSpeed checkpoint directories, checked against checkpoints the real DeepSpeed library wrote.

A session fixture runs ``tests/_deepspeed_writer.py`` under torchrun (2 CPU
ranks, gloo): it trains a tiny Sa2VA-named model under ZeRO-1 (BF16_Optimizer),
ZeRO-2 (bf16; fp32 with parameter alignment and round-robin order) and ZeRO-3
(bf16, several sub-groups), saves with ``engine.save_checkpoint``, and records
what the live engine holds. Every tensor our reader assembles must equal those
values exactly. Without DeepSpeed installed those tests skip; the hand-made
folders of ``_deepspeed_synth.py`` (other world sizes, memory) still run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sa2va_convert.errors import InputError
from sa2va_convert.read.checkpoint import open_checkpoint
from sa2va_convert.read.deepspeed import open_deepspeed_dir

from _deepspeed_synth import random_groups, zero2_folder, zero3_folder

HERE = Path(__file__).parent
WRITER = HERE / "_deepspeed_writer.py"
TAG = "iter_10.pth"
VARIANTS = ("zero2_bf16", "zero2_fp32_aligned", "zero1_bf16", "zero3_bf16")
ZERO12 = ("zero2_bf16", "zero2_fp32_aligned", "zero1_bf16")
STAGE = {"zero2_bf16": 2, "zero2_fp32_aligned": 2, "zero1_bf16": 1, "zero3_bf16": 3}


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def real_ds(tmp_path_factory) -> Path:
    """Folders written by DeepSpeed itself (one torchrun for all variants, ~25 s)."""
    for module in ("deepspeed", "mmengine"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed; install the test extra "
                        "(DS_BUILD_OPS=0 pip install -e '.[test]') to test against real DeepSpeed checkpoints")
    out = tmp_path_factory.mktemp("deepspeed")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WRITER), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out)
    if proc.returncode or not all((out / v / "done.json").is_file() for v in VARIANTS):
        pytest.fail(f"the DeepSpeed writer failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return out


@pytest.fixture(scope="session")
def expected(real_ds):
    """What the engines held, per variant (plain tensors; weights_only loading is enough)."""
    return {v: torch.load(real_ds / v / "expected.pt", weights_only=True) for v in VARIANTS}


def _copy(real_ds: Path, variant: str, dst: Path, tag: str = TAG) -> Path:
    target = dst / variant / tag
    shutil.copytree(real_ds / variant / tag, target)
    return target


def _alias(exp: dict) -> tuple[str, str]:
    return next(iter(exp["shared"].items()))


# --------------------------------------------------------------------------------------------
# Values: exactly what the engine held
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_master_weights_equal_the_engines(real_ds, expected, variant):
    exp = expected[variant]
    ck = open_deepspeed_dir(real_ds / variant / TAG)
    w = ck.weights
    alias, owner = _alias(exp)
    assert ck.kind == "deepspeed-dir" and w.label == "checkpoint"
    assert set(w.keys()) == set(exp["trainable"]) | set(exp["buffers"]) | {alias}
    for key in exp["trainable"]:
        tensor = w.load(key)
        assert w.info(key).shape == tuple(tensor.shape) and w.info(key).dtype == "fp32"
        assert torch.equal(tensor, exp["fp32"][key]), key
    for key, buf in exp["buffers"].items():
        assert torch.equal(w.load(key), buf)
    assert torch.equal(w.load(alias), exp["fp32"][owner])
    ds = ck.meta["deepspeed"]
    assert (ds["zero_stage"], ds["weights"], ds["world_size"], ds["ds_version"]) == (
        STAGE[variant], "master", 2, exp["ds_version"])
    assert ds["trainable_params"] == len(exp["trainable"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_agrees_with_deepspeeds_zero_to_fp32(real_ds, expected, variant):
    reference = expected[variant]["zero_to_fp32"]
    if variant == "zero1_bf16":  # a fact worth pinning: DeepSpeed's own tool refuses this layout
        assert "is not a zero checkpoint" in reference["__refused__"]
        return
    w = open_deepspeed_dir(real_ds / variant / TAG, include_frozen=True).weights
    assert set(w.keys()) == set(reference)
    for key, ref in reference.items():
        assert torch.equal(w.load(key).to(ref.dtype), ref), key


@pytest.mark.parametrize("variant", VARIANTS)
def test_frozen_parameters_only_on_request(real_ds, expected, variant):
    exp = expected[variant]
    alias, _ = _alias(exp)
    frozen = set(exp["module16"]) - set(exp["trainable"]) - {alias}
    default = open_deepspeed_dir(real_ds / variant / TAG)
    assert not frozen & set(default.weights.keys())
    assert default.meta["deepspeed"]["frozen_params"] == len(frozen)
    w = open_deepspeed_dir(real_ds / variant / TAG, include_frozen=True).weights
    for key in frozen:
        assert torch.equal(w.load(key), exp["module16"][key]), key


@pytest.mark.parametrize("variant", ZERO12)
def test_module_weights_on_request(real_ds, expected, variant):
    exp = expected[variant]
    ck = open_deepspeed_dir(real_ds / variant / TAG, weights="module")
    for key in exp["trainable"]:
        assert torch.equal(ck.weights.load(key), exp["module16"][key]), key
    assert ck.meta["deepspeed"]["weights"] == "module"
    assert ck.meta["deepspeed"]["weights_dtype"] == ("fp32" if variant == "zero2_fp32_aligned" else "bf16")


def test_falls_back_to_module_without_optimizer_files(real_ds, expected, tmp_path):
    folder = _copy(real_ds, "zero2_bf16", tmp_path)
    for f in folder.glob("*optim_states.pt"):
        f.unlink()
    ck = open_deepspeed_dir(folder)
    exp = expected["zero2_bf16"]
    assert ck.meta["deepspeed"]["weights"] == "module"
    assert any("no optimizer partition files" in n for n in ck.meta["deepspeed"]["notes"])
    for key in exp["trainable"]:
        assert torch.equal(ck.weights.load(key), exp["module16"][key])
    with pytest.raises(InputError, match="no fp32 master weights"):
        open_deepspeed_dir(folder, weights="master")


def test_zero3_without_optimizer_files_is_an_error(real_ds, tmp_path):
    folder = _copy(real_ds, "zero3_bf16", tmp_path)
    for f in folder.glob("*optim_states.pt"):
        f.unlink()
    with pytest.raises(InputError, match="only empty placeholders") as err:
        open_deepspeed_dir(folder)
    assert "copy the *_optim_states.pt files" in err.value.hint


def test_parameters_are_assembled_across_ranks(real_ds):
    """Guards the value tests: they must include parameters split between the two rank files."""
    z2 = open_deepspeed_dir(real_ds / "zero2_bf16" / TAG).weights
    split = [k for k in z2.keys() if len({f for f, _, _ in z2.location(k)}) == 2]
    assert split, "no ZeRO-2 parameter straddles the partition boundary"
    z3 = open_deepspeed_dir(real_ds / "zero3_bf16" / TAG).weights
    for key in z3.keys():
        if z3.info(key).numel > 1 and "pe_layer" not in key:
            assert len({f for f, _, _ in z3.location(key)}) == 2, key


def test_open_checkpoint_reads_the_folder(real_ds):
    """The dispatch in read.checkpoint, plus mmengine's meta and config from the model-states file."""
    ck = open_checkpoint(real_ds / "zero2_bf16" / TAG)
    assert ck.kind == "deepspeed-dir"
    assert ck.meta["iter"] == 10 and ck.meta["mmengine_version"] == "0.10.7"
    assert ck.meta["experiment_name"] == "toy_20250101_120000"
    assert ck.config is not None and ck.config.path == "/models/Sa2VA-1B"
    assert ck.config.lora is not None and (ck.config.lora.r, ck.config.lora.lora_alpha) == (4, 8)
    assert ck.placeholders["mmengine.logging.history_buffer.HistoryBuffer"] == 1
    assert ck.placeholders["deepspeed.runtime.zero.config.ZeroStageEnum"] == 2
    assert not [p for p in ck.placeholders if p.startswith("torch.")]
    assert {"module", "param_shapes", "meta", "message_hub"} <= set(ck.top_level_keys)
    json.dumps(ck.meta)  # plain data only


def test_reader_never_imports_deepspeed(real_ds):
    code = textwrap.dedent(f"""
        import sys
        from sa2va_convert.read.deepspeed import open_deepspeed_dir
        for variant in {list(VARIANTS)!r}:
            w = open_deepspeed_dir({str(real_ds)!r} + "/" + variant + "/{TAG}", include_frozen=True).weights
            for key in w.keys():
                w.load(key)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("deepspeed", "mmengine"))
        assert not bad, bad
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# Broken folders: one clear line naming the file and the fix
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["zero2_bf16", "zero3_bf16"])
def test_missing_rank_file(real_ds, tmp_path, variant):
    folder = _copy(real_ds, variant, tmp_path)
    (folder / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(InputError) as err:
        open_deepspeed_dir(folder)
    assert "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt" in err.value.message
    assert "partition_count is 2" in err.value.message and err.value.hint
    assert "\n" not in err.value.one_line()


def test_rank_beyond_partition_count(real_ds, tmp_path):
    folder = _copy(real_ds, "zero2_bf16", tmp_path)
    shutil.copy(folder / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                folder / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt")
    with pytest.raises(InputError, match="beyond partition_count 2"):
        open_deepspeed_dir(folder)


@pytest.mark.parametrize("variant", ["zero2_bf16", "zero3_bf16", "zero1_bf16"])
def test_wrong_size_partition(real_ds, variant):
    """The writer saved a copy whose rank-1 partition lost 3 elements."""
    with pytest.raises(InputError, match="expected|need") as err:
        open_deepspeed_dir(real_ds / variant / "iter_10_truncated.pth")
    assert err.value.path.endswith("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert "param_shapes" in err.value.message


def test_truncated_rank_file(real_ds, tmp_path):
    folder = _copy(real_ds, "zero2_bf16", tmp_path)
    victim = folder / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        open_deepspeed_dir(folder)
    assert err.value.path == str(victim)


def test_no_model_states_file(real_ds, tmp_path):
    folder = _copy(real_ds, "zero2_bf16", tmp_path)
    (folder / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(InputError, match="no DeepSpeed model-states file") as err:
        open_deepspeed_dir(folder)
    assert "copy the whole iter_N.pth folder" in err.value.hint


def test_mixed_stages(real_ds, tmp_path):
    z3 = real_ds / "zero3_bf16" / TAG
    both = _copy(real_ds, "zero2_bf16", tmp_path / "a")
    shutil.copy(z3 / "zero_pp_rank_0_mp_rank_00_model_states.pt", both)
    with pytest.raises(InputError, match="mixed ZeRO stages"):
        open_deepspeed_dir(both)

    optim = _copy(real_ds, "zero2_bf16", tmp_path / "b")
    shutil.copy(z3 / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", optim)
    with pytest.raises(InputError, match="mixed ZeRO stages among the optimizer files"):
        open_deepspeed_dir(optim)

    layout = _copy(real_ds, "zero3_bf16", tmp_path / "c")
    for rank in (0, 1):
        name = f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        shutil.copy(real_ds / "zero2_bf16" / TAG / name, layout / name)
    with pytest.raises(InputError, match=r"optimizer files are ZeRO-2 but the model-states file"):
        open_deepspeed_dir(layout)


def test_mixed_precision_prefixes(real_ds, tmp_path):
    folder = _copy(real_ds, "zero2_bf16", tmp_path)
    shutil.copy(real_ds / "zero2_fp32_aligned" / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt", folder)
    with pytest.raises(InputError, match="mixed optimizer files"):
        open_deepspeed_dir(folder)


def test_model_parallel_files_are_refused(tmp_path):
    folder = tmp_path / TAG
    zero2_folder(folder, random_groups([[(4, 4)]]), world=2)
    (folder / "mp_rank_01_model_states.pt").write_bytes(b"")
    with pytest.raises(InputError, match="tensor/model-parallel"):
        open_deepspeed_dir(folder)


# --------------------------------------------------------------------------------------------
# Hand-made folders: other world sizes, memory (no DeepSpeed needed)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 3, 5])
@pytest.mark.parametrize("stage", [2, 3])
def test_other_world_sizes(tmp_path, world, stage):
    groups = random_groups([[(7, 3), (1,), (5, 5), (2, 3, 1)], [(11,), (3,)]], seed=world)
    folder = tmp_path / TAG
    (zero2_folder if stage == 2 else zero3_folder)(folder, groups, world)
    w = open_deepspeed_dir(folder).weights
    flat = {k: v for g in groups for k, v in g.items()}
    assert list(w.keys()) == list(flat)
    for key, value in flat.items():
        assert torch.equal(w.load(key), value), key


_shapes = st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple), min_size=1, max_size=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(_shapes, min_size=1, max_size=3), world=st.integers(1, 6), stage=st.sampled_from([2, 3]),
       seed=st.integers(0, 2**16))
def test_any_shapes_and_world_size(tmp_path_factory, sizes, world, stage, seed):
    groups = random_groups(sizes, seed=seed)
    folder = tmp_path_factory.mktemp("prop") / TAG
    (zero2_folder if stage == 2 else zero3_folder)(folder, groups, world)
    w = open_deepspeed_dir(folder).weights
    for key, value in ((k, v) for g in groups for k, v in g.items()):
        assert torch.equal(w.load(key), value), key


def test_memory_stays_about_one_parameter(tmp_path):
    """Opening maps the partitions; loading a small parameter must not read the big ones."""
    folder = tmp_path / TAG
    big = 24 * 2**20 // 4  # 24 MiB of fp32 per big parameter
    groups = [{"a.small": torch.randn(3, 5), "b.big": torch.randn(big), "c.big": torch.randn(big),
               "d.small": torch.randn(7)}]
    zero2_folder(folder, groups, world=2, module_dtype=torch.float32)
    code = textwrap.dedent(f"""
        from sa2va_convert.read.deepspeed import open_deepspeed_dir
        def rss_mib():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
        before = rss_mib()
        w = open_deepspeed_dir({str(folder)!r}).weights
        small = [w.load("a.small").sum().item(), w.load("d.small").sum().item()]
        print(round(rss_mib() - before, 1))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grown = float(proc.stdout.strip().splitlines()[-1])
    assert grown < 40, f"RSS grew by {grown} MiB for two small parameters of a ~100 MiB checkpoint"
