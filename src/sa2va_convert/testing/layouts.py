"""Key layouts of the fixture models: the HF base folder and the training checkpoint.

Two INDEPENDENT descriptions are kept here on purpose. ``hf_layout`` follows
docs/DESIGN.md ("HF key layout") and ``training_layout`` follows FORMATS.md §3
(the keys a fine-tune checkpoint really holds), each written by hand per family.
Neither is derived from the other or from the converter's keymaps, so a test
that converts a ``training_layout`` checkpoint onto an ``hf_layout`` folder
checks the keymaps against the documented facts rather than against
themselves.

Qwen-VL family visual tree (our choice; DESIGN.md only fixes the prefix).
``Dv`` vision hidden, ``Iv`` vision MLP, ``P`` patch, ``T`` = 2 temporal patch,
``H`` LLM hidden, ``M`` = 4*Dv (2x2 spatial merge):

- ``model.model.visual.patch_embed.proj.weight [Dv,3,T,P,P]`` (Conv3d, no bias)
- per vision block k: ``model.model.visual.blocks.{k}.norm1.{weight,bias} [Dv]``,
  ``.norm2.{weight,bias} [Dv]`` (LayerNorm), ``.attn.qkv.{weight [3Dv,Dv], bias [3Dv]}``,
  ``.attn.proj.{weight [Dv,Dv], bias [Dv]}``, ``.mlp.fc1.{weight [Iv,Dv], bias [Iv]}``,
  ``.mlp.fc2.{weight [Dv,Iv], bias [Dv]}``
- ``model.model.visual.merger.ln_q.{weight,bias} [Dv]``,
  ``model.model.visual.merger.mlp.0.{weight [M,M], bias [M]}``,
  ``model.model.visual.merger.mlp.2.{weight [H,M], bias [H]}``
- LLM: the Qwen2 body of DESIGN.md under ``model.model.language_model.``
  (``embed_tokens``, ``layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}``, ``o_proj.weight``,
  ``mlp.{gate,up,down}_proj.weight``, ``input_layernorm``, ``post_attention_layernorm``,
  ``norm``) and ``model.lm_head.weight [V,H]``. The same body is used for the
  Qwen3-VL preset (no q_norm/k_norm), so one test model serves both.

All layouts are ordered like ``nn.Module.state_dict()`` would order them, so
writers and readers see tensors in a realistic order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

Shape = tuple[int, ...]
Layout = dict[str, Shape]

SAM2_PREFIX = "grounding_encoder.sam2_model."

#: InternVL's added special tokens, then Sa2VA's (DESIGN.md, "Tokenizer"), in id order.
INTERNVL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)
SA2VA_TOKENS: tuple[str, ...] = ("[SEG]", "<p>", "</p>", "<vp>", "</vp>")


@dataclass(frozen=True)
class Preset:
    """A fixture family (testing/README.md)."""

    name: str
    layout: str  # "internvl" | "qwen-vl" | "llava"
    version: str  # "v1" | "v2"
    llm: str  # "qwen2" | "internlm2" | "qwen3" | "llama"
    template: str
    grounding: str = "sam2"  # "sam2" | "sam3" (the SAM3 tracker, docs/FAMILIES.md)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("sa2va-1b", "internvl", "v1", "qwen2", "qwen_chat"),
        Preset("sa2va-4b", "internvl", "v1", "qwen2", "phi3_chat"),
        Preset("sa2va-8b", "internvl", "v1", "internlm2", "internlm2_chat"),
        Preset("sa2va-internvl3", "internvl", "v2", "qwen2", "qwen_chat"),
        Preset("sa2va-qwen2_5-vl", "qwen-vl", "v2", "qwen2", "qwen_chat"),
        Preset("sa2va-qwen3-vl", "qwen-vl", "v2", "qwen3", "qwen_chat"),
        Preset("sa2va-qwen3-vl-sam3", "qwen-vl", "v2", "qwen3", "qwen_chat", grounding="sam3"),
        Preset("sa2va-llava-1.5", "llava", "v2", "llama", "vicuna"),
    )
}

#: Real model names whose family is another preset (for ``Sizes.real`` and the CLI).
MODEL_ALIASES: dict[str, str] = {
    "sa2va-26b": "sa2va-8b",
    "sa2va-internvl3-2b": "sa2va-internvl3",
    "sa2va-internvl3-8b": "sa2va-internvl3",
    "sa2va-qwen2_5-vl-3b": "sa2va-qwen2_5-vl",
    "sa2va-qwen3-vl-4b": "sa2va-qwen3-vl",
    "sa2va-qwen3-vl-4b-sam3": "sa2va-qwen3-vl-sam3",
    "sa2va-llava-1.5-7b": "sa2va-llava-1.5",
}


def get_preset(name: str | Preset) -> Preset:
    """The family of a preset or real-model name ("sa2va-26b" -> the sa2va-8b family)."""
    if isinstance(name, Preset):
        return name
    name = MODEL_ALIASES.get(name, name)
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join([*PRESETS, *MODEL_ALIASES])
        raise ValueError(f"unknown preset {name!r}; known: {known}") from None


@dataclass(frozen=True)
class Sizes:
    """Every dimension a fixture needs.

    ``vocab`` is len(tokenizer) of the base Sa2VA folder (Sa2VA tokens
    included) = the embedding rows of that folder; a raw InternVL base has
    ``raw_vocab`` = vocab - 5 rows. SAM2 is a single-width stand-in: ``sam_c``
    trunk width, ``sam_ds`` decoder width (256 in real SAM2), ``sam_blocks``
    trunk blocks.
    """

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    patch: int
    image_size: int
    sam_c: int
    sam_ds: int
    sam_blocks: int
    sam_image_size: int
    lora_r: int
    lora_alpha: int
    head_dim_override: int | None = None
    max_position: int = 2048
    rope_theta: float = 1_000_000.0

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden // self.heads

    @property
    def raw_vocab(self) -> int:
        return self.vocab - len(SA2VA_TOKENS)

    @classmethod
    def tiny(cls) -> Sizes:
        """Structurally faithful, a few hundred kB: every test can write one in well under a second."""
        return cls(
            hidden=64,
            intermediate=128,
            layers=2,
            heads=4,
            kv_heads=2,
            vocab=400,
            vision_hidden=32,
            vision_intermediate=64,
            vision_layers=2,
            vision_heads=2,
            patch=14,
            image_size=56,
            sam_c=16,
            sam_ds=32,
            sam_blocks=2,
            sam_image_size=64,
            lora_r=4,
            lora_alpha=8,
        )

    @classmethod
    def real(cls, name: str) -> Sizes:
        """Realistic shapes of a released model (for benchmarks; never written in unit tests)."""
        try:
            return _REAL[name if name in _REAL else _DEFAULT_REAL.get(name, name)]
        except KeyError:
            raise ValueError(f"no real sizes for {name!r}; known: {', '.join(_REAL)}") from None

    def with_(self, **changes) -> Sizes:
        return replace(self, **changes)


# InternViT-300M (InternVL2.5/3) and a SAM2 stand-in of Hiera-Large's size:
# trunk width 576 (Hiera-L's third stage) x 56 blocks ~ 223 M + decoder/neck ~ 4 M.
_VIT300M = dict(
    vision_hidden=1024, vision_intermediate=4096, vision_layers=24, vision_heads=16, patch=14, image_size=448
)
_SAM2L = dict(sam_c=576, sam_ds=256, sam_blocks=56, sam_image_size=1024)
_QWEN_VOCAB = 151674 + len(SA2VA_TOKENS)

_REAL: dict[str, Sizes] = {
    "sa2va-1b": Sizes(
        hidden=896,
        intermediate=4864,
        layers=24,
        heads=14,
        kv_heads=2,
        vocab=_QWEN_VOCAB,
        lora_r=128,
        lora_alpha=256,
        max_position=32768,
        **_VIT300M,
        **_SAM2L,
    ),
    "sa2va-4b": Sizes(
        hidden=2048,
        intermediate=11008,
        layers=36,
        heads=16,
        kv_heads=2,
        vocab=_QWEN_VOCAB,
        lora_r=128,
        lora_alpha=256,
        max_position=32768,
        **_VIT300M,
        **_SAM2L,
    ),
    "sa2va-8b": Sizes(
        hidden=4096,
        intermediate=14336,
        layers=32,
        heads=32,
        kv_heads=8,
        vocab=92553 + len(SA2VA_TOKENS),
        lora_r=128,
        lora_alpha=256,
        max_position=32768,
        **_VIT300M,
        **_SAM2L,
    ),
    "sa2va-26b": Sizes(
        hidden=6144,
        intermediate=16384,
        layers=48,
        heads=48,
        kv_heads=8,
        vocab=92553 + len(SA2VA_TOKENS),
        lora_r=128,
        lora_alpha=256,
        max_position=32768,
        vision_hidden=3200,
        vision_intermediate=12800,
        vision_layers=45,
        vision_heads=25,
        patch=14,
        image_size=448,
        **_SAM2L,
    ),
    # InternVL3-2B: InternViT-300M + Qwen2.5-1.5B
    "sa2va-internvl3-2b": Sizes(
        hidden=1536,
        intermediate=8960,
        layers=28,
        heads=12,
        kv_heads=2,
        vocab=_QWEN_VOCAB,
        lora_r=128,
        lora_alpha=256,
        max_position=32768,
        **_VIT300M,
        **_SAM2L,
    ),
    # InternVL3-8B: InternViT-300M + Qwen2.5-7B
    "sa2va-internvl3-8b": Sizes(
        hidden=3584,
        intermediate=18944,
        layers=28,
        heads=28,
        kv_heads=4,
        vocab=_QWEN_VOCAB,
        lora_r=256,
        lora_alpha=512,
        max_position=32768,
        **_VIT300M,
        **_SAM2L,
    ),
    # Qwen2.5-VL-3B: 32-block 1280-wide ViT + Qwen2.5-3B
    "sa2va-qwen2_5-vl-3b": Sizes(
        hidden=2048,
        intermediate=11008,
        layers=36,
        heads=16,
        kv_heads=2,
        vocab=151665 + len(SA2VA_TOKENS),
        lora_r=128,
        lora_alpha=256,
        max_position=32768,
        vision_hidden=1280,
        vision_intermediate=3420,
        vision_layers=32,
        vision_heads=16,
        patch=14,
        image_size=448,
        **_SAM2L,
    ),
    # Qwen3-VL-4B: 24-block 1024-wide ViT (patch 16) + Qwen3-4B (head_dim 128 != 2560/32)
    "sa2va-qwen3-vl-4b": Sizes(
        hidden=2560,
        intermediate=9728,
        layers=36,
        heads=32,
        kv_heads=8,
        head_dim_override=128,
        vocab=151665 + len(SA2VA_TOKENS),
        lora_r=128,
        lora_alpha=256,
        max_position=32768,
        vision_hidden=1024,
        vision_intermediate=4096,
        vision_layers=24,
        vision_heads=16,
        patch=16,
        image_size=448,
        **_SAM2L,
    ),
}
# Qwen3-VL-4B with the SAM3 tracker instead of SAM2: SAM3's ViT is 1024 wide, 32 blocks, patch 14,
# 1008-px input (docs/FAMILIES.md); the stand-in's MLP is 4.625x wide like SAM3's.
_REAL["sa2va-qwen3-vl-4b-sam3"] = _REAL["sa2va-qwen3-vl-4b"].with_(
    sam_c=1024, sam_ds=256, sam_blocks=32, sam_image_size=1008
)
# LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B (Llama). The tokenizer has 32002 entries (32000 +
# <image> + <pad>); Sa2VA adds 5, so training resizes the (padded) 32064-row embedding to 32007.
_REAL["sa2va-llava-1.5-7b"] = Sizes(
    hidden=4096,
    intermediate=11008,
    layers=32,
    heads=32,
    kv_heads=32,
    vocab=32002 + len(SA2VA_TOKENS),
    lora_r=128,
    lora_alpha=256,
    max_position=4096,
    rope_theta=10000.0,
    vision_hidden=1024,
    vision_intermediate=4096,
    vision_layers=24,
    vision_heads=16,
    patch=14,
    image_size=336,
    **_SAM2L,
)
_DEFAULT_REAL = {
    "sa2va-internvl3": "sa2va-internvl3-2b",
    "sa2va-qwen2_5-vl": "sa2va-qwen2_5-vl-3b",
    "sa2va-qwen3-vl": "sa2va-qwen3-vl-4b",
    "sa2va-qwen3-vl-sam3": "sa2va-qwen3-vl-4b-sam3",
    "sa2va-llava-1.5": "sa2va-llava-1.5-7b",
}


# ---------------------------------------------------------------- HF layout


def _lin(out: int, inp: int, bias: bool = True) -> list[tuple[str, Shape]]:
    items: list[tuple[str, Shape]] = [("weight", (out, inp))]
    if bias:
        items.append(("bias", (out,)))
    return items


def _add(layout: Layout, prefix: str, items: list[tuple[str, Shape]]) -> None:
    for suffix, shape in items:
        layout[f"{prefix}.{suffix}"] = shape


def _norm(n: int) -> list[tuple[str, Shape]]:
    return [("weight", (n,)), ("bias", (n,))]


def sam2_layout(s: Sizes, *, training_names: bool = False) -> Layout:
    """SAM2 stand-in keys WITHOUT the ``grounding_encoder.sam2_model.`` prefix.

    ``training_names`` spells the memory-encoder layer scale ``.gamma`` (SAM2's
    and the training code's name) instead of the HF folder's ``.g_weight``.
    """
    C, D = s.sam_c, s.sam_ds
    scale = "gamma" if training_names else "g_weight"
    out: Layout = {}
    out["image_encoder.trunk.pos_embed"] = (1, C, 7, 7)
    out["image_encoder.trunk.patch_embed.proj.weight"] = (C, 3, 7, 7)
    out["image_encoder.trunk.patch_embed.proj.bias"] = (C,)
    for k in range(s.sam_blocks):
        p = f"image_encoder.trunk.blocks.{k}"
        _add(out, f"{p}.norm1", _norm(C))
        _add(out, f"{p}.attn.qkv", _lin(3 * C, C))
        _add(out, f"{p}.attn.proj", _lin(C, C))
        _add(out, f"{p}.norm2", _norm(C))
        _add(out, f"{p}.mlp.layers.0", _lin(4 * C, C))
        _add(out, f"{p}.mlp.layers.1", _lin(C, 4 * C))
    for j in range(4):
        out[f"image_encoder.neck.convs.{j}.conv.weight"] = (D, C, 1, 1)
        out[f"image_encoder.neck.convs.{j}.conv.bias"] = (D,)
    out["maskmem_tpos_enc"] = (7, 1, 1, 64)
    out["no_mem_embed"] = (1, 1, D)
    out["memory_attention.layers.0.self_attn.q_proj.weight"] = (D, D)
    out["memory_attention.layers.0.self_attn.q_proj.bias"] = (D,)
    for j in range(2):
        out[f"memory_encoder.fuser.layers.{j}.{scale}"] = (D,)
        out[f"memory_encoder.fuser.layers.{j}.dwconv.weight"] = (D, 1, 7, 7)
        out[f"memory_encoder.fuser.layers.{j}.dwconv.bias"] = (D,)
    out["sam_prompt_encoder.no_mask_embed.weight"] = (1, D)
    for j in range(4):
        out[f"sam_prompt_encoder.point_embeddings.{j}.weight"] = (1, D)
    out.update(sam_mask_decoder_layout(s))
    return out


def sam_mask_decoder_layout(s: Sizes) -> Layout:
    """The (always trained) SAM2 mask decoder, keys starting ``sam_mask_decoder.``."""
    D = s.sam_ds
    out: Layout = {}
    p = "sam_mask_decoder"
    for j in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _add(out, f"{p}.transformer.layers.{j}.self_attn.{proj}", _lin(D, D))
    out[f"{p}.iou_token.weight"] = (1, D)
    out[f"{p}.mask_tokens.weight"] = (4, D)
    out[f"{p}.output_upscaling.0.weight"] = (D, D // 4, 2, 2)
    out[f"{p}.output_upscaling.0.bias"] = (D // 4,)
    _add(out, f"{p}.output_upscaling.1", _norm(D // 4))
    out[f"{p}.output_upscaling.3.weight"] = (D // 4, D // 8, 2, 2)
    out[f"{p}.output_upscaling.3.bias"] = (D // 8,)
    for m in range(4):
        q = f"{p}.output_hypernetworks_mlps.{m}.layers"
        _add(out, f"{q}.0", _lin(D, D))
        _add(out, f"{q}.1", _lin(D, D))
        _add(out, f"{q}.2", _lin(D // 8, D))
    q = f"{p}.iou_prediction_head.layers"
    _add(out, f"{q}.0", _lin(D, D))
    _add(out, f"{q}.1", _lin(D, D))
    _add(out, f"{q}.2", _lin(4, D))
    return out


def sam3_patch(s: Sizes) -> int:
    """Patch size of the SAM3 stand-in's ViT: SAM3's 14 when the input allows it (1008), else 8."""
    return 14 if s.sam_image_size % 14 == 0 else 8


def sam3_pos_grid(s: Sizes) -> int:
    """Side of the stored position-embedding grid: SAM3 keeps its 336-px pretraining grid (24)."""
    return min(24, s.sam_image_size // sam3_patch(s))


def sam3_mlp(s: Sizes) -> int:
    """Hidden width of the SAM3 ViT MLP (mlp_ratio 4.625, as SAM3's)."""
    return int(s.sam_c * 4.625)


def sam3_layout(s: Sizes, *, training_names: bool = False) -> Layout:
    """SAM3 tracker stand-in keys WITHOUT the ``grounding_encoder.sam2_model.`` prefix.

    The SAM3 tracker keeps the attribute name ``sam2_model`` (upstream sam3.py), but its
    sub-modules differ from SAM2's: ``backbone.vision_backbone.{trunk,convs}`` (ViTDet + neck),
    ``maskmem_backbone`` (with the two fuser blocks' layer scale, ``.gamma`` in training and
    ``.g_weight`` in the HF code), ``transformer.encoder`` (memory attention). Widths come from
    ``Sizes``: ``sam_c`` ViT width, ``sam_ds`` decoder width, ``sam_blocks`` ViT blocks.
    """
    C, D, P, M = s.sam_c, s.sam_ds, sam3_patch(s), sam3_mlp(s)
    scale = "gamma" if training_names else "g_weight"
    t = "backbone.vision_backbone.trunk"
    out: Layout = {f"{t}.pos_embed": (1, sam3_pos_grid(s) ** 2 + 1, C), f"{t}.patch_embed.proj.weight": (C, 3, P, P)}
    _add(out, f"{t}.ln_pre", _norm(C))
    for k in range(s.sam_blocks):
        p = f"{t}.blocks.{k}"
        _add(out, f"{p}.norm1", _norm(C))
        _add(out, f"{p}.attn.qkv", _lin(3 * C, C))
        _add(out, f"{p}.attn.proj", _lin(C, C))
        _add(out, f"{p}.norm2", _norm(C))
        _add(out, f"{p}.mlp.fc1", _lin(M, C))
        _add(out, f"{p}.mlp.fc2", _lin(C, M))
    for j in range(4):
        out[f"backbone.vision_backbone.convs.{j}.conv_1x1.weight"] = (D, C, 1, 1)
        out[f"backbone.vision_backbone.convs.{j}.conv_1x1.bias"] = (D,)
    out["maskmem_backbone.pix_feat_proj.weight"] = (D, D, 1, 1)
    out["maskmem_backbone.pix_feat_proj.bias"] = (D,)
    for j in range(2):
        out[f"maskmem_backbone.fuser.layers.{j}.dwconv.weight"] = (D, 1, 7, 7)
        out[f"maskmem_backbone.fuser.layers.{j}.dwconv.bias"] = (D,)
        out[f"maskmem_backbone.fuser.layers.{j}.{scale}"] = (D,)
    _add(out, "transformer.encoder.layers.0.self_attn.q_proj", _lin(D, D))
    out["maskmem_tpos_enc"] = (7, 1, 1, 64)
    out["no_mem_embed"] = (1, 1, D)
    out["sam_prompt_encoder.no_mask_embed.weight"] = (1, D)
    for j in range(4):
        out[f"sam_prompt_encoder.point_embeddings.{j}.weight"] = (1, D)
    out.update(sam_mask_decoder_layout(s))
    return out


def grounding_layout(p: Preset, s: Sizes, *, training_names: bool = False) -> Layout:
    """The grounding encoder's keys (no prefix) for the preset's SAM flavour."""
    fn = sam3_layout if p.grounding == "sam3" else sam2_layout
    return fn(s, training_names=training_names)


def _intern_vit(s: Sizes) -> Layout:
    Dv, Iv, P = s.vision_hidden, s.vision_intermediate, s.patch
    out: Layout = {}
    e = "vision_model.embeddings"
    out[f"{e}.class_embedding"] = (1, 1, Dv)
    out[f"{e}.patch_embedding.weight"] = (Dv, 3, P, P)
    out[f"{e}.patch_embedding.bias"] = (Dv,)
    out[f"{e}.position_embedding"] = (1, (s.image_size // P) ** 2 + 1, Dv)
    for j in range(s.vision_layers):
        p = f"vision_model.encoder.layers.{j}"
        _add(out, f"{p}.attn.qkv", _lin(3 * Dv, Dv))
        _add(out, f"{p}.attn.proj", _lin(Dv, Dv))
        _add(out, f"{p}.mlp.fc1", _lin(Iv, Dv))
        _add(out, f"{p}.mlp.fc2", _lin(Dv, Iv))
        _add(out, f"{p}.norm1", _norm(Dv))
        _add(out, f"{p}.norm2", _norm(Dv))
        out[f"{p}.ls1"] = (Dv,)
        out[f"{p}.ls2"] = (Dv,)
    return out


def _qwen2_body(s: Sizes, prefix: str, vocab: int, *, qkv_bias: bool = True) -> Layout:
    """embed_tokens, layers, norm of a Qwen2 decoder under ``prefix`` (e.g. 'language_model.model').

    ``qkv_bias=False`` gives a Llama decoder (same names, no q/k/v bias)."""
    H, FF, hd = s.hidden, s.intermediate, s.head_dim
    out: Layout = {f"{prefix}.embed_tokens.weight": (vocab, H)}
    for i in range(s.layers):
        p = f"{prefix}.layers.{i}"
        _add(out, f"{p}.self_attn.q_proj", _lin(s.heads * hd, H, bias=qkv_bias))
        _add(out, f"{p}.self_attn.k_proj", _lin(s.kv_heads * hd, H, bias=qkv_bias))
        _add(out, f"{p}.self_attn.v_proj", _lin(s.kv_heads * hd, H, bias=qkv_bias))
        _add(out, f"{p}.self_attn.o_proj", _lin(H, s.heads * hd, bias=False))
        _add(out, f"{p}.mlp.gate_proj", _lin(FF, H, bias=False))
        _add(out, f"{p}.mlp.up_proj", _lin(FF, H, bias=False))
        _add(out, f"{p}.mlp.down_proj", _lin(H, FF, bias=False))
        out[f"{p}.input_layernorm.weight"] = (H,)
        out[f"{p}.post_attention_layernorm.weight"] = (H,)
    out[f"{prefix}.norm.weight"] = (H,)
    return out


def _internlm2(s: Sizes, vocab: int) -> Layout:
    H, FF, hd = s.hidden, s.intermediate, s.head_dim
    out: Layout = {"language_model.model.tok_embeddings.weight": (vocab, H)}
    for i in range(s.layers):
        p = f"language_model.model.layers.{i}"
        out[f"{p}.attention.wqkv.weight"] = ((s.heads + 2 * s.kv_heads) * hd, H)
        out[f"{p}.attention.wo.weight"] = (H, s.heads * hd)
        out[f"{p}.feed_forward.w1.weight"] = (FF, H)
        out[f"{p}.feed_forward.w3.weight"] = (FF, H)
        out[f"{p}.feed_forward.w2.weight"] = (H, FF)
        out[f"{p}.attention_norm.weight"] = (H,)
        out[f"{p}.ffn_norm.weight"] = (H,)
    out["language_model.model.norm.weight"] = (H,)
    out["language_model.output.weight"] = (vocab, H)
    return out


def _qwen_visual(s: Sizes) -> Layout:
    Dv, Iv, P, M = s.vision_hidden, s.vision_intermediate, s.patch, 4 * s.vision_hidden
    out: Layout = {"model.model.visual.patch_embed.proj.weight": (Dv, 3, 2, P, P)}
    for k in range(s.vision_layers):
        p = f"model.model.visual.blocks.{k}"
        _add(out, f"{p}.norm1", _norm(Dv))
        _add(out, f"{p}.norm2", _norm(Dv))
        _add(out, f"{p}.attn.qkv", _lin(3 * Dv, Dv))
        _add(out, f"{p}.attn.proj", _lin(Dv, Dv))
        _add(out, f"{p}.mlp.fc1", _lin(Iv, Dv))
        _add(out, f"{p}.mlp.fc2", _lin(Dv, Iv))
    _add(out, "model.model.visual.merger.ln_q", _norm(Dv))
    _add(out, "model.model.visual.merger.mlp.0", _lin(M, M))
    _add(out, "model.model.visual.merger.mlp.2", _lin(s.hidden, M))
    return out


def _llava_vision(s: Sizes) -> Layout:
    """transformers' LlavaModel vision side: a CLIP vision tower and the 2-layer projector."""
    Dv, Iv, P = s.vision_hidden, s.vision_intermediate, s.patch
    v = "model.model.vision_tower.vision_model"
    out: Layout = {
        f"{v}.embeddings.class_embedding": (Dv,),
        f"{v}.embeddings.patch_embedding.weight": (Dv, 3, P, P),
        f"{v}.embeddings.position_embedding.weight": ((s.image_size // P) ** 2 + 1, Dv),
    }
    _add(out, f"{v}.pre_layrnorm", _norm(Dv))  # sic: CLIP's spelling
    for k in range(s.vision_layers):
        p = f"{v}.encoder.layers.{k}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            _add(out, f"{p}.self_attn.{proj}", _lin(Dv, Dv))
        _add(out, f"{p}.layer_norm1", _norm(Dv))
        _add(out, f"{p}.mlp.fc1", _lin(Iv, Dv))
        _add(out, f"{p}.mlp.fc2", _lin(Dv, Iv))
        _add(out, f"{p}.layer_norm2", _norm(Dv))
    _add(out, f"{v}.post_layernorm", _norm(Dv))
    _add(out, "model.model.multi_modal_projector.linear_1", _lin(s.hidden, Dv))
    _add(out, "model.model.multi_modal_projector.linear_2", _lin(s.hidden, s.hidden))
    return out


def _sa2va_heads(s: Sizes, p: Preset) -> Layout:
    out: Layout = {SAM2_PREFIX + k: v for k, v in grounding_layout(p, s).items()}
    _add(out, "text_hidden_fcs.0", _lin(s.hidden, s.hidden))
    _add(out, "text_hidden_fcs.2", _lin(s.sam_ds, s.hidden))
    return out


def hf_layout(preset: str | Preset, sizes: Sizes, *, raw_internvl: bool = False) -> Layout:
    """HF name -> shape of the base folder (DESIGN.md "HF key layout"), in state_dict order.

    ``raw_internvl`` gives a raw InternVL2.5/3 folder instead: no SAM2, no
    ``text_hidden_fcs``, ``raw_vocab`` embedding rows.
    """
    p = get_preset(preset)
    s = sizes
    if p.layout == "llava":
        if raw_internvl:
            raise ValueError(f"raw_internvl applies to the InternVL family, not {p.name}")
        out = _llava_vision(s)
        out.update(_qwen2_body(s, "model.model.language_model", s.vocab, qkv_bias=False))
        out["model.lm_head.weight"] = (s.vocab, s.hidden)
        out.update(_sa2va_heads(s, p))
        return out
    if p.layout == "qwen-vl":
        if raw_internvl:
            raise ValueError(f"raw_internvl applies to the InternVL family, not {p.name}")
        out = _qwen_visual(s)
        out.update(_qwen2_body(s, "model.model.language_model", s.vocab))
        out["model.lm_head.weight"] = (s.vocab, s.hidden)
        out.update(_sa2va_heads(s, p))
        return out
    vocab = s.raw_vocab if raw_internvl else s.vocab
    out = _intern_vit(s)
    if p.llm == "internlm2":
        out.update(_internlm2(s, vocab))
    else:
        out.update(_qwen2_body(s, "language_model.model", vocab))
        out["language_model.lm_head.weight"] = (vocab, s.hidden)
    Dv4 = 4 * s.vision_hidden
    _add(out, "mlp1.0", _norm(Dv4))
    _add(out, "mlp1.1", _lin(s.hidden, Dv4))
    _add(out, "mlp1.3", _lin(s.hidden, s.hidden))
    if not raw_internvl:
        out.update(_sa2va_heads(s, p))
    return out


# ---------------------------------------------------------- training layout
#
# Written from FORMATS.md §3 directly, family by family: the literal key
# spellings of the upstream training model, PEFT decorations included.

_QWEN2_TARGETS = (
    ("self_attn.q_proj", "q"),
    ("self_attn.k_proj", "kv"),
    ("self_attn.v_proj", "kv"),
    ("self_attn.o_proj", "o"),
    ("mlp.gate_proj", "up"),
    ("mlp.up_proj", "up"),
    ("mlp.down_proj", "down"),
)
_INTERNLM2_TARGETS = (
    ("attention.wqkv", "qkv"),
    ("attention.wo", "o"),
    ("feed_forward.w1", "up"),
    ("feed_forward.w3", "up"),
    ("feed_forward.w2", "down"),
)


def _io(kind: str, s: Sizes) -> tuple[int, int]:
    """(out, in) features of a LoRA-wrapped Linear."""
    H, FF, hd = s.hidden, s.intermediate, s.head_dim
    return {
        "q": (s.heads * hd, H),
        "kv": (s.kv_heads * hd, H),
        "qkv": ((s.heads + 2 * s.kv_heads) * hd, H),
        "o": (H, s.heads * hd),
        "up": (FF, H),
        "down": (H, FF),
    }[kind]


def _lora_pair(out: Layout, module: str, n_out: int, n_in: int, r: int) -> None:
    out[f"{module}.lora_A.default.weight"] = (r, n_in)
    out[f"{module}.lora_B.default.weight"] = (n_out, r)


def training_layout(
    preset: str | Preset,
    sizes: Sizes,
    *,
    extra_tokens: int = 0,
    lora_r: int | None = None,
    include_frozen_sam2: bool = False,
) -> Layout:
    """Training key -> shape of what a fine-tune checkpoint of this family holds.

    Embedding and head rows are ``sizes.vocab + extra_tokens`` (the tokenizer
    was resized in training). ``include_frozen_sam2`` adds the rest of SAM2
    (training spelling ``.gamma``), as a ZeRO-3 gathered dump may carry it.
    """
    p = get_preset(preset)
    s = sizes
    r = lora_r or s.lora_r
    V, H = s.vocab + extra_tokens, s.hidden
    out: Layout = {}

    if p.layout in ("qwen-vl", "llava"):
        # PEFT wraps the whole Qwen-VL (or LlavaForConditionalGeneration) model:
        # mllm.model.base_model.model.<HF-ish names>
        root = "mllm.model.base_model.model"
        out[f"{root}.model.language_model.embed_tokens.modules_to_save.default.weight"] = (V, H)
        for i in range(s.layers):
            for mod, kind in _QWEN2_TARGETS:
                _lora_pair(out, f"{root}.model.language_model.layers.{i}.{mod}", *_io(kind, s), r)
        out[f"{root}.lm_head.modules_to_save.default.weight"] = (V, H)
    elif p.llm == "internlm2":
        root = "mllm.model.language_model.base_model.model"
        out[f"{root}.model.tok_embeddings.weight"] = (V, H)
        for i in range(s.layers):
            for mod, kind in _INTERNLM2_TARGETS:
                _lora_pair(out, f"{root}.model.layers.{i}.{mod}", *_io(kind, s), r)
        # the LoRA-wrapped head is trainable as a whole: base_layer AND the adapter
        out[f"{root}.output.base_layer.weight"] = (V, H)
        _lora_pair(out, f"{root}.output", V, H, r)
    else:
        root = "mllm.model.language_model.base_model.model"
        if p.version == "v1":
            embed, head = f"{root}.model.embed_tokens.weight", f"{root}.lm_head.weight"
        else:
            embed = f"{root}.model.embed_tokens.modules_to_save.default.weight"
            head = f"{root}.lm_head.modules_to_save.default.weight"
        out[embed] = (V, H)
        for i in range(s.layers):
            for mod, kind in _QWEN2_TARGETS:
                _lora_pair(out, f"{root}.model.layers.{i}.{mod}", *_io(kind, s), r)
        out[head] = (V, H)

    if p.layout == "internvl":
        Dv4 = 4 * s.vision_hidden
        _add(out, "mllm.model.mlp1.0", _norm(Dv4))
        _add(out, "mllm.model.mlp1.1", _lin(H, Dv4))
        _add(out, "mllm.model.mlp1.3", _lin(H, H))

    sam = grounding_layout(p, s, training_names=True) if include_frozen_sam2 else sam_mask_decoder_layout(s)
    out.update({SAM2_PREFIX + k: v for k, v in sam.items()})
    _add(out, "text_hidden_fcs.0", _lin(H, H))
    _add(out, "text_hidden_fcs.2", _lin(s.sam_ds, H))
    return out


def param_count(layout: Layout) -> int:
    """Number of elements over a layout (no tensor is created)."""
    return sum(math.prod(shape) for shape in layout.values())
