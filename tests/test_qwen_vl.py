"""Qwen-VL family specifics: tied bases are untied, both tie flags false, processor files travel."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sa2va_convert.api import ConvertOptions, convert
from sa2va_convert.testing.fixtures import write_training_checkpoint

HEAD = "model.lm_head.weight"
EMB = "model.model.language_model.embed_tokens.weight"


def _tied_copy(base, dst):
    """The base as a tied Qwen model stores it: no lm_head tensor, tie_word_embeddings true."""
    shutil.copytree(base, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"].pop(HEAD)
    with safe_open(str(dst / shard), framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != HEAD}
    save_file(kept, str(dst / shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    cfg["text_config"]["tie_word_embeddings"] = True
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _tensor(out, name):
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(out / index[name]), framework="pt") as f:
        return f.get_tensor(name)


def test_tied_base_gets_an_explicit_head_from_the_fine_tune(base_cache, tmp_path):
    base = _tied_copy(base_cache("sa2va-qwen2_5-vl"), tmp_path / "tied")
    ck = write_training_checkpoint(tmp_path / "iter_1.pth", "sa2va-qwen2_5-vl")
    out = tmp_path / "out"
    res = convert(ck.path, out, ConvertOptions(roundtrip=False, base=base))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["text_config"]["tie_word_embeddings"] is False
    assert cfg["text_config"]["vocab_size"] == ck.vocab_rows
    assert cfg["auto_map"]["AutoModel"] == "modeling_sa2va_qwen.Sa2VAChatModelQwen"
    sd = torch.load(ck.path, weights_only=False)["state_dict"]
    want = sd["mllm.model.base_model.model.lm_head.modules_to_save.default.weight"]
    assert torch.equal(_tensor(out, HEAD), want)
    assert any("tied embeddings" in w for w in res.plan.warnings)


def test_tied_base_and_no_trained_head_copies_the_embedding(base_cache, tmp_path):
    base = _tied_copy(base_cache("sa2va-qwen3-vl"), tmp_path / "tied")
    ck = write_training_checkpoint(tmp_path / "iter_1.pth", "sa2va-qwen3-vl")
    obj = torch.load(ck.path, weights_only=False)
    del obj["state_dict"]["mllm.model.base_model.model.lm_head.modules_to_save.default.weight"]
    torch.save(obj, ck.path)
    out = tmp_path / "out"
    convert(ck.path, out, ConvertOptions(roundtrip=False, base=base))
    assert torch.equal(_tensor(out, HEAD), _tensor(out, EMB))


def test_processor_files_travel_with_the_tokenizer(base_cache, tmp_path):
    base = base_cache("sa2va-qwen2_5-vl")
    ck = write_training_checkpoint(tmp_path / "iter_1.pth", "sa2va-qwen2_5-vl")
    out = tmp_path / "out"
    convert(ck.path, out, ConvertOptions(roundtrip=False, base=base))
    extra = [p.name for p in base.iterdir() if "processor" in p.name or p.name == "chat_template.json"]
    assert extra, "the Qwen fixture base should carry processor files"
    for name in extra:
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert (out / "modeling_sa2va_qwen.py").exists()
