"""Sa2VA test model, LLaVA-1.5 family (written for sa2va-convert; no upstream Sa2VA, LLaVA or CLIP code in it).

Key layout, as in a real Sa2VA-LLaVA-1.5-7B folder (docs/FAMILIES.md): the whole transformers
``LlavaForConditionalGeneration`` sits under ``model.``, so ``model.model.vision_tower.vision_model.*``
(a CLIP vision tower, below), ``model.model.multi_modal_projector.linear_{1,2}``,
``model.model.language_model.*`` (transformers' LlamaModel), ``model.lm_head.weight`` (untied); then
``grounding_encoder.sam2_model.*`` (sam2.py) and ``text_hidden_fcs.{0,2}``.

``predict_forward`` takes ``tokenizer=`` (required the first time, as upstream asserts) and accepts
``processor=`` only to ignore it, as upstream's does; ``mask_prompts`` are refused. The prompt is the
``vicuna`` template (``USER: ... ASSISTANT:``); each image becomes one ``<image>`` token per vision
patch (CLS dropped, features of ``vision_feature_layer``), and the video path gives the LLM at most 5
frames while every frame gets a mask. Inputs move with ``.to(device)``, as upstream's LLaVA file does.

Like upstream's ``projects/sa2va/hf/models_llava/modeling_sa2va_llava.py`` (fork cjhcjh123-666/EvoSeg@4a21e99;
FORMATS.md §9): it imports torchvision at module level (lines 6-7 and 15 there) and its ``__init__`` never
calls ``self.post_init()`` (lines 44-83 there), so it loads on transformers 4.x only.

CLIP keys under ``model.model.vision_tower.vision_model.`` (Dv hidden, Iv intermediate, P patch, n patches):
  embeddings.class_embedding [Dv], embeddings.patch_embedding.weight [Dv,3,P,P] (no bias),
  embeddings.position_embedding.weight [n+1, Dv], pre_layrnorm.{weight,bias},
  encoder.layers.{k}.self_attn.{q,k,v,out}_proj.{weight,bias}, .layer_norm{1,2}.{weight,bias},
  .mlp.fc{1,2}.{weight,bias}, post_layernorm.{weight,bias}
"""

import torch
import torch.nn.functional as F
import torchvision.transforms as T  # noqa: F401,N812 - imported at module level, as upstream does
from torch import nn
from torchvision.transforms.functional import InterpolationMode  # noqa: F401 - likewise
from transformers import LlamaModel, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_sa2va_chat import Sa2VAChatConfigLlava
from .sam2 import SAM2, image_to_tensor
from .templates import build_prompt, generate_with_masks, get_template, token_id

IMAGE_TOKENS = ("<image>", "<IMG_CONTEXT>")  # LLaVA's, else the fixture tokenizer's image token
SEG_TOKEN = "[SEG]"
MAX_LLM_FRAMES = 5
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ClipEmbeddings(nn.Module):
    def __init__(self, vc):
        super().__init__()
        n = (vc.image_size // vc.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.zeros(vc.hidden_size))
        self.patch_embedding = nn.Conv2d(3, vc.hidden_size, vc.patch_size, stride=vc.patch_size, bias=False)
        self.position_embedding = nn.Embedding(n + 1, vc.hidden_size)

    def forward(self, pixels):
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight.to(x.dtype)


class ClipAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.heads = heads

    def forward(self, x):
        b, n, d = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class ClipMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), QuickGELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.self_attn = ClipAttention(vc.hidden_size, vc.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.mlp = ClipMLP(vc.hidden_size, vc.intermediate_size)
        self.layer_norm2 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(vc) for _ in range(vc.num_hidden_layers))


class ClipVisionTransformer(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.embeddings = ClipEmbeddings(vc)
        self.pre_layrnorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.encoder = ClipEncoder(vc)
        self.post_layernorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)

    def hidden_states(self, pixels):
        """Every layer's output, the embeddings first (like output_hidden_states=True)."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return states


class ClipVisionModel(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.vision_model = ClipVisionTransformer(vc)


class Projector(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaModel(nn.Module):
    """Mirrors transformers' ``LlavaModel``: ``vision_tower``, ``multi_modal_projector``, ``language_model``."""

    def __init__(self, config):
        super().__init__()
        self.vision_tower = ClipVisionModel(config.vision_config)
        self.multi_modal_projector = Projector(config)
        self.language_model = LlamaModel(config.text_config)


class LlavaForGeneration(nn.Module):
    """Mirrors ``LlavaForConditionalGeneration``: ``model`` + ``lm_head``."""

    def __init__(self, config):
        super().__init__()
        self.model = LlavaModel(config)
        tc = config.text_config
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)


def param_of(module):
    return next(module.parameters())


class Sa2VAChatModelLlava(PreTrainedModel):
    config_class = Sa2VAChatConfigLlava
    main_input_name = "pixel_values"
    _no_split_modules = ["ClipLayer", "LlamaDecoderLayer", "SAM2Model"]
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        vc, hidden = config.vision_config, config.text_config.hidden_size
        self.template = config.template
        self.patch_token = (vc.image_size // vc.patch_size) ** 2
        self.model = LlavaForGeneration(config)
        self.grounding_encoder = SAM2(config.sam2_test_config)
        ds = self.grounding_encoder.sam2_model.no_mem_embed.shape[-1]
        self.text_hidden_fcs = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                             nn.Linear(hidden, ds), nn.Dropout(0.0))
        self.tokenizer = None
        self.max_new_tokens = 2048
        self.image_token_id = None
        # no self.post_init(): upstream's __init__ has none (see the module docstring)

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

    def image_features(self, pixel_values):
        tower = self.model.model.vision_tower.vision_model
        vp = param_of(tower)
        states = tower.hidden_states(pixel_values.to(vp.device, vp.dtype))
        feats = states[self.config.vision_feature_layer][:, 1:]  # 'default' strategy: CLS dropped
        return self.model.model.multi_modal_projector(feats)

    def embed(self, input_ids, pixel_values=None):
        embed_tokens = self.get_input_embeddings()
        embeds = embed_tokens(input_ids.to(embed_tokens.weight.device))
        if pixel_values is not None:
            feats = self.image_features(pixel_values).reshape(-1, embeds.shape[-1])
            where = input_ids.to(embeds.device) == self.image_token_id
            if int(where.sum()) != feats.shape[0]:  # HF LLaVA's hard count check
                raise ValueError(f"prompt has {int(where.sum())} image tokens, images give {feats.shape[0]}")
            embeds = embeds.clone()
            embeds[where] = feats.to(embeds.device, embeds.dtype)
        return embeds

    def forward(self, input_ids, pixel_values=None, **kwargs):
        """Logits of a prompt (no loss, no cache): enough for checks; training is not supported."""
        hidden = self.model.model.language_model(inputs_embeds=self.embed(input_ids, pixel_values),
                                                 use_cache=False)["last_hidden_state"]
        return CausalLMOutputWithPast(logits=self.model.lm_head(hidden))

    def preparing_for_generation(self, tokenizer, max_new_tokens=2048, **kwargs):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def predict_forward(self, image=None, video=None, text=None, past_text="", mask_prompts=None, tokenizer=None,
                        processor=None):
        if self.tokenizer is None:
            if tokenizer is None:
                raise ValueError("predict_forward needs tokenizer= (the LLaVA model has no processor)")
            self.preparing_for_generation(tokenizer)
        if mask_prompts is not None:
            raise NotImplementedError("Visual prompts are not supported for the LLaVA backbone.")
        tok = self.tokenizer
        image_token = next((t for t in IMAGE_TOKENS if token_id(tok, t) is not None), IMAGE_TOKENS[-1])
        self.image_token_id = token_id(tok, image_token)
        seg_id = token_id(tok, SEG_TOKEN)
        template = get_template(self.template.replace("-", "_"))

        frames = list(video) if video is not None else ([image] if image is not None else [])
        llm_frames = frames[:MAX_LLM_FRAMES]
        image_tokens = "\n".join([image_token * self.patch_token] * len(llm_frames))
        prompt = past_text + build_prompt(template, text or "", image_tokens)
        device = self.device
        input_ids = tok(prompt, return_tensors="pt").input_ids.to(device)
        pixel_values = None
        if frames:
            size = self.config.vision_config.image_size
            pixel_values = torch.stack([image_to_tensor(f, size, CLIP_MEAN, CLIP_STD) for f in llm_frames]).to(device)

        ids, masks = generate_with_masks(self, self.model.model.language_model, self.model.lm_head,
                                         self.embed(input_ids, pixel_values), tok, template, seg_id, frames)
        return {"prediction": tok.decode(ids, skip_special_tokens=False).strip(), "prediction_masks": masks}
