"""SAM3-tracker stand-in for the Sa2VA test model (written for sa2va-convert; no SAM3 code in it).

What it keeps from the real Sa2VA SAM3 remote code (docs/FAMILIES.md), because the converter and
the round trip depend on it:

- the grounding encoder holds the tracker as ``sam2_model`` (upstream kept SAM2's attribute name),
  so keys are ``grounding_encoder.sam2_model.*``, but with SAM3's sub-modules:
  ``backbone.vision_backbone.trunk`` (a ViT: ``patch_embed.proj`` without bias, ``pos_embed`` of the
  pretraining grid plus a class token, ``ln_pre``, ``blocks.{k}.{norm1,attn.qkv,attn.proj,norm2,
  mlp.fc1,mlp.fc2}``), ``backbone.vision_backbone.convs.{0..3}`` (neck, scales 4, 2, 1, 0.5 upstream;
  scale 1 is used here), ``maskmem_backbone`` (``pix_feat_proj`` and the two fuser blocks, whose
  layer scale is ``g_weight`` here and ``gamma`` in training), ``transformer.encoder`` (memory
  attention), ``no_mem_embed``, ``maskmem_tpos_enc``, ``sam_prompt_encoder``, ``sam_mask_decoder``;
- the ViT MLP goes through ``addmm_act``, a fused op that refuses autograd and computes in bf16
  (returning bf16), as SAM3's perflib op does;
- mask inference runs under ``torch.no_grad()`` and ``torch.autocast("cuda", dtype=torch.bfloat16)``,
  as upstream's ``language_embd_inference``.

Without CUDA the autocast is disabled (torch warns), so with fp32 weights the bf16 output of
``addmm_act`` meets an fp32 ``fc2`` and fails, as the real model does; the round trip maps
``torch.autocast('cuda')`` to the CPU's autocast, under which it runs. Inputs move with
``.to(device)``, not ``.cuda()``, as in upstream's SAM3 modeling file.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .sam2 import Fuser, MaskDecoder, MemoryAttention, PromptEncoder, frame_mask_logits, image_to_tensor

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


class NeckConv(nn.Module):
    def __init__(self, dim, ds):
        super().__init__()
        self.conv_1x1 = nn.Conv2d(dim, ds, kernel_size=1)


class VisionBackbone(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.trunk = ViT(cfg["C"], cfg["blocks"], cfg["patch"], cfg["pos_grid"], cfg["mlp"])
        self.convs = nn.ModuleList(NeckConv(cfg["C"], cfg["Ds"]) for _ in range(4))

    def forward(self, pixels):  # scale-1 features: the mask decoder's image embedding
        x = self.trunk(pixels)
        conv = self.convs[2].conv_1x1
        return conv(x.to(conv.weight.dtype))


class Backbone(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.vision_backbone = VisionBackbone(cfg)


class MaskMemBackbone(nn.Module):
    """Memory of the previous frame: its features gated by its mask, then the two fuser blocks."""

    def __init__(self, ds):
        super().__init__()
        self.pix_feat_proj = nn.Conv2d(ds, ds, kernel_size=1)
        self.fuser = Fuser(ds)

    def forward(self, feats, mask_logits):
        gate = F.interpolate(mask_logits.float(), size=feats.shape[-2:], mode="bilinear")
        x = self.pix_feat_proj(feats) * torch.sigmoid(gate).to(feats.dtype)
        for layer in self.fuser.layers:
            x = layer(x)
        return x


class MemTransformer(nn.Module):
    def __init__(self, ds):
        super().__init__()
        self.encoder = MemoryAttention(ds)  # SAM2's memory attention, here under transformer.encoder

    def forward(self, feats, memory):
        return self.encoder(feats, memory)


class Sam3Tracker(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ds, size, patch = cfg["Ds"], cfg["image_size"], cfg["patch"]
        if ds % 8 or size % patch:
            raise ValueError(f"sam3_test_config: Ds must be a multiple of 8, image_size of patch; got {cfg}")
        self.image_size = size
        self.backbone = Backbone(cfg)
        self.maskmem_backbone = MaskMemBackbone(ds)
        self.transformer = MemTransformer(ds)
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(7, 1, 1, 64))  # kept for the key layout; unused
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, ds))
        self.sam_prompt_encoder = PromptEncoder(ds)
        self.sam_mask_decoder = MaskDecoder(ds)


class SAM3(nn.Module):
    """``grounding_encoder``: holds the tracker as ``sam2_model`` and turns [SEG] embeddings into masks."""

    def __init__(self, sam3_test_config=None):
        super().__init__()
        cfg = {"C": 16, "Ds": 32, "blocks": 1, "image_size": 64, "patch": 8, "pos_grid": 8, "mlp": 74}
        cfg.update(sam3_test_config or {})
        self.sam2_model = Sam3Tracker(cfg)
        self.image_size = cfg["image_size"]

    @torch.no_grad()
    def predict_masks(self, frames, seg_embeds, size):
        """frames: PIL images; seg_embeds [n, Ds]; size (W, H) -> n bool arrays (n_frames, H, W)."""
        sam = self.sam2_model
        weight = sam.no_mem_embed
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            pixels = torch.stack([image_to_tensor(f, self.image_size, IMAGENET_MEAN, IMAGENET_STD)
                                  for f in frames]).to(weight.device, weight.dtype)
            feats = sam.backbone.vision_backbone(pixels).to(weight.dtype)  # [F, Ds, h, w]
            logits = frame_mask_logits(sam, feats, seg_embeds, lambda cur, prev_feats, prev_logits: sam.transformer(
                cur, sam.maskmem_backbone(prev_feats, prev_logits)))
        logits = torch.cat(logits, dim=1).float()
        masks = F.interpolate(logits, size=(size[1], size[0]), mode="bilinear", align_corners=False) > 0
        return [m.cpu().numpy() for m in masks]
