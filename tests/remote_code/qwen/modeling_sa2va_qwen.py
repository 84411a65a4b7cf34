"""Sa2VA test model, Qwen-VL family (written for sa2va-convert; no upstream Sa2VA or Qwen-VL code in it).

Key layout, as in a real Sa2VA-Qwen2.5-VL / Qwen3-VL folder (docs/DESIGN.md):
``model.model.visual.*`` (a small ViT with a 2x2 patch merger: qwen_vl.py), ``model.model.language_model.*``
(transformers' Qwen2Model), ``model.lm_head.weight``, ``grounding_encoder.sam2_model.*``
(sam2.py), ``text_hidden_fcs.{0,2}``. ``predict_forward`` follows the same contract as the InternVL
family's (see modeling_sa2va_chat.py there) and also takes ``processor=``: only its tokenizer is
used (images are preprocessed here), and with ``processor=None`` the ``tokenizer`` is used.

All but the grounding encoder and the start of ``predict_forward`` is the Qwen-VL side shared with the
Qwen-VL + SAM3 family (qwen_vl.py).
"""

import torch
from qwen_vl_utils import process_vision_info  # noqa: F401 - imported at module level, as upstream does
from torchvision.transforms.functional import to_pil_image  # noqa: F401 - likewise (see below)

from .configuration_sa2va_chat import Sa2VAChatConfigQwen
from .qwen_vl import Sa2VAQwenVLBase
from .sam2 import SAM2
from .templates import token_id  # noqa: F401  (for qwen_vl.py: see below)

# Upstream's modeling_sa2va_qwen.py imports torchvision and qwen_vl_utils at module level (lines 12 and 16 of
# projects/sa2va/hf/models_qwen2_5_vl/modeling_sa2va_qwen.py, bytedance/Sa2VA 9832e1a): loading the folder needs
# both installed, and a torchvision built for another torch fails right there.
# transformers copies a local folder's remote code into its module cache one import deep: the files that
# the auto_map module imports itself, not the files those import in turn. So every file qwen_vl.py
# imports (sam2.py, templates.py) is imported here too, or loading the folder fails.


class Sa2VAChatModelQwen(Sa2VAQwenVLBase):
    config_class = Sa2VAChatConfigQwen
    _no_split_modules = ["VisionTower", "Qwen2DecoderLayer", "SAM2Model"]

    def make_grounding_encoder(self, config):
        return SAM2(config.sam2_test_config)

    @torch.no_grad()
    def predict_forward(self, image=None, video=None, text=None, tokenizer=None, mask_prompts=None, processor=None,
                        **kwargs):
        if mask_prompts is not None:
            raise NotImplementedError("the test model does not take visual prompts (mask_prompts)")
        if tokenizer is None:
            tokenizer = getattr(processor, "tokenizer", processor)
        # Upstream moves its inputs with .cuda() (FORMATS.md §8); so do we, so that CI exercises the
        # CPU round trip's mapping of these calls.
        return self.answer(tokenizer, image=image, video=video, text=text, move=lambda t: t.cuda())
