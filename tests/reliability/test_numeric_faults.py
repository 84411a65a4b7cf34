"""Numbers that would make a broken model: Inf in the checkpoint, Inf made by the merge, fp16 overflow.

A converted folder with Inf/NaN loads fine and then generates garbage, so
these are refused (exit 5) naming the checkpoint and the tensor; nothing is
published and no partial folder is left. ``tests/test_convert_errors.py``
covers NaN in a LoRA tensor and a full tensor beyond fp16; these add the
other routes to the same failure.
"""

from __future__ import annotations

import torch
from _reliability import Guard, assert_refused, load_fixture_checkpoint

LM = "mllm.model.language_model.base_model.model.model"
LORA_A = f"{LM}.layers.0.self_attn.q_proj.lora_A.default.weight"
LORA_B = f"{LM}.layers.0.self_attn.q_proj.lora_B.default.weight"
HF_Q = "language_model.model.layers.0.self_attn.q_proj.weight"


def _edit(path, fn) -> None:
    obj = load_fixture_checkpoint(path)
    fn(obj["state_dict"])
    torch.save(obj, path)


def _refused(sa2va, tiny, *needles: str, args: tuple = ()) -> str:
    guard = Guard((tiny.ckpt.path, tiny.base), tiny.out)
    r = sa2va(tiny.ckpt.path, tiny.out, "--base", tiny.base, *args)
    return assert_refused(r, 5, guard, tiny.ckpt.path, *needles)


def test_inf_in_a_full_checkpoint_tensor(sa2va, tiny):
    _edit(tiny.ckpt.path, lambda sd: sd["text_hidden_fcs.0.weight"].view(-1).__setitem__(5, float("inf")))
    _refused(sa2va, tiny, "NaN/Inf", "text_hidden_fcs.0.weight", "earlier checkpoint")


def test_merge_overflows_fp32_to_inf(sa2va, tiny):
    """Every input value is finite (1e30 fits bf16), but B @ A is ~1e61: the merged weight is Inf."""

    def huge(sd):
        sd[LORA_A].fill_(1e30)
        sd[LORA_B].fill_(1e30)
        assert torch.isfinite(sd[LORA_A]).all() and torch.isfinite(sd[LORA_B]).all()

    _edit(tiny.ckpt.path, huge)
    _refused(sa2va, tiny, "merged tensor", HF_Q, "NaN/Inf")


def test_merge_result_beyond_fp16(sa2va, tiny):
    """The LoRA delta (r * 100 * 100 * scale = 80000) pushes a merged weight past fp16's 65504."""

    def large(sd):
        sd[LORA_A].fill_(100.0)
        sd[LORA_B].fill_(100.0)

    _edit(tiny.ckpt.path, large)
    _refused(sa2va, tiny, HF_Q, "beyond fp16", "--dtype bf16", args=("--dtype", "fp16"))
