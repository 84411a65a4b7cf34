"""Config of the tiny InternLM2-shaped causal LM (test model, written for sa2va-convert)."""

from transformers import PretrainedConfig


class InternLM2Config(PretrainedConfig):
    model_type = "internlm2"

    def __init__(self, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
                 rope_theta=1000000.0, head_dim=None, bias=False, initializer_range=0.02, tie_word_embeddings=False,
                 use_cache=True, **kwargs):
        rope_parameters = kwargs.pop("rope_parameters", None) or {}  # transformers 5.x style
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_parameters.get("rope_theta", rope_theta)
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.bias = bias
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        self.use_cache = use_cache
