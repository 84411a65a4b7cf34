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

The tracker's modules live in ``sam3pkg_*.py`` files that only this file imports (and they each
other), as in the self-contained SAM3 remote code (fork cjhcjh123-666/EvoSeg@4a21e99,
``projects/sa2va/hf/models_qwen3vl_sam3/sam3.py`` lines 23-27): plain transformers copies a local
folder's remote code one import deep, so ``from_pretrained`` of such a folder fails with
``FileNotFoundError`` for the first ``sam3pkg_*`` file; the round trip makes them importable.
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import sam3pkg_build_sam3_tracker as _build_mod  # noqa: F401 - the fork's form, `from . import x`
from .sam2 import frame_mask_logits, image_to_tensor
from .sam3pkg_build_sam3_tracker import build_sam3_tracker

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SAM3(nn.Module):
    """``grounding_encoder``: holds the tracker as ``sam2_model`` and turns [SEG] embeddings into masks."""

    def __init__(self, sam3_test_config=None):
        super().__init__()
        cfg = {"C": 16, "Ds": 32, "blocks": 1, "image_size": 64, "patch": 8, "pos_grid": 8, "mlp": 74}
        cfg.update(sam3_test_config or {})
        self.sam2_model = build_sam3_tracker(cfg)
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
