"""A tiny InternViT-shaped vision encoder (test model, written for sa2va-convert).

Keys (under ``vision_model.``): ``embeddings.{class_embedding, patch_embedding, position_embedding}``,
``encoder.layers.{j}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, norm1, norm2, ls1, ls2}``.

Like upstream's ``projects/sa2va/hf/models/modeling_intern_vit.py`` (bytedance/Sa2VA 9832e1a, line 13)
it imports timm's ``DropPath`` at module level: timm must be installed and import (it imports
torchvision, which fails beside a torch it was not built for), as users' environments need.
"""

import torch
import torch.nn.functional as F
from timm.models.layers import DropPath
from torch import nn


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, p, s = config.hidden_size, config.patch_size, config.image_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p)
        self.position_embedding = nn.Parameter(torch.zeros(1, (s // p) ** 2 + 1, d))

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.class_embedding.expand(x.shape[0], -1, -1).to(x.dtype)
        pos = self.position_embedding
        if pos.shape[1] != x.shape[1] + 1:  # input size differs from config.image_size: resample the grid
            g, n = int((pos.shape[1] - 1) ** 0.5), int(x.shape[1] ** 0.5)
            grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(n, n), mode="bicubic").permute(0, 2, 3, 1).reshape(1, n * n, -1)
            pos = torch.cat([pos[:, :1], grid.to(pos.dtype)], dim=1)
        return torch.cat([cls, x], dim=1) + pos.to(x.dtype)


class InternAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(d, 3 * d, bias=config.qkv_bias)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class InternMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.ls1 = nn.Parameter(torch.ones(d))  # layer scale
        self.ls2 = nn.Parameter(torch.ones(d))
        self.drop_path1 = DropPath(0.0)  # no parameters; identity at inference, as upstream's drop_path_rate 0
        self.drop_path2 = DropPath(0.0)

    def forward(self, x):
        x = x + self.drop_path1(self.attn(self.norm1(x)) * self.ls1)
        return x + self.drop_path2(self.mlp(self.norm2(x)) * self.ls2)


class InternVisionEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x):
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x.to(layer.ls1.device))
            hidden_states.append(x)
        return hidden_states


class InternVisionModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def forward(self, pixel_values, select_layer=-1):
        """[B, 3, S, S] -> hidden states of layer ``select_layer`` (class token first), [B, N+1, D]."""
        return self.encoder(self.embeddings(pixel_values))[select_layer]
