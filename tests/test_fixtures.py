"""The fixture generator: fast, deterministic, and faithful to FORMATS.md / DESIGN.md.

Other tests trust these fixtures to stand in for real Sa2VA checkpoints and
folders, so the checks here compare them with the documented facts (literal
key spellings from FORMATS.md §3, the layout and config fields of DESIGN.md),
not with the generator's own tables.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import pickle
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sa2va_convert.testing import (
    PRESETS,
    SA2VA_TOKENS,
    Sizes,
    find_remote_code,
    hf_layout,
    make_tiny_example,
    param_count,
    reference_output,
    sam2_layout,
    training_layout,
    training_name_to_hf,
    write_base_folder,
    write_sam2_checkpoint,
    write_training_checkpoint,
)
from sa2va_convert.testing.__main__ import main as fixtures_cli
from sa2va_convert.testing.values import make_tensor

TINY = Sizes.tiny()
ALL = list(PRESETS)


def _headers(folder: Path) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """name -> (shape, safetensors dtype, file) read from shard headers."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        header.pop("__metadata__", None)
        for k, v in header.items():
            out[k] = (tuple(v["shape"]), v["dtype"], f.name)
    return out


def _digest_tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------ base folder


@pytest.mark.parametrize("preset", ALL)
def test_base_folder_matches_layout_index_and_config(tmp_path, preset):
    t0 = time.perf_counter()
    base = write_base_folder(tmp_path / "base", preset, max_shard_bytes=150_000)
    assert time.perf_counter() - t0 < 10
    layout = hf_layout(preset, TINY)
    headers = _headers(base)
    index = json.loads((base / "model.safetensors.index.json").read_text())

    assert list(headers) != [] and set(headers) == set(layout)
    assert set(index["weight_map"]) == set(layout)
    assert len({f for _, _, f in headers.values()}) > 1, "expected several shards"
    for name, (shape, dt, fname) in headers.items():
        assert shape == layout[name], name
        assert dt == "BF16"
        assert index["weight_map"][name] == fname
    assert index["metadata"]["total_size"] == 2 * param_count(layout)
    # shards follow layout order, like save_pretrained
    assert [index["weight_map"][k] for k in layout] == sorted(index["weight_map"][k] for k in layout)

    cfg = json.loads((base / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    dims = {"C": TINY.sam_c, "Ds": TINY.sam_ds, "blocks": TINY.sam_blocks, "image_size": TINY.sam_image_size}
    if PRESETS[preset].grounding == "sam3":  # the SAM3 stand-in also records its ViT's patch grid and MLP width
        assert cfg["sam3_test_config"] == {**dims, "patch": 8, "pos_grid": 8, "mlp": int(TINY.sam_c * 4.625)}
        assert "sam2_test_config" not in cfg
    else:
        assert cfg["sam2_test_config"] == dims
    if PRESETS[preset].layout == "llava":
        assert cfg["architectures"] == ["Sa2VAChatModelLlava"] and cfg["template"] == "vicuna"
        assert cfg["auto_map"]["AutoModel"] == "modeling_sa2va_llava.Sa2VAChatModelLlava"
        assert cfg["text_config"]["vocab_size"] == layout["model.lm_head.weight"][0] == TINY.vocab
        assert cfg["vision_config"]["model_type"] == "clip_vision_model"
        assert any(k.startswith("model.model.vision_tower.vision_model.") for k in layout)
        assert not any(k.endswith("self_attn.q_proj.bias") and "language_model" in k for k in layout)  # Llama
    elif PRESETS[preset].layout == "qwen-vl":
        assert cfg["architectures"] == ["Sa2VAChatModelQwen"]
        assert cfg["auto_map"]["AutoModel"] == "modeling_sa2va_qwen.Sa2VAChatModelQwen"
        assert cfg["auto_map"]["AutoConfig"] == "configuration_sa2va_chat.Sa2VAChatConfigQwen"
        assert cfg["text_config"]["vocab_size"] == layout["model.lm_head.weight"][0] == TINY.vocab
        assert cfg["text_config"]["tie_word_embeddings"] is False
        assert any(k.startswith("model.model.visual.") for k in layout)
    else:
        assert cfg["architectures"] == ["Sa2VAChatModel"] and cfg["model_type"] == "sa2va_chat"
        assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_sa2va_chat.Sa2VAChatModel"
        assert cfg["template"] == PRESETS[preset].template
        assert cfg["llm_config"]["vocab_size"] == TINY.vocab
        assert cfg["llm_config"]["architectures"]
        assert cfg["vision_config"]["hidden_size"] == TINY.vision_hidden
        head = "language_model.output.weight" if PRESETS[preset].llm == "internlm2" \
            else "language_model.lm_head.weight"
        assert layout[head] == (TINY.vocab, TINY.hidden)
    assert json.loads((base / "generation_config.json").read_text())["eos_token_id"]


def test_internvl_layout_spells_design_md_keys():
    qwen = hf_layout("sa2va-1b", TINY)
    lm2 = hf_layout("sa2va-8b", TINY)
    H, hd = TINY.hidden, TINY.head_dim
    for key in (
        "vision_model.embeddings.class_embedding", "vision_model.encoder.layers.1.ls2",
        "mlp1.0.weight", "mlp1.1.weight", "mlp1.3.bias",
        "language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
        "language_model.model.layers.1.self_attn.k_proj.bias",
        "language_model.model.layers.0.mlp.down_proj.weight",
        "grounding_encoder.sam2_model.memory_encoder.fuser.layers.1.g_weight",
        "grounding_encoder.sam2_model.maskmem_tpos_enc",
        "grounding_encoder.sam2_model.sam_mask_decoder.iou_prediction_head.layers.2.weight",
        "text_hidden_fcs.0.weight", "text_hidden_fcs.2.bias",
    ):
        assert key in qwen, key
    assert qwen["mlp1.1.weight"] == (H, 4 * TINY.vision_hidden)
    assert qwen["grounding_encoder.sam2_model.maskmem_tpos_enc"] == (7, 1, 1, 64)
    assert qwen["text_hidden_fcs.2.weight"] == (TINY.sam_ds, H)
    assert "language_model.model.layers.0.self_attn.o_proj.bias" not in qwen
    assert lm2["language_model.model.layers.0.attention.wqkv.weight"] == (
        (TINY.heads + 2 * TINY.kv_heads) * hd, H)
    assert "language_model.model.tok_embeddings.weight" in lm2
    assert not any(".gamma" in k for k in qwen)


def test_raw_internvl_folder(tmp_path):
    from transformers import AutoTokenizer

    base = write_base_folder(tmp_path / "raw", "sa2va-1b", raw_internvl=True)
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["model_type"] == "internvl_chat" and cfg["architectures"] == ["InternVLChatModel"]
    assert "sam2_test_config" not in cfg
    headers = _headers(base)
    assert not any(k.startswith(("grounding_encoder.", "text_hidden_fcs.")) for k in headers)
    rows = headers["language_model.model.embed_tokens.weight"][0][0]
    assert rows == cfg["llm_config"]["vocab_size"] == TINY.vocab - len(SA2VA_TOKENS)
    tok = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    assert len(tok) == rows
    assert "[SEG]" not in tok.get_vocab()
    assert not list(base.glob("*.py")), "raw folders get remote code only when asked"
    with pytest.raises(ValueError):
        hf_layout("sa2va-qwen2_5-vl", TINY, raw_internvl=True)


def test_remote_code_is_copied_from_the_given_or_default_folder(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "modeling_sa2va_chat.py").write_text("# ours\n")
    (code / "__init__.py").write_text("")
    base = write_base_folder(tmp_path / "a", "sa2va-1b", remote_code_dir=code)
    assert sorted(p.name for p in base.glob("*.py")) == ["modeling_sa2va_chat.py"]
    bare = write_base_folder(tmp_path / "b", "sa2va-1b", remote_code_dir=code, copy_remote_code=False)
    assert not list(bare.glob("*.py"))
    for preset in ("sa2va-1b", "sa2va-qwen3-vl"):
        default = find_remote_code(preset)
        if default is not None:  # our test models, once they exist
            base = write_base_folder(tmp_path / preset, preset)
            shared = default.parent / "shared"
            names = sorted(p.name for d in (default, shared) for p in d.glob("*.py") if p.name != "__init__.py")
            assert sorted(p.name for p in base.glob("*.py")) == names


# -------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("raw", [False, True])
def test_tokenizer_loads_and_matches_embedding_rows(tmp_path, raw):
    from transformers import AutoTokenizer

    base = write_base_folder(tmp_path / "b", "sa2va-1b", raw_internvl=raw)
    tok = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    rows = _headers(base)["language_model.model.embed_tokens.weight"][0][0]
    assert len(tok) == rows
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    vocab = tok.get_vocab()
    # InternVL's tokens then Sa2VA's, in DESIGN.md's order, at the end
    order = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
             "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
    if not raw:
        order += ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
    assert [vocab[t] for t in order] == list(range(rows - len(order), rows))
    for text in ("<image>Please segment the blood vessel.", "Sure, [SEG].",
                 "<|im_start|>user\nCan you segment the dog?<|im_end|>", "naïve café 🙂"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    if not raw:
        ids = tok("Sure, [SEG].", add_special_tokens=False)["input_ids"]
        assert vocab["[SEG]"] in ids and len(ids) <= 6
        assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


# ------------------------------------------------------------ training checkpoint

V1_QWEN_LITERAL = [
    "mllm.model.language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
    "mllm.model.language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
    "mllm.model.language_model.base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight",
    "mllm.model.language_model.base_model.model.model.embed_tokens.weight",
    "mllm.model.language_model.base_model.model.lm_head.weight",
    "mllm.model.mlp1.0.weight", "mllm.model.mlp1.0.bias", "mllm.model.mlp1.1.weight",
    "mllm.model.mlp1.1.bias", "mllm.model.mlp1.3.weight", "mllm.model.mlp1.3.bias",
    "grounding_encoder.sam2_model.sam_mask_decoder.mask_tokens.weight",
    "grounding_encoder.sam2_model.sam_mask_decoder.output_hypernetworks_mlps.3.layers.2.bias",
    "text_hidden_fcs.0.weight", "text_hidden_fcs.0.bias",
    "text_hidden_fcs.2.weight", "text_hidden_fcs.2.bias",
]
LITERAL_KEYS = {
    "sa2va-1b": V1_QWEN_LITERAL,
    "sa2va-4b": V1_QWEN_LITERAL,
    "sa2va-8b": [
        "mllm.model.language_model.base_model.model.model.layers.0.attention.wqkv.lora_A.default.weight",
        "mllm.model.language_model.base_model.model.model.layers.0.attention.wo.lora_B.default.weight",
        "mllm.model.language_model.base_model.model.model.layers.1.feed_forward.w1.lora_A.default.weight",
        "mllm.model.language_model.base_model.model.model.layers.1.feed_forward.w2.lora_A.default.weight",
        "mllm.model.language_model.base_model.model.model.layers.1.feed_forward.w3.lora_B.default.weight",
        "mllm.model.language_model.base_model.model.model.tok_embeddings.weight",
        "mllm.model.language_model.base_model.model.output.base_layer.weight",
        "mllm.model.language_model.base_model.model.output.lora_A.default.weight",
        "mllm.model.language_model.base_model.model.output.lora_B.default.weight",
        "mllm.model.mlp1.1.weight", "text_hidden_fcs.2.weight",
    ],
    "sa2va-internvl3": [
        "mllm.model.language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "mllm.model.language_model.base_model.model.model.embed_tokens.modules_to_save.default.weight",
        "mllm.model.language_model.base_model.model.lm_head.modules_to_save.default.weight",
        "mllm.model.mlp1.3.weight",
    ],
    "sa2va-qwen2_5-vl": [
        "mllm.model.base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "mllm.model.base_model.model.model.language_model.layers.1.mlp.gate_proj.lora_B.default.weight",
        "mllm.model.base_model.model.lm_head.modules_to_save.default.weight",
        "mllm.model.base_model.model.model.language_model.embed_tokens.modules_to_save.default.weight",
        "grounding_encoder.sam2_model.sam_mask_decoder.iou_token.weight", "text_hidden_fcs.0.bias",
    ],
}
LITERAL_KEYS["sa2va-qwen3-vl"] = LITERAL_KEYS["sa2va-qwen2_5-vl"]
# SAM3 (upstream sam3_train.py keeps the tracker as `sam2_model`; Sa2VAModel.state_dict keeps its mask decoder)
LITERAL_KEYS["sa2va-qwen3-vl-sam3"] = LITERAL_KEYS["sa2va-qwen2_5-vl"]
# LLaVA (projects/sa2va/models/mllm/llava.py): PEFT wraps the whole LlavaForConditionalGeneration
LITERAL_KEYS["sa2va-llava-1.5"] = LITERAL_KEYS["sa2va-qwen2_5-vl"]


@pytest.mark.parametrize("preset", ALL)
def test_checkpoint_is_mmengine_shaped_with_formats_md_keys(tmp_path, preset):
    from mmengine.logging import HistoryBuffer

    t0 = time.perf_counter()
    fx = write_training_checkpoint(tmp_path / "iter_100.pth", preset)
    assert time.perf_counter() - t0 < 10
    obj = _load(fx.path)
    assert set(obj) == {"state_dict", "meta", "message_hub", "param_schedulers"}
    sd = obj["state_dict"]
    for key in LITERAL_KEYS[preset]:
        assert key in sd, key
    assert list(sd) == list(fx.keys) == list(training_layout(preset, TINY))
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    # never in a checkpoint: vision encoder, frozen base weights, SAM2 outside the decoder
    assert not any("vision_model" in k or ".visual." in k for k in sd)
    assert not any(k.endswith(("norm.weight", "layernorm.weight")) and "mllm" in k for k in sd)
    sam = [k for k in sd if k.startswith("grounding_encoder.")]
    assert sam and all(k.startswith("grounding_encoder.sam2_model.sam_mask_decoder.") for k in sam)
    if PRESETS[preset].layout != "internvl":
        assert not any("mlp1" in k for k in sd)
    if preset != "sa2va-8b":
        assert not any(".base_layer." in k for k in sd)
    rows = sd[[k for k in sd if "embed_tokens" in k or "tok_embeddings" in k][0]].shape[0]
    assert rows == TINY.vocab
    # LoRA factor shapes: A [r, in], B [out, r]
    r = TINY.lora_r
    for k, t in sd.items():
        if ".lora_A." in k:
            b = sd[k.replace(".lora_A.", ".lora_B.")]
            assert t.shape[0] == r and b.shape[1] == r
            assert torch.count_nonzero(b) > 0, "B must be non-zero by default"

    hub = obj["message_hub"]
    assert isinstance(hub["log_scalars"]["train/loss"], HistoryBuffer)
    assert type(hub["runtime_info"]["seed"]).__module__ == "numpy"
    meta = obj["meta"]
    assert meta["iter"] == 100 and meta["mmengine_version"] == "0.10.7"
    cfg = meta["cfg"]
    tree = ast.parse(cfg)
    top = [n.targets[0].id for n in tree.body]
    assert top == sorted(top)
    assert "import" not in cfg
    for needle in ("type='peft.LoraConfig'", f"r={r},", f"lora_alpha={TINY.lora_alpha},",
                   "runner_type = 'FlexibleRunner'", "type='xtuner.engine.DeepSpeedStrategy'",
                   f"prompt_template = 'xtuner.utils.PROMPT_TEMPLATE.{PRESETS[preset].template}'",
                   f"template = '{PRESETS[preset].template}'",
                   "special_tokens = ['[SEG]', '<p>', '</p>', '<vp>', '</vp>']", "launcher = ",
                   "work_dir = "):
        assert needle in cfg, needle
    assert "use_rslora" not in cfg
    if PRESETS[preset].version == "v2":
        assert "pretrained_pth = './" in cfg
    else:
        assert "pretrained_pth = None" in cfg
    # what a safe loader is up against: torch's default refuses the file
    with pytest.raises(pickle.UnpicklingError):
        torch.load(fx.path)


def test_every_training_key_meets_the_hf_layout():
    """The two hand-written layouts agree through FORMATS.md's renaming rules."""
    for preset in ALL:
        hf = hf_layout(preset, TINY)
        for key, shape in training_layout(preset, TINY, include_frozen_sam2=True).items():
            name = training_name_to_hf(key)
            for dec in (".lora_A.default.weight", ".lora_B.default.weight"):
                if name.endswith(dec):
                    name = name[: -len(dec)] + ".weight"
            assert name in hf, (preset, key)
            if ".lora_" not in key:
                assert hf[name] == shape, (preset, key)


def test_checkpoint_options(tmp_path):
    fx = write_training_checkpoint(
        tmp_path / "a.pth", "sa2va-internvl3", lora_r=8, lora_alpha=32, use_rslora=True,
        extra_tokens=("<obj>", "</obj>"), zero_lora_b=True, include_frozen_sam2=True,
    )
    assert fx.scale == pytest.approx(32 / math.sqrt(8))
    assert fx.vocab_rows == TINY.vocab + 2
    obj = _load(fx.path)
    sd = obj["state_dict"]
    assert sd["mllm.model.language_model.base_model.model.model.embed_tokens.modules_to_save.default.weight"
              ].shape == (TINY.vocab + 2, TINY.hidden)
    assert sd["mllm.model.language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
              ].shape == (8, TINY.hidden)
    assert all(torch.count_nonzero(t) == 0 for k, t in sd.items() if ".lora_B." in k)
    assert "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.gamma" in sd
    assert not any("g_weight" in k for k in sd)
    cfg = obj["meta"]["cfg"]
    assert "use_rslora=True" in cfg and "r=8," in cfg and "lora_alpha=32," in cfg
    assert "'<obj>', '</obj>']" in cfg

    plain = write_training_checkpoint(tmp_path / "b.pth", "sa2va-1b", fmt="state_dict")
    assert list(_load(plain.path)) == list(plain.keys)

    nocfg = write_training_checkpoint(tmp_path / "c.pth", "sa2va-1b", config_text=False)
    assert "cfg" not in _load(nocfg.path)["meta"]

    ds = write_training_checkpoint(tmp_path / "iter_5.pth" / "mp_rank_00_model_states.pt",
                                   "sa2va-8b", fmt="deepspeed-module", iteration=5)
    obj = _load(ds.path)
    for key in ("module", "buffer_names", "param_shapes", "frozen_param_shapes", "shared_params",
                "ds_config", "ds_version", "global_steps", "dp_world_size",
                "meta", "message_hub", "param_schedulers"):
        assert key in obj, key
    assert list(obj["module"]) == list(ds.keys)
    assert obj["param_shapes"][0][ds.keys[0]] == obj["module"][ds.keys[0]].shape
    assert obj["global_steps"] == 5 and obj["meta"]["iter"] == 5


# ------------------------------------------------------------------- reference


def test_reference_merge_equals_hand_computation(tmp_path):
    base = write_base_folder(tmp_path / "base", "sa2va-1b")
    fx = write_training_checkpoint(tmp_path / "iter_1.pth", "sa2va-1b", base_dir=base)
    ref = dict(reference_output(base, fx.path, scale=fx.scale))
    assert fx.scale == 2.0
    assert set(ref) == set(hf_layout("sa2va-1b", TINY))
    assert all(t.dtype == torch.float32 for t in ref.values())

    sd = _load(fx.path)["state_dict"]
    pre = "mllm.model.language_model.base_model.model.model.layers.1.self_attn.v_proj"
    with safe_open(str(next(base.glob("*.safetensors"))), "pt") as f:
        w = f.get_tensor("language_model.model.layers.1.self_attn.v_proj.weight").float()
        bias = f.get_tensor("language_model.model.layers.1.self_attn.v_proj.bias").float()
        vision = f.get_tensor("vision_model.encoder.layers.0.attn.qkv.weight").float()
    a, b = sd[f"{pre}.lora_A.default.weight"].float(), sd[f"{pre}.lora_B.default.weight"].float()
    expected = w + 2.0 * (b @ a)
    got = ref["language_model.model.layers.1.self_attn.v_proj.weight"]
    assert torch.allclose(got, expected, atol=1e-6)
    assert (got - w).abs().max() > 1e-3, "the delta must be far above bf16 rounding"
    assert torch.equal(ref["language_model.model.layers.1.self_attn.v_proj.bias"], bias)
    assert torch.equal(ref["vision_model.encoder.layers.0.attn.qkv.weight"], vision)
    assert torch.equal(ref["language_model.lm_head.weight"],
                       sd["mllm.model.language_model.base_model.model.lm_head.weight"].float())
    assert torch.equal(ref["text_hidden_fcs.2.bias"], sd["text_hidden_fcs.2.bias"].float())


def test_reference_internlm2_head_is_trained_base_layer_plus_delta(tmp_path):
    base = write_base_folder(tmp_path / "base", "sa2va-8b")
    fx = write_training_checkpoint(tmp_path / "c.pth", "sa2va-8b", lora_r=2, lora_alpha=6,
                                   include_frozen_sam2=True)
    ref = dict(reference_output(base, fx.path, scale=fx.scale))
    sd = _load(fx.path)["state_dict"]
    pre = "mllm.model.language_model.base_model.model.output"
    expected = sd[f"{pre}.base_layer.weight"].float() + 3.0 * (
        sd[f"{pre}.lora_B.default.weight"].float() @ sd[f"{pre}.lora_A.default.weight"].float())
    assert torch.allclose(ref["language_model.output.weight"], expected, atol=1e-6)
    g = "grounding_encoder.sam2_model.memory_encoder.fuser.layers.1"
    assert torch.equal(ref[f"{g}.g_weight"], sd[f"{g}.gamma"].float())
    assert not any(k.endswith(".gamma") for k in ref)


def test_reference_raw_internvl_with_sam2_checkpoint(tmp_path):
    raw = write_base_folder(tmp_path / "raw", "sa2va-1b", raw_internvl=True)
    sam = write_sam2_checkpoint(tmp_path / "sam2_hiera_large.pt")
    fx = write_training_checkpoint(tmp_path / "c.pth", "sa2va-1b")
    ref = dict(reference_output(raw, fx.path, scale=fx.scale, sam2_checkpoint=sam))
    assert set(ref) == set(hf_layout("sa2va-1b", TINY))
    assert ref["language_model.model.embed_tokens.weight"].shape[0] == TINY.vocab
    sam_sd = _load(sam)["model"]
    assert torch.equal(ref["grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.g_weight"],
                       sam_sd["memory_encoder.fuser.layers.0.gamma"])
    dec = "grounding_encoder.sam2_model.sam_mask_decoder.iou_token.weight"
    assert torch.equal(ref[dec], _load(fx.path)["state_dict"][dec].float())


def test_sam2_checkpoint_uses_sam2_names_and_base_values(tmp_path):
    sam = write_sam2_checkpoint(tmp_path / "sam2.pt")
    sd = _load(sam)["model"]
    assert list(sd) == list(sam2_layout(TINY, training_names=True))
    assert "memory_encoder.fuser.layers.1.gamma" in sd and not any("g_weight" in k for k in sd)
    assert all(t.dtype == torch.float32 for t in sd.values())
    base = write_base_folder(tmp_path / "base", "sa2va-4b")
    ref = dict(reference_output(base, write_training_checkpoint(
        tmp_path / "c.pth", "sa2va-4b", fmt="state_dict").path, scale=2.0))
    k = "image_encoder.trunk.blocks.1.attn.qkv.weight"
    assert torch.equal(ref["grounding_encoder.sam2_model." + k], sd[k].to(torch.bfloat16).float())


# ------------------------------------------------------------------ determinism


def test_same_seed_gives_byte_identical_files(tmp_path):
    import shutil

    trees = []
    root = tmp_path / "run"  # same place twice: the config text names the work dir
    for _ in range(2):
        shutil.rmtree(root, ignore_errors=True)
        write_base_folder(root / "base", "sa2va-8b", max_shard_bytes=100_000)
        write_training_checkpoint(root / "ck" / "iter_100.pth", "sa2va-8b")
        write_training_checkpoint(root / "ck" / "ds.pt", "sa2va-qwen3-vl", fmt="deepspeed-module")
        write_sam2_checkpoint(root / "ck" / "sam2.pt")
        trees.append(_digest_tree(root))
    assert trees[0] == trees[1]
    other = write_base_folder(tmp_path / "other", "sa2va-8b", max_shard_bytes=100_000, seed=5)
    digests = _digest_tree(other)
    shards = [k for k in digests if k.endswith(".safetensors")]
    assert all(digests[s] != trees[0]["base/" + s] for s in shards)
    assert digests["tokenizer.json"] == trees[0]["base/tokenizer.json"]


def test_fast_fill_is_deterministic_and_varied():
    a = make_tensor("x.weight", (300, 70), "bf16", seed=3, fill="fast")
    b = make_tensor("x.weight", (300, 70), "bf16", seed=3, fill="fast")
    c = make_tensor("y.weight", (300, 70), "bf16", seed=3, fill="fast")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.float().std() > 0.01
    n = make_tensor("m.norm.weight", (64,), "fp32", seed=0)
    assert 0.9 < n.mean() < 1.1


# --------------------------------------------------------------- demo and sizes


def test_tiny_example_tree(tmp_path):
    ex = make_tiny_example(tmp_path / "demo", "sa2va-4b")
    assert ex.base_dir == (tmp_path / "demo" / "base").resolve()
    assert ex.checkpoint.path == ex.work_dir / "iter_100.pth"
    last = ex.last_checkpoint.read_text().strip()
    assert Path(last).is_absolute() and Path(last) == ex.checkpoint.path
    assert len(list(ex.base_dir.glob("*.safetensors"))) >= 3
    meta_cfg = _load(ex.checkpoint.path)["meta"]["cfg"]
    assert ex.config_file.read_text() == meta_cfg
    assert f"path = '{ex.base_dir}'" in meta_cfg


def test_cli_writes_tiny_fixtures(tmp_path, capsys):
    assert fixtures_cli(["tiny-example", str(tmp_path / "ex"), "--preset", "sa2va-qwen2_5-vl"]) == 0
    assert (tmp_path / "ex" / "base" / "model.safetensors.index.json").exists()
    assert fixtures_cli(["generate", "--preset", "sa2va-internvl3", "--sizes", "tiny",
                         "--out", str(tmp_path / "gen"), "--fill", "fast"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint\t" in out and (tmp_path / "gen" / "work_dirs" / "exp" / "last_checkpoint").exists()


@pytest.mark.parametrize("name,low,high", [
    ("sa2va-1b", 1.0e9, 1.35e9),
    ("sa2va-4b", 3.6e9, 4.3e9),
    ("sa2va-8b", 7.8e9, 8.7e9),
    ("sa2va-26b", 24.5e9, 27e9),
    ("sa2va-qwen2_5-vl", 3.8e9, 4.5e9),
])
def test_real_sizes_are_in_the_expected_ballpark(name, low, high):
    s = Sizes.real(name)
    layout = hf_layout(name, s)
    assert low < param_count(layout) < high
    sam = param_count(sam2_layout(s))
    assert 0.21e9 < sam < 0.24e9, "SAM2 Hiera-Large is about 224 M parameters"
    if name in ("sa2va-1b", "sa2va-4b", "sa2va-8b"):
        vit = param_count({k: v for k, v in layout.items() if k.startswith("vision_model.")})
        assert 0.28e9 < vit < 0.32e9, "InternViT-300M"
    # the checkpoint is a fraction of the model: LoRA, embeddings, heads, decoder
    train = param_count(training_layout(name, s))
    assert 0.05 < train / param_count(layout) < 0.35


def test_real_sizes_4b_shapes():
    s = Sizes.real("sa2va-4b")
    layout = hf_layout("sa2va-4b", s)
    assert layout["language_model.model.layers.35.self_attn.k_proj.weight"] == (256, 2048)
    assert layout["language_model.model.layers.0.mlp.gate_proj.weight"] == (11008, 2048)
    assert layout["vision_model.embeddings.position_embedding"] == (1, 1025, 1024)
    assert layout["language_model.lm_head.weight"][0] >= 151674
    assert layout["grounding_encoder.sam2_model.sam_mask_decoder.mask_tokens.weight"] == (4, 256)


def test_real_sizes_of_the_2026_families():
    """Sa2VA-LLaVA-1.5-7B (CLIP-L/336 + Vicuna-7B, 32007 rows) and Sa2VA-Qwen3-VL-4B-SAM3 (SAM3's
    1024-wide, 32-block ViT instead of SAM2's Hiera-L)."""
    from sa2va_convert.testing.layouts import sam3_layout

    llava = Sizes.real("sa2va-llava-1.5-7b")
    layout = hf_layout("sa2va-llava-1.5-7b", llava)
    assert layout["model.model.language_model.embed_tokens.weight"] == (32007, 4096)
    assert 7.0e9 < param_count(layout) < 7.6e9
    clip = param_count({k: v for k, v in layout.items() if ".vision_tower." in k})
    assert 0.29e9 < clip < 0.32e9, "CLIP ViT-L/14-336"
    sam3 = Sizes.real("sa2va-qwen3-vl-4b-sam3")
    vit = param_count({k: v for k, v in sam3_layout(sam3).items() if k.startswith("backbone.vision_backbone.trunk.")})
    assert 0.42e9 < vit < 0.47e9, "SAM3's ViT (1024 wide, 32 blocks, MLP 4.625x)"
    assert sam3_layout(sam3)["backbone.vision_backbone.trunk.pos_embed"] == (1, 24 * 24 + 1, 1024)
