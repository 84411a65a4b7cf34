"""A tiny InternLM2-shaped causal LM (test model, written for sa2va-convert).

Keys (under ``language_model.``): ``model.tok_embeddings``, ``model.layers.{i}.attention.{wqkv,wo}``,
``model.layers.{i}.feed_forward.{w1,w2,w3}``, ``model.layers.{i}.{attention_norm,ffn_norm}``,
``model.norm``, ``output``. Head dim hd = ``head_dim`` (default hidden/heads).

``wqkv`` is packed as InternLM2 packs it: for each of the ``nkv`` key/value groups, the group's
``nh/nkv`` query heads, then its key head, then its value head; rows ``(nh + 2*nkv) * hd``.
The KV cache is a tuple of per-layer ``(k, v)`` pairs, passed as ``past_key_values``; outputs are dicts.
"""

import torch
import torch.nn.functional as F
from torch import nn


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


class InternLM2Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids=None, inputs_embeds=None, past_key_values=None, use_cache=True, **kwargs):
        x = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        presents = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            x, present = layer(x.to(layer.ffn_norm.weight.device), past)
            presents.append(present)
        x = self.norm(x.to(self.norm.weight.device))
        # a plain dict: transformers 5.x output classes rename `past_key_values` to `cache`
        return {"last_hidden_state": x, "past_key_values": tuple(presents) if use_cache else None}


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = InternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.output

    def forward(self, input_ids=None, inputs_embeds=None, past_key_values=None, use_cache=True, **kwargs):
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, past_key_values=past_key_values,
                         use_cache=use_cache)
        out["logits"] = self.output(out.last_hidden_state.to(self.output.weight.device))
        return out
