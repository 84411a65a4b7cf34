"""The transform stage on its own: one planned tensor in, the exact tensor to store out.

No files and no writer: sources are in-memory state dicts and each ``PlannedTensor`` is built by
hand, so a failure here points at ``transform/`` and nothing else. What it must do
(``transform/produce.py``): the checkpoint's tensor over the base's, ``W + scale * (B @ A)`` in fp32
with one cast at the end, the same result whole or streamed in row blocks, and refusals for NaN/Inf
and fp16 overflow; the LoRA delta report names all-zero B adapters.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sa2va_convert.errors import PlanError
from sa2va_convert.plan.types import LoraRef, PlannedTensor, SourceRef
from sa2va_convert.read.tensor_source import StateDictSource
from sa2va_convert.transform.produce import Prepared, TensorProducer, module_group

NAME = "language_model.model.layers.0.self_attn.q_proj.weight"
ROWS, COLS, RANK = 48, 32, 4


def _sources(**layers: dict[str, torch.Tensor]) -> dict[str, StateDictSource]:
    return {layer: StateDictSource(tensors, label=layer, path=Path(f"{layer}.pth")) for layer, tensors in layers.items()}


def _ref(layer: str, key: str, t: torch.Tensor) -> SourceRef:
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[t.dtype]
    return SourceRef(layer, key, tuple(t.shape), dtype)


def _lora_case(dtype: torch.dtype = torch.bfloat16, *, zero_b: bool = False, scale: float = 2.0):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(ROWS, COLS, generator=g).to(dtype)
    a = torch.randn(RANK, COLS, generator=g).to(dtype)
    b = torch.zeros(ROWS, RANK, dtype=dtype) if zero_b else torch.randn(ROWS, RANK, generator=g).to(dtype)
    sources = _sources(base={NAME: w}, checkpoint={"a": a, "b": b})
    lora = LoraRef(_ref("checkpoint", "a", a), _ref("checkpoint", "b", b), RANK, scale)
    return sources, PlannedTensor(NAME, (ROWS, COLS), "bf16", _ref("base", NAME, w), lora), (w, a, b)


def test_the_checkpoint_tensor_is_stored_cast_once_to_the_planned_dtype():
    trained = torch.randn(ROWS, COLS, dtype=torch.float32)
    sources = _sources(base={NAME: torch.zeros(ROWS, COLS)}, checkpoint={NAME: trained})
    pt = PlannedTensor(NAME, (ROWS, COLS), "bf16", _ref("checkpoint", NAME, trained))
    out = TensorProducer(sources)(pt)
    assert out.dtype == torch.bfloat16 and torch.equal(out, trained.to(torch.bfloat16))


def test_lora_merge_is_the_fp32_reference_with_one_cast():
    sources, pt, (w, a, b) = _lora_case()
    producer = TensorProducer(sources, block_elems=COLS * 5)  # several row blocks, one odd-sized
    expected = (w.float() + pt.lora.scale * (b.float() @ a.float())).to(torch.bfloat16)
    assert torch.equal(producer(pt), expected)
    [delta] = producer.report.deltas
    assert delta.group == "self_attn.q_proj" and delta.rank == RANK and not delta.zero_b


def test_streamed_rows_are_the_whole_tensor():
    sources, pt, _ = _lora_case()
    producer = TensorProducer(sources, block_elems=COLS * 7)
    assert producer.can_stream(pt)
    whole = TensorProducer(sources, block_elems=COLS * 7)(pt)
    streamed = torch.cat([block.clone() for block in producer.stream(pt)])
    assert torch.equal(streamed, whole)


def test_an_all_zero_b_is_reported_and_leaves_the_base():
    sources, pt, (w, _, _) = _lora_case(zero_b=True)
    producer = TensorProducer(sources)
    assert torch.equal(producer(pt), w)
    assert producer.report.zero_b == [NAME] and producer.report.to_dict()["zero_b_count"] == 1


def test_nan_in_a_checkpoint_tensor_is_refused_with_the_count():
    bad = torch.ones(ROWS, COLS)
    bad[3, 4] = float("nan")
    bad[5, 6] = float("inf")
    pt = PlannedTensor(NAME, (ROWS, COLS), "bf16", _ref("checkpoint", NAME, bad))
    with pytest.raises(PlanError, match="2 NaN/Inf"):
        TensorProducer(_sources(checkpoint={NAME: bad}))(pt)


def test_a_merge_beyond_fp16_is_refused():
    sources, pt, _ = _lora_case(torch.float32, scale=1e6)
    pt = PlannedTensor(pt.name, pt.shape, "fp16", pt.value, pt.lora)
    with pytest.raises(PlanError, match="beyond fp16"):
        TensorProducer(sources)(pt)


@pytest.mark.parametrize("name,group", [
    ("language_model.model.layers.3.self_attn.q_proj.weight", "self_attn.q_proj"),
    ("language_model.model.layers.12.attention.wqkv.weight", "attention.wqkv"),
    ("language_model.output.weight", "output"),
])
def test_module_group_names_the_kind_of_module(name, group):
    assert module_group(name) == group


def test_row_blocks_merged_on_several_threads_are_the_sequential_merge(monkeypatch):
    """Issue 26: one tensor's row blocks run on several threads (block_threads); bytes, delta norms and
    the error raised for NaN rows are exactly those of the one-thread loop."""
    sources, pt, _ = _lora_case(scale=0.3)  # not a power of two: the delta is scaled block by block
    one = TensorProducer(sources, block_elems=COLS * 5)
    monkeypatch.setenv("SA2VA_BLOCK_THREADS", "4")
    four = TensorProducer(sources, block_elems=COLS * 5)
    assert (one._block_threads, four._block_threads) == (1, 4)
    assert not one.reads_in_merge(pt) and four.reads_in_merge(pt)  # the block threads read the rows
    expected = one(pt)
    assert torch.equal(expected, four(pt))
    w0, a0, b0 = (sources[layer].load(key) for layer, key in (("base", NAME), ("checkpoint", "a"), ("checkpoint", "b")))
    assert torch.equal(expected, four.finish(Prepared(pt, w0.clone(), a0, b0)))  # rows from memory, in parallel
    [d1], [d4, d4b] = one.report.deltas, four.report.deltas
    assert (d1.base_norm, d1.delta_norm) == (d4.base_norm, d4.delta_norm) == (d4b.base_norm, d4b.delta_norm)
    assert d1.delta_norm > 0
    assert four._block_pool is not None  # the parallel path ran
    four.disable_pool()
    assert four._block_pool is None
    w = sources["base"].load(NAME).clone()
    w[7, 1] = float("inf")  # rows 5-9 and 35-39 hold Inf: the first block in row order is named
    w[36, 2] = float("inf")
    bad = _sources(base={NAME: w}, checkpoint={"a": sources["checkpoint"].load("a"), "b": sources["checkpoint"].load("b")})
    errors = []
    for threads in ("1", "4"):
        monkeypatch.setenv("SA2VA_BLOCK_THREADS", threads)
        with pytest.raises(PlanError) as e:
            TensorProducer(bad, block_elems=COLS * 5)(pt)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "rows 5-9" in errors[0]
