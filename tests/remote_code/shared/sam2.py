"""A tiny SAM2-shaped grounding model (test model, written for sa2va-convert; no SAM2 code in it).

The same file is shipped with every test family (it lives once, in shared/); the SAM3 stand-in
(qwen_sam3/sam3.py) builds on its parts.

It keeps the parameter names of SAM2 that a Sa2VA checkpoint and HF folder carry (see
docs/DESIGN.md, "SAM2 stand-in"), with sizes from ``config.sam2_test_config``:
``C`` trunk width, ``Ds`` decoder width (256 in real SAM2), ``blocks`` trunk blocks,
``image_size`` input side (a multiple of 32).

How a mask is made, for one ``[SEG]`` embedding (``Ds`` wide, from ``text_hidden_fcs``):
image -> trunk (7x7/4 patch conv + pos_embed + blocks) -> 4-level FPN neck -> stride-16 features;
frame 0 adds ``no_mem_embed``; later video frames add a memory of the previous frame's mask
(``memory_encoder.fuser`` + ``memory_attention`` q_proj); the ``[SEG]`` embedding is the sparse
prompt, ``no_mask_embed`` the dense one; the mask decoder runs joint attention over its tokens and
the image, upscales x4, and takes the dot product with the hypernetwork MLP of mask token 0.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_to_tensor(image, size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """PIL image -> normalised float tensor [3, size, size] (bicubic resize, no torchvision)."""
    from PIL import Image

    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def attention(q, k, v, heads):
    """Multi-head attention on [B, N, D] tensors."""
    b, n, d = q.shape
    q, k, v = (t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


class MLP(nn.Module):
    def __init__(self, dims, act=nn.ReLU):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = act()

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else self.act(layer(x))
        return x


class LayerNorm2d(nn.Module):
    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- image encoder
class PatchEmbed(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.proj = nn.Conv2d(3, c, kernel_size=7, stride=4, padding=3)


class Attention(nn.Module):
    def __init__(self, dim, heads=1):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x):
        return self.proj(attention(*self.qkv(x).chunk(3, dim=-1), self.heads))


class TrunkBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, eps=1e-6)
        self.attn = Attention(c)
        self.norm2 = nn.LayerNorm(c, eps=1e-6)
        self.mlp = MLP([c, 4 * c, c], act=nn.GELU)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Trunk(nn.Module):
    def __init__(self, c, blocks):
        super().__init__()
        self.patch_embed = PatchEmbed(c)
        self.pos_embed = nn.Parameter(torch.zeros(1, c, 7, 7))
        self.blocks = nn.ModuleList(TrunkBlock(c) for _ in range(blocks))

    def forward(self, pixels):  # [B,3,S,S] -> [B,C,S/4,S/4]
        x = self.patch_embed.proj(pixels)
        b, c, h, w = x.shape
        x = x + F.interpolate(self.pos_embed.float(), size=(h, w), mode="bicubic").to(x.dtype)
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return x.transpose(1, 2).reshape(b, c, h, w)


class NeckConv(nn.Module):
    def __init__(self, c, ds):
        super().__init__()
        self.conv = nn.Conv2d(c, ds, kernel_size=1)


class Neck(nn.Module):
    """Top-down FPN over four pooled levels of the trunk; ``convs[0]`` is the coarsest (stride 32)."""

    def __init__(self, c, ds):
        super().__init__()
        self.convs = nn.ModuleList(NeckConv(c, ds) for _ in range(4))

    def forward(self, x):  # x at stride 4 -> features at strides 32, 16, 8, 4
        levels = [F.avg_pool2d(x, 8), F.avg_pool2d(x, 4), F.avg_pool2d(x, 2), x]
        outs, top = [], None
        for conv, level in zip(self.convs, levels):
            y = conv.conv(level)
            top = y if top is None else y + F.interpolate(top, scale_factor=2.0, mode="nearest")
            outs.append(top)
        return outs


class ImageEncoder(nn.Module):
    def __init__(self, c, ds, blocks):
        super().__init__()
        self.trunk = Trunk(c, blocks)
        self.neck = Neck(c, ds)

    def forward(self, pixels):
        return self.neck(self.trunk(pixels))[1]  # stride 16: the mask decoder's image embedding


# ----------------------------------------------------------------------------- memory (video)
class FuserLayer(nn.Module):
    def __init__(self, ds):
        super().__init__()
        self.dwconv = nn.Conv2d(ds, ds, kernel_size=7, padding=3, groups=ds)
        self.g_weight = nn.Parameter(torch.ones(ds))  # SAM2's `gamma`, renamed in HF folders

    def forward(self, x):
        return x + self.g_weight.view(1, -1, 1, 1) * self.dwconv(x)


class Fuser(nn.Module):
    def __init__(self, ds):
        super().__init__()
        self.layers = nn.ModuleList(FuserLayer(ds) for _ in range(2))


class MemoryEncoder(nn.Module):
    def __init__(self, ds):
        super().__init__()
        self.fuser = Fuser(ds)

    def forward(self, feats, mask_logits):
        gate = F.interpolate(mask_logits.float(), size=feats.shape[-2:], mode="bilinear")
        x = feats * torch.sigmoid(gate).to(feats.dtype)
        for layer in self.fuser.layers:
            x = layer(x)
        return x


class MemorySelfAttention(nn.Module):
    def __init__(self, ds):
        super().__init__()
        self.q_proj = nn.Linear(ds, ds)


class MemoryAttentionLayer(nn.Module):
    def __init__(self, ds):
        super().__init__()
        self.self_attn = MemorySelfAttention(ds)


class MemoryAttention(nn.Module):
    def __init__(self, ds):
        super().__init__()
        self.layers = nn.ModuleList([MemoryAttentionLayer(ds)])

    def forward(self, feats, memory):  # add the projected memory to the current frame's features
        proj = self.layers[0].self_attn.q_proj(memory.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return feats + proj


# ----------------------------------------------------------------------------- prompt encoder, decoder
class PromptEncoder(nn.Module):
    def __init__(self, ds):
        super().__init__()
        self.no_mask_embed = nn.Embedding(1, ds)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, ds) for _ in range(4))


class DecoderSelfAttention(nn.Module):
    def __init__(self, ds, heads=1):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(ds, ds) for _ in range(4))
        self.heads = heads

    def forward(self, x):
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class DecoderLayer(nn.Module):
    def __init__(self, ds):
        super().__init__()
        self.self_attn = DecoderSelfAttention(ds)


class DecoderTransformer(nn.Module):
    def __init__(self, ds):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(ds) for _ in range(2))

    def forward(self, tokens, image_tokens):  # joint attention over prompt tokens and image
        x = torch.cat([tokens, image_tokens], dim=1)
        for layer in self.layers:
            x = x + layer.self_attn(x)
        return x[:, : tokens.shape[1]], x[:, tokens.shape[1]:]


class MaskDecoder(nn.Module):
    def __init__(self, ds):
        super().__init__()
        self.iou_token = nn.Embedding(1, ds)
        self.mask_tokens = nn.Embedding(4, ds)
        self.transformer = DecoderTransformer(ds)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(ds, ds // 4, kernel_size=2, stride=2),
            LayerNorm2d(ds // 4),
            nn.GELU(),
            nn.ConvTranspose2d(ds // 4, ds // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP([ds, ds, ds, ds // 8]) for _ in range(4))
        self.iou_prediction_head = MLP([ds, ds, ds, 4])

    def forward(self, image_embed, dense, sparse):
        """image_embed, dense [B,Ds,h,w]; sparse [B,n,Ds] -> mask logits [B,1,4h,4w], iou [B,4]."""
        b, ds, h, w = image_embed.shape
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        src = (image_embed + dense).flatten(2).transpose(1, 2)
        tokens, src = self.transformer(tokens, src)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, ds, h, w))
        hyper = torch.stack([mlp(tokens[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        masks = (hyper @ upscaled.flatten(2)).reshape(b, 4, *upscaled.shape[-2:])
        return masks[:, :1], self.iou_prediction_head(tokens[:, 0])  # single-mask output: mask 0


class SAM2Model(nn.Module):
    def __init__(self, c=16, ds=32, blocks=1, image_size=64):
        super().__init__()
        if ds % 8 or image_size % 32:
            raise ValueError(f"sam2_test_config: Ds must be a multiple of 8, image_size of 32; got {ds}, {image_size}")
        self.image_size = image_size
        self.image_encoder = ImageEncoder(c, ds, blocks)
        self.memory_encoder = MemoryEncoder(ds)
        self.memory_attention = MemoryAttention(ds)
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(7, 1, 1, 64))  # kept for the key layout; unused
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, ds))
        self.sam_prompt_encoder = PromptEncoder(ds)
        self.sam_mask_decoder = MaskDecoder(ds)


def frame_mask_logits(sam, feats, seg_embeds, with_memory):
    """Mask logits of each frame, [n, 1, 4h, 4w], for n [SEG] embeddings [n, Ds] over frame features [F, Ds, h, w].

    Frame 0 adds ``no_mem_embed``; a later frame's features go through ``with_memory(features, previous
    frame's features, previous frame's logits)`` (the tracker's memory). Then the mask decoder, with the
    [SEG] embedding as the sparse prompt and ``no_mask_embed`` as the dense one."""
    weight = sam.no_mem_embed
    n, ds, (h, w) = seg_embeds.shape[0], feats.shape[1], feats.shape[-2:]
    sparse = seg_embeds.to(weight.device, weight.dtype).unsqueeze(1)  # [n, 1, Ds]
    dense = sam.sam_prompt_encoder.no_mask_embed.weight.view(1, ds, 1, 1).expand(n, ds, h, w)
    logits, prev = [], None
    for t in range(feats.shape[0]):
        cur = feats[t : t + 1].expand(n, -1, -1, -1)
        if prev is None:
            cur = cur + sam.no_mem_embed.view(1, ds, 1, 1)
        else:
            cur = with_memory(cur, feats[t - 1 : t].expand(n, -1, -1, -1), prev)
        prev, _ = sam.sam_mask_decoder(cur, dense, sparse)
        logits.append(prev)
    return logits


class SAM2(nn.Module):
    """``grounding_encoder``: holds ``sam2_model`` and turns [SEG] embeddings into masks."""

    def __init__(self, sam2_test_config=None):
        super().__init__()
        cfg = dict(sam2_test_config or {})
        dims = cfg.get("C", 16), cfg.get("Ds", 32), cfg.get("blocks", 1), cfg.get("image_size", 64)
        self.sam2_model = SAM2Model(*dims)

    def init_state(self, images):
        """The tracking state, made as upstream's ``SAM2VideoPredictor.init_state`` makes it
        (``projects/sa2va/hf/models/sam2.py`` lines 3699-3719, bytedance/Sa2VA 9832e1a): its device and
        storage device are ``torch.device("cuda")`` whatever device the weights are on, so on a machine
        without a GPU the mask path needs the round trip's CPU mapping of every CUDA use (FORMATS.md §9)."""
        return {"images": images, "num_frames": len(images), "device": torch.device("cuda"),
                "storage_device": torch.device("cuda"), "outputs": {}}

    @torch.no_grad()
    def predict_masks(self, frames, seg_embeds, size):
        """frames: list of PIL images; seg_embeds [n, Ds]; size (W, H).

        Returns n bool arrays of shape (n_frames, H, W): one per [SEG]."""
        sam = self.sam2_model
        weight = sam.no_mem_embed
        state = self.init_state(torch.stack([image_to_tensor(f, sam.image_size) for f in frames]).to(weight.dtype))
        # Upstream runs SAM2 under torch.autocast('cuda', bfloat16) (sam2.py:336); enabled only for bf16 weights
        # here so that fp32 tests keep fp32 numerics, but the call is made either way.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=weight.dtype == torch.bfloat16):
            return self._predict_masks(sam, state, seg_embeds, size)

    def _predict_masks(self, sam, state, seg_embeds, size):
        # each frame goes to the GPU as upstream's _get_image_feature sends it (sam2.py:3463: .cuda())
        feats = torch.cat([sam.image_encoder(state["images"][t].cuda().unsqueeze(0))
                           for t in range(state["num_frames"])])  # [F, Ds, h, w]

        def with_memory(cur, prev_feats, prev_logits):
            # a frame's output is kept on the storage device (sam2.py:3543: .to(storage_device, non_blocking=True))
            # and read back with .cuda(non_blocking=True) (sam2.py:2825, 3788)
            stored = prev_logits.to(state["storage_device"], non_blocking=True)
            return sam.memory_attention(cur, sam.memory_encoder(prev_feats, stored.cuda(non_blocking=True)))

        logits = frame_mask_logits(sam, feats, seg_embeds, with_memory)
        n, (h4, w4) = seg_embeds.shape[0], logits[0].shape[-2:]
        video = torch.zeros(n, state["num_frames"], h4, w4, device=state["device"])  # as upstream's consolidated outputs
        for t, frame_logits in enumerate(logits):
            video[:, t] = frame_logits[:, 0].float()
        masks = F.interpolate(video, size=(size[1], size[0]), mode="bilinear", align_corners=False) > 0
        return [m.cpu().numpy() for m in masks]
