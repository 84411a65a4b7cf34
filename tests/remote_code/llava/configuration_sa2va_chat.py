"""Config of the Sa2VA test model, LLaVA-1.5 family (test model, written for sa2va-convert).

Upstream's ``Sa2VAChatConfigLlava`` is a transformers ``LlavaConfig`` plus ``template``
(docs/FAMILIES.md); this one keeps the fields our small model reads: ``text_config`` (read as a
Llama text model), ``vision_config`` (CLIP vision fields: ``hidden_size``, ``intermediate_size``,
``num_hidden_layers``, ``num_attention_heads``, ``image_size``, ``patch_size``, ``layer_norm_eps``),
``image_token_index``, ``vision_feature_layer``, ``template`` and ``sam2_test_config``.
"""

import copy

from transformers import CLIPVisionConfig, LlamaConfig, PretrainedConfig


def _plain(d, drop=("model_type", "transformers_version")):
    d = copy.deepcopy(d or {})
    for k in drop:
        d.pop(k, None)
    return d


class Sa2VAChatConfigLlava(PretrainedConfig):
    model_type = "sa2va_chat_llava"
    is_composition = True

    def __init__(self, text_config=None, vision_config=None, template="vicuna", image_token_index=None,
                 vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                 sam2_test_config=None, tie_word_embeddings=False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(text_config, PretrainedConfig):
            text = _plain(text_config) or {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                                           "num_hidden_layers": 1, "num_attention_heads": 4}
            rope = text.get("rope_parameters")  # written by transformers 5.x; 4.x reads rope_theta
            if "rope_theta" not in text and isinstance(rope, dict) and "rope_theta" in rope:
                text["rope_theta"] = rope["rope_theta"]
            text.setdefault("tie_word_embeddings", False)
            text_config = LlamaConfig(**text)
        if not isinstance(vision_config, PretrainedConfig):
            vision_config = CLIPVisionConfig(**_plain(vision_config))
        self.text_config = text_config
        self.vision_config = vision_config
        self.template = template
        self.image_token_index = image_token_index
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.projector_hidden_act = projector_hidden_act
        self.sam2_test_config = dict(sam2_test_config or {"C": 16, "Ds": 32, "blocks": 1, "image_size": 64})
        self.tie_word_embeddings = tie_word_embeddings

    def to_dict(self):
        out = super().to_dict()
        for key in ("vision_config", "text_config"):
            sub = getattr(self, key)
            out[key] = sub.to_dict() if isinstance(sub, PretrainedConfig) else dict(sub)
            out[key].pop("transformers_version", None)
        out["model_type"] = self.model_type
        return out
