"""The original Sa2VA recipe: raw InternVL2.5 + sam2_hiera_large.pt + a Sa2VA code folder, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sa2va_convert.testing.fixtures import write_sam2_checkpoint, write_training_checkpoint
from sa2va_convert.testing.layouts import Sizes
from sa2va_convert.testing.reference import reference_output


@pytest.fixture
def recipe(base_cache, tmp_path):
    def make(preset: str = "sa2va-1b"):
        raw = base_cache(preset, raw_internvl=True)
        code = base_cache(preset, sizes=Sizes.tiny().with_(layers=3))  # another size: only code and config used
        sam2 = write_sam2_checkpoint(tmp_path / "sam2_hiera_large.pt")
        ckpt = write_training_checkpoint(tmp_path / "work" / "iter_50.pth", preset)
        return raw, code, sam2, ckpt
    return make


@pytest.mark.parametrize("preset", ["sa2va-1b", "sa2va-8b"])
def test_raw_internvl_recipe_converts_with_tokenizer_growth_and_sam2_mapping(recipe, tmp_path, cli, preset):
    raw, code, sam2, ckpt = recipe(preset)
    out = tmp_path / "out"
    r = cli(ckpt.path, out, "--base", raw, "--sam2", sam2, "--code-from", code, "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)["plan"]
    assert [t["token"] for t in plan["tokenizer_additions"]] == ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Sa2VAChatModel"] and cfg["model_type"] == "sa2va_chat"
    assert cfg["llm_config"]["num_hidden_layers"] == Sizes.tiny().layers  # sizes from the raw base, not --code-from
    assert cfg["llm_config"]["vocab_size"] == ckpt.vocab_rows
    assert (out / "modeling_sa2va_chat.py").read_bytes() == (code / "modeling_sa2va_chat.py").read_bytes()
    ref = dict(reference_output(raw, ckpt.path, scale=ckpt.scale, sam2_checkpoint=sam2))
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(ref)
    for shard in set(index.values()):
        with safe_open(str(out / shard), framework="pt") as f:
            for k in f.keys():
                assert torch.equal(f.get_tensor(k), ref[k].bfloat16()), k
    assert "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.g_weight" in index
    tok = json.loads((out / "tokenizer.json").read_text())
    assert {t["content"]: t["id"] for t in tok["added_tokens"]}["[SEG]"] == ckpt.vocab_rows - 5


def test_recipe_needs_all_three_inputs(recipe, tmp_path, cli):
    raw, code, sam2, ckpt = recipe()
    r = cli(ckpt.path, tmp_path / "out", "--base", raw, "--sam2", sam2)
    assert r.returncode == 3 and "--code-from" in r.error_lines[0]


def test_recipe_refuses_a_sa2va_base(recipe, base_cache, tmp_path, cli):
    raw, code, sam2, ckpt = recipe()
    r = cli(ckpt.path, tmp_path / "out", "--base", code, "--sam2", sam2, "--code-from", code)
    assert r.returncode == 5 and "raw InternVLChatModel" in r.error_lines[0]


def test_recipe_refuses_a_file_that_is_not_sam2(recipe, tmp_path, cli):
    raw, code, sam2, ckpt = recipe()
    r = cli(ckpt.path, tmp_path / "out", "--base", raw, "--sam2", ckpt.path, "--code-from", code)
    assert r.returncode == 3 and "not a SAM2 checkpoint" in r.error_lines[0]
