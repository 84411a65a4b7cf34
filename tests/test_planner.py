"""The plan is plain data: these tests build it from shape-only (meta) tensors, no bytes at all."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sa2va_convert.errors import PlanError
from sa2va_convert.plan.keymap import load_builtin
from sa2va_convert.plan.planner import build_plan
from sa2va_convert.plan.types import PlanOptions
from sa2va_convert.write.safetensors_writer import SAFETENSORS
from sa2va_convert.plan.vocab import TokenizerState
from sa2va_convert.read.tensor_source import StateDictSource

H, V, R = 8, 20, 4
KM = load_builtin("sa2va-v1-internvl-qwen2")
P = "mllm.model.language_model.base_model.model."


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def base_tensors(layers=2):
    t = {
        "language_model.model.embed_tokens.weight": meta(V, H),
        "language_model.lm_head.weight": meta(V, H),
        "language_model.model.norm.weight": meta(H),
        "vision_model.embeddings.patch_embedding.weight": meta(4, 3, 2, 2),
        "mlp1.1.weight": meta(H, 16),
        "grounding_encoder.sam2_model.sam_mask_decoder.iou_token.weight": meta(1, 6),
        "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.g_weight": meta(6),
        "text_hidden_fcs.0.weight": meta(H, H),
        "text_hidden_fcs.2.weight": meta(6, H),
    }
    for i in range(layers):
        t[f"language_model.model.layers.{i}.self_attn.q_proj.weight"] = meta(H, H)
        t[f"language_model.model.layers.{i}.self_attn.q_proj.bias"] = meta(H)
        t[f"language_model.model.layers.{i}.mlp.down_proj.weight"] = meta(H, 2 * H)
    return t


def ckpt_tensors(rows=V, layers=2, r=R):
    t = {
        P + "model.embed_tokens.weight": meta(rows, H),
        P + "lm_head.weight": meta(rows, H),
        "mllm.model.mlp1.1.weight": meta(H, 16),
        "grounding_encoder.sam2_model.sam_mask_decoder.iou_token.weight": meta(1, 6),
        "text_hidden_fcs.0.weight": meta(H, H),
        "text_hidden_fcs.2.weight": meta(6, H),
    }
    for i in range(layers):
        t[P + f"model.layers.{i}.self_attn.q_proj.lora_A.default.weight"] = meta(r, H)
        t[P + f"model.layers.{i}.self_attn.q_proj.lora_B.default.weight"] = meta(H, r)
        t[P + f"model.layers.{i}.mlp.down_proj.lora_A.default.weight"] = meta(r, 2 * H)
        t[P + f"model.layers.{i}.mlp.down_proj.lora_B.default.weight"] = meta(H, r)
    return t


CODE = ["configuration_sa2va_chat.py", "modeling_sa2va_chat.py", "tokenizer.json", "tokenizer_config.json",
        "generation_config.json"]
BASE_CONFIG = {"architectures": ["Sa2VAChatModel"], "template": "qwen_chat", "llm_config": {"vocab_size": V},
               "tie_word_embeddings": True}


def embedded(alpha=2 * R, rslora=False, special=None, template=None):
    return SimpleNamespace(lora=SimpleNamespace(r=R, lora_alpha=alpha, use_rslora=rslora),
                           special_tokens=special, template=template)


def plan(ckpt=None, base=None, *, tok_len=V, options=PlanOptions(), emb=None, files=CODE, config=BASE_CONFIG):
    return build_plan(
        checkpoint=StateDictSource(ckpt if ckpt is not None else ckpt_tensors(), label="checkpoint", path=Path("iter_1.pth")),
        base=StateDictSource(base if base is not None else base_tensors(), label="base", path=Path("base")),
        base_config=config, base_files=files,
        tokenizer=TokenizerState(tok_len, {"[SEG]": tok_len - 1}, ("tokenizer.json",), "test"),
        keymap=KM, out=Path("out"), naming=SAFETENSORS.naming, options=options, embedded=emb if emb is not None else embedded(),
    )


def test_plan_sources_every_base_tensor_and_merges_lora():
    p = plan()
    by = p.by_name()
    assert set(by) == set(base_tensors())
    q = by["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert q.origin == "base+lora" and q.lora.scale == 2.0 and q.lora.rank == R
    assert by["language_model.model.layers.0.self_attn.q_proj.bias"].origin == "base"
    assert by["mlp1.1.weight"].value.key == "mllm.model.mlp1.1.weight"
    assert by["language_model.lm_head.weight"].origin == "checkpoint"
    assert by["vision_model.embeddings.patch_embedding.weight"].origin == "base"
    assert all(t.dtype == "bf16" for t in p.tensors)
    assert p.lora.alpha_source.startswith("embedded config")


def test_plan_writes_config_fields():
    cfg = plan().config
    assert cfg["architectures"] == ["Sa2VAChatModel"]
    assert cfg["auto_map"]["AutoModel"] == "modeling_sa2va_chat.Sa2VAChatModel"
    assert cfg["llm_config"]["vocab_size"] == V
    assert cfg["tie_word_embeddings"] is False and cfg["llm_config"]["tie_word_embeddings"] is False
    assert cfg["torch_dtype"] == "bfloat16"


def test_rslora_scale_and_alpha_flag_override():
    p = plan(emb=embedded(rslora=True))
    assert p.lora.scale_for(R) == pytest.approx(2 * R / R ** 0.5)
    # --lora-alpha is the fallback for a config without alpha; a different embedded value wins only
    # when the user says so by name
    with pytest.raises(PlanError, match="lora_alpha=8 but --lora-alpha gives 16.0"):
        plan(options=PlanOptions(lora_alpha=16.0))
    p = plan(options=PlanOptions(lora_alpha=16.0, override_lora_config=True))
    assert p.lora.scale_for(R) == 4.0 and p.lora.alpha_source == "--lora-alpha (--override-lora-config)"
    p = plan(options=PlanOptions(lora_alpha=8.0))
    assert p.lora.scale_for(R) == 2.0 and "same as --lora-alpha" in p.lora.alpha_source
    p = plan(emb=SimpleNamespace(lora=None, special_tokens=None, template=None), options=PlanOptions(lora_alpha=16.0))
    assert p.lora.scale_for(R) == 4.0 and p.lora.alpha_source == "--lora-alpha"


def test_missing_alpha_is_an_error_that_says_what_to_pass():
    with pytest.raises(PlanError) as e:
        plan(emb=SimpleNamespace(lora=None, special_tokens=None, template=None))
    assert "LoRA alpha is unknown" in e.value.message and "--lora-alpha 8" in e.value.hint


def test_unused_checkpoint_key_is_an_error_unless_allowed():
    ck = ckpt_tensors()
    ck["text_hidden_fcs.4.weight"] = meta(3, 3)
    with pytest.raises(PlanError) as e:
        plan(ck)
    assert "text_hidden_fcs.4.weight" in e.value.message and "--allow-unused" in e.value.hint
    p = plan(ck, options=PlanOptions(allow_unused=(r"text_hidden_fcs\.4",)))
    assert p.allowed_unused == ("text_hidden_fcs.4.weight",)


def test_shape_mismatch_lists_first_ten_and_count():
    base = base_tensors(layers=12)
    ck = ckpt_tensors(layers=12)
    for i in range(12):
        ck[P + f"model.layers.{i}.self_attn.q_proj.lora_A.default.weight"] = meta(R, H + 1)
    with pytest.raises(PlanError) as e:
        plan(ck, base)
    assert e.value.message.startswith("12 shape mismatch") and "(+2 more)" in e.value.message


def test_raw_model_base_is_refused_with_the_v2_trap_explained():
    base = {k: v for k, v in base_tensors().items() if not k.startswith(("grounding_encoder", "text_hidden_fcs"))}
    with pytest.raises(PlanError) as e:
        plan(base=base)
    assert "raw InternVL/Qwen-VL model" in e.value.message and "--base" in e.value.hint


def test_base_of_another_family_is_refused():
    with pytest.raises(PlanError) as e:
        plan(config={**BASE_CONFIG, "architectures": ["Sa2VAChatModelQwen"]})
    assert "Sa2VAChatModelQwen" in e.value.message


def test_missing_remote_code_in_base_is_refused():
    with pytest.raises(PlanError) as e:
        plan(files=["tokenizer.json"])
    assert "modeling_sa2va_chat.py" in e.value.message


def test_vocab_growth_adds_the_configs_special_tokens_in_order():
    p = plan(ckpt_tensors(rows=V + 2), tok_len=V, emb=embedded(special=["[SEG]", "<obj>", "<ref2>"]))
    assert p.tokenizer_additions.tokens == (("<obj>", V), ("<ref2>", V + 1))
    assert p.config["llm_config"]["vocab_size"] == V + 2
    assert "tokenizer.json" not in p.copy_files


def test_vocab_growth_without_matching_tokens_is_an_error():
    with pytest.raises(PlanError) as e:
        plan(ckpt_tensors(rows=V + 3), tok_len=V, emb=embedded(special=["<obj>"]))
    assert "3 more than the base tokenizer" in e.value.message


def test_vocab_smaller_than_tokenizer_is_an_error():
    with pytest.raises(PlanError):
        plan(ckpt_tensors(rows=V - 1), tok_len=V)


def test_shards_respect_max_size_and_keep_model_order():
    p = plan(options=PlanOptions(max_shard_bytes=400))
    assert len(p.shards) > 1
    names = [n for s in p.shards for n in s.tensors]
    assert names == [t.name for t in p.tensors]
    for s in p.shards:
        assert s.nbytes <= 400 or len(s.tensors) == 1
    assert p.shards[0].filename == f"model-00001-of-{len(p.shards):05d}.safetensors"


def test_dtype_auto_keeps_base_dtype_and_fp32_upcasts():
    base = {k: (meta(*v.shape, dtype=torch.float32)) for k, v in base_tensors().items()}
    p = plan(base=base, options=PlanOptions(dtype="auto"))
    by = p.by_name()
    assert by["vision_model.embeddings.patch_embedding.weight"].dtype == "fp32"
    assert by["text_hidden_fcs.0.weight"].dtype == "fp32"  # checkpoint bf16 lands in the base's fp32
    assert "torch_dtype" not in p.config or p.config["torch_dtype"] == BASE_CONFIG.get("torch_dtype")


def test_plan_is_deterministic_and_serialisable():
    import json

    a, b = plan().to_dict(), plan().to_dict()
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert a["estimates"]["disk_bytes"] > 0  # peak RAM is the write stage's estimate (test_convert checks it)


def test_two_checkpoint_keys_to_one_target_is_an_error():
    ck = ckpt_tensors()
    ck[P + "lm_head.base_layer.weight"] = meta(V, H)
    with pytest.raises(PlanError) as e:
        plan(ck)
    assert "two checkpoint keys map to one target" in e.value.message


def test_incomplete_lora_pair_is_an_error():
    ck = ckpt_tensors()
    del ck[P + "model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    with pytest.raises(PlanError) as e:
        plan(ck)
    assert "incomplete" in e.value.message
