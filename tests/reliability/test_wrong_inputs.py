"""Readable inputs of the wrong kind: another model, an unknown family, a base that does not fit.

The tool must refuse rather than guess: exit 5 when the inputs do not add up
(family, shapes, vocabulary), exit 3 when a needed file is missing or is not
what it should be, always naming the file and what to pass instead. Cases
already covered at the CLI in ``tests/test_convert_errors.py`` (a base of the
Qwen-VL family, a raw InternVL base, extra checkpoint tokens, a shape change
in one dimension) are not repeated; these extend them.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import torch
from _reliability import Guard, assert_refused, load_fixture_checkpoint

from sa2va_convert.testing import Sizes


def _refuse(sa2va, tiny, base: Path, code: int, file, *needles: str, ckpt: Path | None = None) -> str:
    ckpt = ckpt or tiny.ckpt.path
    guard = Guard((ckpt, base), tiny.out)
    r = sa2va(ckpt, tiny.out, "--base", base)
    return assert_refused(r, code, guard, file, *needles)


def _base_copy(tiny, tmp_path: Path) -> Path:
    base = tmp_path / "base"
    shutil.copytree(tiny.base, base)
    return base


# ------------------------------------------------------------------ the checkpoint is not Sa2VA


def test_checkpoint_of_another_model(sa2va, tiny):
    """A LLaMA-style fine-tune saved by the same mmengine runner: refused, a few of its keys quoted."""
    obj = load_fixture_checkpoint(tiny.ckpt.path)
    sd = OrderedDict()
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[f"model.layers.{i}.self_attn.{proj}.weight"] = torch.zeros(8, 8, dtype=torch.bfloat16)
    sd["model.embed_tokens.weight"] = torch.zeros(16, 8, dtype=torch.bfloat16)
    sd["lm_head.weight"] = torch.zeros(16, 8, dtype=torch.bfloat16)
    obj["state_dict"] = sd
    torch.save(obj, tiny.ckpt.path)
    _refuse(sa2va, tiny, tiny.base, 5, tiny.ckpt.path, "not a recognised Sa2VA training checkpoint",
            "model.layers.0.self_attn", "--keymap")


def test_unknown_sa2va_like_family(sa2va, tiny):
    """Sa2VA's wrapper around an LLM no keymap knows (GPT-2 blocks): the unmatched keys are listed."""
    obj = load_fixture_checkpoint(tiny.ckpt.path)
    lm = "mllm.model.language_model.base_model.model.transformer"
    sd = OrderedDict()
    for i in range(2):
        sd[f"{lm}.h.{i}.attn.c_attn.lora_A.default.weight"] = torch.zeros(4, 8, dtype=torch.bfloat16)
        sd[f"{lm}.h.{i}.attn.c_attn.lora_B.default.weight"] = torch.zeros(24, 4, dtype=torch.bfloat16)
    sd[f"{lm}.wte.weight"] = torch.zeros(16, 8, dtype=torch.bfloat16)
    sd["text_hidden_fcs.0.weight"] = torch.zeros(8, 8, dtype=torch.bfloat16)
    obj["state_dict"] = sd
    torch.save(obj, tiny.ckpt.path)
    _refuse(sa2va, tiny, tiny.base, 5, tiny.ckpt.path, "fit no known family", f"{lm}.h.0.attn.c_attn.lora_A")


def test_deepspeed_optimizer_states_file_instead_of_the_model(sa2va, tiny, tmp_path):
    ckpt = tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": 2, "single_partition_of_fp32_groups": [torch.zeros(4)]},
                "ds_version": "0.19.8"}, ckpt)
    _refuse(sa2va, tiny, tiny.base, 3, ckpt, "optimizer-states file", "mp_rank_00_model_states.pt", ckpt=ckpt)


# ------------------------------------------------------------------ the base does not fit


def test_base_of_another_family_same_layout(sa2va, tiny, base_cache):
    """A Sa2VA-8B (InternLM2) base for a Sa2VA-1B (Qwen2) fine-tune: same InternVL layout, other LLM."""
    other = base_cache("sa2va-8b")
    _refuse(sa2va, tiny, other, 5, other, "does not fit", "--base")


def test_base_of_another_size_lists_first_ten_mismatches_and_count(sa2va, tiny, base_cache):
    other = base_cache("sa2va-1b", sizes=Sizes.tiny().with_(hidden=96))
    line = _refuse(sa2va, tiny, other, 5, tiny.ckpt.path, "shape mismatch")
    m = re.search(r": (\d+) shape mismatch\(es\)[^:]*: (.*) \(\+(\d+) more\)", line)
    assert m, line
    total, shown, more = int(m.group(1)), m.group(2).split("; "), int(m.group(3))
    assert len(shown) == 10 and total == 10 + more and more > 0, line


def test_missing_config_json_in_base(sa2va, tiny, tmp_path):
    base = _base_copy(tiny, tmp_path)
    (base / "config.json").unlink()
    _refuse(sa2va, tiny, base, 3, base / "config.json", "config.json is missing")


def test_missing_tokenizer_in_base(sa2va, tiny, tmp_path):
    base = _base_copy(tiny, tmp_path)
    (base / "tokenizer.json").unlink()
    _refuse(sa2va, tiny, base, 3, base, "no tokenizer found")


def test_missing_shard_in_base(sa2va, tiny, tmp_path):
    base = _base_copy(tiny, tmp_path)
    shard = base / "model-00001-of-00001.safetensors"
    shard.unlink()
    _refuse(sa2va, tiny, base, 3, shard, "named in the index is missing", "copy the missing shard")


def test_base_is_a_file(sa2va, tiny):
    shard = tiny.base / "model-00001-of-00001.safetensors"
    _refuse(sa2va, tiny, shard, 3, shard, "got a file", "config.json")


def test_base_tokenizer_of_another_vocabulary(sa2va, tiny, tmp_path):
    """The base's tokenizer has one token more than the fine-tune's embedding rows: no guess, exit 5."""
    base = _base_copy(tiny, tmp_path)
    tj = json.loads((base / "tokenizer.json").read_text())
    next_id = 1 + max(max(t["id"] for t in tj["added_tokens"]), max(tj["model"]["vocab"].values()))
    tj["added_tokens"].append({"id": next_id, "content": "<other_model_token>", "single_word": False,
                               "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (base / "tokenizer.json").write_text(json.dumps(tj))
    _refuse(sa2va, tiny, base, 5, tiny.ckpt.path, "400 rows", "401 tokens", "--base")
