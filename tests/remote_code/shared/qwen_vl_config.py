"""Config of the Qwen-VL side of the Sa2VA test models (test model, written for sa2va-convert).

Shared by the two Qwen-VL families, qwen/ (SAM2 stand-in) and qwen_sam3/ (SAM3 stand-in): it lives
once, in shared/. Each family's configuration_sa2va_chat.py subclasses ``Sa2VAChatConfigQwenBase``
and adds its grounding encoder's test config (``sam2_test_config`` or ``sam3_test_config``).

Fields read by the model: ``text_config`` (always read as a Qwen2 text model, whatever its
``model_type``: the fixtures use one Qwen2 body for the Qwen2.5-VL and Qwen3-VL presets),
``vision_config`` (the small visual tower of qwen_vl.py: ``hidden_size``,
``intermediate_size``, ``depth``, ``num_heads``, ``patch_size``, ``temporal_patch_size``,
``spatial_merge_size``, ``image_size``, ``out_hidden_size``), ``template``.
Sub-configs are config objects, saved as dicts.
"""

import copy

from transformers import PretrainedConfig, Qwen2Config

DEFAULT_TEXT = {"model_type": "qwen2", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                "tie_word_embeddings": False}


def make_text_config(text_config):
    if isinstance(text_config, PretrainedConfig):
        return text_config
    d = copy.deepcopy(text_config) if text_config else copy.deepcopy(DEFAULT_TEXT)
    d.pop("model_type", None)
    d.pop("transformers_version", None)
    rope = d.get("rope_parameters")  # written by transformers 5.x; 4.x reads rope_theta
    if "rope_theta" not in d and isinstance(rope, dict) and "rope_theta" in rope:
        d["rope_theta"] = rope["rope_theta"]
    d.setdefault("tie_word_embeddings", False)
    return Qwen2Config(**d)


class Sa2VAQwenVisionConfig(PretrainedConfig):
    model_type = "sa2va_test_qwen_vision"

    def __init__(self, hidden_size=16, intermediate_size=32, depth=1, num_heads=2, patch_size=7,
                 temporal_patch_size=2, spatial_merge_size=2, image_size=28, out_hidden_size=None,
                 in_channels=3, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.depth = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.spatial_merge_size = spatial_merge_size
        self.image_size = image_size
        self.out_hidden_size = out_hidden_size
        self.in_channels = in_channels


class Sa2VAChatConfigQwenBase(PretrainedConfig):
    """``Sa2VAChatConfigQwen`` less its grounding encoder's config (each family's file adds it)."""

    is_composition = True

    def __init__(self, text_config=None, vision_config=None, template="qwen_chat", tie_word_embeddings=False,
                 **kwargs):
        super().__init__(**kwargs)
        self.text_config = make_text_config(text_config)
        if not isinstance(vision_config, PretrainedConfig):
            vision_config = Sa2VAQwenVisionConfig(**{k: v for k, v in (vision_config or {}).items()
                                                     if k not in ("model_type", "transformers_version")})
        if vision_config.out_hidden_size is None:
            vision_config.out_hidden_size = self.text_config.hidden_size
        self.vision_config = vision_config
        self.template = template
        self.tie_word_embeddings = tie_word_embeddings

    def to_dict(self):
        out = super().to_dict()
        for key in ("vision_config", "text_config"):
            sub = getattr(self, key)
            out[key] = sub.to_dict() if isinstance(sub, PretrainedConfig) else dict(sub)
            out[key].pop("transformers_version", None)
        out["model_type"] = self.model_type
        return out
