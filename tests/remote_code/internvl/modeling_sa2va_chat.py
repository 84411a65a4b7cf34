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

Where users get hurt, it behaves like upstream's ``projects/sa2va/hf/models/modeling_sa2va_chat.py``
(bytedance/Sa2VA 9832e1a; FORMATS.md §9), so that CI meets the same failures:

- ``Sa2VAChatModel.__init__`` never calls ``self.post_init()`` (upstream lines 98-172): transformers 5
  cannot load it (``all_tied_weights_keys`` is set in ``post_init``);
- it imports torchvision at module level (upstream lines 10-11) and builds its image transform
  with it (upstream ``preparing_for_generation``, lines 571-576), and peft (line 18): a torchvision
  built for another torch fails the import;
- the answer comes from ``self.language_model.generate(inputs_embeds=..., output_hidden_states=True,
  return_dict_in_generate=True)`` (upstream ``generate``, line 515, called from ``predict_forward`` at line 735),
  and each ``[SEG]``'s hidden state is read from the generated steps as upstream does (lines 751-756):
  with the InternLM2 LM this fails on transformers >= 4.50 (modeling_internlm2.py);
- input ids and pixel values move with ``.cuda()`` (upstream lines 610, 720).
"""

import torch
import torchvision.transforms as T  # noqa: N812 - upstream's spelling (modeling_sa2va_chat.py:10)
from peft import LoraConfig  # noqa: F401 - imported at module level, as upstream does (line 18)
from torch import nn
from torchvision.transforms.functional import InterpolationMode
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_sa2va_chat import Sa2VAChatConfig
from .modeling_intern_vit import InternVisionModel
from .modeling_internlm2 import InternLM2ForCausalLM
from .sam2 import IMAGENET_MEAN, IMAGENET_STD, SAM2
from .templates import build_prompt, get_template, stop_token_ids, token_id

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
        self.transform = T.Compose([
            T.Lambda(lambda img: img.convert("RGB")),
            T.Resize((config.force_image_size, config.force_image_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ])
        # no self.post_init(): upstream's __init__ has none (see the module docstring)

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

    def generation_config_for(self, tokenizer, template):
        """Greedy, capped, stopping at the template's stop tokens (upstream: its gen_config + stop words)."""
        stops = sorted(stop_token_ids(tokenizer, template))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=stops,
                                pad_token_id=pad)

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
        # Upstream moves its inputs with .cuda() (modeling_sa2va_chat.py:610, 720; FORMATS.md §8); so do we, so
        # that CI exercises the CPU round trip's mapping of these calls.
        input_ids = tokenizer(build_prompt(template, text or "", image_tokens), return_tensors="pt").input_ids.cuda()
        pixel_values = None
        if frames:
            pixel_values = torch.stack([self.transform(f) for f in llm_frames]).cuda()

        embeds = self.embed(input_ids, pixel_values)
        out = self.language_model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids, dtype=torch.bool).to(embeds.device),
            generation_config=self.generation_config_for(tokenizer, template), output_hidden_states=True,
            return_dict_in_generate=True, use_cache=True)
        ids = out.sequences[0]
        prediction = tokenizer.decode(ids, skip_special_tokens=False)
        masks = []
        seg_states = seg_hidden_states(out.hidden_states, ids, seg_id)
        if len(seg_states) and frames:
            fcs = param_of(self.text_hidden_fcs)
            seg_embeds = self.text_hidden_fcs(seg_states.to(fcs.device, fcs.dtype))
            masks = self.grounding_encoder.predict_masks(frames, seg_embeds, frames[0].size)
        return {"prediction": prediction, "prediction_masks": masks}


def seg_hidden_states(step_hidden_states, ids, seg_id):
    """The last layer's hidden state at each generated ``[SEG]`` fed back into the model.

    ``generate`` returns, per step, the hidden states of that step's inputs: the prompt, then each
    generated token but the last. So a ``[SEG]`` gets a mask only when another token follows it,
    as in upstream (``get_seg_hidden_states`` over ``sequences[0][:-1]``, lines 751-756 and 774)."""
    last = torch.cat([step[-1][0] for step in step_hidden_states], dim=0)  # [prompt + generated - 1, H]
    fed = ids[:-1].to(last.device)
    if seg_id is None or not len(fed):
        return last[:0]
    return last[-len(fed):][fed == seg_id]
