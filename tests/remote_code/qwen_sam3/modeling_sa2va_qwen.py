"""Sa2VA test model, Qwen3-VL + SAM3 family (written for sa2va-convert; no upstream Sa2VA, Qwen-VL or
SAM3 code in it). The Qwen-VL side is the Qwen-VL test model's (qwen_vl.py, shared with
tests/remote_code/qwen); the grounding encoder is the SAM3-tracker stand-in of sam3.py, and
``predict_forward`` requires ``processor=`` as upstream's Sa2VA-Qwen3-VL-4B-SAM3 does (it asserts
``processor is not None`` and takes the tokenizer from it; a ``tokenizer=`` argument alone is refused).

Key layout, as in a real Sa2VA-Qwen2.5-VL / Qwen3-VL folder (docs/DESIGN.md):
``model.model.visual.*`` (a small ViT with a 2x2 patch merger: qwen_vl.py), ``model.model.language_model.*``
(transformers' Qwen2Model), ``model.lm_head.weight``, ``grounding_encoder.sam2_model.*``
(sam3.py: SAM3's tracker, kept under SAM2's attribute name), ``text_hidden_fcs.{0,2}``.
"""

import torch
from qwen_vl_utils import process_vision_info  # noqa: F401 - imported at module level, as upstream does
from torchvision.transforms.functional import to_pil_image  # noqa: F401 - likewise (see below)

from .configuration_sa2va_chat import Sa2VAChatConfigQwen
from .qwen_vl import Sa2VAQwenVLBase
from .sam2 import image_to_tensor  # noqa: F401  (for qwen_vl.py and sam3.py: see below)
from .sam3 import SAM3
from .templates import token_id  # noqa: F401  (for qwen_vl.py: see below)

# Upstream's modeling_sa2va_qwen.py imports torchvision and qwen_vl_utils at module level (lines 12 and 16 of
# projects/sa2va/hf/models_qwen2_5_vl/modeling_sa2va_qwen.py, bytedance/Sa2VA 9832e1a): loading the folder needs
# both installed, and a torchvision built for another torch fails right there.
# transformers copies a local folder's remote code into its module cache one import deep: the files that
# the auto_map module imports itself, not the files those import in turn. So every file qwen_vl.py and
# sam3.py import (sam2.py, templates.py) is imported here too, or loading the folder fails.


class Sa2VAChatModelQwen(Sa2VAQwenVLBase):
    config_class = Sa2VAChatConfigQwen
    _no_split_modules = ["VisionTower", "Qwen2DecoderLayer", "Sam3Tracker"]

    def make_grounding_encoder(self, config):
        return SAM3(config.sam3_test_config)

    @torch.no_grad()
    def predict_forward(self, image=None, video=None, text=None, tokenizer=None, mask_prompts=None, processor=None,
                        **kwargs):
        if mask_prompts is not None:
            raise NotImplementedError("the test model does not take visual prompts (mask_prompts)")
        if processor is None:
            raise ValueError("predict_forward needs processor= (the Qwen-VL + SAM3 model reads its tokenizer "
                             "from the processor, as upstream's does)")
        return self.answer(getattr(processor, "tokenizer", processor), image=image, video=video, text=text)
