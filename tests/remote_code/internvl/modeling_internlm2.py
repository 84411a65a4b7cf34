"""A tiny InternLM2-shaped causal LM (test model, written for sa2va-convert).

Keys (under ``language_model.``): ``model.tok_embeddings``, ``model.layers.{i}.attention.{wqkv,wo}``,
``model.layers.{i}.feed_forward.{w1,w2,w3}``, ``model.layers.{i}.{attention_norm,ffn_norm}``,
``model.norm``, ``output``. Head dim hd = ``head_dim`` (default hidden/heads).

``wqkv`` is packed as InternLM2 packs it: for each of the ``nkv`` key/value groups, the group's
``nh/nkv`` query heads, then its key head, then its value head; rows ``(nh + 2*nkv) * hd``.
The KV cache is a tuple of per-layer ``(k, v)`` pairs (the legacy cache format), passed as
``past_key_values``.

Like upstream's InternLM2 code, where users get hurt (FORMATS.md §9):
``InternLM2PreTrainedModel(PreTrainedModel, GenerationMixin)`` and
``InternLM2ForCausalLM(InternLM2PreTrainedModel)`` with its own ``prepare_inputs_for_generation``
(upstream ``projects/sa2va/hf/models/modeling_internlm2.py`` lines 721, 1003 and 1127 at
bytedance/Sa2VA 9832e1a). transformers >= 4.50's ``can_generate()`` does not look through a base
whose name contains "PreTrainedModel", so the causal LM gets no ``generation_config`` and
``generate`` fails with "'NoneType' object has no attribute 'transformers_version'"; with
transformers 4.49 (upstream's ``legacy`` pin) it generates.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_internlm2 import InternLM2Config


class InternLM2RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate(x, positions, theta):
    """Rotary position embedding (rotate-half form) on [B, heads, T, hd]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, hd/2]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class InternLM2Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.nh, self.nkv = config.num_attention_heads, config.num_key_value_heads
        self.hd = config.head_dim
        self.theta = config.rope_theta
        self.wqkv = nn.Linear(config.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=config.bias)
        self.wo = nn.Linear(self.nh * self.hd, config.hidden_size, bias=config.bias)

    def forward(self, x, past=None):
        b, t, _ = x.shape
        groups = self.nh // self.nkv
        qkv = self.wqkv(x).view(b, t, self.nkv, groups + 2, self.hd)
        q = qkv[..., :groups, :].reshape(b, t, self.nh, self.hd).transpose(1, 2)
        k = qkv[..., groups, :].transpose(1, 2)  # [B, nkv, T, hd]
        v = qkv[..., groups + 1, :].transpose(1, 2)
        start = 0 if past is None else past[0].shape[2]
        positions = torch.arange(start, start + t, device=x.device)
        q, k = rotate(q, positions, self.theta), rotate(k, positions, self.theta)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), attn_mask=mask
        )
        return self.wo(out.transpose(1, 2).reshape(b, t, self.nh * self.hd)), (k, v)


class InternLM2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = InternLM2Attention(config)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, past=None):
        h, present = self.attention(self.attention_norm(x), past)
        x = x + h
        return x + self.feed_forward(self.ffn_norm(x)), present


class InternLM2PreTrainedModel(PreTrainedModel, GenerationMixin):
    """GenerationMixin comes in here, as in upstream (modeling_internlm2.py:721), not in the causal LM."""

    config_class = InternLM2Config
    base_model_prefix = "model"
    _no_split_modules = ["InternLM2DecoderLayer"]
    _skip_keys_device_placement = "past_key_values"

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()


class InternLM2Model(InternLM2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def forward(self, input_ids=None, inputs_embeds=None, past_key_values=None, use_cache=True,
                output_hidden_states=False, return_dict=True, **kwargs):
        x = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        presents, hidden = [], [x] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            past = None if not past_key_values else past_key_values[i]
            x, present = layer(x.to(layer.ffn_norm.weight.device), past)
            presents.append(present)
            if output_hidden_states and i < len(self.layers) - 1:
                hidden.append(x)
        x = self.norm(x.to(self.norm.weight.device))
        if output_hidden_states:
            hidden.append(x)
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=tuple(presents) if use_cache else None,
                                       hidden_states=tuple(hidden) if hidden is not None else None)


class InternLM2ForCausalLM(InternLM2PreTrainedModel):
    """No GenerationMixin among its own bases: upstream modeling_internlm2.py:1003."""

    def __init__(self, config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.output

    def forward(self, input_ids=None, inputs_embeds=None, past_key_values=None, use_cache=True, attention_mask=None,
                position_ids=None, output_hidden_states=False, return_dict=True, **kwargs):
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, past_key_values=past_key_values,
                         use_cache=use_cache, output_hidden_states=output_hidden_states)
        logits = self.output(out.last_hidden_state.to(self.output.weight.device)).float()
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                      **kwargs):
        """Defined here, as upstream does (modeling_internlm2.py:1127): with a legacy tuple cache, feed only
        the ids not in the cache; the prompt's embeddings only on the first step."""
        if past_key_values:
            input_ids = input_ids[:, past_key_values[0][0].shape[2]:] if input_ids.shape[1] > \
                past_key_values[0][0].shape[2] else input_ids[:, -1:]
        if inputs_embeds is not None and not past_key_values:
            inputs = {"inputs_embeds": inputs_embeds}
        else:
            inputs = {"input_ids": input_ids}
        inputs.update(past_key_values=past_key_values, use_cache=kwargs.get("use_cache"),
                      attention_mask=attention_mask)
        return inputs

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):
        return tuple(tuple(t.index_select(0, beam_idx.to(t.device)) for t in layer) for layer in past_key_values)
