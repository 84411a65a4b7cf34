"""Config of the Sa2VA test model, InternVL family (test model, written for sa2va-convert).

Fields read by the model (docs/DESIGN.md, "config.json of the InternVL family"):
``llm_config`` (``architectures[0]`` picks the LM: ``Qwen2ForCausalLM`` -> transformers' Qwen2,
``InternLM2ForCausalLM`` -> modeling_internlm2.py, anything else -> ``AutoModelForCausalLM`` of its
``model_type``), ``vision_config``, ``template``, ``sam2_test_config``, ``downsample_ratio``,
``force_image_size``, ``select_layer``. The other InternVL fields are kept and saved, not used.
The sub-configs are config objects (``config.llm_config.vocab_size`` works) and saved as dicts.
"""

import copy

from transformers import AutoConfig, PretrainedConfig, Qwen2Config

from .configuration_intern_vit import InternVisionConfig
from .configuration_internlm2 import InternLM2Config

DEFAULT_LLM = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 128, "hidden_size": 32,
               "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
               "tie_word_embeddings": False}


def make_llm_config(llm_config):
    if isinstance(llm_config, PretrainedConfig):
        return llm_config
    d = copy.deepcopy(llm_config) if llm_config else copy.deepcopy(DEFAULT_LLM)
    arch = (d.get("architectures") or ["Qwen2ForCausalLM"])[0]
    d["architectures"] = [arch]
    model_type = d.pop("model_type", None)
    d.pop("transformers_version", None)
    rope = d.get("rope_parameters")  # written by transformers 5.x; 4.x reads rope_theta
    if "rope_theta" not in d and isinstance(rope, dict) and "rope_theta" in rope:
        d["rope_theta"] = rope["rope_theta"]
    if arch.startswith("InternLM2"):
        return InternLM2Config(**d)
    if arch.startswith("Qwen2") or model_type in (None, "qwen2"):
        return Qwen2Config(**d)
    return AutoConfig.for_model(model_type, **d)


class Sa2VAChatConfig(PretrainedConfig):
    model_type = "sa2va_chat"
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, template="qwen_chat", sam2_test_config=None,
                 downsample_ratio=0.5, force_image_size=None, select_layer=-1, ps_version="v2",
                 dynamic_image_size=False, use_thumbnail=False, max_dynamic_patch=1, min_dynamic_patch=1,
                 use_backbone_lora=0, use_llm_lora=0, tie_word_embeddings=False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(vision_config, PretrainedConfig):
            vision_config = InternVisionConfig(**{k: v for k, v in (vision_config or {}).items()
                                                  if k not in ("model_type", "transformers_version")})
        self.vision_config = vision_config
        self.llm_config = make_llm_config(llm_config)
        self.template = template
        self.sam2_test_config = dict(sam2_test_config or {"C": 16, "Ds": 32, "blocks": 1, "image_size": 64})
        self.downsample_ratio = downsample_ratio
        self.force_image_size = force_image_size or vision_config.image_size
        self.select_layer = select_layer
        self.ps_version = ps_version
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.max_dynamic_patch = max_dynamic_patch
        self.min_dynamic_patch = min_dynamic_patch
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.tie_word_embeddings = tie_word_embeddings

    def to_dict(self):
        out = super().to_dict()
        for key in ("vision_config", "llm_config"):
            sub = getattr(self, key)
            out[key] = sub.to_dict() if isinstance(sub, PretrainedConfig) else dict(sub)
            out[key].pop("transformers_version", None)
        out["model_type"] = self.model_type
        return out
