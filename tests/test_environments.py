"""Where users run it: their CPU, their packages, their transformers — with remote code that behaves
like upstream's where users get hurt (tests/remote_code, FORMATS.md §9).

- the CPU round trip runs the upstream-style mask path (``torch.device("cuda")`` in SAM2's state init,
  ``.cuda(non_blocking=True)``, ``.to(device)``) and reports what it mapped;
- environment problems are exit 9 and named: InternLM2 code under transformers >= 4.50, a torchvision
  built for another torch, a package the code imports missing (found before any work);
- the base's remote code must be self-contained (exit 3 before any work, unless the user says they know).

Other environments (torch 2.6, transformers 4.49 / 5.x, fresh installs) are run by bench/compat.py;
its results are in the README ("Compatibility").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
import transformers  # noqa: E402
from _cli import run_cli  # noqa: E402
from packaging.version import Version  # noqa: E402

from sa2va_convert.read.remote_code import check_imports, read_remote_code, scan_imports  # noqa: E402
from sa2va_convert.testing import write_base_folder, write_training_checkpoint  # noqa: E402
from sa2va_convert.runner.environment import diagnose  # noqa: E402

INTERNLM2_GENERATES = Version(transformers.__version__) < Version("4.50")


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def family(tmp_path):
    """``family(preset, edit=None)``: a fresh base folder (its remote code editable) and a checkpoint for it."""
    def make(preset: str, edit=None) -> tuple[Path, Path]:
        base = write_base_folder(tmp_path / f"base-{preset}", preset)
        if edit is not None:
            edit(base)
        ckpt = write_training_checkpoint(tmp_path / f"work-{preset}" / "iter_1.pth", preset, base_dir=base).path
        return base, ckpt

    return make


def append_line(path: Path, line: str) -> int:
    """Append one line of code to a remote-code file; returns its line number."""
    text = path.read_text(encoding="utf-8").rstrip("\n") + "\n"
    path.write_text(text + line + "\n", encoding="utf-8")
    return text.count("\n") + 1


# ------------------------------------------------------------------ reading remote code (no execution)


def test_import_scan_follows_the_closure_and_marks_optional_imports(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_x.M"}}))
    (tmp_path / "modeling_x.py").write_text(
        "import torch\nfrom . import helper\n"
        "try:\n    from .fast import F\nexcept ImportError:\n    F = None\n"
        "def later():\n    import somewhere_else\n")
    (tmp_path / "helper.py").write_text("from .deep import d\n")
    (tmp_path / "deep.py").write_text("import os\nif is_thing_available():\n    import thing\n")
    (tmp_path / "fast.py").write_text("import only_with_fast\n")
    refs = {(r.module, r.optional) for r in scan_imports(tmp_path / "modeling_x.py")}
    assert refs == {("torch", False), ("helper", False), ("fast", True), ("somewhere_else", False)}
    code = read_remote_code(tmp_path)
    assert sorted(code.files) == ["deep.py", "fast.py", "helper.py", "modeling_x.py"]
    assert code.nested() == ["deep.py"]  # two imports away from the auto_map module
    check = check_imports(tmp_path)
    # a function-level import counts (transformers' own check reads the whole file); a file reached only
    # through an optional import makes its own imports optional; an `if is_..._available()` block is optional
    assert [r.module for r in check.nowhere] == ["somewhere_else"]
    assert check.missing_packages == []


def test_child_finds_whether_the_model_calls_post_init(tmp_path):
    """The fact behind the transformers-5 diagnosis, read from our upstream-like test classes."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from sa2va_convert.runner.child import calls_post_init

    # a name of its own: transformers imports remote code as transformers_modules.<folder name>, and this
    # worker process may already hold another test's "base" under that name
    base = write_base_folder(tmp_path / f"postinit-{tmp_path.name}", "sa2va-1b")
    # the config class first, as from_pretrained does: for a local folder transformers copies only each
    # file's direct relative imports, and configuration_intern_vit.py arrives as the config's
    get_class_from_dynamic_module("configuration_sa2va_chat.Sa2VAChatConfig", str(base))
    cls = get_class_from_dynamic_module("modeling_sa2va_chat.Sa2VAChatModel", str(base))
    lm = get_class_from_dynamic_module("modeling_internlm2.InternLM2ForCausalLM", str(base))
    assert calls_post_init(cls) is False and calls_post_init(lm) is True


# ------------------------------------------------------------------ self-contained code, before any work


def test_code_importing_a_module_found_nowhere_is_refused_before_any_work(family, tmp_path):
    """As upstream's SAM3 sam3.py at one revision (imports third_parts.sam3, only inside a Sa2VA checkout)."""
    line = []
    base, ckpt = family("sa2va-qwen3-vl-sam3",
                        lambda b: line.append(append_line(b / "sam3.py", "from third_parts.sam3.model import x")))
    out = tmp_path / "out"
    r = run_cli(ckpt, out, "--base", base, roundtrip=True)
    assert r.returncode == 3, r.stderr
    msg = one_error_line(r.stderr)
    assert f"sam3.py: remote code line {line[0]} imports 'third_parts'" in msg and "--allow-unresolved-imports" in msg
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))
    # the user says they know: converted (without the round trip), with a warning naming the line
    r = run_cli(ckpt, out, "--base", base, "--allow-unresolved-imports")
    assert r.returncode == 0, r.stderr
    assert f"sam3.py:{line[0]} imports 'third_parts', found nowhere" in r.stderr and (out / "sam3.py").is_file()
    # verify judges such a folder: the folder's fault (exit 7), before loading it
    r = run_cli("verify", out, "--device", "cpu")
    assert r.returncode == 7 and "imports 'third_parts'" in one_error_line(r.stderr)


def test_a_missing_package_stops_the_round_trip_before_any_work(family, tmp_path):
    """A package Sa2VA code imports (decord: not installed here) is the environment's matter: exit 9, nothing
    written; without the round trip it is only a note."""
    assert subprocess.run([sys.executable, "-c", "import decord"], capture_output=True).returncode != 0
    base, ckpt = family("sa2va-1b", lambda b: append_line(b / "modeling_sa2va_chat.py", "import decord"))
    out = tmp_path / "out"
    r = run_cli(ckpt, out, "--base", base, roundtrip=True)
    assert r.returncode == 9, r.stderr
    msg = one_error_line(r.stderr)
    assert "imports decord, not installed there" in msg and "nothing was written" in msg and "--no-verify" in msg
    assert not out.exists()
    r = run_cli(ckpt, out, "--base", base)  # --no-verify
    assert r.returncode == 0 and "note: loading OUT will need decord" in r.stderr


# ------------------------------------------------------------------ the round trip on this CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_test_model_fails_on_cpu_without_the_mapping_like_upstream(tmp_path):
    """SAM2's state is on torch.device("cuda") (upstream sam2.py init_state): without the round trip's
    mapping of every CUDA use, the mask path cannot run on a CPU, whatever .cuda() mapping there is."""
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer

    base = write_base_folder(tmp_path / "base", "sa2va-1b")
    model = AutoModel.from_pretrained(str(base), trust_remote_code=True).eval()
    sam = model.grounding_encoder
    seg = torch.zeros(1, model.text_hidden_fcs[2].out_features)
    with pytest.raises((RuntimeError, AssertionError), match="CUDA|cuda|NVIDIA"):
        sam.predict_masks([Image.new("RGB", (40, 30))], seg, (40, 30))
    from sa2va_convert.runner.child import cuda_on_cpu

    with cuda_on_cpu() as mapped:
        masks = sam.predict_masks([Image.new("RGB", (40, 30))], seg, (40, 30))
    assert masks[0].shape == (1, 30, 40) and mapped["device=cuda"] >= 1 and mapped["tensor.cuda"] >= 1
    AutoTokenizer.from_pretrained(str(base))  # the folder is complete


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cpu_round_trip_runs_the_mask_path_and_says_what_it_mapped(family, tmp_path):
    base, ckpt = family("sa2va-1b")
    out = tmp_path / "out"
    r = run_cli(ckpt, out, "--base", base, "--json", roundtrip=True)
    assert r.returncode == 0, r.stderr
    rt = json.loads(r.stdout)["roundtrip"]
    mapped = rt["cuda_mapped"]
    assert mapped["device=cuda"] >= 1 and mapped["tensor.cuda"] >= 2 and mapped["autocast"] >= 1
    forced = [run for run in rt["runs"] if run.get("forced")]
    own = rt["runs"][0]
    assert (own["n_masks"] or forced[0]["n_masks"]) == 1
    assert "CUDA calls mapped to CPU" in rt["summary"] and "device='cuda'" in rt["summary"]


def test_nested_remote_code_is_made_importable_and_reported(family, tmp_path):
    base, ckpt = family("sa2va-qwen3-vl-sam3")
    assert read_remote_code(base).nested() == ["sam3pkg_build_sam3_tracker.py", "sam3pkg_model_vitdet.py"]
    out = tmp_path / "out"
    r = run_cli(ckpt, out, "--base", base, "--json", roundtrip=True)
    assert r.returncode == 0, r.stderr
    rt = json.loads(r.stdout)["roundtrip"]
    assert rt["nested_imports"] == ["sam3pkg_build_sam3_tracker.py", "sam3pkg_model_vitdet.py"]
    assert "made importable" in rt["summary"]


@pytest.mark.skipif(INTERNLM2_GENERATES, reason="transformers < 4.50: InternLM2 code generates here")
def test_internlm2_code_under_new_transformers_is_exit_9_with_the_fix(family, tmp_path):
    """Sa2VA-8B-style code in the user's Sa2VA env (4.57): the environment, not the folder."""
    base, ckpt = family("sa2va-8b")
    out = tmp_path / "out"
    r = run_cli(ckpt, out, "--base", base, roundtrip=True)
    assert r.returncode == 9, r.stderr
    msg = one_error_line(r.stderr)
    assert "InternLM2ForCausalLM" in msg and "InternLM2PreTrainedModel" in msg
    assert f"transformers {transformers.__version__}" in msg and "transformers==4.49.0" in msg and "--python" in msg
    assert (out / "config.json").is_file()  # written; only the round trip could not run here


def _overlay_with(tmp_path_factory, *requirements: str) -> Path:
    """A folder with ``requirements`` installed (no dependencies), for a PYTHONPATH overlay; skipped when
    the package registry cannot give them."""
    root = tmp_path_factory.mktemp("overlay")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(root),
                        *requirements], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"cannot install {requirements} from the package registry here: {r.stderr.strip()[-200:]}")
    return root


def _interpreter_with(overlay: Path, path: Path) -> Path:
    """An interpreter for --python: this one, with ``overlay``'s packages in front of its own."""
    path.write_text(f"#!/bin/sh\nPYTHONPATH={overlay} exec {sys.executable} \"$@\"\n")
    path.chmod(0o755)
    return path


def test_a_torchvision_built_for_another_torch_is_exit_9_naming_both(family, tmp_path, tmp_path_factory):
    """The registry's torchvision beside a torch it was not built for (e.g. a local CPU torch) fails on
    import with 'operator torchvision::nms does not exist': named, with both versions, exit 9."""
    other = "0.28.0" if not torchvision_version().startswith("0.28") else "0.29.1"
    overlay = _overlay_with(tmp_path_factory, f"torchvision=={other}")
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(overlay)})
    if "torchvision::" not in probe.stderr:
        pytest.skip(f"torchvision {other} imports beside torch {torch.__version__} here")
    python = _interpreter_with(overlay, tmp_path / "python-mixed")
    base, ckpt = family("sa2va-1b")
    out = tmp_path / "out"
    assert run_cli(ckpt, out, "--base", base).returncode == 0
    r = run_cli("verify", out, "--device", "cpu", "--python", python)
    assert r.returncode == 9, r.stderr
    msg = one_error_line(r.stderr)
    assert f"torchvision {other}" in msg and f"torch {torch.__version__}" in msg and "torchvision::nms" in msg
    assert f"torch=={torch.__version__.split('+')[0]}" in msg


def torchvision_version() -> str:
    from importlib import metadata

    return metadata.version("torchvision")


# ------------------------------------------------------------------ the diagnosis (a pure function of the child's facts)


def test_diagnosis_of_a_torchvision_beside_a_local_cpu_torch_points_to_its_own_index(tmp_path):
    """The facts bench/compat.py's "mixed" row gets for real (torch 2.13.0+cpu from a local file, the registry's
    torchvision 0.28.0 for it): pinning the torch, the fix for a registry torch, would install the same
    mismatched torchvision again, so the line points to the index the torch came from instead."""
    result = {"stage": "load", "versions": {"torch": "2.13.0+cpu", "transformers": "4.57.6"},
              "packages": {"torch": "2.13.0+cpu", "torchvision": "0.28.0", "timm": "1.0.31"},
              "error": {"stage": "load", "type": "RuntimeError",
                        "message": "operator torchvision::nms does not exist"}}
    text = diagnose(result, folder=tmp_path, python="/venv/bin/python").one_line()
    assert "torchvision 0.28.0" in text and "torch 2.13.0+cpu" in text
    assert "pip install 'torchvision==0.28.*' --index-url https://download.pytorch.org/whl/cpu" in text
    assert "torch==2.13.0" not in text
    # a registry torch (its package version has no label, only torch.__version__ does): pin it
    result["versions"]["torch"] = "2.14.1+cu130"
    result["packages"].update(torch="2.14.1", torchvision="0.28.0")
    text = diagnose(result, folder=tmp_path, python="/venv/bin/python").one_line()
    assert "pip install 'sa2va-convert[verify]' torch==2.14.1" in text and "--index-url" not in text


def test_diagnosis_names_transformers_5_for_code_without_post_init(tmp_path):
    """What the child reports when upstream-style code meets transformers 5 (bench/compat.py runs it for real)."""
    result = {"stage": "load", "model_class": "Sa2VAChatModel", "model_calls_post_init": False,
              "config_transformers_version": "4.57.0", "versions": {"transformers": "5.25.0", "torch": "2.14.1"},
              "error": {"stage": "load", "type": "AttributeError",
                        "message": "'Sa2VAChatModel' object has no attribute 'all_tied_weights_keys'"}}
    err = diagnose(result, folder=tmp_path, python="/venv/bin/python")
    assert err is not None and err.exit_code == 9
    text = err.one_line()
    assert "Sa2VAChatModel" in text and "4.57.0" in text and "5.25.0" in text and "post_init()" in text
    assert "transformers>=4.49,<5" in text
    # the same error under 4.x is not this diagnosis (left to the caller: the folder or its code)
    result["versions"]["transformers"] = "4.57.6"
    assert diagnose(result, folder=tmp_path, python="/venv/bin/python") is None


def test_diagnosis_tells_a_module_found_nowhere_from_a_missing_package(tmp_path):
    base = {"stage": "load", "versions": {"transformers": "4.57.6"}}
    missing = diagnose({**base, "error": {"stage": "load", "type": "ModuleNotFoundError",
                                          "message": "No module named 'timm'"}}, folder=tmp_path, python="py")
    assert missing is not None and "timm" in missing.one_line() and missing.exit_code == 9
    nowhere = diagnose({**base, "error": {"stage": "load", "type": "ModuleNotFoundError",
                                          "message": "No module named 'third_parts'"}}, folder=tmp_path, python="py")
    assert nowhere is None  # the folder's code is not self-contained: exit 7, judged by the caller


# ------------------------------------------------------------------ Qwen-VL: the length written into the call


def test_qwen_vl_answers_are_capped_by_wrapping_generate_as_upstream_code_needs(tmp_path):
    """Upstream's Qwen-VL classes have no preparing_for_generation() and ask generate for 2048 tokens
    (modeling_sa2va_qwen.py lines 214-220): the test model does the same, and the child's cap reaches it."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from sa2va_convert.runner.child import cap_generation, cuda_on_cpu

    base = write_base_folder(tmp_path / f"qwencap-{tmp_path.name}", "sa2va-qwen2_5-vl")
    model = AutoModel.from_pretrained(str(base), trust_remote_code=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(base), trust_remote_code=True)
    assert not hasattr(model, "preparing_for_generation")
    asked: list = []
    made: list = []
    inner = model.model.generate

    def spy(*a, **kw):  # records what generate is asked for; the real one runs (at most 8 tokens, for time)
        asked.append(kw.get("max_new_tokens"))
        ids, seg_states = inner(*a, **{**kw, "max_new_tokens": min(kw["max_new_tokens"], 8)})
        made.append(len(ids))
        return ids, seg_states

    model.model.generate = spy
    from sa2va_convert.testing.finetune import synthetic_picture

    with torch.no_grad(), cuda_on_cpu():
        model.predict_forward(image=synthetic_picture(), text="<image>Please segment it.", tokenizer=tok)
        assert asked == [2048]  # the number written into the call, like upstream
        assert cap_generation(model, tok, 3) == "model.generate(max_new_tokens<=3)"
        model.predict_forward(image=synthetic_picture(), text="<image>Please segment it.", tokenizer=tok)
        assert cap_generation(model, tok, 5) == "model.generate(max_new_tokens<=5)"  # a new cap replaces the old
        model.predict_forward(image=synthetic_picture(), text="<image>Please segment it.", tokenizer=tok)
    assert asked == [2048, 3, 5]
    assert made[1] <= 3 and made[2] <= 5


# ------------------------------------------------------------------ a '.' in the folder's name, transformers < 4.57


def test_a_folder_named_with_a_dot_loads_under_transformers_4_49(family, tmp_path, tmp_path_factory):
    """transformers before 4.57 imports a local folder's code as transformers_modules.<name> unchanged, so
    "out-1.5" fails (No module named 'transformers_modules.out-1'); the child loads it through a link
    named out-1_5 and says so. Run under upstream's `legacy` transformers (4.49.0, with its tokenizers)
    put in front of this environment's packages."""
    overlay = _overlay_with(tmp_path_factory, "transformers==4.49.0", "tokenizers>=0.21,<0.22")
    python = _interpreter_with(overlay, tmp_path / "python-tf449")
    base, ckpt = family("sa2va-1b")
    out = tmp_path / "out-1.5"
    assert run_cli(ckpt, out, "--base", base).returncode == 0
    r = run_cli("verify", out, "--device", "cpu", "--python", python, "--json")
    assert r.returncode == 0, r.stderr
    rt = json.loads(r.stdout)["roundtrip"]
    assert rt["versions"]["transformers"] == "4.49.0" and rt["loaded_as"] == "out-1_5"
    from sa2va_convert.verify.roundtrip import summary_line

    assert "through a link named out-1_5" in summary_line(rt)  # the line convert and verify print
    assert sorted(p.name for p in tmp_path.iterdir() if "out" in p.name) == ["out-1.5"]  # nothing beside it
