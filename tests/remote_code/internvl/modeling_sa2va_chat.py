"""Sa2VA test model, InternVL family (written for sa2va-convert; no upstream Sa2VA code in it).

A small, CPU-friendly model with the HF key layout of a real Sa2VA folder (docs/DESIGN.md):
``vision_model.*`` (InternViT-shaped), ``mlp1.{0,1,3}``, ``language_model.*`` (transformers'
Qwen2ForCausalLM, or modeling_internlm2.py for InternLM2), ``grounding_encoder.sam2_model.*``
(sam2.py) and ``text_hidden_fcs.{0,2}``. It implements the ``predict_forward`` contract:

    model.preparing_for_generation(tokenizer, max_new_tokens=16)   # optional; caps generation
    out = model.predict_forward(image=pil_image, text="<image>Please segment the cat.", tokenizer=tok)
    out["prediction"]        # str: the decoded answer (special tokens kept, stop token included)
    out["prediction_masks"]  # one bool np.ndarray (n_frames, H, W) per generated [SEG]; [] without one

``video=[frames...]`` instead of ``image`` gives (n_frames, H, W) masks. Decoding is greedy, so the
output is a deterministic function of the weights. Runs on whatever device the weights are on.
"""

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_sa2va_chat import Sa2VAChatConfig
from .modeling_intern_vit import InternVisionModel
from .modeling_internlm2 import InternLM2ForCausalLM
from .sam2 import SAM2, image_to_tensor
from .templates import build_prompt, get_template, greedy_generate, stop_token_ids, token_id

IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, SEG_TOKEN = "<img>", "</img>", "<IMG_CONTEXT>", "[SEG]"
MAX_LLM_FRAMES = 5  # video: frames shown to the LLM (masks are made for every frame)


def build_language_model(llm_config):
    arch = llm_config.architectures[0]
    if arch.startswith("InternLM2"):
        return InternLM2ForCausalLM(llm_config)
    if arch == "Qwen2ForCausalLM":
        return Qwen2ForCausalLM(llm_config)
    return AutoModelForCausalLM.from_config(llm_config)


def pixel_shuffle(x, scale):
    """Space-to-depth: [B, h, w, C] -> [B, h*scale, w*scale, C/scale^2] (each r x r block into channels)."""
    b, h, w, c = x.shape
    r = round(1 / scale)
    x = x.reshape(b, h // r, r, w // r, r, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // r, w // r, r * r * c)


def param_of(module):
    return next(module.parameters())


class Sa2VAChatModel(PreTrainedModel):
    config_class = Sa2VAChatConfig
    main_input_name = "pixel_values"
    _no_split_modules = ["InternVisionModel", "Qwen2DecoderLayer", "InternLM2DecoderLayer", "SAM2Model"]
    _supports_sdpa = True

    def __init__(self, config, vision_model=None, language_model=None):
        super().__init__(config)
        vc, lc = config.vision_config, config.llm_config
        self.template = config.template
        self.downsample_ratio = config.downsample_ratio
        self.num_image_token = int((config.force_image_size // vc.patch_size) ** 2 * config.downsample_ratio ** 2)
        self.vision_model = vision_model or InternVisionModel(vc)
        self.language_model = language_model or build_language_model(lc)
        vit_out = vc.hidden_size * round(1 / config.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(nn.LayerNorm(vit_out), nn.Linear(vit_out, lc.hidden_size), nn.GELU(),
                                  nn.Linear(lc.hidden_size, lc.hidden_size))
        self.grounding_encoder = SAM2(config.sam2_test_config)
        ds = self.grounding_encoder.sam2_model.no_mem_embed.shape[-1]
        self.text_hidden_fcs = nn.Sequential(nn.Linear(lc.hidden_size, lc.hidden_size), nn.ReLU(inplace=True),
                                             nn.Linear(lc.hidden_size, ds), nn.Dropout(0.0))
        self.max_new_tokens = 2048
        self.img_context_token_id = None  # set by predict_forward from its tokenizer
        self.post_init()

    def _init_weights(self, module):
        """Called per module (own parameters only); small random weights, ones for norms and scales."""
        with torch.no_grad():
            for name, p in module.named_parameters(recurse=False):
                if "Norm" in type(module).__name__:
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias":
                    p.zero_()
                elif name in ("ls1", "ls2", "g_weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)

    # ------------------------------------------------------------------ embeddings
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def extract_feature(self, pixel_values):
        """[F, 3, S, S] -> image token embeddings [F, num_image_token, H]."""
        vit = self.vision_model(pixel_values, select_layer=self.config.select_layer)[:, 1:]  # drop class token
        b, n, c = vit.shape
        side = int(n ** 0.5)
        vit = pixel_shuffle(vit.reshape(b, side, side, c), self.downsample_ratio)
        vit = vit.reshape(b, -1, vit.shape[-1])
        return self.mlp1(vit.to(param_of(self.mlp1).device))

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with the <IMG_CONTEXT> positions replaced by image features."""
        embed_tokens = self.language_model.get_input_embeddings()
        embeds = embed_tokens(input_ids.to(embed_tokens.weight.device))
        if pixel_values is not None:
            vision = param_of(self.vision_model)
            feats = self.extract_feature(pixel_values.to(vision.device, vision.dtype)).reshape(-1, embeds.shape[-1])
            where = input_ids.to(embeds.device) == self.img_context_token_id
            if int(where.sum()) != feats.shape[0]:
                raise ValueError(f"prompt has {int(where.sum())} {IMG_CONTEXT_TOKEN} tokens, "
                                 f"the images give {feats.shape[0]} features")
            embeds = embeds.clone()
            embeds[where] = feats.to(embeds.device, embeds.dtype)
        return embeds

    def forward(self, input_ids, pixel_values=None, **kwargs):
        """Logits of a prompt (no loss, no cache): enough for checks; training is not supported."""
        lm = self.language_model
        hidden = lm.model(inputs_embeds=self.embed(input_ids, pixel_values), use_cache=False)["last_hidden_state"]
        return CausalLMOutputWithPast(logits=lm.get_output_embeddings()(hidden))

    # ------------------------------------------------------------------ prediction
    def preparing_for_generation(self, tokenizer=None, max_new_tokens=2048, torch_dtype=None, **kwargs):
        """Cap generation at ``max_new_tokens``. ``torch_dtype`` is accepted and ignored: inputs follow the weights."""
        self.max_new_tokens = max_new_tokens

    def image_token_string(self, n_frames, video):
        block = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * self.num_image_token + IMG_END_TOKEN
        if not video:
            return block * n_frames
        return "".join(f"Frame{i + 1}: {block}\n" for i in range(n_frames))

    @torch.no_grad()
    def predict_forward(self, image=None, video=None, text=None, tokenizer=None, mask_prompts=None, processor=None,
                        **kwargs):
        if mask_prompts is not None:
            raise NotImplementedError("the test model does not take visual prompts (mask_prompts)")
        tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", processor)
        self.img_context_token_id = token_id(tokenizer, IMG_CONTEXT_TOKEN)
        seg_id = token_id(tokenizer, SEG_TOKEN)
        template = get_template(self.template)

        frames = list(video) if video is not None else ([image] if image is not None else [])
        llm_frames = frames
        if len(frames) > MAX_LLM_FRAMES:
            step = len(frames) / MAX_LLM_FRAMES
            llm_frames = [frames[int(i * step)] for i in range(MAX_LLM_FRAMES)]
        image_tokens = self.image_token_string(len(llm_frames), video is not None) if frames else ""
        # Upstream moves its inputs with .cuda() (FORMATS.md §8); so do we, so that CI exercises the
        # CPU round trip's mapping of these calls.
        input_ids = tokenizer(build_prompt(template, text or "", image_tokens), return_tensors="pt").input_ids.cuda()
        pixel_values = None
        if frames:
            size = self.config.force_image_size
            pixel_values = torch.stack([image_to_tensor(f, size) for f in llm_frames]).cuda()

        lm = self.language_model
        ids, seg_states = greedy_generate(lm.model, lm.get_output_embeddings(), lm.get_input_embeddings(),
                                          self.embed(input_ids, pixel_values), self.max_new_tokens,
                                          stop_token_ids(tokenizer, template), seg_id)
        prediction = tokenizer.decode(ids, skip_special_tokens=False)
        masks = []
        if seg_states and frames:
            fcs = param_of(self.text_hidden_fcs)
            seg_embeds = self.text_hidden_fcs(torch.stack(seg_states).to(fcs.device, fcs.dtype))
            masks = self.grounding_encoder.predict_masks(frames, seg_embeds, frames[0].size)
        return {"prediction": prediction, "prediction_masks": masks}
