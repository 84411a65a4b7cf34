"""Deterministic tensor values, one tensor at a time.

Each tensor is generated from its own seed (derived from the fixture seed and
the tensor's name), so a writer can produce any tensor alone, in any order,
and the same (seed, name) always gives the same bytes. That is what lets a
multi-GB realistic fixture be streamed to disk with about one tensor in memory,
and what makes "same seed -> byte-identical files" testable.

Values are shaped like a trained model's so that the test remote-code model
computes something finite: norm weights around 1, layer scales small, other
weights and biases small around 0. LoRA factors are larger than a real
model's so that a forgotten merge changes outputs far beyond bf16 rounding.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .. import dtypes

FILLS = ("random", "fast")
_CHUNK = 1 << 22  # elements generated per randn call: bounds the fp32 scratch memory
_BLOCK = 4099  # 'fast' fill: random block tiled over the tensor (prime, so rows do not repeat)


def key_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one tensor, stable across processes and platforms."""
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def init_stats(name: str) -> tuple[float, float]:
    """(mean, std) of a tensor from its name (HF or training spelling)."""
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if "." in name else ""
    if leaf in ("gamma", "g_weight"):
        return 0.1, 0.01
    if leaf in ("ls1", "ls2"):
        return 0.1, 0.01
    if ".lora_A." in name or ".lora_B." in name:
        return 0.0, 0.05
    is_norm = "norm" in parent or parent == "ln_q"
    if leaf == "weight" and (is_norm or name.endswith(("mlp1.0.weight", "output_upscaling.1.weight"))):
        return 1.0, 0.02
    return 0.0, 0.02


def make_tensor(
    name: str,
    shape: tuple[int, ...],
    dtype: str,
    *,
    seed: int,
    fill: str = "random",
    zero: bool = False,
) -> torch.Tensor:
    """The tensor ``name`` of a fixture with ``seed``; ``fill='fast'`` tiles a small random block.

    'fast' is for benchmark fixtures of many GB, where drawing billions of
    normal samples would dominate the run; values still differ per tensor
    and per position within a block.
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, not {fill!r}")
    tdtype = dtypes.to_torch(dtype)
    out = torch.empty(shape, dtype=tdtype)
    if zero:
        return out.zero_()
    numel = math.prod(shape)
    if numel == 0:
        return out
    mean, std = init_stats(name)
    g = torch.Generator().manual_seed(key_seed(seed, name))
    flat = out.view(-1)
    if fill == "fast" and numel > _BLOCK:
        block = (torch.randn(_BLOCK, generator=g) * std + mean).to(tdtype)
        whole = numel // _BLOCK
        flat[: whole * _BLOCK].view(whole, _BLOCK).copy_(block.expand(whole, _BLOCK))
        flat[whole * _BLOCK :].copy_(block[: numel - whole * _BLOCK])
        return out
    for start in range(0, numel, _CHUNK):
        n = min(_CHUNK, numel - start)
        flat[start : start + n].copy_(torch.randn(n, generator=g).mul_(std).add_(mean))
    return out
