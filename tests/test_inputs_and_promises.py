"""No input is ever touched, promises hold, mistakes are caught before any work.

Every case runs the real CLI in a subprocess on real fixture files and checks every input byte
for byte (sha256 of every file under it) before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _cli import run_cli
from sa2va_convert.errors import ConvertError, UsageError
from sa2va_convert.testing.fixtures import write_training_checkpoint


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of the file itself), by relative name."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path) if p != path else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def snapshot(*paths: Path) -> dict[str, dict[str, str]]:
    return {str(p): tree_digest(p) for p in paths}


@pytest.fixture
def run(make_family, tmp_path):
    """A v1 fine-tune in tmp/work_dirs/exp with its base, plus a keymap file and a log."""
    fam = make_family("sa2va-1b")
    wd = Path(fam.ckpt.path).parent
    (wd / "20261206_000000.log").write_text("training log\n")
    (wd / "last_checkpoint").write_text(str(fam.ckpt.path))
    return fam, wd


def refused(r, *words: str) -> str:
    assert r.returncode == 6, (r.returncode, r.stderr)
    lines = r.error_lines
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ 1. --force never deletes an input


def test_out_equal_to_the_work_dir_is_refused_with_force(run, tmp_path):
    fam, wd = run
    before = snapshot(wd, fam.base)
    r = run_cli(wd, wd, "--base", fam.base, "--force")
    refused(r, "work_dir", str(wd))
    assert snapshot(wd, fam.base) == before


def test_out_containing_the_checkpoint_file_is_refused(run):
    fam, wd = run
    before = snapshot(wd, fam.base)
    r = run_cli(fam.ckpt.path, wd, "--base", fam.base, "--force", "--replace-foreign")
    refused(r, "contains the checkpoint")
    assert snapshot(wd, fam.base) == before


def test_out_dot_in_the_checkpoint_folder_is_refused(run):
    fam, wd = run
    before = snapshot(wd, fam.base)
    p = subprocess.run([sys.executable, "-m", "sa2va_convert", Path(fam.ckpt.path).name, ".", "--base",
                        str(fam.base), "--force", "--no-verify"], cwd=wd, capture_output=True, text=True,
                       env={**os.environ, "CI": "1"}, timeout=300)
    assert p.returncode == 6 and "contains the checkpoint" in p.stderr, p.stderr
    assert snapshot(wd, fam.base) == before


def test_out_equal_to_the_checkpoint_file_is_refused(run):
    fam, wd = run
    before = snapshot(wd)
    refused(run_cli(fam.ckpt.path, fam.ckpt.path, "--base", fam.base, "--force"), "the checkpoint itself")
    assert snapshot(wd) == before


def test_out_equal_to_or_inside_the_base_is_refused(run):
    fam, wd = run
    before = snapshot(fam.base)
    refused(run_cli(fam.ckpt.path, fam.base, "--base", fam.base, "--force", "--replace-foreign"), "--base folder")
    refused(run_cli(fam.ckpt.path, fam.base / "sub", "--base", fam.base), "lies inside the --base folder")
    assert snapshot(fam.base) == before and not (fam.base / "sub").exists()


def test_out_through_a_symlink_to_the_base_is_refused(run, tmp_path):
    fam, _ = run
    link = tmp_path / "link-to-base"
    link.symlink_to(fam.base, target_is_directory=True)
    before = snapshot(fam.base)
    refused(run_cli(fam.ckpt.path, link, "--base", fam.base, "--force", "--replace-foreign"), "--base folder")
    assert snapshot(fam.base) == before


def test_out_equal_to_pretrained_sam2_code_from_or_keymap_is_refused(run, tmp_path):
    fam, wd = run
    keymap = tmp_path / "km" / "my.yaml"
    keymap.parent.mkdir()
    keymap.write_text(run_cli("keymaps", "show", "sa2va-v1-internvl-qwen2").stdout)
    pre = Path(shutil.copy(fam.ckpt.path, tmp_path / "pretrained.pth"))
    sam2 = Path(shutil.copy(fam.ckpt.path, tmp_path / "sam2_hiera_large.pt"))
    code = Path(shutil.copytree(fam.base, tmp_path / "code-from"))
    before = snapshot(wd, fam.base, keymap.parent, pre, sam2, code)
    cases = [
        (("--pretrained", pre), pre, "--pretrained checkpoint"),
        (("--keymap", keymap), keymap.parent, "--keymap file"),
        (("--sam2", sam2, "--code-from", code), code, "--code-from folder"),
        (("--sam2", sam2, "--code-from", code), sam2, "--sam2 checkpoint"),
    ]
    for extra, out, word in cases:
        r = run_cli(fam.ckpt.path, out, "--base", fam.base, *extra, "--force", "--replace-foreign")
        refused(r, word)
    assert snapshot(wd, fam.base, keymap.parent, pre, sam2, code) == before


def test_all_into_the_work_dir_or_its_parent_is_refused(run, tmp_path):
    fam, wd = run
    write_training_checkpoint(wd / "iter_200.pth", "sa2va-1b", base_dir=fam.base)
    before = snapshot(wd.parent, fam.base)
    refused(run_cli(wd, wd, "--all", "--base", fam.base, "--force"), "work_dir")
    refused(run_cli(wd, wd.parent, "--all", "--base", fam.base, "--force"), "work_dir")
    refused(run_cli(wd, wd / "hf", "--all", "--base", fam.base), "work_dir")
    assert snapshot(wd.parent, fam.base) == before


def test_force_replaces_only_our_folders_and_replace_foreign_is_explicit(run, tmp_path):
    fam, _ = run
    out = tmp_path / "someone-elses"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = refused(run_cli(fam.ckpt.path, out, "--base", fam.base, "--force"), "not written by sa2va-convert")
    assert "--replace-foreign" in line and (out / "notes.txt").exists()
    # a forged report of another tool does not count as ours
    (out / "conversion_report.json").write_text(json.dumps({"tool": "other"}))
    refused(run_cli(fam.ckpt.path, out, "--base", fam.base, "--force"), "not written by sa2va-convert")
    ok = run_cli(fam.ckpt.path, out, "--base", fam.base, "--replace-foreign")
    assert ok.returncode == 0, ok.stderr
    assert not (out / "notes.txt").exists() and json.loads((out / "conversion_report.json").read_text())["tool"] == \
        "sa2va-convert"


# ------------------------------------------------------------------ 2. promises


def test_all_dry_run_writes_nothing(run, tmp_path):
    fam, wd = run
    write_training_checkpoint(wd / "iter_200.pth", "sa2va-1b", base_dir=fam.base)
    out = tmp_path / "hf"
    before = snapshot(wd, fam.base)
    listing = sorted(os.listdir(tmp_path))
    r = run_cli(wd, out, "--all", "--dry-run", "--base", fam.base, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [i["status"] for i in doc["items"]] == ["planned", "planned"]
    assert all(i["plan"]["tensor_count"] > 0 for i in doc["items"])
    assert not out.exists() and sorted(os.listdir(tmp_path)) == listing
    assert snapshot(wd, fam.base) == before


def test_show_tensors_without_dry_run_is_a_usage_error(run, tmp_path):
    fam, _ = run
    r = run_cli(fam.ckpt.path, tmp_path / "out", "--base", fam.base, "--show-tensors")
    assert r.returncode == 2 and "--dry-run" in r.stderr
    assert not (tmp_path / "out").exists()


def _start(args: list, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sa2va_convert", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "CI": "1"}, cwd=cwd)


def test_ctrl_c_during_the_round_trip_says_out_is_complete_but_not_verified(run, tmp_path):
    fam, _ = run
    out = tmp_path / "out"
    proc = _start([fam.ckpt.path, out, "--base", fam.base, "--device", "cpu"])
    seen = []
    for line in proc.stderr:  # plain progress lines; interrupt once the round trip has started
        seen.append(line)
        if "round trip" in line or "verifying" in line:
            # said before it happens (issue 23): whose code runs, and where
            assert f"running the model's own code from {fam.base} in a child process" in line, line
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    errors = [ln for ln in rest.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 130, "".join(seen) + rest
    assert len(errors) == 1 and "complete" in errors[0] and "not verified" in errors[0], rest
    assert "sa2va-convert verify" in errors[0] and "no partial output" not in rest
    assert (out / "config.json").is_file()  # it was published, as the message says
    v = run_cli("verify", out, "--device", "cpu")
    assert v.returncode == 0, v.stderr


@pytest.mark.parametrize("delay", [0.25, 0.6, 1.2])
def test_ctrl_c_while_starting_prints_one_line(run, tmp_path, delay):
    fam, _ = run
    proc = _start(["inspect", fam.ckpt.path])
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("finished before the signal")
    # 130, or killed by SIGINT itself (-2), which a shell reports as the same $? = 130; either way
    # one line and no traceback is the promise
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.strip()]) <= 2, err
    assert "interrupted" in err


def test_all_rerun_reverifies_a_checkpoint_whose_round_trip_did_not_pass(run, tmp_path):
    fam, wd = run
    out = tmp_path / "hf"
    first = run_cli(wd, out, "--all", "--base", fam.base, "--device", "cpu", "--json", roundtrip=True,
                    env={"SA2VA_CONVERT_RAM_LIMIT": "1MB"})
    assert first.returncode == 8, first.stderr
    item = json.loads(first.stdout)["items"][0]
    assert item["status"] == "failed" and item["error"]["exit_code"] == 9
    assert (out / "iter_100" / "config.json").exists()  # converted, only the round trip could not run
    second = run_cli(wd, out, "--all", "--base", fam.base, "--device", "cpu", "--json", roundtrip=True)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["items"][0]["status"] == "reverified"
    third = run_cli(wd, out, "--all", "--base", fam.base, "--device", "cpu", "--json", roundtrip=True)
    assert json.loads(third.stdout)["items"][0]["status"] == "skipped"


# ------------------------------------------------------------------ 3. mistakes caught before any work

BAD_OPTIONS = [
    (("--max-shard-size", "5XB"), "5XB"),
    (("--max-shard-size", "0"), "more than 0"),
    (("--allow-unused", "("), "regular expression"),
    (("--merge-device", "gpu"), "merge device"),
    (("--device", "cdua"), "unknown device"),
    (("--python", "/no/such/python3"), "not found"),
    (("--lora-alpha", "-3"), "above 0"),
    (("--lora-alpha", "inf"), "above 0"),
]


@pytest.mark.parametrize("extra,word", BAD_OPTIONS, ids=[a[0][0] + "=" + a[0][1] for a in BAD_OPTIONS])
def test_bad_options_are_usage_errors_before_any_work(run, tmp_path, extra, word):
    fam, _ = run
    out = tmp_path / "out"
    r = run_cli(fam.ckpt.path, out, "--base", fam.base, *extra, roundtrip=True)
    assert r.returncode == 2, r.stderr
    assert len(r.error_lines) == 1 and word in r.error_lines[0] and "internal error" not in r.stderr
    assert not out.exists() and "reading" not in r.stderr  # nothing was read, nothing written


def _imported_torch(stderr: str) -> bool:
    """Whether ``PYTHONPROFILEIMPORTTIME``'s lines on stderr show torch imported (``... |   torch``)."""
    return any(line.startswith("import time:") and line.rsplit("|", 1)[-1].strip() == "torch"
               for line in stderr.splitlines())


def test_a_wrong_out_or_option_is_refused_before_torch_is_imported(run, tmp_path):
    """A refused OUT (an input itself, a folder not ours under --force) and a bad option cost no torch
    import (1.5-4 s): the CLI checks them first (preflight.check_before_work, which the conversion runs too)."""
    fam, _ = run
    foreign = tmp_path / "someone-elses"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    profile = {"PYTHONPROFILEIMPORTTIME": "1"}
    cases = [
        ((fam.base,), 6, "--base folder itself"),
        ((fam.ckpt.path,), 6, "the checkpoint itself"),
        ((foreign, "--force"), 6, "not written by sa2va-convert"),
        ((tmp_path / "new", "--allow-unused", "("), 2, "regular expression"),
    ]
    for (out, *extra), code, words in cases:
        r = run_cli(fam.ckpt.path, out, "--base", fam.base, *extra, env=profile)
        assert r.returncode == code and len(r.error_lines) == 1 and words in r.error_lines[0], r.stderr[-2000:]
        assert "import time:" in r.stderr and not _imported_torch(r.stderr), words
    assert (foreign / "notes.txt").read_text() == "keep me" and not (tmp_path / "new").exists()
    ok = run_cli(fam.ckpt.path, tmp_path / "fine", "--base", fam.base, "--dry-run", env=profile)
    assert ok.returncode == 0 and _imported_torch(ok.stderr)  # the check can tell: real work imports torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_merge_device_cuda_without_a_gpu_is_a_usage_error(run, tmp_path):
    fam, _ = run
    r = run_cli(fam.ckpt.path, tmp_path / "out", "--base", fam.base, "--merge-device", "cuda")
    assert r.returncode == 2 and "sees no GPU" in r.stderr and not (tmp_path / "out").exists()


def test_not_a_python_is_refused_before_converting(run, tmp_path):
    fam, _ = run
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    r = run_cli(fam.ckpt.path, tmp_path / "out", "--base", fam.base, "--python", fake, roundtrip=True)
    assert r.returncode == 2 and "not a Python 3" in r.stderr and not (tmp_path / "out").exists()


def test_lora_alpha_that_contradicts_the_training_config_is_refused(run, tmp_path):
    fam, _ = run
    alpha = fam.ckpt.lora_alpha
    r = run_cli(fam.ckpt.path, tmp_path / "a", "--base", fam.base, "--lora-alpha", "3")
    assert r.returncode == 5 and len(r.error_lines) == 1, r.stderr
    assert f"lora_alpha={alpha!r}" in r.error_lines[0] or f"lora_alpha={float(alpha)!r}" in r.error_lines[0]
    assert "gives 3.0" in r.error_lines[0] and "--override-lora-config" in r.error_lines[0]
    assert not (tmp_path / "a").exists()
    same = run_cli(fam.ckpt.path, tmp_path / "b", "--base", fam.base, "--lora-alpha", str(alpha), "--json")
    assert same.returncode == 0, same.stderr
    lora = json.loads(same.stdout)["plan"]["lora"]
    assert lora["alpha"] == alpha and "embedded config" in lora["alpha_source"]
    forced = run_cli(fam.ckpt.path, tmp_path / "c", "--base", fam.base, "--lora-alpha", "3",
                     "--override-lora-config", "--json")
    assert forced.returncode == 0, forced.stderr
    lora = json.loads(forced.stdout)["plan"]["lora"]
    assert lora["alpha"] == 3.0 and "--override-lora-config" in lora["alpha_source"]


def test_forced_keymap_of_another_family_is_refused_with_the_evidence(run, tmp_path):
    fam, _ = run
    r = run_cli(fam.ckpt.path, tmp_path / "out", "--base", fam.base, "--keymap", "sa2va-v2-internvl3")
    assert r.returncode == 5 and len(r.error_lines) == 1, r.stderr
    line = r.error_lines[0]
    assert "sa2va-v2-internvl3 does not fit" in line and "sa2va-v1-internvl-qwen2" in line
    assert "--force-keymap" in line and not (tmp_path / "out").exists()
    ok = run_cli(fam.ckpt.path, tmp_path / "out", "--base", fam.base, "--keymap", "sa2va-v1-internvl-qwen2")
    assert ok.returncode == 0, ok.stderr
    forced = run_cli(fam.ckpt.path, tmp_path / "o2", "--base", fam.base, "--keymap", "sa2va-v2-internvl3",
                     "--force-keymap", "--dry-run")
    assert "does not fit" not in forced.stderr


@pytest.mark.parametrize("bad", [{"dtype": "fp8"}, {"max_shard_bytes": "lots"}, {"lora_alpha": "x"},
                                 {"allow_unused": ["[a-"]}, {"merge_device": "tpu"}])
def test_api_raises_convert_errors_for_bad_options(run, tmp_path, bad):
    from sa2va_convert.api import ConvertOptions, convert

    fam, _ = run
    with pytest.raises(UsageError) as e:
        convert(fam.ckpt.path, tmp_path / "out", ConvertOptions(base=fam.base, **bad))
    assert isinstance(e.value, ConvertError) and e.value.exit_code == 2
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 4. dependencies of the round trip


def test_a_plain_install_carries_what_the_round_trip_imports():
    """pillow, peft, einops, sentencepiece are requirements; torchvision, timm, qwen-vl-utils the verify extra."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in requires("sa2va-convert") or []]
    hard = {r.name.lower() for r in reqs if r.marker is None}
    verify = {r.name.lower() for r in reqs if r.marker is not None and r.marker.evaluate({"extra": "verify"})}
    assert {"pillow", "peft", "einops", "sentencepiece", "torch", "transformers"} <= hard
    assert {"torchvision", "timm", "qwen-vl-utils"} <= verify


# ------------------------------------------------------------------ 5. the folder tells loaders the truth


@pytest.mark.parametrize("dtype,torch_dtype", [("fp32", torch.float32), ("fp16", torch.float16),
                                               ("bf16", torch.bfloat16)])
def test_every_dtype_field_names_the_written_dtype(make_family, base_cache, tmp_path, dtype, torch_dtype):
    """A base saved by transformers 4.57 says "dtype": "bfloat16" (top level and sub-configs):
    after --dtype X every such field says X, and dtype="auto" loads X."""
    from transformers import AutoModel

    fam = make_family("sa2va-1b")
    base = Path(shutil.copytree(fam.base, tmp_path / "base457"))
    cfg = json.loads((base / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    cfg["llm_config"]["dtype"] = "bfloat16"
    cfg["vision_config"]["dtype"] = "bfloat16"
    (base / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / f"out-{dtype}"
    r = run_cli(fam.ckpt.path, out, "--base", base, "--dtype", dtype)
    assert r.returncode == 0, r.stderr
    written = json.loads((out / "config.json").read_text())
    name = str(torch_dtype).replace("torch.", "")
    assert written["dtype"] == written["torch_dtype"] == name
    assert written["llm_config"]["dtype"] == written["vision_config"]["dtype"] == name
    model = AutoModel.from_pretrained(str(out), trust_remote_code=True, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch_dtype}


def test_verify_names_the_keymap_from_the_conversion_report(make_family, tmp_path):
    """v2 InternVL3 and v1 Qwen2 folders share a layout: only the report can tell them apart."""
    fam = make_family("sa2va-internvl3-2b")
    out = tmp_path / "out"
    assert run_cli(fam.ckpt.path, out, "--base", fam.base).returncode == 0
    v = run_cli("verify", out, "--no-roundtrip", "--json")
    doc = json.loads(v.stdout)
    assert doc["keymap"] == "sa2va-v2-internvl3" and doc["keymap_source"] == "conversion_report.json"
    (out / "conversion_report.json").unlink()
    v = run_cli("verify", out, "--no-roundtrip", "--json")
    doc = json.loads(v.stdout)
    assert "guess" in doc["keymap_source"]
    plain = run_cli("verify", out, "--no-roundtrip")
    assert "a guess" in plain.stdout


def test_round_trip_that_cannot_fit_in_memory_stops_before_loading(run, tmp_path):
    fam, _ = run
    out = tmp_path / "out"
    assert run_cli(fam.ckpt.path, out, "--base", fam.base).returncode == 0
    r = run_cli("verify", out, "--device", "cpu", env={"SA2VA_CONVERT_RAM_LIMIT": "1MB"})
    assert r.returncode == 9, r.stderr
    line = r.error_lines[0]
    assert "GiB of RAM" in line and "SA2VA_CONVERT_RAM_LIMIT" in line
    assert "--device cuda" in line and "--no-verify" in line
