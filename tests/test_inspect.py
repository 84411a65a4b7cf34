"""`sa2va-convert inspect`: family, groups, LoRA settings and their origin, config values, unknown layouts."""

from __future__ import annotations

import json

import pytest
import torch

from sa2va_convert.testing.fixtures import write_training_checkpoint

FAMILY = {
    "sa2va-1b": "sa2va-v1-internvl-qwen2", "sa2va-4b": "sa2va-v1-internvl-qwen2",
    "sa2va-8b": "sa2va-v1-internvl-internlm2", "sa2va-internvl3": "sa2va-v2-internvl3",
    "sa2va-qwen2_5-vl": "sa2va-v2-qwen-vl", "sa2va-qwen3-vl": "sa2va-v2-qwen-vl",
}


@pytest.mark.parametrize("preset", sorted(FAMILY))
def test_inspect_names_the_family_of_every_fixture(preset, tmp_path, cli):
    ck = write_training_checkpoint(tmp_path / "iter_7.pth", preset, iteration=7)
    r = cli("inspect", ck.path, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["family"]["keymap"] == FAMILY[preset]
    assert rep["kind"] == "mmengine" and rep["meta"]["iter"] == 7
    assert rep["lora"]["ranks"] == [ck.lora_r] and rep["lora"]["alpha"] == ck.lora_alpha
    assert rep["lora"]["scale"] == ck.scale and rep["lora"]["alpha_source"] == "embedded config"
    groups = {g["group"]: g for g in rep["groups"]}
    assert groups["LoRA adapters"]["tensors"] == 2 * rep["lora"]["pairs"]
    assert "SAM2 mask decoder" in groups and "text_hidden_fcs" in groups
    assert ("mlp1 (projector)" in groups) == (not preset.startswith("sa2va-qwen"))
    assert rep["unrecognised"] == []
    assert rep["config"]["special_tokens"][:2] == ["[SEG]", "<p>"]
    assert rep["placeholders"]["mmengine.logging.history_buffer.HistoryBuffer"] >= 1
    assert rep["dtypes"] == {"bf16": rep["tensor_count"]}


def test_inspect_rich_table_on_a_terminal_free_run(tmp_path, cli):
    ck = write_training_checkpoint(tmp_path / "iter_7.pth", "sa2va-8b")
    r = cli("inspect", ck.path)
    assert r.returncode == 0
    for needle in ("Sa2VA v1 InternVL2.5 + InternLM2", "LoRA adapters", "alpha", "Embedded training config",
                   "Family evidence"):
        assert needle in r.stdout, needle


def test_unknown_layout_is_reported_with_the_keys_that_fit_no_family(tmp_path, cli):
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(2, 2), "fc.lora_A.default.weight": torch.zeros(1, 2)},
                "meta": {"iter": 3}}, path)
    r = cli("inspect", path, "--json")
    assert r.returncode == 0
    rep = json.loads(r.stdout)
    assert rep["family"]["keymap"] is None
    assert "fc.lora_A.default.weight" in rep["family"]["unmatched_sample"]
    assert not any(c["matched"] for c in rep["family"]["candidates"])
    conv = cli(path, tmp_path / "out", "--base", tmp_path / "base")
    assert conv.returncode == 5 and "fit no known family" in conv.error_lines[0]


def test_inspect_refuses_a_hostile_pickle_without_running_it(tmp_path, cli):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "iter_1.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "meta": {"cfg": Evil()}}, path, pickle_protocol=2)
    r = cli("inspect", path)
    assert r.returncode == 4 and not marker.exists()
    assert len(r.error_lines) == 1 and "system" in r.error_lines[0] and str(path) in r.error_lines[0]


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "truncated", "not_a_checkpoint", "safetensors"])
def test_bad_input_is_one_line_naming_the_file(case, tmp_path, cli):
    from safetensors.torch import save_file

    path = tmp_path / "iter_1.pth"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        ck = write_training_checkpoint(path, "sa2va-1b")
        path.write_bytes(ck.path.read_bytes()[:4000])
    elif case == "not_a_checkpoint":
        torch.save([1, 2, 3], path)
    elif case == "safetensors":
        save_file({"a": torch.zeros(2)}, str(path))
    r = cli("inspect", path)
    assert r.returncode == 3, (case, r.stderr)
    assert len(r.error_lines) == 1 and str(path) in r.error_lines[0] and "(fix:" in r.error_lines[0]
