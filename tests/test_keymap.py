"""Keymap loading: the built-ins are valid, and every kind of broken keymap is refused with file:line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sa2va_convert.errors import KeymapError
from sa2va_convert.plan.keymap import builtin_dir, builtin_names, load_builtin, load_keymap

GOOD = builtin_dir() / "sa2va-v1-internvl-qwen2.yaml"


def test_builtin_keymaps_load_and_cover_every_family():
    names = builtin_names()
    assert set(names) == {"sa2va-v1-internvl-qwen2", "sa2va-v1-internvl-internlm2", "sa2va-v2-internvl3",
                          "sa2va-v2-qwen-vl", "sa2va-v2-qwen3vl-sam3", "sa2va-v2-llava"}
    for n in names:
        km = load_builtin(n)
        assert km.examples, n


@pytest.mark.parametrize("key,role,hf", [
    # FORMATS.md §3/§4 literal examples
    ("mllm.model.language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
     "lora_a", "language_model.model.layers.0.self_attn.q_proj.weight"),
    ("mllm.model.language_model.base_model.model.model.embed_tokens.weight", "full",
     "language_model.model.embed_tokens.weight"),
    ("mllm.model.language_model.base_model.model.lm_head.weight", "full", "language_model.lm_head.weight"),
    ("mllm.model.mlp1.0.bias", "full", "mlp1.0.bias"),
    ("grounding_encoder.sam2_model.memory_encoder.fuser.layers.1.gamma", "full",
     "grounding_encoder.sam2_model.memory_encoder.fuser.layers.1.g_weight"),
    ("text_hidden_fcs.0.weight", "full", "text_hidden_fcs.0.weight"),
])
def test_v1_qwen2_mapping(key, role, hf):
    assert load_builtin("sa2va-v1-internvl-qwen2").map_key(key) == (role, hf)


def test_internlm2_output_base_layer_and_lora_share_the_target():
    km = load_builtin("sa2va-v1-internvl-internlm2")
    assert km.map_key("mllm.model.language_model.base_model.model.output.base_layer.weight") == (
        "full", "language_model.output.weight")
    assert km.map_key("mllm.model.language_model.base_model.model.output.lora_B.default.weight") == (
        "lora_b", "language_model.output.weight")


def test_qwen_vl_strips_mllm_only():
    km = load_builtin("sa2va-v2-qwen-vl")
    assert km.map_key("mllm.model.base_model.model.lm_head.modules_to_save.default.weight") == (
        "full", "model.lm_head.weight")
    assert km.map_key(
        "mllm.model.base_model.model.model.language_model.layers.2.mlp.down_proj.lora_A.default.weight") == (
        "lora_a", "model.model.language_model.layers.2.mlp.down_proj.weight")
    assert km.classify("mllm.model.base_model.model.lm_head.original_module.weight")[0] == "drop"


def _broken(tmp_path: Path, old: str, new: str) -> Path:
    text = GOOD.read_text()
    assert old in text, old
    p = tmp_path / "broken.yaml"
    p.write_text(text.replace(old, new, 1))
    return p


def _line_of(path: Path, needle: str) -> int:
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(needle)


def test_invalid_yaml_names_the_line(tmp_path):
    p = _broken(tmp_path, "rename:\n", "rename: [\n")
    with pytest.raises(KeymapError) as e:
        load_keymap(p)
    assert "invalid YAML" in e.value.message and str(p) in e.value.path


def test_unknown_field_names_file_and_line(tmp_path):
    p = _broken(tmp_path, "  - from: '^mllm\\.model\\.'\n", "  - from: '^mllm\\.model\\.'\n    too: ''\n")
    with pytest.raises(KeymapError) as e:
        load_keymap(p)
    assert "unknown field 'too'" in e.value.message
    assert e.value.path == f"{p}:{_line_of(p, 'too:')}"


def test_bad_regex_is_refused_with_line(tmp_path):
    p = _broken(tmp_path, "- from: '\\.gamma$'", "- from: '\\.gamma($'")
    with pytest.raises(KeymapError) as e:
        load_keymap(p)
    assert "bad regex" in e.value.message
    assert e.value.path.endswith(f":{_line_of(p, 'gamma($')}")


def test_two_source_keys_to_one_target_is_refused(tmp_path):
    # Map text_hidden_fcs.2 onto text_hidden_fcs.0: the examples then collide.
    p = _broken(tmp_path, "  - from: '\\.gamma$'\n    to: '.g_weight'\n",
                "  - from: '\\.gamma$'\n    to: '.g_weight'\n  - from: 'text_hidden_fcs\\.2\\.bias'\n    to: 'language_model.lm_head.weight'\n")
    with pytest.raises(KeymapError) as e:
        load_keymap(p)
    assert "two source keys map to one target" in e.value.message


def test_rule_matching_nothing_the_family_has_is_refused(tmp_path):
    p = _broken(tmp_path, "  - from: '\\.gamma$'", "  - from: '\\.gammma$'")
    with pytest.raises(KeymapError) as e:
        load_keymap(p)
    assert "matches none of the example keys" in e.value.message
    assert e.value.path.endswith(f":{_line_of(p, 'gammma')}")


def test_replacement_group_must_exist(tmp_path):
    p = _broken(tmp_path, "name: '\\1.weight'", "name: '\\3.weight'")
    with pytest.raises(KeymapError) as e:
        load_keymap(p)
    assert "group \\3" in e.value.message


def test_example_with_wrong_expectation_is_refused(tmp_path):
    p = _broken(tmp_path, "hf: mlp1.1.weight", "hf: mlp1.2.weight")
    with pytest.raises(KeymapError) as e:
        load_keymap(p)
    assert "maps to 'mlp1.1.weight'" in e.value.message


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sa2va_convert.cli", *args], capture_output=True, text=True)


def test_cli_keymaps_lint_ok_and_broken(tmp_path):
    ok = _cli("keymaps", "lint", str(GOOD))
    assert ok.returncode == 0 and "ok:" in ok.stdout
    bad = _cli("keymaps", "lint", str(_broken(tmp_path, "role: lora_a", "role: lora_c")))
    assert bad.returncode == 5
    err = bad.stderr.strip().splitlines()
    assert len(err) == 1 and "unknown role 'lora_c'" in err[0] and "broken.yaml:" in err[0]


def test_cli_keymaps_list_and_show():
    lst = _cli("keymaps", "list", "--json")
    assert lst.returncode == 0
    assert "sa2va-v2-qwen-vl" in lst.stdout
    show = _cli("keymaps", "show", "sa2va-v2-internvl3")
    assert show.returncode == 0 and "modules_to_save" in show.stdout
    missing = _cli("keymaps", "show", "no-such-keymap")
    assert missing.returncode == 2 and "no built-in keymap" in missing.stderr  # a usage error, not a keymap error
