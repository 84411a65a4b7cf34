"""A round trip that proves the fine-tune arrived (issue 4, item 4).

The README demo's checkpoint (``make_tiny_example``) is a fine-tune that segments
(``sa2va_convert.testing.finetune``): its LoRA and its head were fitted to the base folder so
that the converted model answers ``[SEG]<|im_end|>``, while the base never says ``[SEG]``. So a
mask coming out of ``predict_forward`` after ``sa2va-convert`` (the real CLI, the real round
trip in a child process) shows that both pieces arrived, and the two twins show that each is
needed: the same checkpoint without its LoRA pairs, or without its head tensor, converts fine
and yields no ``[SEG]`` and no mask. The logits of the converted model are compared with a model
assembled directly from the independent fp32 reference (``testing.reference``).

"Never" is checked where the round trip looks: 16 new tokens on its synthetic image and video
(and, for the twins and the base, the first answer token on held-out inputs). The base's head is
random: over a long enough generation its gibberish can hit ``[SEG]`` by chance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
Image = pytest.importorskip("PIL.Image")

import transformers  # noqa: E402
from _cli import run_cli  # noqa: E402
from packaging.version import Version  # noqa: E402
from safetensors import safe_open  # noqa: E402

from sa2va_convert.read.checkpoint import open_checkpoint  # noqa: E402
from sa2va_convert.testing import PRESETS, make_tiny_example, reference_output  # noqa: E402
from sa2va_convert.testing.finetune import (  # noqa: E402
    SEG_TOKEN,
    STOP_TOKEN,
    SegmentingCheckpoint,
    drop_from_checkpoint,
    synthetic_picture,
    write_segmenting_finetune,
)
from sa2va_convert.testing.reference import load_checkpoint_state_dict  # noqa: E402
from sa2va_convert.runner.child import cap_generation, cuda_on_cpu  # noqa: E402

INTERNLM2_GENERATES = Version(transformers.__version__) < Version("4.50")

SYNTH_W, SYNTH_H = 80, 60  # the round trip's synthetic picture (runner/child.py)
HEAD = "language_model.lm_head.weight"
PROMPT = "<image>Please segment the object."  # the round trip's prompt


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> SimpleNamespace:
    """The README demo tree (sa2va-1b) and the fine-tune's two twins, each in a work_dir of its own."""
    root = tmp_path_factory.mktemp("arrived")
    ex = make_tiny_example(root / "tiny")
    twins = {d: drop_from_checkpoint(ex.checkpoint.path, root / f"no_{d}" / "iter_100.pth", [d])
             for d in ("lora", "head")}
    return SimpleNamespace(root=root, ex=ex, ckpt=ex.checkpoint, base=ex.base_dir, twins=twins)


@pytest.fixture(scope="module")
def full(demo) -> SimpleNamespace:
    """The demo's command, for real: ``sa2va-convert WORK_DIR OUT --base BASE`` (round trip included)."""
    out = demo.root / "out"
    r = run_cli(demo.ex.work_dir, out, "--base", demo.base, "--json", roundtrip=True)
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(out=out, report=json.loads(r.stdout))


def load_model(path: Path, dtype: torch.dtype):
    from transformers import AutoModel

    kw = "dtype" if tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
    return AutoModel.from_pretrained(str(path), trust_remote_code=True, **{kw: dtype}).eval()


def tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)


def predict(model, tok, max_new_tokens: int = 16, **inputs) -> dict:
    cap_generation(model, tok, max_new_tokens)
    inputs.setdefault("text", PROMPT)
    with torch.no_grad(), cuda_on_cpu():
        return model.predict_forward(tokenizer=tok, **inputs)


# ------------------------------------------------------------------ the fixture itself


def test_the_fine_tune_is_a_training_checkpoint_fitted_and_checked(demo):
    ck = demo.ckpt
    assert isinstance(ck, SegmentingCheckpoint) and ck.preset == "sa2va-1b" and ck.dropped == ()
    d = ck.design
    assert d["checks"]["ok"], d["checks"]
    assert d["checks"]["answers"]["full"] == [SEG_TOKEN + STOP_TOKEN]
    assert d["checks"]["answers"]["no_lora"] == [STOP_TOKEN]
    assert all(SEG_TOKEN not in a for a in d["checks"]["answers"]["no_head"])
    assert min(d["calibration_margins"].values()) > 0.2, d["calibration_margins"]
    # what the CLI sees: an mmengine checkpoint with real mmengine objects and the embedded config
    opened = open_checkpoint(ck.path)
    assert opened.kind == "mmengine" and opened.config is not None and opened.config.lora.r == ck.lora_r
    assert any("HistoryBuffer" in name for name in opened.placeholders)
    # the twins: everything else identical
    full_sd = load_checkpoint_state_dict(ck.path)
    for dropped, path in demo.twins.items():
        twin = load_checkpoint_state_dict(path)
        gone = set(full_sd) - set(twin)
        if dropped == "lora":
            assert gone == {k for k in full_sd if ".lora_" in k} and len(gone) == 2 * 7 * ck.sizes.layers
        else:
            assert gone == {d["head"]} and d["head"].endswith("base_model.model.lm_head.weight")
        assert all(torch.equal(twin[k], full_sd[k]) for k in twin)


def test_the_fit_is_deterministic_and_drop_matches_the_helper(demo, tmp_path):
    again = write_segmenting_finetune(tmp_path / "iter_100.pth", demo.base, seed=1, drop=("lora",), check=False)
    assert again.dropped == ("lora",) and not any(".lora_" in k for k in again.keys)
    a, b = load_checkpoint_state_dict(again.path), load_checkpoint_state_dict(demo.twins["lora"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_base_never_says_seg(demo):
    model, tok = load_model(demo.base, torch.bfloat16), tokenizer(demo.base)
    for inputs in ({"image": synthetic_picture()},
                   {"video": [synthetic_picture(), synthetic_picture(shift=6)]},
                   {"image": synthetic_picture(50, 70, 3), "text": "<image>Please segment the red car."}):
        out = predict(model, tok, **inputs)
        assert SEG_TOKEN not in out["prediction"] and out["prediction_masks"] == [], out["prediction"]


# ------------------------------------------------------------------ the round trips (real CLI, child process)


def test_converted_fine_tune_segments(full, demo):
    report = full.report
    assert report["lora_deltas"]["lora_pairs"] == 7 * demo.ckpt.sizes.layers
    rt = report["roundtrip"]
    assert rt["ok"] and rt["loading_info"]["missing_keys"] == []
    runs = {run["name"]: run for run in rt["runs"]}
    assert set(runs) == {"image", "video"}
    for name, frames in (("image", 1), ("video", 2)):
        run = runs[name]
        assert run["prediction"] == SEG_TOKEN + STOP_TOKEN and run["seg_count"] == 1
        assert run["n_masks"] >= 1
        for m in run["masks"]:
            assert m["dtype"] == "bool" and m["shape"] == [frames, SYNTH_H, SYNTH_W]
            assert 0 < m["true_fraction"] < 1  # a mask, not an empty or full frame
    assert "answered with [SEG]: yes, 1 mask (1, 60, 80)" in rt["summary"]
    assert "video: 1 mask (2, 60, 80)" in rt["summary"] and "forced" not in rt["summary"]


@pytest.mark.parametrize("dropped", ["lora", "head"])
def test_without_the_lora_or_the_head_there_is_no_mask(demo, cli, tmp_path, dropped):
    out = tmp_path / "out"
    r = cli(demo.twins[dropped], out, "--base", demo.base, "--json", roundtrip=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    own = [run for run in report["roundtrip"]["runs"] if not run.get("forced")]
    forced = [run for run in report["roundtrip"]["runs"] if run.get("forced")]
    for run in own:
        assert run["n_masks"] == 0 and run["seg_count"] == 0, run["prediction"]
        assert SEG_TOKEN not in run["prediction"]
    # the round trip still drove the mask path, by forcing [SEG], and said so
    assert len(forced) == 1 and forced[0]["n_masks"] == 1
    assert "answered with [SEG]: no" in report["roundtrip"]["summary"]
    if dropped == "lora":
        assert report["lora_deltas"]["lora_pairs"] == 0
        assert all(run["prediction"] == STOP_TOKEN for run in own)
    else:  # the base head was used, bit for bit
        assert read_tensor(out, HEAD).equal(read_tensor(demo.base, HEAD))


def read_tensor(folder: Path, name: str) -> torch.Tensor:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(folder / index[name]), "pt") as f:
        return f.get_tensor(name)


def test_predict_writes_the_demo_mask(full, cli, tmp_path):
    picture = tmp_path / "some.png"
    synthetic_picture(120, 90, 15).save(picture)
    mask, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    r = cli("predict", full.out, picture, "the object", "--save", mask, "--overlay", overlay)
    assert r.returncode == 0, r.stderr
    assert f"prediction: {SEG_TOKEN}{STOP_TOKEN}" in r.stdout
    with Image.open(mask) as m:
        assert m.size == (120, 90) and m.mode == "L"
        assert set(np.unique(np.asarray(m)).tolist()) == {0, 255}  # white on black, some of each
    assert overlay.is_file()


# ------------------------------------------------------------------ logits against the fp32 reference


def lm_logits(model, tok) -> tuple[torch.Tensor, list[str]]:
    """Logits at every position of a fixed sequence: the round trip's prompt with its image, then [SEG]."""
    code = sys.modules[type(model).__module__]  # our remote code: the prompt built as predict_forward builds it
    model.img_context_token_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    prompt = code.build_prompt(code.get_template(model.template), PROMPT, model.image_token_string(1, False))
    ids = tok(prompt + SEG_TOKEN, return_tensors="pt").input_ids
    pixels = model.transform(synthetic_picture())[None]  # the model's own (torchvision) transform
    with torch.no_grad():
        logits = model(ids, pixel_values=pixels.to(next(model.parameters()).dtype)).logits[0].float()
    return logits, tok.convert_ids_to_tokens(ids[0].tolist())


@pytest.fixture(scope="module")
def reference_logits(demo):
    """A model assembled from the fp32 reference tensors (base + checkpoint, merged the plain way)."""
    model = load_model(demo.base, torch.float32)
    missing, unexpected = model.load_state_dict(
        dict(reference_output(demo.base, demo.ckpt.path, scale=demo.ckpt.scale)), strict=True)
    assert not missing and not unexpected
    logits, tokens = lm_logits(model, tokenizer(demo.base))
    assert tokens[-2:] == ["Ċ", SEG_TOKEN]  # ... assistant\n  [SEG]
    return logits


def check_answer(logits: torch.Tensor, tok) -> None:
    """The two decisions of the fine-tune: [SEG] after the prompt, <|im_end|> after [SEG]."""
    assert tok.convert_ids_to_tokens(logits[-2:].argmax(-1).tolist()) == [SEG_TOKEN, STOP_TOKEN]


def test_bf16_output_logits_match_the_fp32_reference(full, reference_logits):
    tok = tokenizer(full.out)
    check_answer(reference_logits, tok)
    logits, _ = lm_logits(load_model(full.out, torch.bfloat16), tok)
    check_answer(logits, tok)
    # bf16 keeps 8 mantissa bits: weights rounded once, then a bf16 forward pass. Observed: 0.06
    # on logits up to 16; a missing LoRA or head changes the deciding logits by several units.
    atol = 0.01 * float(reference_logits.abs().max()) + 0.02
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=atol)
    top2 = reference_logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * atol  # positions whose answer bf16 cannot flip
    assert clear[-2:].all()
    assert torch.equal(logits.argmax(-1)[clear], reference_logits.argmax(-1)[clear])


def test_fp32_output_logits_equal_the_reference(demo, cli, reference_logits, tmp_path):
    out = tmp_path / "out32"
    r = cli(demo.ex.work_dir, out, "--base", demo.base, "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    logits, _ = lm_logits(load_model(out, torch.float32), tokenizer(out))
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ every family


# The fit runs the family's own predict_forward; the InternLM2 family's code generates only on
# transformers < 4.50, as upstream's (tests/test_environments.py checks the exit 9 it gives elsewhere).
FITTABLE = [p for p in PRESETS if p != "sa2va-1b" and (p != "sa2va-8b" or INTERNLM2_GENERATES)]


@pytest.mark.parametrize("preset", FITTABLE)
def test_every_family_gets_a_segmenting_fine_tune(preset, base_cache, tmp_path):
    """The fit holds for each LLM and layout (checked in-process on held-out inputs in bf16)."""
    ck = write_segmenting_finetune(tmp_path / "iter_100.pth", base_cache(preset), preset)
    checks = ck.design["checks"]
    assert checks["ok"], checks
    assert checks["answers"]["full"] == [SEG_TOKEN + STOP_TOKEN] and checks["answers"]["no_lora"] == [STOP_TOKEN]
