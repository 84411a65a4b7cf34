"""Fixture generator shared by the tests, the README demo and the benchmarks.

It writes, deterministically and without any download:

- base HF folders of every family (``write_base_folder``), tiny or with real
  shapes (``Sizes.real``), streamed tensor by tensor;
- training checkpoints shaped like mmengine/xtuner/DeepSpeed output
  (``write_training_checkpoint``), with keys written from FORMATS.md §3;
- SAM2 ``.pt`` files (``write_sam2_checkpoint``) and a whole demo tree
  (``make_tiny_example``);
- an independent fp32 reference of the conversion result (``reference_output``).

The key layouts live in ``layouts`` (HF side per DESIGN.md, training side per
FORMATS.md, kept independent of each other and of the converter's keymaps).
Writing checkpoints needs the ``test`` extra (mmengine-lite, tokenizers).
"""

from .fixtures import (
    CHECKPOINT_FORMATS,
    FixtureCheckpoint,
    TinyExample,
    base_config,
    find_remote_code,
    make_tiny_example,
    write_base_folder,
    write_sam2_checkpoint,
    write_training_checkpoint,
)
from .layouts import (
    INTERNVL_TOKENS,
    PRESETS,
    SA2VA_TOKENS,
    Preset,
    Sizes,
    get_preset,
    hf_layout,
    param_count,
    sam2_layout,
    training_layout,
)
from .reference import reference_output, training_name_to_hf
from .tokenizer import build_tokenizer, special_tokens, write_tokenizer

__all__ = [
    "CHECKPOINT_FORMATS",
    "FixtureCheckpoint",
    "INTERNVL_TOKENS",
    "PRESETS",
    "Preset",
    "SA2VA_TOKENS",
    "Sizes",
    "TinyExample",
    "base_config",
    "build_tokenizer",
    "find_remote_code",
    "get_preset",
    "hf_layout",
    "make_tiny_example",
    "param_count",
    "reference_output",
    "sam2_layout",
    "special_tokens",
    "training_layout",
    "training_name_to_hf",
    "write_base_folder",
    "write_sam2_checkpoint",
    "write_tokenizer",
    "write_training_checkpoint",
]
