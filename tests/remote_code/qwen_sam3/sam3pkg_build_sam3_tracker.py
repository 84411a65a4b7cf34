"""Builds the SAM3 stand-in's tracker (test model, written for sa2va-convert; no SAM3 code in it).

Imported by ``sam3.py`` only (never by the modeling file), and itself importing
``sam3pkg_model_vitdet.py``: the nested layout of the self-contained Sa2VA SAM3 remote code (fork
cjhcjh123-666/EvoSeg@4a21e99, ``sam3.py`` lines 23-27 import ``sam3pkg_build_sam3_tracker`` and other
``sam3pkg_*`` siblings; FORMATS.md §9).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .sam2 import Fuser, MaskDecoder, MemoryAttention, PromptEncoder
from .sam3pkg_model_vitdet import ViT


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


def build_sam3_tracker(cfg):
    """The tracker from the (test) config, as the real builder makes it from SAM3's fixed sizes."""
    return Sam3Tracker(cfg)
