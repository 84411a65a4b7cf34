"""Each refusal of the convert command: one line naming the file and the fix, a documented exit code, no OUT."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from sa2va_convert.testing.layouts import Sizes


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line(r, code: int, *needles: str) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.error_lines
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _edit_checkpoint(path: Path, fn) -> None:
    obj = torch.load(path, weights_only=False)  # our own fixture file
    fn(obj["state_dict"])
    torch.save(obj, path)


def test_no_alpha(make_family, tmp_path, cli):
    fam = make_family("sa2va-1b", config_text=False)
    before = _sha(fam.ckpt.path)
    r = cli(fam.ckpt.path, tmp_path / "out", "--base", fam.base)
    _one_line(r, 5, str(fam.ckpt.path), "LoRA alpha is unknown", "--lora-alpha 8")
    assert not (tmp_path / "out").exists() and _sha(fam.ckpt.path) == before
    ok = cli(fam.ckpt.path, tmp_path / "out", "--base", fam.base, "--lora-alpha", "8")
    assert ok.returncode == 0, ok.stderr


def test_vocab_mismatch(make_family, tmp_path, cli):
    fam = make_family("sa2va-1b", extra_tokens=("<obj>",), config_text=False)
    r = cli(fam.ckpt.path, tmp_path / "out", "--base", fam.base, "--lora-alpha", "8")
    _one_line(r, 5, "401 rows", "400", "--base")
    assert not (tmp_path / "out").exists()


def test_unused_keys(make_family, tmp_path, cli):
    fam = make_family("sa2va-1b")
    _edit_checkpoint(fam.ckpt.path, lambda sd: sd.__setitem__("text_hidden_fcs.4.weight", torch.zeros(2, 2)))
    r = cli(fam.ckpt.path, tmp_path / "out", "--base", fam.base)
    _one_line(r, 5, "text_hidden_fcs.4.weight", "--allow-unused")
    ok = cli(fam.ckpt.path, tmp_path / "out", "--base", fam.base, "--allow-unused", r"text_hidden_fcs\.4\.")
    assert ok.returncode == 0, ok.stderr


def test_shape_mismatch_with_a_base_of_another_size(make_family, base_cache, tmp_path, cli):
    fam = make_family("sa2va-1b")
    other = base_cache("sa2va-1b", sizes=Sizes.tiny().with_(intermediate=96))
    r = cli(fam.ckpt.path, tmp_path / "out", "--base", other)
    line = _one_line(r, 5, "shape mismatch", "mlp.down_proj")
    assert "(+" in line or line.count(";") >= 1


def test_existing_out_needs_force_and_is_kept_on_failure(make_family, tmp_path, cli):
    fam = make_family("sa2va-1b")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = cli(fam.ckpt.path, out, "--base", fam.base)
    _one_line(r, 6, str(out), "already exists", "--replace-foreign")
    assert (out / "keep.txt").read_text() == "precious"
    # --force replaces only folders this tool wrote: this one is not
    r = cli(fam.ckpt.path, out, "--base", fam.base, "--force")
    _one_line(r, 6, str(out), "not written by sa2va-convert", "--replace-foreign")
    assert (out / "keep.txt").read_text() == "precious"
    # a failing --replace-foreign run leaves the old folder as it was
    bad = cli(fam.ckpt.path, out, "--base", fam.base, "--keymap", "sa2va-v2-qwen-vl", "--replace-foreign",
              "--force-keymap")
    assert bad.returncode == 5 and (out / "keep.txt").exists()
    ok = cli(fam.ckpt.path, out, "--base", fam.base, "--replace-foreign")
    assert ok.returncode == 0 and not (out / "keep.txt").exists() and (out / "config.json").exists()
    # now it is ours: --force replaces it, without the other flag
    again = cli(fam.ckpt.path, out, "--base", fam.base)
    _one_line(again, 6, str(out), "already exists", "--force")
    assert cli(fam.ckpt.path, out, "--base", fam.base, "--force").returncode == 0


def test_bad_keymap(make_family, tmp_path, cli):
    fam = make_family("sa2va-1b")
    km = tmp_path / "my.yaml"
    km.write_text("schema: 1\nname: x\nbogus: 1\n")
    r = cli(fam.ckpt.path, tmp_path / "out", "--base", fam.base, "--keymap", km)
    _one_line(r, 5, f"{km}:3", "unknown field 'bogus'")


def test_fp16_overflow(make_family, tmp_path, cli):
    fam = make_family("sa2va-1b")
    _edit_checkpoint(fam.ckpt.path, lambda sd: sd["text_hidden_fcs.0.weight"].view(-1).__setitem__(0, 1e6))
    r = cli(fam.ckpt.path, tmp_path / "out", "--base", fam.base, "--dtype", "fp16")
    _one_line(r, 5, "beyond fp16", "--dtype bf16")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_nan_in_checkpoint(make_family, tmp_path, cli):
    fam = make_family("sa2va-1b")
    key = "mllm.model.language_model.base_model.model.model.layers.1.mlp.up_proj.lora_A.default.weight"
    _edit_checkpoint(fam.ckpt.path, lambda sd: sd[key].view(-1).__setitem__(3, float("nan")))
    r = cli(fam.ckpt.path, tmp_path / "out", "--base", fam.base)
    _one_line(r, 5, "NaN/Inf", key)
    assert not (tmp_path / "out").exists()


def test_wrong_family_base(make_family, base_cache, tmp_path, cli):
    fam = make_family("sa2va-1b")
    r = cli(fam.ckpt.path, tmp_path / "out", "--base", base_cache("sa2va-qwen2_5-vl"))
    _one_line(r, 5, "does not fit", "--base")


def test_raw_internvl_base_is_refused_as_the_v2_trap(make_family, base_cache, tmp_path, cli):
    fam = make_family("sa2va-internvl3")
    r = cli(fam.ckpt.path, tmp_path / "out", "--base", base_cache("sa2va-internvl3", raw_internvl=True))
    _one_line(r, 5, "raw InternVL/Qwen-VL model", "loads and is wrong")


def test_no_base_and_none_discoverable(make_family, tmp_path, cli):
    fam = make_family("sa2va-1b")
    (fam.base / "model.safetensors.index.json").rename(tmp_path / "hidden-index.json")
    try:
        r = cli(fam.ckpt.path, tmp_path / "out", env={"HF_HOME": str(tmp_path / "hf")})
        _one_line(r, 5, "no --base given", "pass --base DIR", "Sa2VA-1B")
    finally:
        (tmp_path / "hidden-index.json").rename(fam.base / "model.safetensors.index.json")


def test_base_discovered_from_the_training_config(make_family, tmp_path, cli):
    fam = make_family("sa2va-1b")  # the fixture's config names the base folder as `path`
    r = cli(fam.ckpt.path, tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    assert str(fam.base) in r.stdout


def _base_with_nan(src: Path, dst: Path, prefix: str = "vision_model.") -> str:
    """A copy of a base folder with one NaN in a 2-D tensor the conversion copies as it is; returns its name."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for shard in sorted(dst.glob("*.safetensors")):
        tensors = load_file(str(shard))
        key = next((k for k in sorted(tensors) if k.startswith(prefix) and tensors[k].is_floating_point()
                    and tensors[k].dim() == 2), None)
        if key is not None:
            tensors[key].view(-1)[0] = float("nan")
            save_file(tensors, str(shard), metadata={"format": "pt"})
            return key
    raise AssertionError(f"no {prefix} tensor in {src}")


def test_nan_in_a_base_tensor_copied_as_is(make_family, tmp_path, cli):
    """The default post-write check reads no values back from disk (issue 14), so every value written is
    checked in memory: a NaN in a base tensor that no LoRA touches is refused before anything is published."""
    fam = make_family("sa2va-1b")
    key = _base_with_nan(fam.base, tmp_path / "base")
    r = cli(fam.ckpt.path, tmp_path / "out", "--base", tmp_path / "base")
    _one_line(r, 5, "NaN/Inf", key, "base folder")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
