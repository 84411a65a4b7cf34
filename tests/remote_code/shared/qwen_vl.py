"""The Qwen-VL side of the Sa2VA test models (written for sa2va-convert; no upstream Sa2VA or Qwen-VL code in it).

Shared by the two Qwen-VL families, qwen/ (grounding encoder: sam2.py) and qwen_sam3/ (sam3.py): it
lives once, in shared/. ``Sa2VAQwenVLBase`` is the whole model class but for what differs between the
families: the config class, the grounding encoder (``make_grounding_encoder``) and the start of
``predict_forward`` (where the tokenizer comes from, and how inputs are moved: ``answer(..., move=)``).
Its own relative imports (sam2.py, templates.py) are imported by each family's modeling file too:
transformers copies a local folder's remote code only one import deep from the ``auto_map`` module.

Visual tower keys (under ``model.model.visual.``), with Dv = vision hidden_size, Iv = intermediate_size,
T = temporal_patch_size, P = patch_size, m = spatial_merge_size, H = out_hidden_size (text hidden):
  patch_embed.proj.weight            [Dv, 3, T, P, P]  (Conv3d, no bias)
  blocks.{k}.norm1.{weight,bias}     [Dv]              (LayerNorm)
  blocks.{k}.norm2.{weight,bias}     [Dv]
  blocks.{k}.attn.qkv.{weight,bias}  [3Dv, Dv], [3Dv]
  blocks.{k}.attn.proj.{weight,bias} [Dv, Dv], [Dv]
  blocks.{k}.mlp.fc1.{weight,bias}   [Iv, Dv], [Iv]
  blocks.{k}.mlp.fc2.{weight,bias}   [Dv, Iv], [Dv]
  merger.ln_q.{weight,bias}          [Dv]              (LayerNorm)
  merger.mlp.0.{weight,bias}         [m*m*Dv, m*m*Dv], [m*m*Dv]
  merger.mlp.2.{weight,bias}         [H, m*m*Dv], [H]
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Qwen2Model
from transformers.modeling_outputs import CausalLMOutputWithPast

from .sam2 import image_to_tensor
from .templates import (build_prompt, get_template, greedy_generate, masks_from_seg_states, stop_token_ids,
                        token_id)

# image tokens: Qwen-VL's when the tokenizer has them, else InternVL's
IMAGE_TOKENS = (("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"), ("<img>", "<IMG_CONTEXT>", "</img>"))
SEG_TOKEN = "[SEG]"
MAX_LLM_FRAMES = 5
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def sincos_2d(side, dim, device):
    """Fixed 2-D sine-cosine position embedding, [side*side, dim] (no parameters)."""
    y, x = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    freqs = 1.0 / (10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / max(dim // 4, 1)))
    parts = [f(c.flatten().float()[:, None] * freqs) for c in (y, x) for f in (torch.sin, torch.cos)]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1]))


class VisionPatchEmbed(nn.Module):
    def __init__(self, vc):
        super().__init__()
        k = (vc.temporal_patch_size, vc.patch_size, vc.patch_size)
        self.proj = nn.Conv3d(vc.in_channels, vc.hidden_size, kernel_size=k, stride=k, bias=False)
        self.temporal = vc.temporal_patch_size

    def forward(self, pixels):  # [F, 3, S, S] -> [F, g*g, Dv] (each image repeated over the temporal patch)
        x = self.proj(pixels.unsqueeze(2).expand(-1, -1, self.temporal, -1, -1))
        return x.flatten(2).transpose(1, 2)


class VisionAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.norm1 = nn.LayerNorm(vc.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(vc.hidden_size, eps=1e-6)
        self.attn = VisionAttention(vc.hidden_size, vc.num_heads)
        self.mlp = VisionMLP(vc.hidden_size, vc.intermediate_size)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, vc):
        super().__init__()
        merged = vc.hidden_size * vc.spatial_merge_size ** 2
        self.ln_q = nn.LayerNorm(vc.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, vc.out_hidden_size))
        self.m = vc.spatial_merge_size

    def forward(self, x):  # [F, g*g, Dv] -> [F, (g/m)^2, H]: each m x m block of patches becomes one token
        f, n, d = x.shape
        g, m = int(math.isqrt(n)), self.m
        x = self.ln_q(x).reshape(f, g // m, m, g // m, m, d).permute(0, 1, 3, 2, 4, 5)
        return self.mlp(x.reshape(f, (g // m) ** 2, m * m * d))


class VisionTower(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.patch_embed = VisionPatchEmbed(vc)
        self.blocks = nn.ModuleList(VisionBlock(vc) for _ in range(vc.depth))
        self.merger = PatchMerger(vc)

    def forward(self, pixels):
        x = self.patch_embed(pixels)
        x = x + sincos_2d(math.isqrt(x.shape[1]), x.shape[2], x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.merger(x)


class QwenVLModel(nn.Module):
    """Mirrors the layout of a Qwen-VL ``model``: ``visual`` + ``language_model``."""

    def __init__(self, config):
        super().__init__()
        self.visual = VisionTower(config.vision_config)
        self.language_model = Qwen2Model(config.text_config)


class QwenVLForGeneration(nn.Module):
    """Mirrors the layout of a Qwen-VL ``...ForConditionalGeneration``: ``model`` + ``lm_head``."""

    def __init__(self, config):
        super().__init__()
        self.model = QwenVLModel(config)
        tc = config.text_config
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)

    def generate(self, inputs_embeds, max_new_tokens, stop_ids, seg_id):
        """Greedy decoding; the generated ids and each fed-back ``[SEG]``'s last hidden state. What
        upstream's ``predict_forward`` takes from Qwen-VL's ``generate`` (sequences, hidden states)."""
        body = self.model.language_model
        return greedy_generate(body, self.lm_head, body.get_input_embeddings(), inputs_embeds, max_new_tokens,
                               stop_ids, seg_id)


def param_of(module):
    return next(module.parameters())



class Sa2VAQwenVLBase(PreTrainedModel):
    """Sa2VAChatModelQwen of both Qwen-VL families, less its config class, grounding encoder and the
    start of ``predict_forward``."""

    main_input_name = "pixel_values"
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        vc, hidden = config.vision_config, config.text_config.hidden_size
        self.template = config.template
        self.num_image_token = (vc.image_size // vc.patch_size // vc.spatial_merge_size) ** 2
        self.model = QwenVLForGeneration(config)
        self.grounding_encoder = self.make_grounding_encoder(config)
        ds = self.grounding_encoder.sam2_model.no_mem_embed.shape[-1]
        self.text_hidden_fcs = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                             nn.Linear(hidden, ds), nn.Dropout(0.0))
        self.image_pad_token_id = None  # set by predict_forward from its tokenizer
        # no self.post_init(): upstream's Sa2VAChatModelQwen.__init__ has none (projects/sa2va/hf/
        # models_qwen2_5_vl/modeling_sa2va_qwen.py lines 41-65, bytedance/Sa2VA 9832e1a), so, like it,
        # this model loads on transformers 4.x only (FORMATS.md §9)

    def make_grounding_encoder(self, config):
        """The family's ``grounding_encoder`` (holding ``sam2_model``)."""
        raise NotImplementedError

    def _init_weights(self, module):
        """Called per module (own parameters only); small random weights, ones for norms and scales."""
        with torch.no_grad():
            for name, p in module.named_parameters(recurse=False):
                if "Norm" in type(module).__name__:
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias":
                    p.zero_()
                elif name == "g_weight":
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)

    def get_input_embeddings(self):
        return self.model.model.language_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.lm_head

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with the image-pad positions replaced by visual features."""
        embed_tokens = self.model.model.language_model.get_input_embeddings()
        embeds = embed_tokens(input_ids.to(embed_tokens.weight.device))
        if pixel_values is not None:
            visual = self.model.model.visual
            vp = param_of(visual)
            feats = visual(pixel_values.to(vp.device, vp.dtype)).reshape(-1, embeds.shape[-1])
            where = input_ids.to(embeds.device) == self.image_pad_token_id
            if int(where.sum()) != feats.shape[0]:
                raise ValueError(f"prompt has {int(where.sum())} image tokens, images give {feats.shape[0]}")
            embeds = embeds.clone()
            embeds[where] = feats.to(embeds.device, embeds.dtype)
        return embeds

    def forward(self, input_ids, pixel_values=None, **kwargs):
        """Logits of a prompt (no loss, no cache): enough for checks; training is not supported."""
        body = self.model.model.language_model
        hidden = body(inputs_embeds=self.embed(input_ids, pixel_values), use_cache=False)["last_hidden_state"]
        return CausalLMOutputWithPast(logits=self.model.lm_head(hidden))

    def answer(self, tokenizer, image=None, video=None, text=None, move=None):
        """The rest of ``predict_forward`` once the family has its tokenizer; ``move`` (if given) is applied
        to the input ids and pixel values, as the family's upstream moves its inputs."""
        start, pad, end = next((t for t in IMAGE_TOKENS if all(token_id(tokenizer, s) is not None for s in t)),
                               IMAGE_TOKENS[-1])
        self.image_pad_token_id = token_id(tokenizer, pad)
        seg_id = token_id(tokenizer, SEG_TOKEN)
        template = get_template(self.template)

        frames = list(video) if video is not None else ([image] if image is not None else [])
        llm_frames = frames
        if len(frames) > MAX_LLM_FRAMES:
            step = len(frames) / MAX_LLM_FRAMES
            llm_frames = [frames[int(i * step)] for i in range(MAX_LLM_FRAMES)]
        block = start + pad * self.num_image_token + end
        if video is not None:
            image_tokens = "".join(f"Frame{i + 1}: {block}\n" for i in range(len(llm_frames)))
        else:
            image_tokens = block * len(llm_frames)
        move = move or (lambda t: t)
        input_ids = move(tokenizer(build_prompt(template, text or "", image_tokens), return_tensors="pt").input_ids)
        pixel_values = None
        if frames:
            size = self.config.vision_config.image_size
            pixel_values = move(torch.stack([image_to_tensor(f, size, CLIP_MEAN, CLIP_STD) for f in llm_frames]))

        # Like upstream, no preparing_for_generation() and the length written into the call:
        # self.model.generate(**mm_inputs, max_new_tokens=2048, ...) in projects/sa2va/hf/models_qwen2_5_vl/
        # modeling_sa2va_qwen.py lines 214-220 (and models_qwen3vl/, same lines), bytedance/Sa2VA 9832e1a.
        # A caller that wants a shorter answer wraps self.model.generate (the round trip's child does).
        ids, seg_states = self.model.generate(inputs_embeds=self.embed(input_ids, pixel_values), max_new_tokens=2048,
                                              stop_ids=stop_token_ids(tokenizer, template), seg_id=seg_id)
        masks = masks_from_seg_states(self, seg_states, frames)
        return {"prediction": tokenizer.decode(ids, skip_special_tokens=False), "prediction_masks": masks}
