"""Config of the Sa2VA test model, Qwen-VL + SAM3 family (test model, written for sa2va-convert).

Fields read by the model: those of the Qwen-VL side (``text_config``, ``vision_config``, ``template``:
see qwen_vl_config.py, shared with the Qwen-VL family) and ``sam3_test_config`` (the SAM3 stand-in of
sam3.py: ``C``, ``Ds``, ``blocks``, ``image_size``, ``patch``, ``pos_grid``, ``mlp``).
Sub-configs are config objects, saved as dicts.
"""

from .qwen_vl_config import Sa2VAChatConfigQwenBase


class Sa2VAChatConfigQwen(Sa2VAChatConfigQwenBase):
    model_type = "sa2va_chat_qwen"

    def __init__(self, text_config=None, vision_config=None, template="qwen_chat", sam3_test_config=None,
                 tie_word_embeddings=False, **kwargs):
        super().__init__(text_config=text_config, vision_config=vision_config, template=template,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.sam3_test_config = dict(sam3_test_config or {"C": 16, "Ds": 32, "blocks": 1, "image_size": 64,
                                                          "patch": 8, "pos_grid": 8, "mlp": 74})
