"""Our Sa2VA-compatible test remote code (tests/remote_code/): it loads the fixture folders with
``AutoModel.from_pretrained(..., trust_remote_code=True)`` with no missing or unexpected key, its
state dict is exactly ``sa2va_convert.testing.hf_layout``, and ``predict_forward`` keeps the
contract of FORMATS.md §5 (CPU only, a few seconds in all).

Greedy decoding of a random model says nothing useful, so tests that need [SEG] tokens *steer*
the weights (``steer`` below): one embedding dimension dominates the last hidden state and the
head reads only it, so the next token depends on the current token alone.
"""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
Image = pytest.importorskip("PIL.Image")

from packaging.version import Version  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: E402

from sa2va_convert.testing import PRESETS, Sizes, get_preset, hf_layout, write_base_folder  # noqa: E402
from sa2va_convert.runner.child import cap_generation, cuda_on_cpu, nested_code_importable  # noqa: E402


@pytest.fixture(autouse=True)
def _cuda_calls_on_cpu():
    """The test models call .cuda() where upstream does; in this process map those calls to the CPU."""
    if torch.cuda.is_available():
        yield
        return
    with cuda_on_cpu():
        yield

REMOTE = Path(__file__).parent / "remote_code"
SIZES = Sizes.tiny()
IMAGE_W, IMAGE_H = 50, 40  # not square: catches (W, H) mix-ups
DTYPE_KW = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
TRANSFORMERS_5 = Version(transformers.__version__) >= Version("5.0.0.dev0")
# one preset per model class / LM: Qwen2, InternLM2, Qwen-VL
MAIN = ["sa2va-1b", "sa2va-8b", "sa2va-qwen2_5-vl"]
# The InternLM2 LM generates only where upstream's does: transformers < 4.50 (modeling_internlm2.py; FORMATS.md §9)
INTERNLM2_GENERATES = Version(transformers.__version__) < Version("4.50")
PREDICT = [p for p in MAIN if p != "sa2va-8b" or INTERNLM2_GENERATES]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in made:
            made[preset] = write_base_folder(tmp_path_factory.mktemp(preset.replace(".", "_")), preset, SIZES)
        return made[preset]

    return get


def load(path, dtype=None, **kw):
    """from_pretrained as the round trip's child does it: with the SAM3 family's nested files importable."""
    extra = {DTYPE_KW: dtype} if dtype is not None else {}
    with nested_code_importable(path):
        model, info = AutoModel.from_pretrained(path, trust_remote_code=True, output_loading_info=True, **extra, **kw)
    return model.eval(), info


def tokenizer(path):
    return AutoTokenizer.from_pretrained(path, trust_remote_code=True)


def image(seed=0, w=IMAGE_W, h=IMAGE_H):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def steer(model, default: int, chain: dict[int, int] | None = None, c: float = 100.0) -> None:
    """Make greedy decoding emit ``default`` after any token, except ``src -> dst`` for ``chain``."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    chain = chain or {}
    assert len(chain) < 4
    with torch.no_grad():
        head[:, :4] = 0  # dims 0..3 are the steering dims (also undoes an earlier steer)
        emb[:, 0] = c
        head[default, 0] = 1
        for d, (src, dst) in enumerate(chain.items(), start=1):
            emb[src] = 0
            emb[src, d] = c
            head[dst, d] = 1


def predict(model, tok, **kw):
    cap_generation(model, tok, kw.pop("max_new_tokens", 4))
    kw.setdefault("text", "<image>Please segment the cat.")
    if "video" not in kw:
        kw.setdefault("image", image())
    return model.predict_forward(tokenizer=tok, **kw)


def check_contract(out, n_frames=1):
    assert set(out) >= {"prediction", "prediction_masks"}
    assert isinstance(out["prediction"], str)
    assert isinstance(out["prediction_masks"], list)
    for m in out["prediction_masks"]:
        assert isinstance(m, np.ndarray) and m.dtype == np.bool_ and m.shape == (n_frames, IMAGE_H, IMAGE_W)


# ------------------------------------------------------------------------ files and layout


def test_shared_remote_code_files_are_copied_into_both_families(tmp_path):
    """sam2.py and templates.py live once (tests/remote_code/shared) and land in every folder we write."""
    for preset in ("sa2va-1b", "sa2va-qwen2_5-vl"):
        folder = write_base_folder(tmp_path / preset, preset)
        for name in ("sam2.py", "templates.py"):
            assert filecmp.cmp(REMOTE / "shared" / name, folder / name, shallow=False), (preset, name)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_loads_fixture_folder_with_exact_layout(folder, preset):
    model, info = load(folder(preset))
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == hf_layout(preset, SIZES)
    # transformers 5 loads in the folder's dtype by default, 4.x in fp32
    assert next(model.parameters()).dtype == (torch.bfloat16 if TRANSFORMERS_5 else torch.float32)
    # untied head, as the folders say (tie_word_embeddings false)
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    cfg = model.config
    text = cfg.text_config if get_preset(preset).layout in ("qwen-vl", "llava") else cfg.llm_config
    assert text.vocab_size == SIZES.vocab == len(tokenizer(folder(preset)))
    assert cfg.template == get_preset(preset).template


def test_loaded_values_are_the_files_values(folder):
    from safetensors import safe_open

    path = folder("sa2va-8b")
    model, _ = load(path)
    sd = model.state_dict()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                assert torch.equal(sd[k], st.get_tensor(k)), k


@pytest.mark.parametrize("preset", MAIN)
def test_save_pretrained_round_trip(folder, tmp_path, preset):
    model, _ = load(folder(preset))
    model.save_pretrained(tmp_path)
    for f in folder(preset).glob("*.py"):  # transformers < 4.5x saves only the config's code files
        if not (tmp_path / f.name).exists():
            shutil.copyfile(f, tmp_path / f.name)
    again, info = load(tmp_path)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("template", "sam2_test_config"):
        assert getattr(again.config, key) == getattr(model.config, key)
    if get_preset(preset).layout == "internvl":
        assert again.config.llm_config.architectures == model.config.llm_config.architectures
        assert again.config.llm_config.vocab_size == SIZES.vocab
    # a config class built with no arguments works (transformers builds one to diff against)
    type(model.config)()


def test_config_survives_autoconfig(folder):
    cfg = AutoConfig.from_pretrained(folder("sa2va-8b"), trust_remote_code=True)
    assert cfg.llm_config.architectures == ["InternLM2ForCausalLM"]
    assert cfg.llm_config.vocab_size == SIZES.vocab
    d = cfg.to_dict()
    assert isinstance(d["llm_config"], dict) and d["llm_config"]["architectures"] == ["InternLM2ForCausalLM"]
    assert isinstance(d["vision_config"], dict) and d["model_type"] == "sa2va_chat"


# ------------------------------------------------------------------------ predict_forward


@pytest.mark.parametrize("preset", PREDICT)
def test_predict_forward_contract_random_weights(folder, preset):
    model, _ = load(folder(preset))
    tok = tokenizer(folder(preset))
    out = predict(model, tok, max_new_tokens=3)
    check_contract(out)
    again = predict(model, tok, max_new_tokens=3)  # greedy: deterministic
    assert again["prediction"] == out["prediction"]
    assert len(again["prediction_masks"]) == len(out["prediction_masks"])
    assert all(np.array_equal(x, y) for x, y in zip(out["prediction_masks"], again["prediction_masks"]))


@pytest.mark.parametrize("preset", PREDICT)
def test_one_mask_per_generated_seg(folder, preset):
    model, _ = load(folder(preset))
    tok = tokenizer(folder(preset))
    seg, end = tok.convert_tokens_to_ids("[SEG]"), tok.convert_tokens_to_ids("<|im_end|>")

    steer(model, default=seg, chain={seg: end})
    out = predict(model, tok, max_new_tokens=8)
    check_contract(out)
    assert out["prediction"] == "[SEG]<|im_end|>"
    assert len(out["prediction_masks"]) == 1

    steer(model, default=seg)  # [SEG] after every token: capped by max_new_tokens
    out = predict(model, tok, max_new_tokens=3)
    check_contract(out)
    assert out["prediction"] == "[SEG]" * 3
    # the last token is never fed back, so the [SEG] that ends a capped answer has no hidden state and no
    # mask, as in upstream (modeling_sa2va_chat.py reads [SEG] states over sequences[0][:-1])
    assert len(out["prediction_masks"]) == 2


def test_internlm2_generates_only_where_upstream_code_does(folder):
    """InternLM2ForCausalLM gets GenerationMixin only through InternLM2PreTrainedModel, as upstream's:
    transformers >= 4.50 then leaves it without a generation_config and generate fails the way users
    see it with Sa2VA-8B (FORMATS.md §9); with transformers 4.49 (upstream's legacy pin) it answers."""
    model, _ = load(folder("sa2va-8b"))
    tok = tokenizer(folder("sa2va-8b"))
    lm = model.language_model
    assert "GenerationMixin" not in [b.__name__ for b in type(lm).__bases__]
    assert "GenerationMixin" in [b.__name__ for b in type(lm).__mro__[1].__bases__]
    if INTERNLM2_GENERATES:
        check_contract(predict(model, tok, max_new_tokens=3))
        return
    assert lm.can_generate() is False and lm.generation_config is None
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'transformers_version'"):
        predict(model, tok, max_new_tokens=3)


@pytest.mark.parametrize("preset", PREDICT)
def test_video_gives_one_mask_per_frame(folder, preset):
    model, _ = load(folder(preset))
    tok = tokenizer(folder(preset))
    seg, end = tok.convert_tokens_to_ids("[SEG]"), tok.convert_tokens_to_ids("<|im_end|>")
    steer(model, default=seg, chain={seg: end})
    out = predict(model, tok, video=[image(1), image(2)], text="<image>Please segment the dog.")
    check_contract(out, n_frames=2)
    assert len(out["prediction_masks"]) == 1


@pytest.mark.parametrize("preset", PREDICT)
def test_no_seg_gives_no_mask(folder, preset):
    model, _ = load(folder(preset))
    tok = tokenizer(folder(preset))
    steer(model, default=tok.convert_tokens_to_ids("<|im_end|>"))
    out = predict(model, tok, max_new_tokens=8)
    assert out == {"prediction": "<|im_end|>", "prediction_masks": []}


def test_masks_come_from_the_mask_decoder_weights(folder):
    """Negating the last layer of mask token 0's hypernetwork flips the sign of every mask logit."""
    path = folder("sa2va-1b")
    model, _ = load(path, dtype=torch.float32)
    tok = tokenizer(path)
    seg, end = tok.convert_tokens_to_ids("[SEG]"), tok.convert_tokens_to_ids("<|im_end|>")
    steer(model, default=seg, chain={seg: end})
    before = predict(model, tok)["prediction_masks"][0]
    last = model.grounding_encoder.sam2_model.sam_mask_decoder.output_hypernetworks_mlps[0].layers[2]
    with torch.no_grad():
        last.weight.neg_()
        last.bias.neg_()
    after = predict(model, tok)["prediction_masks"][0]
    assert np.array_equal(after, ~before)


@pytest.mark.parametrize("preset", ["sa2va-1b"] + (["sa2va-8b"] if INTERNLM2_GENERATES else []))
def test_fp32_and_bf16_both_predict(folder, preset):
    path = folder(preset)
    tok = tokenizer(path)
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = load(path, dtype=dtype)
        assert next(model.parameters()).dtype == dtype
        seg, end = tok.convert_tokens_to_ids("[SEG]"), tok.convert_tokens_to_ids("<|im_end|>")
        steer(model, default=seg, chain={seg: end})
        out = predict(model, tok)
        check_contract(out)
        assert len(out["prediction_masks"]) == 1


def test_qwen_family_takes_a_processor_or_none(folder):
    path = folder("sa2va-qwen2_5-vl")
    model, _ = load(path)
    tok = tokenizer(path)
    seg = tok.convert_tokens_to_ids("[SEG]")
    steer(model, default=seg, chain={seg: tok.eos_token_id})

    class Processor:  # only .tokenizer is used
        tokenizer = tok

    a = predict(model, tok, processor=None)
    cap_generation(model, tok, 4)
    b = model.predict_forward(image=image(), text="<image>Please segment the cat.", tokenizer=None,
                              processor=Processor())
    check_contract(a)
    assert a["prediction"] == b["prediction"] == "[SEG]<|im_end|>"
    assert np.array_equal(a["prediction_masks"][0], b["prediction_masks"][0])


def test_internlm2_wqkv_is_grouped_q_k_v(folder):
    """InternLM2 packs wqkv per kv group as [q heads..., k, v]: with one token at position 0
    (no rotation, attention weight 1) head h outputs the v rows of group h // (nh/nkv)."""
    model, _ = load(folder("sa2va-8b"), dtype=torch.float32)
    attn = model.language_model.model.layers[0].attention
    nh, nkv, hd, H = attn.nh, attn.nkv, attn.hd, SIZES.hidden
    g = nh // nkv
    with torch.no_grad():
        attn.wo.weight.copy_(torch.eye(H, nh * hd))
    x = torch.randn(1, 1, H)
    out, _ = attn(x)
    w = attn.wqkv.weight.view(nkv, g + 2, hd, H)
    expected = torch.cat([x[0, 0] @ w[h // g, g + 1].T for h in range(nh)])
    torch.testing.assert_close(out[0, 0, : nh * hd], expected)
