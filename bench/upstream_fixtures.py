"""Tiny Sa2VA base folders that carry the REAL upstream remote code (random weights), with a training
checkpoint for each: what ``bench/upstream_check.py`` converts and round-trips in users' environments.

    python bench/upstream_fixtures.py --upstream SA2VA_CHECKOUT --out DIR [internvl-qwen2 internvl-internlm2 qwen25vl]

SA2VA_CHECKOUT is a clone of github.com/bytedance/Sa2VA (or a bare mirror: its HEAD is read with
``git archive``). This repository ships no upstream code: the ``*.py`` files are copied from that checkout
into DIR/<family>/base at run time. The model is the upstream class itself, instantiated through
``get_class_from_dynamic_module`` and filled with small random values (upstream never calls ``post_init``),
in bf16, saved with ``save_pretrained`` (shards under 200 MB). The tokenizer, the training checkpoint
(real mmengine objects, LoRA on the language model, the mask decoder and ``text_hidden_fcs`` trained)
and its config text come from ``sa2va_convert.testing``. Needs torch, transformers 4.x, peft, timm,
torchvision and mmengine-lite in the running interpreter (e.g. upstream's ``latest`` environment:
torch 2.6.0, transformers 4.57.0, peft 0.17.1). About 450 MB per family; most of it is SAM2 Hiera-L,
which upstream hard-wires.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from unittest import mock

import torch
from torch import nn

# set by main() from the command line
MIRROR = ""
SRC = Path()
FIX = Path()
SEED = 1234
LORA_R, LORA_ALPHA = 8, 16
ITER = 10

FAMILIES = {
    "internvl-qwen2": dict(code="projects/sa2va/hf/models", preset="sa2va-1b", llm="Qwen2ForCausalLM",
                           template="qwen_chat"),
    "internvl-internlm2": dict(code="projects/sa2va/hf/models", preset="sa2va-8b", llm="InternLM2ForCausalLM",
                               template="internlm2_chat"),
    "qwen25vl": dict(code="projects/sa2va/hf/models_qwen2_5_vl", preset="sa2va-qwen2_5-vl", llm="qwen25vl",
                     template="qwen_chat"),
}

QWEN_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Qwen2.5-VL's chat template (the processor's; public HF data, used by processor.apply_chat_template)
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def log(*a):
    print("[build]", *a, flush=True)


# --------------------------------------------------------------------------- upstream code
def extract_upstream() -> str:
    commit = subprocess.check_output(["git", "-C", MIRROR, "rev-parse", "HEAD"], text=True).strip()
    if not (SRC / "projects/sa2va/hf/models/modeling_sa2va_chat.py").exists():
        SRC.mkdir(parents=True, exist_ok=True)
        p1 = subprocess.Popen(["git", "-C", MIRROR, "archive", "HEAD", "projects/sa2va/hf"], stdout=subprocess.PIPE)
        subprocess.check_call(["tar", "-x", "-C", str(SRC)], stdin=p1.stdout)
        p1.wait()
    return commit


def copy_code(code_dir: str, dst: Path) -> list[str]:
    files = sorted(p.name for p in (SRC / code_dir).glob("*.py"))
    for f in files:
        shutil.copy2(SRC / code_dir / f, dst / f)
    return files


def no_flash_attn_imports():
    """FORMATS §5: upstream InternVL code needs flash_attn importable unless filtered out."""
    import transformers.dynamic_module_utils as dmu

    orig = dmu.get_imports

    def patched(filename):
        return [i for i in orig(filename) if i != "flash_attn"]

    return mock.patch.object(dmu, "get_imports", patched)


# --------------------------------------------------------------------------- tokenizer
def write_tok(base: Path, family: str, bpe_vocab: int = 1000) -> int:
    """The project's test tokenizer (+ Qwen-VL vision tokens for the Qwen family). Returns len."""
    from sa2va_convert.testing.tokenizer import build_tokenizer, special_tokens, write_tokenizer

    if family != "qwen25vl":
        write_tokenizer(base, bpe_vocab)
    else:
        from tokenizers import AddedToken

        tok = build_tokenizer(bpe_vocab)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_VL_TOKENS])
        tok.save(str(base / "tokenizer.json"))
        specials = special_tokens(True) + QWEN_VL_TOKENS
        extra = [t for t in specials if t not in ("<|endoftext|>", "<|im_end|>")]
        cfg = {
            "added_tokens_decoder": {
                str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for t in specials},
            "additional_special_tokens": extra, "bos_token": None, "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>", "model_max_length": 32768, "pad_token": "<|endoftext|>",
            "padding_side": "right", "split_special_tokens": False,
            "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": None,
            "chat_template": QWEN25VL_CHAT_TEMPLATE,
        }
        (base / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (base / "special_tokens_map.json").write_text(json.dumps(
            {"additional_special_tokens": extra, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
            indent=2) + "\n")
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(base)
    need = ["<IMG_CONTEXT>", "<img>", "</img>", "[SEG]", "<p>", "</p>", "<vp>", "</vp>", "<|im_end|>",
            "<|endoftext|>", "<|im_start|>"]
    if family == "qwen25vl":
        need += list(QWEN_VL_TOKENS)
    for w in need:
        ids = t.encode(w, add_special_tokens=False)
        assert len(ids) == 1, (w, ids)
    return len(t)


# --------------------------------------------------------------------------- configs
def tiny_llm_config(arch: str, vocab: int) -> dict:
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="bfloat16")
    if arch == "Qwen2ForCausalLM":
        return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1000000.0,
                    hidden_act="silu", use_sliding_window=False, sliding_window=None, max_window_layers=2,
                    bos_token_id=None, eos_token_id=None, **common)
    if arch == "InternLM2ForCausalLM":
        return dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", rope_theta=1000000,
                    hidden_act="silu", bias=False, attn_implementation="eager",
                    auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                              "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                              "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
                    bos_token_id=1, eos_token_id=2, pad_token_id=2, **common)
    raise ValueError(arch)


def tiny_vit_config() -> dict:
    # image 448 / patch 14 / downsample 0.5 -> 256 tokens per tile: predict_forward hard-codes these
    return dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", image_size=448, patch_size=14,
                hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                qkv_bias=True, qk_normalization=False, norm_type="layer_norm", layer_norm_eps=1e-6,
                use_flash_attn=False, hidden_act="gelu", drop_path_rate=0.0, initializer_factor=1.0,
                torch_dtype="bfloat16")


def internvl_config_json(family: str, vocab: int) -> dict:
    f = FAMILIES[family]
    return dict(
        architectures=["Sa2VAChatModel"],
        auto_map={"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
                  "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
                  "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel"},
        model_type="sa2va_chat", template=f["template"], llm_config=tiny_llm_config(f["llm"], vocab),
        vision_config=tiny_vit_config(), downsample_ratio=0.5, dynamic_image_size=True, force_image_size=448,
        max_dynamic_patch=12, min_dynamic_patch=1, ps_version="v2", select_layer=-1, use_thumbnail=True,
        use_backbone_lora=0, use_llm_lora=0, pad2square=False, tie_word_embeddings=False, torch_dtype="bfloat16",
    )


def qwen25vl_config_json(tok, vocab: int) -> dict:
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VL_TOKENS}
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_theta=1000000.0, hidden_act="silu", use_sliding_window=False, sliding_window=32768,
                max_window_layers=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                tie_word_embeddings=False, model_type="qwen2_5_vl_text", torch_dtype="bfloat16",
                bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                  in_chans=3, hidden_act="silu", model_type="qwen2_5_vl", torch_dtype="bfloat16")
    return dict(
        architectures=["Sa2VAChatModelQwen"],
        auto_map={"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigQwen",
                  "AutoModel": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
                  "AutoModelForCausalLM": "modeling_sa2va_qwen.Sa2VAChatModelQwen"},
        model_type="sa2va_chat", template="qwen_chat", text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"],
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )


def write_qwen_processor(base: Path) -> None:
    pre = {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "max_pixels": 12845056, "merge_size": 2,
        "min_pixels": 3136, "patch_size": 14, "processor_class": "Qwen2_5_VLProcessor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "temporal_patch_size": 2,
    }
    (base / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    (base / "chat_template.json").write_text(json.dumps({"chat_template": QWEN25VL_CHAT_TEMPLATE}, indent=2) + "\n")


# --------------------------------------------------------------------------- weights
@torch.no_grad()
def init_small(model: nn.Module, seed: int) -> None:
    """Upstream __init__ never calls post_init(): initialise every tensor to small, finite values."""
    g = torch.Generator().manual_seed(seed)

    def normal_(t, std=0.02):
        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32) * std)

    seen = set()
    for mod in model.modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            cls = type(mod).__name__.lower()
            is_norm = "norm" in cls or isinstance(mod, (nn.LayerNorm, nn.GroupNorm))
            if is_norm:
                if pname == "weight":
                    p.fill_(1.0)
                else:
                    p.zero_()
            elif pname == "bias":
                normal_(p, 0.01)
            elif p.dim() <= 1 and not torch.isfinite(p).all():
                normal_(p, 0.02)
            elif pname in ("g_weight", "ls1", "ls2", "gamma"):
                p.fill_(0.1)
            else:
                normal_(p, 0.02)
        for bname, b in mod.named_buffers(recurse=False):
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()


def instantiate(base: Path):
    """Build the UPSTREAM class from the folder's config (remote code) and return the model."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    with no_flash_attn_imports():
        cfg = AutoConfig.from_pretrained(base, trust_remote_code=True)
        ref = cfg.auto_map["AutoModel"]
        cls = get_class_from_dynamic_module(ref, str(base))
    log("upstream class", cls.__module__, cls.__name__)
    model = cls(cfg)
    return model


# --------------------------------------------------------------------------- training checkpoint
def lora_pairs(sd, prefix: str, w: torch.Tensor, g: torch.Generator):
    out_f, in_f = w.shape
    a = (torch.randn(LORA_R, in_f, generator=g) * 0.05).to(torch.bfloat16)
    b = (torch.randn(out_f, LORA_R, generator=g) * 0.05).to(torch.bfloat16)
    sd[f"{prefix}.lora_A.default.weight"] = a
    sd[f"{prefix}.lora_B.default.weight"] = b


def training_state_dict(family: str, model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """Trainable keys as upstream training saves them (FORMATS §3), with fine-tuned values."""
    g = torch.Generator().manual_seed(SEED + 7)
    hf = model.state_dict()
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()

    def perturbed(t):
        return (t.float() + torch.randn(t.shape, generator=g) * 0.01).to(torch.bfloat16)

    if family in ("internvl-qwen2", "internvl-internlm2"):
        P = "mllm.model.language_model.base_model.model."
        if family == "internvl-qwen2":
            targets = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
            emb, head = "model.embed_tokens.weight", "lm_head.weight"
        else:
            targets = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
            emb, head = "model.tok_embeddings.weight", None
        n_layers = model.config.llm_config.num_hidden_layers
        for i in range(n_layers):
            for t in targets:
                lora_pairs(sd, f"{P}model.layers.{i}.{t}", hf[f"language_model.model.layers.{i}.{t}.weight"], g)
        sd[P + emb] = perturbed(hf["language_model." + emb])
        if head:
            sd[P + head] = perturbed(hf["language_model." + head])
        else:  # InternLM2: LoRA-wrapped head, trained as a whole (FORMATS §3)
            sd[P + "output.base_layer.weight"] = perturbed(hf["language_model.output.weight"])
            lora_pairs(sd, P + "output", hf["language_model.output.weight"], g)
        for k, v in hf.items():
            if k.startswith("mlp1."):
                sd["mllm.model." + k] = perturbed(v)
    else:
        P = "mllm.model.base_model.model."
        targets = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        n_layers = model.config.text_config.num_hidden_layers
        for i in range(n_layers):
            for t in targets:
                lora_pairs(sd, f"{P}model.language_model.layers.{i}.{t}",
                           hf[f"model.model.language_model.layers.{i}.{t}.weight"], g)
        sd[P + "model.language_model.embed_tokens.modules_to_save.default.weight"] = perturbed(
            hf["model.model.language_model.embed_tokens.weight"])
        sd[P + "lm_head.modules_to_save.default.weight"] = perturbed(hf["model.lm_head.weight"])
    for k, v in hf.items():
        if k.startswith("grounding_encoder.sam2_model.sam_mask_decoder."):
            sd[k] = perturbed(v)
    for k, v in hf.items():
        if k.startswith("text_hidden_fcs."):
            sd[k] = perturbed(v)
    return sd


def write_checkpoint(family: str, base: Path, model: nn.Module) -> Path:
    from sa2va_convert.testing.config_text import training_config_text
    from sa2va_convert.testing.layouts import get_preset
    from sa2va_convert.testing.training_checkpoint import mmengine_parts

    f = FAMILIES[family]
    p = get_preset(f["preset"])
    work = FIX / family / "work_dirs" / "exp"
    work.mkdir(parents=True, exist_ok=True)
    sd = training_state_dict(family, model)
    mm = mmengine_parts(p, LORA_R, LORA_ALPHA, False, (), ITER, SEED, str(base), str(work), True)
    # the cfg text from the project's writer (mmengine pretty_text shape); checked for the required fields
    cfg = mm["meta"]["cfg"]
    assert cfg == training_config_text(p, lora_r=LORA_R, lora_alpha=LORA_ALPHA, path=str(base),
                                       work_dir=str(work), max_iters=max(ITER * 10, 1000))
    for needle in ("path = ", "type='peft.LoraConfig'", "r=8", "lora_alpha=16", f"template = '{f['template']}'",
                   f"prompt_template = 'xtuner.utils.PROMPT_TEMPLATE.{f['template']}'"):
        assert needle in cfg, needle
    ck = work / f"iter_{ITER}.pth"
    torch.save({"state_dict": sd, **mm}, ck)
    (work / "last_checkpoint").write_text(str(ck))
    (work / f"{p.name.replace('-', '_')}_finetune.py").write_text(cfg)
    return ck


# --------------------------------------------------------------------------- main
def build(family: str, commit: str) -> dict:
    f = FAMILIES[family]
    base = FIX / family / "base"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    code_files = copy_code(f["code"], base)
    vocab = write_tok(base, family)
    if family == "qwen25vl":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base)
        cfg = qwen25vl_config_json(tok, vocab)
        write_qwen_processor(base)
    else:
        cfg = internvl_config_json(family, vocab)
    # seed transformers_version: upstream Sa2VAChatConfig.to_dict copies __dict__, so save_pretrained
    # writes back whatever the loaded config.json carried (None if absent)
    import transformers

    cfg["transformers_version"] = transformers.__version__
    (base / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    torch.manual_seed(SEED)
    model = instantiate(base)
    init_small(model, SEED)
    model = model.to(torch.bfloat16)
    # save_pretrained writes config.json (with transformers_version/dtype) and the safetensors
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(base, safe_serialization=True, max_shard_size="200MB")
    # put the upstream code back exactly (save_pretrained may copy from the module cache)
    for fn in code_files:
        shutil.copy2(SRC / f["code"] / fn, base / fn)
    # check / fix the saved config's fixed fields
    saved = json.loads((base / "config.json").read_text())
    saved["architectures"] = cfg["architectures"]
    saved["auto_map"] = cfg["auto_map"]
    saved["tie_word_embeddings"] = False
    sub = "text_config" if family == "qwen25vl" else "llm_config"
    assert saved[sub]["vocab_size"] == vocab, (saved[sub]["vocab_size"], vocab)
    assert saved[sub].get("tie_word_embeddings", False) is False
    (base / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    for p in base.iterdir():
        p.chmod(0o644)

    ck = write_checkpoint(family, base, model)
    n_params = sum(p.numel() for p in model.parameters())
    size = sum(p.stat().st_size for p in base.iterdir())
    info = dict(family=family, upstream_commit=commit, code_files=code_files, vocab=vocab, params=n_params,
                hf_keys=len(model.state_dict()), base_bytes=size, checkpoint=str(ck),
                checkpoint_bytes=ck.stat().st_size,
                checkpoint_keys=len(torch.load(ck, weights_only=False)["state_dict"]))
    (FIX / family / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    log(json.dumps(info))
    return info


def main(argv: list[str] | None = None) -> None:
    global MIRROR, SRC, FIX
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="a clone (or bare mirror) of bytedance/Sa2VA")
    ap.add_argument("--out", required=True, type=Path, help="where DIR/<family>/{base,work_dirs} go")
    ap.add_argument("families", nargs="*", help=f"any of {', '.join(FAMILIES)} (default: all)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    MIRROR, FIX = str(Path(args.upstream).resolve()), args.out.resolve()
    SRC = FIX / ".upstream-src"
    names = args.families or list(FAMILIES)
    commit = extract_upstream()
    if len(names) == 1:
        build(names[0], commit)
        return
    # one process per family: every fixture folder is named "base", and transformers caches remote code
    # as the module transformers_modules.base.*, so two families in one process would clash
    for n in names:
        subprocess.check_call([sys.executable, __file__, "--upstream", MIRROR, "--out", str(FIX), n])


if __name__ == "__main__":
    main()
