"""Write fixture inputs: base HF folders, SAM2 checkpoints and training checkpoints.

Everything is deterministic (per-tensor seeds, fixed timestamps) so that
tests can compare bytes, and base folders are streamed one tensor at a time
with the project's own safetensors writer so that realistic sizes
(``Sizes.real(...)``, many GB) never need the model in memory. Training
checkpoints are ``torch.save``d dicts shaped like mmengine/xtuner/DeepSpeed
output (FORMATS.md §2), with REAL mmengine objects in ``message_hub`` so the
converter's refusal to unpickle them is exercised for real.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dtypes
from ..formats import SAFETENSORS_INDEX, SAFETENSORS_SHARDS
from ..read.tensor_source import TensorInfo
from ..write.safetensors_stream import StreamEntry, write_streamed
from .config_text import training_config_text
from .layouts import (
    SAM2_PREFIX,
    Preset,
    Sizes,
    get_preset,
    hf_layout,
    sam2_layout,
    sam3_mlp,
    sam3_patch,
    sam3_pos_grid,
)
from .tokenizer import special_token_id, write_tokenizer
from .training_checkpoint import (  # noqa: F401  (re-exported: the fixture writers in one place)
    CHECKPOINT_FORMATS,
    FixtureCheckpoint,
    write_training_checkpoint,
)
from .values import make_tensor

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # HF's default "5GB"
# config.json's transformers_version, as save_pretrained writes it: upstream's `latest` pin, and for the
# InternLM2 families (Sa2VA-8B / 26B style) its `legacy` pin, the newest their code generates with
# (FORMATS.md §9). The round trip quotes it when the installed transformers cannot run the code.
TRANSFORMERS_VERSION = "4.57.0"
LEGACY_TRANSFORMERS_VERSION = "4.49.0"

_REPO_ROOT = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------ base folder


def shard_entries(layout: dict[str, tuple[int, ...]], dtype: str, max_shard_bytes: int) -> list[list[StreamEntry]]:
    """Greedy split in layout order, like ``save_pretrained``: a tensor never spans shards."""
    shards: list[list[StreamEntry]] = [[]]
    size = 0
    for name, shape in layout.items():
        e = StreamEntry(name, TensorInfo(tuple(shape), dtype))
        if shards[-1] and size + e.info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.info.nbytes
    return shards


def write_base_folder(
    out_dir: str | Path,
    preset: str | Preset,
    sizes: Sizes | None = None,
    *,
    dtype: str = "bf16",
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    remote_code_dir: str | Path | None = None,
    fill: str = "random",
    raw_internvl: bool = False,
    copy_remote_code: bool = True,
) -> Path:
    """Write a base Sa2VA HF folder (or a raw InternVL2.5 one) and return its path.

    Shards are named ``model-0000k-of-0000n.safetensors`` and always come with
    ``model.safetensors.index.json``. Remote code is copied from
    ``remote_code_dir`` or, by default, from our test models
    (``tests/remote_code/{internvl,qwen,qwen_sam3,llava}``) when they exist; a raw InternVL
    folder gets remote code only when ``remote_code_dir`` is given;
    ``copy_remote_code=False`` writes none (weights, config and tokenizer only).
    """
    p = get_preset(preset)
    s = sizes or Sizes.tiny()
    dtype = dtypes.normalise(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = hf_layout(p, s, raw_internvl=raw_internvl)
    shards = shard_entries(layout, dtype, max_shard_bytes)

    weight_map: dict[str, str] = {}
    total = 0
    for k, entries in enumerate(shards, start=1):
        fname = SAFETENSORS_SHARDS.format(index=k, count=len(shards))
        write_streamed(
            out / fname,
            entries,
            lambda e: make_tensor(e.name, e.info.shape, dtype, seed=seed, fill=fill),
            metadata={"format": "pt"},
        )
        for e in entries:
            weight_map[e.name] = fname
            total += e.info.nbytes
    _write_json(
        out / SAFETENSORS_INDEX,
        {"metadata": {"total_size": total}, "weight_map": weight_map},
        sort_keys=True,
    )

    vocab = s.raw_vocab if raw_internvl else s.vocab
    _write_json(out / "config.json", base_config(p, s, dtype=dtype, raw_internvl=raw_internvl))
    write_tokenizer(out, s.vocab, with_sa2va_tokens=not raw_internvl, model_max_length=s.max_position)
    _write_json(out / "generation_config.json", _generation_config(s.vocab))
    if p.layout == "qwen-vl":
        _write_json(out / "preprocessor_config.json", _qwen_preprocessor(s))
    assert vocab == layout[_embed_key(p)][0]

    if remote_code_dir is not None:
        code: Path | None = Path(remote_code_dir)
    else:
        code = None if raw_internvl else find_remote_code(p)
    if code is not None and copy_remote_code:
        # A model folder's code is self-contained: the family's files plus the ones the families
        # share (tests/remote_code/shared: sam2.py, templates.py, qwen_vl*.py), copied side by side.
        shared = code.parent / "shared"
        for f in sorted(code.glob("*.py")) + (sorted(shared.glob("*.py")) if shared.is_dir() else []):
            if f.name != "__init__.py":
                shutil.copyfile(f, out / f.name)
    return out


def find_remote_code(preset: str | Preset) -> Path | None:
    """Our test remote-code folder for this family, or None if it is not there (yet)."""
    p = get_preset(preset)
    sub = {"qwen-vl": "qwen", "llava": "llava"}.get(p.layout, "internvl")
    if p.grounding == "sam3":
        sub += "_sam3"
    for cand in (_REPO_ROOT / "tests" / "remote_code" / sub, Path(__file__).parent / "remote_code" / sub):
        if cand.is_dir() and any(cand.glob("*.py")):
            return cand
    return None


def _embed_key(p: Preset) -> str:
    if p.layout in ("qwen-vl", "llava"):
        return "model.model.language_model.embed_tokens.weight"
    if p.llm == "internlm2":
        return "language_model.model.tok_embeddings.weight"
    return "language_model.model.embed_tokens.weight"


_TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def _llm_config(p: Preset, s: Sizes, vocab: int) -> dict:
    arch, model_type = {
        "qwen2": (["Qwen2ForCausalLM"], "qwen2"),
        "qwen3": (["Qwen3ForCausalLM"], "qwen3"),
        "llama": (["LlamaForCausalLM"], "llama"),
        "internlm2": (["InternLM2ForCausalLM"], "internlm2"),
    }[p.llm]
    return {
        "architectures": arch,
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "max_position_embeddings": s.max_position,
        "rms_norm_eps": 1e-6,
        "rope_theta": s.rope_theta,
        "tie_word_embeddings": False,
    }


def base_config(p: Preset, s: Sizes, *, dtype: str = "bf16", raw_internvl: bool = False) -> dict:
    """config.json of a base folder (DESIGN.md, "config.json of the InternVL family")."""
    sam2 = {"C": s.sam_c, "Ds": s.sam_ds, "blocks": s.sam_blocks, "image_size": s.sam_image_size}
    torch_dtype = _TORCH_DTYPE[dtype]
    if p.layout == "llava":
        # Sa2VAChatConfigLlava is a LlavaConfig (docs/FAMILIES.md); our test config reads the same fields
        text = _llm_config(p, s, s.vocab)
        del text["architectures"]
        return {
            "architectures": ["Sa2VAChatModelLlava"],
            "auto_map": {
                "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigLlava",
                "AutoModel": "modeling_sa2va_llava.Sa2VAChatModelLlava",
                "AutoModelForCausalLM": "modeling_sa2va_llava.Sa2VAChatModelLlava",
            },
            "model_type": "sa2va_chat_llava",
            "template": p.template,
            "text_config": text,
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": s.vision_hidden,
                "intermediate_size": s.vision_intermediate,
                "num_hidden_layers": s.vision_layers,
                "num_attention_heads": s.vision_heads,
                "image_size": s.image_size,
                "patch_size": s.patch,
                "layer_norm_eps": 1e-5,
                "hidden_act": "quick_gelu",
            },
            "image_token_index": special_token_id(s.vocab, "<IMG_CONTEXT>"),
            "projector_hidden_act": "gelu",
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "sam2_test_config": sam2,
            "tie_word_embeddings": False,
            "torch_dtype": torch_dtype,
            "transformers_version": TRANSFORMERS_VERSION,
        }
    if p.layout == "qwen-vl":
        text = _llm_config(p, s, s.vocab)
        del text["architectures"]
        return {
            "architectures": ["Sa2VAChatModelQwen"],
            "auto_map": {
                "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigQwen",
                "AutoModel": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
                "AutoModelForCausalLM": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
            },
            "model_type": "sa2va_chat_qwen",
            "template": p.template,
            "text_config": text,
            "vision_config": {
                "model_type": "qwen_vl_test_vision",
                "depth": s.vision_layers,
                "hidden_size": s.vision_hidden,
                "intermediate_size": s.vision_intermediate,
                "num_heads": s.vision_heads,
                "patch_size": s.patch,
                "temporal_patch_size": 2,
                "spatial_merge_size": 2,
                "in_channels": 3,
                "out_hidden_size": s.hidden,
                "image_size": s.image_size,
            },
            **({"sam3_test_config": _sam3_test_config(s)} if p.grounding == "sam3" else {"sam2_test_config": sam2}),
            "tie_word_embeddings": False,
            "torch_dtype": torch_dtype,
            "transformers_version": TRANSFORMERS_VERSION,
        }
    cfg: dict = {}
    if raw_internvl:
        cfg["architectures"] = ["InternVLChatModel"]
        cfg["auto_map"] = {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        }
        cfg["model_type"] = "internvl_chat"
        cfg["template"] = "internvl2_5"
    else:
        cfg["architectures"] = ["Sa2VAChatModel"]
        cfg["auto_map"] = {
            "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
            "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
            "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel",
        }
        cfg["model_type"] = "sa2va_chat"
        cfg["template"] = p.template
    cfg["llm_config"] = _llm_config(p, s, s.raw_vocab if raw_internvl else s.vocab)
    cfg["vision_config"] = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": s.vision_hidden,
        "intermediate_size": s.vision_intermediate,
        "num_hidden_layers": s.vision_layers,
        "num_attention_heads": s.vision_heads,
        "image_size": s.image_size,
        "patch_size": s.patch,
        "qkv_bias": True,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "initializer_factor": 1.0,
    }
    if not raw_internvl:
        cfg["sam2_test_config"] = sam2
    cfg.update(
        {
            "downsample_ratio": 0.5,
            "force_image_size": s.image_size,
            "select_layer": -1,
            "ps_version": "v2",
            "dynamic_image_size": False,
            "use_thumbnail": False,
            "max_dynamic_patch": 1,
            "min_dynamic_patch": 1,
            "use_backbone_lora": 0,
            "use_llm_lora": 0,
            "tie_word_embeddings": False,
            "torch_dtype": torch_dtype,
            "transformers_version": LEGACY_TRANSFORMERS_VERSION if p.llm == "internlm2" else TRANSFORMERS_VERSION,
        }
    )
    return cfg


def _sam3_test_config(s: Sizes) -> dict:
    """The SAM3 stand-in's dimensions (tests/remote_code/qwen_sam3/sam3.py reads them)."""
    return {
        "C": s.sam_c,
        "Ds": s.sam_ds,
        "blocks": s.sam_blocks,
        "image_size": s.sam_image_size,
        "patch": sam3_patch(s),
        "pos_grid": sam3_pos_grid(s),
        "mlp": sam3_mlp(s),
    }


def _generation_config(vocab: int) -> dict:
    eos, pad = special_token_id(vocab, "<|im_end|>"), special_token_id(vocab, "<|endoftext|>")
    return {
        "bos_token_id": pad,
        "eos_token_id": [eos, pad],
        "pad_token_id": pad,
        "transformers_version": TRANSFORMERS_VERSION,
    }


def _qwen_preprocessor(s: Sizes) -> dict:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "patch_size": s.patch,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": (s.patch * 2) ** 2,
        "max_pixels": s.image_size * s.image_size,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
    }


def write_sam2_checkpoint(
    path: str | Path,
    sizes: Sizes | None = None,
    *,
    seed: int = 0,
    dtype: str = "fp32",
    fill: str = "random",
) -> Path:
    """``{'model': state_dict}`` with SAM2's own key names (``.gamma``), like sam2_hiera_large.pt.

    Values equal the SAM2 tensors of ``write_base_folder(..., seed=seed)``
    (same per-key seeds), up to the dtype cast, as the released Sa2VA folders
    carry SAM2's pretrained weights.
    """
    s = sizes or Sizes.tiny()
    hf = sam2_layout(s)
    train = sam2_layout(s, training_names=True)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (hf_name, shape), name in zip(hf.items(), train, strict=True):
        sd[name] = make_tensor(SAM2_PREFIX + hf_name, shape, dtype, seed=seed, fill=fill)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd}, out)
    return out


# ---------------------------------------------------------------- tiny example


@dataclass(frozen=True)
class TinyExample:
    """A self-contained demo tree: ``base/`` and an mmengine ``work_dirs/exp/``."""

    root: Path
    base_dir: Path
    work_dir: Path
    checkpoint: FixtureCheckpoint
    config_file: Path
    last_checkpoint: Path

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint.path


def make_tiny_example(
    out_dir: str | Path, preset: str = "sa2va-1b", *, sizes: Sizes | None = None, seed: int = 0
) -> TinyExample:
    """Write ``base/`` (3-ish shards) and ``work_dirs/exp/iter_100.pth`` + ``last_checkpoint``.

    The checkpoint is a fine-tune that segments (``finetune.write_segmenting_finetune``): once
    converted, the model answers ``[SEG]<|im_end|>`` and ``predict_forward`` returns one mask,
    which it does only if both the LoRA and the fine-tuned head arrived. Fitting it loads the
    base folder with our test remote code in this process (a few seconds). ``last_checkpoint``
    holds the absolute checkpoint path and the work dir holds the resolved config as
    ``<name>.py``, as an mmengine run leaves them.
    """
    from .finetune import write_segmenting_finetune  # it imports this module

    s = sizes or Sizes.tiny()
    p = get_preset(preset)
    root = Path(out_dir).resolve()
    base_layout_bytes = sum(math.prod(v) for v in hf_layout(p, s).values()) * 2
    base = write_base_folder(root / "base", p, s, seed=seed, max_shard_bytes=max(1, base_layout_bytes // 3 + 1))
    work = root / "work_dirs" / "exp"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = write_segmenting_finetune(work / "iter_100.pth", base, p, s, seed=seed + 1)
    last = work / "last_checkpoint"
    last.write_text(str(ckpt.path))
    cfg_text = training_config_text(
        p, lora_r=ckpt.lora_r, lora_alpha=ckpt.lora_alpha, path=str(base), work_dir=str(work)
    )
    cfg_file = work / (p.name.replace("-", "_") + "_finetune.py")
    cfg_file.write_text(cfg_text)
    return TinyExample(
        root=root, base_dir=base, work_dir=work, checkpoint=ckpt, config_file=cfg_file, last_checkpoint=last
    )


def _write_json(path: Path, obj: object, *, sort_keys: bool = False) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")
