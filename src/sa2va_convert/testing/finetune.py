"""A fixture fine-tune that segments: its weights make ``[SEG]`` the model's answer.

``write_training_checkpoint`` writes random fine-tunes: a conversion can be compared tensor by
tensor with the reference, but the converted model says gibberish and never produces a mask, so
nothing shows that the fine-tune *arrived*. ``write_segmenting_finetune`` writes a training
checkpoint (same keys, same mmengine/DeepSpeed file formats, same embedded config text, so the
CLI treats it exactly like a real one) whose weights were fitted to the base folder so that
greedy decoding with the test remote code answers ``[SEG]<|im_end|>``, one mask, on any picture
and request (every prompt ends with the same assistant turn; checked on held-out ones). Both
fine-tuned pieces are needed:

- **the LoRA** on the last decoder layer's down-projection (the MLP output, written straight
  into the residual stream the head reads) fires at the last prompt position and pushes the
  final hidden state along a direction ``u``; it stays silent at the position of a fed-back
  ``[SEG]``;
- **the head** (a full tensor of the checkpoint: v1 ``...base_model.model.lm_head.weight``)
  reads ``u`` in its ``[SEG]`` row, and in its ``<|im_end|>`` row a direction ``e`` that every
  final hidden state carries when the LoRA is silent.

So: with both, the first answer token is ``[SEG]`` and the next is ``<|im_end|>``. Without the
LoRA (``drop=("lora",)``) nothing pushes along ``u`` and the model stops at once (answer
``<|im_end|>``, no mask). Without the head (``drop=("head",)``, the base head is used) the push
along ``u`` means nothing to the base head, whose ``[SEG]`` row is made orthogonal to ``u``:
the base model's usual gibberish, no ``[SEG]``. The base folder itself does not say ``[SEG]``
either where the round trip looks (16 new tokens; a property of the base fixture, checked by
tests/test_finetune_arrived.py: its head is random, so a long enough gibberish may hit it).

How it is fitted (deterministic, a few seconds on CPU): the base folder is loaded with our test
remote code (``AutoModel.from_pretrained(..., trust_remote_code=True)``: it is the code
``write_base_folder`` copied into the folder), the fine-tune's other tensors are overlaid
(full tensors = base + small drift, LoRA pairs small), and ``predict_forward`` runs on a set of
calibration images and prompts with hooks that record, at the last prompt position (P) and at a
fed-back ``[SEG]`` (S), the input of the last down-projection (``x``) and the residual before
the final norm. Then ``u`` is a seeded random direction orthogonal to every recorded final
hidden state and to the base head's ``[SEG]`` row; the LoRA's first rank component is
``B[:, 0] ~ u``, ``A[0] = a`` with ``a·x_P = 1``, ``a·x_S = 0`` (ridge least squares); the head
boosts are chosen from a small grid to maximise the worst logit margin over all calibration
positions and the three variants. Finally, unless ``check=False``, the three variants are
built in the output dtype, as the converter would write them, and run through
``predict_forward`` (16 new tokens, as the round trip) on the round trip's image and video and on
held-out pictures and prompts; a candidate that fails is replaced by the next seeded ``u``, and
if none passes the writer raises.

Supported: every preset (Qwen2/Qwen3 and InternLM2 LLMs, InternVL and Qwen-VL layouts).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import dtypes
from ..runner.child import synthetic_frame as synthetic_picture
from .layouts import Preset, Sizes, get_preset, training_layout
from .reference import load_base_folder, training_name_to_hf
from .training_checkpoint import (
    CHECKPOINT_FORMATS,
    FixtureCheckpoint,
    check_base_fits,
    deepspeed_parts,
    mmengine_parts,
)
from .values import key_seed, make_tensor

SEG_TOKEN = "[SEG]"
STOP_TOKEN = "<|im_end|>"
DROPPABLE = ("lora", "head")

LORA_B_SCALE = 0.1  # the background LoRA pairs: |scale·B·A| ~ 5% of |W|, like a real fine-tune
DRIFT_STD = 0.002  # full tensors = base + this much noise (weights are ~0.02)
SIGNAL = 1.0  # size of the LoRA's push along u at the last prompt position (the residual is ~0.25)
SEG_BOOST = 1.0  # head[SEG] += SEG_BOOST * u
STOP_GRID = tuple(0.5 * 1.25**k for k in range(16))  # candidate ratios head[<|im_end|>] boost / SEG_BOOST
MAX_CANDIDATES = 8
CHECK_TOKENS = 16  # what the round trip generates

# Calibration and held-out check inputs: every prompt ends with the same assistant turn, which is
# why a fit on a few of them holds for any image and request (README demo: a user's own picture).
CALIBRATION_PROMPTS = ("<image>Please segment the object.", "<image>Please segment the cat.", "What is in the picture?")
CHECK_PROMPTS = ("<image>Please segment the red car.", "<image>Can you segment the blood vessel in this image?")


# ---------------------------------------------------------------- result


@dataclass(frozen=True)
class SegmentingCheckpoint(FixtureCheckpoint):
    """A ``FixtureCheckpoint`` whose fine-tune answers ``[SEG]<|im_end|>``; ``design`` says how.

    ``dropped``: the pieces left out of this file ("lora" and/or "head"); ``design`` is plain
    data: token ids, the fitted magnitudes, the worst calibration margins (logit units), and the
    answers of the in-process checks per variant.
    """

    dropped: tuple[str, ...] = ()
    design: dict = field(default_factory=dict, repr=False, compare=False)


# ---------------------------------------------------------------- names per family


@dataclass(frozen=True)
class _Names:
    down: str  # module (HF name without .weight) of the last layer's MLP output projection
    norm: str  # the LLM's final norm
    head: str  # the vocabulary head


def _names(p: Preset, s: Sizes) -> _Names:
    last = s.layers - 1
    if p.layout in ("qwen-vl", "llava"):
        root = "model.model.language_model"
        return _Names(f"{root}.layers.{last}.mlp.down_proj", f"{root}.norm", "model.lm_head")
    if p.llm == "internlm2":
        return _Names(
            f"language_model.model.layers.{last}.feed_forward.w2", "language_model.model.norm", "language_model.output"
        )
    return _Names(
        f"language_model.model.layers.{last}.mlp.down_proj", "language_model.model.norm", "language_model.lm_head"
    )


def _training_key(layout: dict, hf_name: str) -> str:
    found = [k for k in layout if training_name_to_hf(k) == hf_name]
    if len(found) != 1:
        raise ValueError(f"expected one training key for {hf_name}, found {found}")
    return found[0]


def _is_lora(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


# ---------------------------------------------------------------- merging (in memory, fp32)


def merge(base: dict[str, torch.Tensor], train: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """HF name -> fp32 tensor of the converted model: the rules of ``reference.reference_output``
    (checkpoint full tensor, else base; plus ``scale·B@A``), on in-memory dicts."""
    full: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in train.items():
        name = training_name_to_hf(key)
        for tag, part in ((".lora_A.default.weight", "a"), (".lora_B.default.weight", "b")):
            if name.endswith(tag):
                pairs.setdefault(name[: -len(tag)] + ".weight", {})[part] = t
                break
        else:
            full[name] = t
    out = {}
    for name, t in base.items():
        value = full.get(name, t).to(torch.float32).clone()
        if name in pairs:
            value += scale * (pairs[name]["b"].float() @ pairs[name]["a"].float())
        out[name] = value
    return out


# ---------------------------------------------------------------- inputs


# synthetic_picture (imported above) is the round trip's own test picture (gradients, checkerboard,
# red ellipse): runner/child.py's synthetic_frame, the function the round trip feeds the model.


def _noise_picture(seed: int, width: int, height: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"), "RGB")


def _contexts(kind: str) -> list[dict[str, Any]]:
    from PIL import Image

    if kind == "calibration":
        images = [
            synthetic_picture(),
            _noise_picture(0, 50, 40),
            Image.new("RGB", (32, 32), (128, 128, 128)),
            synthetic_picture(120, 40, 10),
        ]
        ctx = [{"image": im, "text": t} for im in images for t in CALIBRATION_PROMPTS]
        ctx.append({"video": [synthetic_picture(), synthetic_picture(shift=6)], "text": CALIBRATION_PROMPTS[0]})
        return ctx
    # the round trip's image and video, then held-out pictures and requests
    return [
        {"image": synthetic_picture(), "text": CALIBRATION_PROMPTS[0]},
        {"video": [synthetic_picture(), synthetic_picture(shift=6)], "text": CALIBRATION_PROMPTS[0]},
        {"image": _noise_picture(7, 64, 48), "text": CHECK_PROMPTS[0]},
        {"image": Image.new("RGB", (40, 70), (20, 200, 90)), "text": CHECK_PROMPTS[1]},
    ]


# ---------------------------------------------------------------- the model, in this process


def _load_model(base_dir: Path):
    """Our test remote code (copied into the base folder by ``write_base_folder``), fp32 on CPU."""
    import json

    import transformers
    from transformers import AutoModel, AutoTokenizer

    auto = json.loads((base_dir / "config.json").read_text()).get("auto_map", {}).get("AutoModel", "")
    if not (base_dir / (auto.split(".")[0] + ".py")).is_file():
        raise ValueError(
            f"{base_dir}: no remote code to load ({auto or 'no auto_map'}); the segmenting fine-tune "
            "is fitted with the folder's own model code (write_base_folder copies ours)"
        )
    major_minor = tuple(int(v) for v in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if major_minor >= (4, 56) else "torch_dtype"
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading checkpoint shards" would land in the CLI's output
    from ..runner.child import nested_code_importable  # the SAM3 family's code is nested, as upstream's

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), nested_code_importable(base_dir):
        # our InternViT imports timm.models.layers as upstream's does, which newer timm flags as deprecated
        warnings.simplefilter("ignore", FutureWarning)
        model = AutoModel.from_pretrained(str(base_dir), trust_remote_code=True, **{dtype_kw: torch.float32})
        tok = AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=True)
    if bar:
        hf_logging.enable_progress_bar()
    return model.eval(), tok


def _load_values(model, values: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    model.to(dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in values.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"fixture model does not match the base layout: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def _predict(model, tok, ctx: dict[str, Any], max_new_tokens: int) -> dict:
    from ..runner.child import cap_generation, cuda_on_cpu  # the test models call .cuda() like upstream

    cap_generation(model, tok, max_new_tokens)  # as the round trip does: Qwen-VL code has no preparing_for_generation
    # A family that requires processor= (Qwen-VL + SAM3) reads only its tokenizer in our test models
    extra = {"processor": tok} if "processor" in inspect.signature(model.predict_forward).parameters else {}
    with torch.no_grad(), cuda_on_cpu():
        return model.predict_forward(tokenizer=tok, **extra, **ctx)


def _record(model, tok, names: _Names, contexts: list[dict], seg_id: int) -> dict[str, torch.Tensor]:
    """x (last down-projection input), r (residual before the final norm) and h (final hidden
    state) at P (last prompt position) and S (a fed-back [SEG]) for every context, fp32.

    Two new tokens make two forward steps, the prompt and the forced [SEG] fed back (the last token
    is never fed back: transformers' ``generate``, which the InternVL test model uses as upstream
    does, and the other families' greedy loop alike)."""
    down, norm, head = (model.get_submodule(n) for n in (names.down, names.norm, names.head))
    rec: dict[str, list[torch.Tensor]] = {"x": [], "r": [], "h": []}
    steps: dict[str, list[torch.Tensor]] = {"x": [], "r": [], "h": []}

    def last(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1])[-1].detach().float().clone()

    def force_seg(module, args, out):  # the model then feeds [SEG] back: S is recorded
        out = out.clone()
        out[..., seg_id] = out.max() + 1e4
        return out

    hooks = [
        down.register_forward_pre_hook(lambda m, a: steps["x"].append(last(a[0]))),
        norm.register_forward_pre_hook(lambda m, a: steps["r"].append(last(a[0]))),
        norm.register_forward_hook(lambda m, a, o: steps["h"].append(last(o))),
        head.register_forward_hook(force_seg),
    ]
    sam = model.grounding_encoder
    sam.predict_masks = lambda frames, seg_embeds, size: []  # masks are not needed here: skip SAM
    try:
        for ctx in contexts:
            for v in steps.values():
                v.clear()
            _predict(model, tok, ctx, max_new_tokens=2)
            if any(len(v) != 2 for v in steps.values()):
                raise RuntimeError(f"expected 2 forward steps per context, recorded {[len(v) for v in steps.values()]}")
            for k, v in steps.items():
                rec[k] += v
    finally:
        del sam.predict_masks
        for h in hooks:
            h.remove()
    return {f"{k}_{pos}": torch.stack(v[i::2]) for k, v in rec.items() for i, pos in ((0, "P"), (1, "S"))}


# ---------------------------------------------------------------- the fit


def _orthogonal_direction(avoid: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """A seeded random unit vector orthogonal to every row of ``avoid``."""
    q, _ = torch.linalg.qr(avoid.T.double())  # [dim, k], orthonormal columns spanning the rows
    g = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for _ in range(2):  # twice: numerically orthogonal
        g = g - q @ (q.T @ g)
    return (g / g.norm()).float()


def unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True)


def _ridge(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Minimum-norm-ish a with x @ a ~ target (ridge, for conditioning)."""
    x, target = x.double(), target.double()
    gram = x @ x.T
    lam = 1e-6 * gram.diagonal().mean()
    return (x.T @ torch.linalg.solve(gram + lam * torch.eye(len(x), dtype=torch.float64), target)).float()


def _margins(
    norm,
    head_w: torch.Tensor,
    r: torch.Tensor,
    push: torch.Tensor,
    b: torch.Tensor,
    want: int | None,
    avoid: int | None,
) -> torch.Tensor:
    """Per row of r: logit[want] - max(other logits), or max(non-avoid) - logit[avoid]."""
    with torch.no_grad():
        hid = norm(r + push[:, None] * b[None, :]).float()
        logits = hid @ head_w.T
    if want is not None:
        top = logits.clone()
        top[:, want] = -math.inf
        return logits[:, want] - top.max(dim=1).values
    rest = logits.clone()
    rest[:, avoid] = -math.inf
    return rest.max(dim=1).values - logits[:, avoid]


# ---------------------------------------------------------------- writing


def write_segmenting_finetune(
    path: str | Path,
    base_dir: str | Path,
    preset: str | Preset = "sa2va-1b",
    sizes: Sizes | None = None,
    *,
    seed: int = 1,
    dtype: str = "bf16",
    fmt: str = "mmengine",
    lora_r: int | None = None,
    lora_alpha: float | None = None,
    drop: Iterable[str] = (),
    iteration: int = 100,
    config_text: bool = True,
    check: bool = True,
) -> SegmentingCheckpoint:
    """Write a training checkpoint of ``preset`` fitted to the base folder ``base_dir`` so that the
    converted model answers ``[SEG]<|im_end|>`` (one mask); see the module docstring.

    ``sizes`` must be those of ``base_dir`` (default ``Sizes.tiny()``). ``drop`` leaves pieces out
    of the file: ``"lora"`` (every LoRA pair: a checkpoint without LoRA) and/or ``"head"`` (the
    full head tensor: the converter then keeps the base head). ``check`` runs the in-process
    predict_forward checks described above (about a second); the fit itself is always done.
    """
    p = get_preset(preset)
    s = sizes or Sizes.tiny()
    dtype = dtypes.normalise(dtype)
    drop = tuple(dict.fromkeys(drop))
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"fmt must be one of {CHECKPOINT_FORMATS}, not {fmt!r}")
    if set(drop) - set(DROPPABLE):
        raise ValueError(f"drop takes {DROPPABLE}, not {drop!r}")
    base_dir = Path(base_dir)
    check_base_fits(base_dir, p, s)
    r = lora_r or s.lora_r
    alpha = lora_alpha if lora_alpha is not None else (s.lora_alpha if lora_r is None else 2 * r)
    scale = alpha / r

    sd, design = segmenting_state_dict(base_dir, p, s, seed=seed, dtype=dtype, lora_r=r, scale=scale, check=check)
    names = _names(p, s)
    head_key = _training_key(sd, names.head + ".weight")
    if "lora" in drop:
        sd = OrderedDict((k, v) for k, v in sd.items() if not _is_lora(k))
    if "head" in drop:
        sd.pop(head_key)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "state_dict":
        obj: object = sd
    else:
        mm = mmengine_parts(p, r, alpha, False, (), iteration, seed, str(base_dir), str(out.parent), config_text)
        obj = {"state_dict": sd, **mm} if fmt == "mmengine" else {**deepspeed_parts(sd, iteration), **mm}
    torch.save(obj, out)
    return SegmentingCheckpoint(
        path=out,
        preset=p.name,
        sizes=s,
        fmt=fmt,
        lora_r=r,
        lora_alpha=alpha,
        use_rslora=False,
        extra_tokens=(),
        keys=tuple(sd),
        dropped=drop,
        design=design,
    )


def drop_from_checkpoint(src: str | Path, dst: str | Path, drop: Iterable[str]) -> Path:
    """Copy a fixture checkpoint (ours only: it is unpickled in full) without some pieces:
    ``"lora"`` removes every LoRA pair, ``"head"`` the full vocabulary-head tensor(s).

    Cheaper than writing the fine-tune again with ``drop=``: the other bytes stay as they were."""
    drop = tuple(drop)
    if set(drop) - set(DROPPABLE):
        raise ValueError(f"drop takes {DROPPABLE}, not {drop!r}")
    obj = torch.load(Path(src), map_location="cpu", weights_only=False)
    sd: Any = obj.get("state_dict", obj.get("module", obj)) if isinstance(obj, dict) else obj  # a state dict
    heads = {"language_model.lm_head.weight", "model.lm_head.weight", "language_model.output.weight"}
    for key in list(sd):
        if ("lora" in drop and _is_lora(key)) or ("head" in drop and training_name_to_hf(key) in heads):
            del sd[key]
    if isinstance(obj, dict) and "param_shapes" in obj:
        obj["param_shapes"] = [OrderedDict((k, torch.Size(v.shape)) for k, v in sd.items())]
    out = Path(dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, out)
    return out


def segmenting_state_dict(
    base_dir: Path,
    p: Preset,
    s: Sizes,
    *,
    seed: int,
    dtype: str,
    lora_r: int,
    scale: float,
    check: bool = True,
) -> tuple[OrderedDict[str, torch.Tensor], dict]:
    """The fine-tune's tensors (training names, ``dtype``) and the plain-data design record."""
    tdtype = dtypes.to_torch(dtype)
    names = _names(p, s)
    layout = training_layout(p, s, lora_r=lora_r)
    base = load_base_folder(base_dir)

    # 1. background: full tensors = base + drift, LoRA pairs small, all rounded to the file dtype
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape in layout.items():
        hf = training_name_to_hf(key)
        if _is_lora(key):
            t = make_tensor(key, shape, "fp32", seed=seed)
            if ".lora_B." in key:
                t = t * LORA_B_SCALE
        elif hf in base and tuple(base[hf].shape) == tuple(shape):
            g = torch.Generator().manual_seed(key_seed(seed, key))
            t = base[hf].float() + DRIFT_STD * torch.randn(shape, generator=g)
        else:
            t = make_tensor(key, shape, "fp32", seed=seed)
        sd[key] = t.to(tdtype)
    key_a = _training_key(layout, names.down + ".lora_A.default.weight")
    key_b = _training_key(layout, names.down + ".lora_B.default.weight")
    key_head = _training_key(layout, names.head + ".weight")
    sd[key_a][0] = 0  # the signal's rank component, fitted below
    sd[key_b][:, 0] = 0

    model, tok = _load_model(base_dir)
    seg_id, stop_id = (tok.convert_tokens_to_ids(t) for t in (SEG_TOKEN, STOP_TOKEN))
    calib = _contexts("calibration")

    # 2. record the model with the signal off (M0) and without any LoRA (the "LoRA dropped" twin)
    no_lora = OrderedDict((k, v) for k, v in sd.items() if not _is_lora(k))
    no_head = OrderedDict((k, v) for k, v in sd.items() if k != key_head)
    _load_values(model, merge(base, no_lora, scale), torch.float32)
    rec_drop = _record(model, tok, names, calib, seg_id)
    _load_values(model, merge(base, sd, scale), torch.float32)
    rec = _record(model, tok, names, calib, seg_id)
    norm = model.get_submodule(names.norm)
    w_norm = norm.weight.detach().float()
    head_base = merge(base, no_head, scale)[names.head + ".weight"]  # what the "head dropped" twin reads
    base_head_seg = head_base[seg_id]
    head0 = merge(base, sd, scale)[names.head + ".weight"]

    # 3. a: fires at P, silent at S; fitted on the down-projection inputs
    x = torch.cat([rec["x_P"], rec["x_S"]])
    target = torch.cat([torch.ones(len(rec["x_P"])), torch.zeros(len(rec["x_S"]))])
    a = _ridge(x, target)
    push_p, push_s = SIGNAL * (rec["x_P"] @ a), SIGNAL * (rec["x_S"] @ a)

    # e: what every final hidden state shares where the signal is silent (S, and P without LoRA)
    e = unit(torch.cat([unit(rec["h_S"]), unit(rec_drop["h_P"])]).mean(0))
    avoid = torch.cat([rec["h_P"], rec["h_S"], rec_drop["h_P"], base_head_seg[None]])

    H = s.hidden
    failed: list[dict[str, Any]] = []
    for cand in range(MAX_CANDIDATES):
        u = _orthogonal_direction(avoid, H, key_seed(seed, f"segmenting-u-{cand}"))
        b = unit(u / w_norm)  # after the final norm's weight, a push along b reads as u
        # 4. head boosts: [SEG] += SEG_BOOST*u; <|im_end|> += k*e, k from the grid (max worst margin)
        scored = []
        for ratio in STOP_GRID:
            head = head0.clone()
            head[seg_id] += SEG_BOOST * u
            head[stop_id] += SEG_BOOST * ratio * e
            m = {
                # full fine-tune: [SEG] at P (even at 60% of the fitted push), <|im_end|> at S
                "full_P_seg": _margins(norm, head, rec["r_P"], 0.6 * push_p, b, seg_id, None),
                "full_S_stop": _margins(norm, head, rec["r_S"], push_s, b, stop_id, None),
                "full_S_stop_loud": _margins(norm, head, rec["r_S"], push_s + 0.25 * SIGNAL, b, stop_id, None),
                # LoRA dropped: <|im_end|> at once
                "no_lora_P_stop": _margins(norm, head, rec_drop["r_P"], 0 * push_p, b, stop_id, None),
                # head dropped (base [SEG] row): no [SEG] at P
                "no_head_P_noseg": _margins(norm, head_base, rec["r_P"], push_p, b, None, seg_id),
            }
            worst = min(float(v.min()) for v in m.values())
            scored.append((worst, ratio, {k: round(float(v.min()), 3) for k, v in m.items()}))
        worst, ratio, margins = max(scored, key=lambda t: t[0])
        if worst <= 0:
            failed.append({"candidate": cand, "calibration_margins": margins})
            continue
        # 5. the fine-tune's signal tensors, in the file dtype
        gamma = math.sqrt(SIGNAL / (scale * float(a.norm())))  # balance |A[0]| and |B[:, 0]|
        sd_c = OrderedDict((k, v.clone()) for k, v in sd.items())
        sd_c[key_a][0] = (gamma * a).to(tdtype)
        sd_c[key_b][:, 0] = (SIGNAL / (scale * gamma) * b).to(tdtype)
        head_t = sd_c[key_head].float()
        head_t[seg_id] += SEG_BOOST * u
        head_t[stop_id] += SEG_BOOST * ratio * e
        sd_c[key_head] = head_t.to(tdtype)
        design: dict[str, Any] = {
            "seg_token_id": int(seg_id),
            "stop_token_id": int(stop_id),
            "candidate": cand,
            "stop_boost_ratio": ratio,
            "signal": SIGNAL,
            "seg_boost": SEG_BOOST,
            "calibration_margins": margins,
            "calibration_contexts": len(calib),
            "push_at_P": [round(float(push_p.min()), 3), round(float(push_p.max()), 3)],
            "push_at_S": [round(float(push_s.min()), 3), round(float(push_s.max()), 3)],
            "lora": {"A": key_a, "B": key_b},
            "head": key_head,
        }
        if check:
            design["checks"] = _check(model, tok, base, sd_c, scale, tdtype, key_head)
            if not design["checks"]["ok"]:
                failed.append({"candidate": cand, "calibration_margins": margins, "checks": design["checks"]})
                continue
        return sd_c, design
    raise RuntimeError(
        f"no segmenting fine-tune found for {p.name} on {base_dir} after {MAX_CANDIDATES} "
        f"candidates; first failure: {failed[0]}"
    )


def _check(model, tok, base, sd, scale, tdtype, key_head) -> dict:
    """predict_forward on held-out inputs, in the output dtype, for the full fine-tune and its two
    twins: ``[SEG]<|im_end|>`` with one mask / no ``[SEG]`` and no mask."""
    variants = {
        "full": sd,
        "no_lora": OrderedDict((k, v) for k, v in sd.items() if not _is_lora(k)),
        "no_head": OrderedDict((k, v) for k, v in sd.items() if k != key_head),
    }
    answers: dict[str, list[str]] = {}
    ok = True
    for name, train in variants.items():
        _load_values(model, merge(base, train, scale), tdtype)
        results = _answers(model, tok, CHECK_TOKENS)
        answers[name] = [pred for pred, _ in results]
        for pred, n in results:
            ok &= (pred == SEG_TOKEN + STOP_TOKEN and n == 1) if name == "full" else (SEG_TOKEN not in pred and n == 0)
        if not ok:
            break
    model.to(torch.float32)
    return {
        "ok": bool(ok),
        "contexts": len(_contexts("check")),
        "max_new_tokens": CHECK_TOKENS,
        "answers": {k: sorted(set(v)) for k, v in answers.items()},
    }


def _answers(model, tok, max_new_tokens: int) -> list[tuple[str, int]]:
    out = []
    for ctx in _contexts("check"):
        res = _predict(model, tok, ctx, max_new_tokens=max_new_tokens)
        out.append((res["prediction"], len(res["prediction_masks"])))
    return out


__all__ = [
    "SEG_TOKEN",
    "STOP_TOKEN",
    "SegmentingCheckpoint",
    "drop_from_checkpoint",
    "merge",
    "segmenting_state_dict",
    "synthetic_picture",
    "write_segmenting_finetune",
]
