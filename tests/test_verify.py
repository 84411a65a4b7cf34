"""``verify``: file checks and the round trip through a real transformers load in a real child process.

Folders come from the real pipeline: the tiny example (``make_tiny_example``) converted with
``api.convert``, loaded by our own test remote code (tests/remote_code/). Nothing is mocked: each
round trip starts ``runner/child.py`` in a separate interpreter, as users get it.

A random tiny model rarely says ``[SEG]``, so tests that need masks *steer* the weights on disk
(``steer_folder``): one embedding dimension dominates every hidden state and the head reads only
it, so greedy decoding emits ``[SEG]`` after any token and ``<p>`` after ``[SEG]``.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("PIL")

from safetensors.torch import load_file, save_file  # noqa: E402

from sa2va_convert.api import ConvertOptions, convert  # noqa: E402
from sa2va_convert.errors import UsageError, VerifyError  # noqa: E402
from sa2va_convert.runner.process import CHILD_SCRIPT  # noqa: E402
from sa2va_convert.testing import make_tiny_example  # noqa: E402
from sa2va_convert.verify import roundtrip as rt  # noqa: E402
from sa2va_convert.verify.folder import (  # noqa: E402
    CHECKSUM_KEY,
    REPORT_NAME,
    check_checksums,
    check_remote_code,
    shard_checksums,
    verify_folder,
)
from sa2va_convert.verify.roundtrip import summary_line  # noqa: E402

EMBED_NAMES = (
    "language_model.model.embed_tokens.weight",
    "model.model.language_model.embed_tokens.weight",
    "language_model.model.tok_embeddings.weight",
)
HEAD_NAMES = ("language_model.lm_head.weight", "model.lm_head.weight", "language_model.output.weight")
SYNTH_W, SYNTH_H = 80, 60  # the child's synthetic picture


# ------------------------------------------------------------------ helpers shared with test_predict


def convert_tiny(root: Path, preset: str = "sa2va-1b", *, max_shard_bytes: int = 200_000) -> Path:
    """The tiny example of ``preset`` converted for real, in several shards, with shard checksums recorded.

    The checksums are written here when the converter does not record them (yet), as the writer is
    meant to (``conversion_report.json`` key ``shard_sha256``)."""
    ex = make_tiny_example(root / "example", preset)
    out = root / "out"
    convert(ex.checkpoint_path, out, ConvertOptions(roundtrip=False, base=ex.base_dir, max_shard_bytes=max_shard_bytes))
    record_checksums(out, only_if_missing=True)
    return out


def shard_files(folder: Path) -> list[str]:
    return sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))


def record_checksums(folder: Path, *, only_if_missing: bool = False) -> None:
    path = folder / "conversion_report.json"
    report = json.loads(path.read_text())
    if only_if_missing and report.get(CHECKSUM_KEY):
        return
    report[CHECKSUM_KEY] = shard_checksums(folder, shard_files(folder))
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def rewrite_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Edit the folder's tensors in place (values changed, keys deleted) and rewrite shards, index and
    recorded checksums to match: a folder that is consistent on disk, only its content differs."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    by_file = {f: load_file(folder / f) for f in shard_files(folder)}
    tensors = {k: t for shard in by_file.values() for k, t in shard.items()}
    edit(tensors)
    for fname, shard in by_file.items():
        kept = {k: tensors[k].contiguous() for k in shard if k in tensors}
        save_file(kept, folder / fname, metadata={"format": "pt"})
    index["weight_map"] = {k: f for k, f in index["weight_map"].items() if k in tensors}
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    if json.loads((folder / "conversion_report.json").read_text()).get(CHECKSUM_KEY):
        record_checksums(folder)


def token_id(folder: Path, token: str) -> int:
    from tokenizers import Tokenizer

    tid = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(token)
    assert tid is not None, token
    return tid


def steer_folder(folder: Path, default: str = "[SEG]", chain: dict[str, str] | None = None, c: float = 100.0) -> Path:
    """Make greedy decoding emit ``default`` after any token, and ``chain[src]`` after ``src``."""
    chain = {"[SEG]": "<p>"} if chain is None else chain

    def edit(t: dict[str, torch.Tensor]) -> None:
        emb = t[next(n for n in EMBED_NAMES if n in t)]
        head = t[next(n for n in HEAD_NAMES if n in t)]
        head[:, :4] = 0
        emb[:, 0] = c
        head[token_id(folder, default), 0] = 1
        for d, (src, dst) in enumerate(chain.items(), start=1):
            emb[token_id(folder, src)] = 0
            emb[token_id(folder, src), d] = c
            head[token_id(folder, dst), d] = 1

    rewrite_tensors(folder, edit)
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def assert_one_line(err: VerifyError, exit_code: int = 7) -> str:
    text = str(err)
    assert "\n" not in text and err.exit_code == exit_code, text
    return text


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The sa2va-1b tiny example, converted in 3 shards: read-only, copy it to break it."""
    out = convert_tiny(tmp_path_factory.mktemp("verify"))
    assert len(shard_files(out)) >= 3
    return out


@pytest.fixture(scope="module")
def steered(converted, tmp_path_factory) -> Path:
    return steer_folder(Path(shutil.copytree(converted, tmp_path_factory.mktemp("steered") / "out")))


# ------------------------------------------------------------------ file checks (no child process)


def test_files_only_pass_on_a_converted_folder(converted):
    report = verify_folder(converted, roundtrip=False)
    d = report.to_dict()
    assert d["ok"] and d["keymap"] == "sa2va-v1-internvl-qwen2"
    assert d["structural"]["shards"] >= 3 and d["structural"]["vocab_rows"] == d["structural"]["tokenizer_length"]
    assert d["checksums"] == {"checked": len(shard_files(converted)), "status": "match"}
    # the whole relative-import closure of the remote code, not only the auto_map files
    assert {"modeling_sa2va_chat.py", "configuration_sa2va_chat.py", "sam2.py", "templates.py"} <= set(d["code_files"])
    assert d["roundtrip"] is None and any("round trip skipped" in n for n in d["notes"])
    json.dumps(d)


def test_missing_shard(converted, tmp_path):
    folder = copy_of(converted, tmp_path)
    victim = shard_files(folder)[1]
    (folder / victim).unlink()
    with pytest.raises(VerifyError) as e:
        verify_folder(folder, device="cpu")
    text = assert_one_line(e.value)
    assert victim in text and "missing" in text


def test_truncated_shard(converted, tmp_path):
    folder = copy_of(converted, tmp_path)
    shard = folder / shard_files(folder)[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(VerifyError) as e:
        verify_folder(folder, device="cpu")
    text = assert_one_line(e.value)
    assert shard.name in text and "truncated" in text


def _data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_flipped_bytes_that_stay_finite_are_caught_by_the_recorded_checksums(converted, tmp_path):
    folder = copy_of(converted, tmp_path)
    shard = folder / shard_files(folder)[0]
    data = bytearray(shard.read_bytes())
    mid = (_data_start(shard) + len(data)) // 2
    for i in range(mid, mid + 64):
        data[i] ^= 0x55  # bf16 of small weights stays finite: only a checksum can see this
    shard.write_bytes(bytes(data))
    from safetensors import safe_open

    with safe_open(str(shard), "pt") as f:  # the damage is invisible to the format and to a NaN scan
        assert all(torch.isfinite(f.get_tensor(k).float()).all() for k in f.keys())
    with pytest.raises(VerifyError) as e:
        verify_folder(folder, device="cpu")
    text = assert_one_line(e.value)
    assert shard.name in text and "checksum" in text


@pytest.mark.parametrize("content", [b"{not json", b"[]", b"\xff\xfe not utf-8"])
def test_an_unreadable_conversion_report_is_named_not_a_crash(tmp_path, content):
    (tmp_path / REPORT_NAME).write_bytes(content)
    with pytest.raises(VerifyError, match="is unreadable"):
        check_checksums(tmp_path, ["model.safetensors"])


def test_bytes_flipped_to_nan_are_caught_without_checksums(converted, tmp_path):
    folder = copy_of(converted, tmp_path)
    (folder / "conversion_report.json").unlink()  # no checksums: the value scan must still see it
    shard = folder / shard_files(folder)[0]
    data = bytearray(shard.read_bytes())
    start = _data_start(shard) + 64
    data[start : start + 16] = b"\xff" * 16  # 0xFFFF is NaN in bf16
    shard.write_bytes(bytes(data))
    with pytest.raises(VerifyError) as e:
        verify_folder(folder, device="cpu")
    text = assert_one_line(e.value)
    assert shard.name in text and "NaN" in text


def test_vocab_size_disagreement(converted, tmp_path):
    folder = copy_of(converted, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["llm_config"]["vocab_size"] += 7
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    with pytest.raises(VerifyError) as e:
        verify_folder(folder, device="cpu")
    text = assert_one_line(e.value)
    assert "vocab_size" in text and "config.json" in text


@pytest.mark.parametrize("victim", ["modeling_sa2va_chat.py", "sam2.py"])
def test_missing_remote_code_file(converted, tmp_path, victim):
    """auto_map's own file, and one only imported relatively (``from .sam2 import ...``)."""
    folder = copy_of(converted, tmp_path)
    (folder / victim).unlink()
    with pytest.raises(VerifyError) as e:
        verify_folder(folder, device="cpu")
    text = assert_one_line(e.value)
    assert victim in text and "missing" in text


def test_remote_code_closure_follows_imports_inside_try_blocks(tmp_path):
    (tmp_path / "modeling_x.py").write_text(
        "try:\n    from .flash_attention import F\nexcept ImportError:\n    F = None\nfrom .helpers.sub import y\n"
    )
    (tmp_path / "flash_attention.py").write_text("F = 1\n")
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "sub.py").write_text("y = 2\n")
    cfg = {"auto_map": {"AutoModel": "modeling_x.M"}}
    assert sorted(check_remote_code(tmp_path, cfg).code.files) == [
        "flash_attention.py",
        "helpers/sub.py",
        "modeling_x.py",
    ]
    (tmp_path / "flash_attention.py").unlink()
    with pytest.raises(VerifyError, match=r"flash_attention\.py is missing \(needed by modeling_x\.py\)"):
        check_remote_code(tmp_path, cfg)


def test_not_a_folder(tmp_path):
    from sa2va_convert.errors import InputError

    with pytest.raises(InputError, match="does not exist") as e:  # a missing input: exit 3, not a failed verify
        verify_folder(tmp_path / "nope")
    assert e.value.exit_code == 3


# ------------------------------------------------------------------ the round trip (real child processes)


def test_roundtrip_on_cpu(steered):
    report = verify_folder(steered, device="cpu", max_new_tokens=2)
    assert report.ok
    r = report.roundtrip.to_dict()
    assert r["ok"] and r["device"] == "cpu" and r["dtype"] == "bf16"
    assert r["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert r["dtypes"]["loaded"] == {"bf16": report.structural.tensors} and r["dtypes"]["mismatch_count"] == 0
    assert r["tokenizer"]["seg_token_id"] == token_id(steered, "[SEG]")
    assert r["model_class"] == "Sa2VAChatModel"
    assert r["flash_attn"]["installed"] or r["flash_attn"]["filtered"]
    assert r["versions"]["transformers"] and r["versions"]["torch"]
    image, video = r["runs"]
    assert image["name"] == "image" and video["name"] == "video"
    assert image["prediction"].startswith("[SEG]") and image["seg_count"] == 1
    for run, frames in ((image, 1), (video, 2)):
        assert run["n_masks"] == 1
        assert run["masks"][0]["shape"] == [frames, SYNTH_H, SYNTH_W] and run["masks"][0]["dtype"] == "bool"
    assert r["timings"]["load"] > 0 and r["timings"]["total"] > 0
    json.dumps(report.to_dict())


def test_a_child_started_before_its_folder_reports_what_a_child_started_then_reports(steered):
    """The conversion starts the round trip's child as the write begins (StartedChild: imports only, then it
    waits on stdin); given the folder, its answers, masks and checks are those of a child started afterwards."""
    from sa2va_convert.runner.process import StartedChild

    later = rt.run_roundtrip(steered, device="cpu", max_new_tokens=2).to_dict()
    early = StartedChild.maybe_start(None, device="cpu")
    assert early is not None
    try:
        ahead = rt.run_roundtrip(steered, device="cpu", max_new_tokens=2, started=early).to_dict()
    finally:
        early.cancel()
    assert ahead["started_early"]["waited_s"] >= 0 and later["started_early"] is None
    assert "prewarm" in ahead["timings"] and "prewarm" not in later["timings"]
    for key in ("ok", "device", "dtype", "loading_info", "dtypes", "tokenizer", "model_class"):
        assert ahead[key] == later[key], key
    strip = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in ahead["runs"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in later["runs"]
    ]
    assert ahead["runs"][0]["prediction"].startswith("[SEG]")


@pytest.mark.parametrize("how", ["cancel", "parent closes stdin"])
def test_a_started_child_that_never_gets_its_folder_ends(how):
    """A conversion that fails or is interrupted cancels its waiting child; a parent that dies closes its
    stdin: either way the child ends, prints no report, and its temporary folder goes."""
    import subprocess as sp

    from sa2va_convert.runner.process import StartedChild

    early = StartedChild.maybe_start(None, device="cpu")
    assert early is not None
    child = early._child
    assert child is not None
    tmp = Path(child.tmp.name)
    assert tmp.is_dir() and child.proc.poll() is None
    if how == "cancel":
        early.cancel()
        assert child.proc.poll() is not None and not tmp.exists()
    else:
        assert child.proc.stdin is not None
        child.proc.stdin.close()
        try:
            child.proc.wait(timeout=120)  # after its imports, it reads EOF and exits
        except sp.TimeoutExpired:
            early.cancel()
            raise
        assert child.proc.returncode == 0
        for r in child.readers:
            r.join(timeout=10)
        assert "".join(child.out_chunks).strip() == ""
        early.cancel()
        assert not tmp.exists()


def test_a_conversion_refused_while_writing_ends_its_early_child(tmp_path, monkeypatch):
    """The round trip's child is started as the write begins; a merge that overflows to Inf is refused in
    the write (exit 5), and the child, never given a folder, is ended with it: no process, no folder left."""
    from sa2va_convert.runner.process import StartedChild

    ex = make_tiny_example(tmp_path / "ex")
    obj = torch.load(ex.checkpoint.path, weights_only=False)  # our own fixture, edited the ordinary way
    lora = [k for k in obj["state_dict"] if k.endswith("q_proj.lora_A.default.weight")][0]
    obj["state_dict"][lora].fill_(1e30)
    obj["state_dict"][lora.replace("lora_A", "lora_B")].fill_(1e30)
    torch.save(obj, ex.checkpoint.path)
    started: list[StartedChild] = []
    real = StartedChild.maybe_start.__func__  # type: ignore[attr-defined]

    def spy(cls, *a, **k):
        child = real(cls, *a, **k)
        started.append(child)
        return child

    monkeypatch.setattr(StartedChild, "maybe_start", classmethod(spy))
    with pytest.raises(Exception) as err:
        convert(ex.checkpoint.path, tmp_path / "out", ConvertOptions(base=ex.base_dir, verify_device="cpu"))
    assert getattr(err.value, "exit_code", None) == 5 and "NaN/Inf" in str(err.value)
    assert len(started) == 1 and started[0] is not None
    assert started[0]._child is None  # cancelled
    assert not (tmp_path / "out").exists()
    ours = [
        pid
        for pid in os.listdir("/proc")
        if pid.isdigit()
        and _parent(pid) == os.getpid()
        and "child.py" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    ]
    assert ours == []


def _parent(pid: str) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_missing_tensor_passes_the_file_checks_but_not_the_roundtrip(converted, tmp_path):
    """from_pretrained would leave it uninitialised; only loading for real shows it."""
    folder = copy_of(converted, tmp_path)
    rewrite_tensors(folder, lambda t: t.pop("text_hidden_fcs.0.bias"))
    assert verify_folder(folder, roundtrip=False).ok
    with pytest.raises(VerifyError) as e:
        verify_folder(folder, device="cpu", max_new_tokens=1, video=False)
    text = assert_one_line(e.value)
    assert "missing key" in text and "text_hidden_fcs.0.bias" in text
    assert e.value.report.roundtrip.loading_info["missing_keys"] == ["text_hidden_fcs.0.bias"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_code_that_needs_a_gpu_is_reported_with_the_fix(converted, tmp_path):
    """Like the upstream predict_forward, which calls .cuda(): on CPU it must say what to do."""
    folder = copy_of(converted, tmp_path)
    modeling = folder / "modeling_sa2va_chat.py"
    src = modeling.read_text()
    anchor = "        if mask_prompts is not None:"
    assert anchor in src
    modeling.write_text(
        src.replace(anchor, "        torch.cuda.synchronize()  # torch.cuda itself: not mapped\n" + anchor, 1)
    )
    with pytest.raises(VerifyError) as e:
        verify_folder(folder, device="auto", max_new_tokens=1, video=False)
    text = assert_one_line(e.value, exit_code=9)  # the environment, not the folder
    assert "needs a GPU" in text and "modeling_sa2va_chat.py:" in text
    line = int(text.split("modeling_sa2va_chat.py:")[1].split(")")[0].split(",")[0])
    assert "torch.cuda.synchronize()" in (folder / "modeling_sa2va_chat.py").read_text().splitlines()[line - 1]
    assert "--device cuda" in e.value.hint and "--python" in e.value.hint


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_calls_are_mapped_to_cpu_and_reported(steered):
    """Our test model calls .cuda() and torch.autocast('cuda') where upstream does; on CPU the
    child maps them, runs the model's own predict_forward, and says so."""
    src = (steered / "modeling_sa2va_chat.py").read_text()
    assert ".cuda()" in src  # the premise: without the mapping this code fails on a CPU
    report = verify_folder(steered, device="cpu", max_new_tokens=2)
    mapped = report.roundtrip.to_dict()["cuda_mapped"]
    assert mapped["tensor.cuda"] >= 2 and mapped["autocast"] >= 1


@pytest.fixture(scope="module")
def no_seg(converted, tmp_path_factory) -> Path:
    """A folder whose model always answers "<p>": never [SEG], like an undertrained model."""
    return steer_folder(
        Path(shutil.copytree(converted, tmp_path_factory.mktemp("noseg") / "out")), default="<p>", chain={}
    )


def test_answer_without_seg_is_forced_through_the_mask_path(no_seg):
    """The model's own answer has no [SEG]: the round trip forces one and checks its mask."""
    report = verify_folder(no_seg, device="cpu", max_new_tokens=3, video=False)
    own, forced = report.roundtrip.to_dict()["runs"]
    assert own["seg_count"] == 0 and own["n_masks"] == 0 and "[SEG]" not in own["prediction"]
    assert forced["forced"] and forced["prediction"].startswith("[SEG]") and forced["n_masks"] == 1
    assert forced["masks"][0]["shape"] == [1, SYNTH_H, SYNTH_W] and forced["masks"][0]["dtype"] == "bool"
    line = summary_line(report.roundtrip.to_dict())
    assert "answered with [SEG]: no" in line and f"forced [SEG]: 1 mask (1, {SYNTH_H}, {SYNTH_W})" in line


def test_expect_mask_fails_an_answer_without_seg(no_seg, steered):
    with pytest.raises(VerifyError) as e:
        verify_folder(no_seg, device="cpu", max_new_tokens=3, video=False, expect_mask=True)
    assert "no [SEG]" in assert_one_line(e.value) and "--expect-mask" in str(e.value)
    assert verify_folder(steered, device="cpu", max_new_tokens=2, video=False, expect_mask=True).ok


def test_a_broken_mask_path_fails_even_when_the_model_never_says_seg(no_seg, tmp_path):
    """Forcing [SEG] exposes remote code whose mask path returns nothing."""
    folder = copy_of(no_seg, tmp_path)
    modeling = folder / "modeling_sa2va_chat.py"
    src = modeling.read_text()
    anchor = '        return {"prediction": prediction, "prediction_masks": masks}'
    assert anchor in src
    modeling.write_text(src.replace(anchor, '        return {"prediction": prediction, "prediction_masks": []}'))
    with pytest.raises(VerifyError) as e:
        verify_folder(folder, device="cpu", max_new_tokens=3, video=False)
    assert "mask path" in assert_one_line(e.value)


def test_timeout(converted):
    with pytest.raises(VerifyError) as e:
        rt.run_roundtrip(converted, device="cpu", timeout=0.5)
    text = assert_one_line(e.value, exit_code=9)
    assert "did not finish within 0.5s" in text and "--timeout" in e.value.hint


def test_unknown_interpreter_and_device_are_usage_errors(converted, tmp_path):
    with pytest.raises(UsageError, match="not found") as e:
        rt.run_roundtrip(converted, python="/nonexistent/python3")
    assert e.value.exit_code == 2
    not_python = tmp_path / "not-python"
    not_python.write_text("#!/bin/sh\necho hello\n")
    not_python.chmod(0o755)
    with pytest.raises(UsageError, match="is not a Python"):
        rt.run_roundtrip(converted, python=not_python)
    with pytest.raises(UsageError, match="unknown device"):
        rt.run_roundtrip(converted, device="tpu")


def _python_without_torch() -> str | None:
    import subprocess

    for cand in ("/usr/bin/python3", "/bin/python3"):
        if Path(cand).is_file() and Path(cand).resolve() != Path(sys.executable).resolve():
            if subprocess.run([cand, "-c", "import torch"], capture_output=True).returncode != 0:
                return cand
    return None


@pytest.mark.skipif(_python_without_torch() is None, reason="no interpreter without torch on this machine")
def test_interpreter_without_torch_is_named(converted):
    """The child starts under another interpreter (no sa2va_convert there either) and says what is missing."""
    py = _python_without_torch()
    with pytest.raises(VerifyError) as e:
        rt.run_roundtrip(converted, python=py)
    text = assert_one_line(e.value, exit_code=9)
    assert py in text and "torch" in text and "--python" in e.value.hint


def test_child_script_is_standalone():
    """runner/child.py runs under --python interpreters without sa2va_convert: stdlib + the model's stack only."""
    # peft: only for an adapter folder (--format adapter); upstream's remote code imports it anyway (FORMATS.md §5).
    # safetensors: a requirement of transformers itself, so every interpreter that can load a model has it.
    allowed = set(sys.stdlib_module_names) | {
        "torch",
        "transformers",
        "numpy",
        "PIL",
        "peft",
        "safetensors",
        "__future__",
    }
    tree = ast.parse(CHILD_SCRIPT.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in runner/child.py"
            names = [node.module]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in allowed, name


def test_convert_runs_the_round_trip_by_default(tmp_path, cli):
    """`sa2va-convert CKPT OUT` ends with predict_forward in a child process (unless --no-verify)."""
    from sa2va_convert.testing.fixtures import make_tiny_example

    ex = make_tiny_example(tmp_path / "ex")
    r = cli(ex.checkpoint.path, tmp_path / "out", "--base", ex.base_dir, "--json", roundtrip=True)
    assert r.returncode == 0, r.stderr
    rt = json.loads(r.stdout)["roundtrip"]
    assert rt["ok"] and rt["loading_info"]["missing_keys"] == [] and rt["device"] == "cpu"
    assert [run["name"] for run in rt["runs"]] == ["image", "video"]
    assert all(run["n_masks"] == 1 for run in rt["runs"])
    # its child was started as the write began, and had imported before it was given the folder
    assert rt["started_early"]["waited_s"] >= 0 and rt["timings"]["prewarm"] > 0
    # the test model calls .cuda() like upstream; on this CPU-only machine that was mapped, and said
    if not torch.cuda.is_available():
        assert rt["cuda_mapped"]["tensor.cuda"] >= 2 and "CUDA calls mapped to CPU" in rt["summary"]
        assert "answered with [SEG]: yes, 1 mask" in rt["summary"]
