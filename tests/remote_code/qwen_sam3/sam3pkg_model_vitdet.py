"""The SAM3 stand-in's ViT trunk and its fused MLP op (test model, written for sa2va-convert; no SAM3 code in it).

One of the ``sam3pkg_*.py`` files: in the layout of the self-contained Sa2VA SAM3 remote code
(fork cjhcjh123-666/EvoSeg@4a21e99, ``projects/sa2va/hf/models_qwen3vl_sam3/``; FORMATS.md §9) the
modeling file imports ``sam3.py``, which imports the tracker's builder
(``sam3pkg_build_sam3_tracker.py``), which imports this file: three imports deep, where plain
transformers copies only one for a local folder. See sam3.py for what the stand-in keeps of SAM3.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def addmm_act(activation, linear, mat1):
    """act(mat1 @ W.T + b) as one fused op in bf16, like SAM3's: no autograd, bf16 result."""
    if torch.is_grad_enabled():
        raise ValueError("Expected grad to be disabled.")
    if activation not in (nn.GELU, F.gelu, nn.ReLU, F.relu):
        raise ValueError(f"Unexpected activation {activation}")
    flat = mat1.reshape(-1, mat1.shape[-1]).to(torch.bfloat16)
    y = torch.ops.aten._addmm_activation(linear.bias.detach().to(torch.bfloat16), flat,
                                         linear.weight.detach().to(torch.bfloat16).t(),
                                         use_gelu=activation in (nn.GELU, F.gelu))
    return y.view(*mat1.shape[:-1], y.shape[-1])


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(addmm_act(type(self.act), self.fc1, x))


class Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(F.scaled_dot_product_attention(q, k, v))


class Block(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch, bias=False)


class ViT(nn.Module):
    def __init__(self, dim, blocks, patch, pos_grid, mlp):
        super().__init__()
        self.patch_embed = PatchEmbed(dim, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid * pos_grid + 1, dim))  # + class token
        self.ln_pre = nn.LayerNorm(dim, eps=1e-5)
        self.blocks = nn.ModuleList(Block(dim, mlp) for _ in range(blocks))

    def forward(self, pixels):  # [B,3,S,S] -> [B,C,S/P,S/P]
        x = self.patch_embed.proj(pixels)
        b, c, h, w = x.shape
        g = math.isqrt(self.pos_embed.shape[1] - 1)
        pos = self.pos_embed[:, 1:].reshape(1, g, g, c).permute(0, 3, 1, 2)
        if (g, g) != (h, w):
            pos = F.interpolate(pos.float(), size=(h, w), mode="bicubic").to(x.dtype)
        x = (x + pos.to(x.dtype)).flatten(2).transpose(1, 2)
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return x.transpose(1, 2).reshape(b, -1, h, w)
