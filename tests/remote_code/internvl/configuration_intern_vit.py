"""Config of the tiny InternViT-shaped vision encoder (test model, written for sa2va-convert)."""

from transformers import PretrainedConfig


class InternVisionConfig(PretrainedConfig):
    model_type = "intern_vit_6b"

    def __init__(self, num_channels=3, patch_size=14, image_size=28, qkv_bias=True, hidden_size=32,
                 num_attention_heads=2, intermediate_size=64, num_hidden_layers=1, hidden_act="gelu",
                 norm_type="layer_norm", layer_norm_eps=1e-6, initializer_range=0.02, initializer_factor=1.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.qkv_bias = qkv_bias
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
