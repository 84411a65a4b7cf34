"""Sa2VA-Qwen3-VL-4B-SAM3 and Sa2VA-LLaVA-1.5-7B (the 2026 releases), and the refusal of
projects we do not convert.

Both new families train exactly the keys of Sa2VA-Qwen3-VL (SAM2): detection must tell them apart
from the embedded config (or, for SAM3, from frozen tracker keys in a full dump) and refuse when
nothing tells. Everything runs on real files: fixture checkpoints written the way upstream training writes
them, the converter, transformers loading our SAM3 test model, the round-trip child process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from test_convert import assert_matches_reference, read_output  # noqa: E402
from test_verify import steer_folder, token_id  # noqa: E402

from sa2va_convert.api import ConvertOptions, convert  # noqa: E402
from sa2va_convert.plan.family import detect_family  # noqa: E402
from sa2va_convert.plan.keymap import load_all_builtin  # noqa: E402
from sa2va_convert.testing.config_text import training_config_text  # noqa: E402
from sa2va_convert.testing.finetune import synthetic_picture  # noqa: E402
from sa2va_convert.testing.fixtures import write_training_checkpoint  # noqa: E402
from sa2va_convert.verify.folder import verify_folder  # noqa: E402

SAM3 = "sa2va-qwen3-vl-sam3"
SAM3_KEYMAP = "sa2va-v2-qwen3vl-sam3"
LLAVA = "sa2va-llava-1.5"
LLAVA_KEYMAP = "sa2va-v2-llava"
FAMILY = {
    "sa2va-1b": "sa2va-v1-internvl-qwen2", "sa2va-4b": "sa2va-v1-internvl-qwen2",
    "sa2va-8b": "sa2va-v1-internvl-internlm2", "sa2va-internvl3": "sa2va-v2-internvl3",
    "sa2va-qwen2_5-vl": "sa2va-v2-qwen-vl", "sa2va-qwen3-vl": "sa2va-v2-qwen-vl",
    SAM3: SAM3_KEYMAP, LLAVA: LLAVA_KEYMAP,
}
FUSER = "grounding_encoder.sam2_model.maskmem_backbone.fuser.layers.{}.{}"


def _keys_and_config(path: Path) -> tuple[list[str], str | None]:
    obj = torch.load(path, map_location="cpu", weights_only=False)
    return list(obj["state_dict"]), (obj.get("meta") or {}).get("cfg")


# ---------------------------------------------------------------- detection, both ways


@pytest.mark.parametrize("preset", sorted(FAMILY))
def test_every_fixture_family_is_detected_as_itself_with_the_sam3_keymap_installed(preset, tmp_path):
    keys, cfg = _keys_and_config(write_training_checkpoint(tmp_path / "iter_1.pth", preset).path)
    det = detect_family(keys, load_all_builtin(), cfg)
    assert det.chosen is not None and det.chosen.name == FAMILY[preset], det.to_dict()


def test_frozen_tracker_keys_decide_without_a_config(tmp_path):
    """A full dump carries the frozen grounding encoder, and SAM3's module names differ from SAM2's."""
    sam3 = write_training_checkpoint(tmp_path / "a.pth", SAM3, include_frozen_sam2=True, config_text=False)
    keys, cfg = _keys_and_config(sam3.path)
    assert cfg is None
    det = detect_family(keys, load_all_builtin(), None)
    assert det.chosen is not None and det.chosen.name == SAM3_KEYMAP
    # SAM2's modules rule SAM3 out; Qwen-VL and LLaVA (both SAM2) stay, and only a config tells them apart
    sam2 = write_training_checkpoint(tmp_path / "b.pth", "sa2va-qwen3-vl", include_frozen_sam2=True, config_text=False)
    det = detect_family(_keys_and_config(sam2.path)[0], load_all_builtin(), None)
    fitting = {m.keymap for m in det.matches if m.matched}
    assert det.chosen is None and fitting == {"sa2va-v2-qwen-vl", LLAVA_KEYMAP}
    assert next(m for m in det.matches if m.keymap == SAM3_KEYMAP).excluded_by


@pytest.mark.parametrize("preset", [SAM3, LLAVA])
def test_same_keys_and_no_config_is_refused_not_guessed(preset, tmp_path, cli):
    ck = write_training_checkpoint(tmp_path / "iter_1.pth", preset, config_text=False)
    plain = write_training_checkpoint(tmp_path / "q" / "iter_1.pth", "sa2va-qwen3-vl", config_text=False)
    assert set(_keys_and_config(ck.path)[0]) == set(_keys_and_config(plain.path)[0])
    (tmp_path / "base").mkdir()  # never opened: the family is decided first
    r = cli(ck.path, tmp_path / "out", "--base", tmp_path / "base")
    assert r.returncode == 5, r.stderr
    line = r.error_lines[0]
    assert "ambiguous" in line and FAMILY[preset] in line and "sa2va-v2-qwen-vl" in line
    assert "--keymap" in r.stderr and not (tmp_path / "out").exists()


def test_a_sam3_checkpoint_on_a_sam2_base_is_refused(make_family, base_cache, tmp_path):
    fam = make_family(SAM3)
    with pytest.raises(Exception) as e:
        convert(fam.ckpt.path, tmp_path / "out", ConvertOptions(base=base_cache("sa2va-qwen3-vl")))
    assert "maskmem_backbone" in str(e.value) and "raw" not in str(e.value)


# ---------------------------------------------------------------- conversion, loading, round trip


def test_sam3_converts_and_every_tensor_matches_the_reference(make_family, tmp_path):
    # include_frozen_sam2: the tracker's own keys too, spelled as training spells them (.gamma)
    fam = make_family(SAM3, include_frozen_sam2=True)
    sd = torch.load(fam.ckpt.path, weights_only=False)["state_dict"]
    root = "mllm.model.base_model.model."
    assert root + "lm_head.modules_to_save.default.weight" in sd
    assert root + "model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight" in sd
    assert FUSER.format(1, "gamma") in sd

    out = tmp_path / "out"
    result = convert(fam.ckpt.path, out, ConvertOptions(base=fam.base))
    assert result.plan.keymap == SAM3_KEYMAP
    assert_matches_reference(out, fam)
    got = read_output(out)
    for j in (0, 1):  # the two mask-memory fuser blocks: the trained layer scale, renamed
        assert torch.equal(got[FUSER.format(j, "g_weight")], sd[FUSER.format(j, "gamma")])
    assert not [k for k in got if k.endswith(".gamma")]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Sa2VAChatModelQwen"] and "sam3_test_config" in cfg
    assert (out / "sam3.py").is_file()


@pytest.fixture(scope="module")
def sam3_fp32(tmp_path_factory) -> Path:
    """A converted SAM3 folder in fp32 (where SAM3's bf16-only fused op bites on CPU), steered to say [SEG]."""
    from sa2va_convert.testing.fixtures import write_base_folder

    root = tmp_path_factory.mktemp("sam3")
    base = write_base_folder(root / "base", SAM3, dtype="fp32")
    ck = write_training_checkpoint(root / "work" / "iter_1.pth", SAM3, dtype="fp32", base_dir=base)
    out = root / "out"
    convert(ck.path, out, ConvertOptions(base=base, dtype="fp32"))
    return steer_folder(out)


def test_sam3_folder_loads_with_no_missing_key_and_requires_a_processor(sam3_fp32):
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    from sa2va_convert.runner.child import cap_generation, nested_code_importable

    # sam3.py imports sam3pkg_*.py files that the modeling file does not: plain transformers copies one
    # import deep for a local folder and fails, as with upstream's SAM3 code (FORMATS.md §9) ...
    with pytest.raises(FileNotFoundError, match=r"sam3pkg_\w+\.py"):
        AutoModel.from_pretrained(str(sam3_fp32), trust_remote_code=True)
    # ... and loads once every file of the closure is made importable, as the round trip's child does
    with nested_code_importable(sam3_fp32) as made:
        model, info = AutoModel.from_pretrained(str(sam3_fp32), trust_remote_code=True, output_loading_info=True)
    assert made["nested_imports"] == ["sam3pkg_build_sam3_tracker.py", "sam3pkg_model_vitdet.py"]
    assert {k: v for k, v in info.items() if v} == {}
    tok = AutoTokenizer.from_pretrained(str(sam3_fp32))
    cap_generation(model, tok, 2)  # as upstream's Qwen-VL classes, this one has no preparing_for_generation
    with pytest.raises(ValueError, match="processor="):
        model.predict_forward(image=synthetic_picture(), text="<image>Segment it.", tokenizer=tok)
    processor = AutoProcessor.from_pretrained(str(sam3_fp32), trust_remote_code=True)
    with pytest.raises(ValueError, match="Expected grad to be disabled"):  # the fused op refuses autograd
        with torch.enable_grad():
            model.grounding_encoder.sam2_model.backbone.vision_backbone(torch.zeros(1, 3, 64, 64))
    # in fp32 on a CPU with no CUDA mapping, SAM3's autocast('cuda') is off and the bf16 result of the
    # fused op meets an fp32 Linear: upstream's SAM3 code hits the same; the round trip maps it (below)
    with pytest.raises(RuntimeError, match="dtype"):
        model.predict_forward(image=synthetic_picture(), text="<image>Segment it.", processor=processor)
    model.to(torch.bfloat16)  # in bf16 the same code runs as it is
    out = model.predict_forward(image=synthetic_picture(), text="<image>Segment it.", processor=processor)
    assert out["prediction"].startswith("[SEG]") and len(out["prediction_masks"]) == 1


def test_sam3_round_trip_on_cpu_reports_masks(sam3_fp32):
    report = verify_folder(sam3_fp32, device="cpu", max_new_tokens=2)
    assert report.ok
    r = report.roundtrip.to_dict()
    raw = report.roundtrip.raw
    assert r["ok"] and r["device"] == "cpu" and r["dtype"] == "fp32"
    assert r["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert raw["processor"], "the Qwen-VL + SAM3 folder must be called with processor="
    # SAM3's torch.autocast('cuda') was mapped to the CPU: under it the fused op's bf16 output is carried
    # into the next Linear, as on a GPU (without it, see the test above, fp32 fails)
    assert r["cuda_mapped"]["autocast"] > 0
    assert r["tokenizer"]["seg_token_id"] == token_id(sam3_fp32, "[SEG]")
    image, video = r["runs"]
    for run, frames in ((image, 1), (video, 2)):
        assert run["seg_count"] == 1 and run["n_masks"] == 1
        assert run["masks"][0]["shape"] == [frames, 60, 80] and run["masks"][0]["dtype"] == "bool"


# ---------------------------------------------------------------- CLI: keymaps list, inspect


def test_keymaps_list_names_both_new_families(cli):
    r = cli("keymaps", "list", "--json")
    assert r.returncode == 0, r.stderr
    listed = {k["name"]: k for k in json.loads(r.stdout)["keymaps"]}  # schema 1: an object with "keymaps"
    assert listed[SAM3_KEYMAP]["models"] == ["Sa2VA-Qwen3-VL-4B-SAM3"]
    assert listed[LLAVA_KEYMAP]["models"] == ["Sa2VA-LLaVA-1.5-7B"]
    assert listed[SAM3_KEYMAP]["detect"]["config"] and listed["sa2va-v2-qwen-vl"]["detect"]["config_none"]


def test_inspect_groups_the_sam3_tracker(tmp_path, cli):
    ck = write_training_checkpoint(tmp_path / "iter_3.pth", SAM3, include_frozen_sam2=True)
    r = cli("inspect", ck.path, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["family"]["keymap"] == SAM3_KEYMAP and rep["unrecognised"] == []
    groups = {g["group"]: g["tensors"] for g in rep["groups"]}
    keys = _keys_and_config(ck.path)[0]
    vit = [k for k in keys if k.startswith("grounding_encoder.sam2_model.backbone.vision_backbone.")]
    mem = [k for k in keys if k.startswith(("grounding_encoder.sam2_model.maskmem_backbone.",
                                            "grounding_encoder.sam2_model.transformer."))]
    assert groups["SAM3 tracker (ViT backbone)"] == len(vit) > 0
    assert groups["SAM3 tracker (memory)"] == len(mem) > 0


# ---------------------------------------------------------------- projects we do not convert


def _sasasa2va_checkpoint(path: Path) -> Path:
    """Keys as SaSaSa2VA's training writes them: a Sa2VAModel subclass over InternVLMLLM with LoRA and no
    modules_to_save (projects/sasasa2va/configs/sasasa2va_in25_4b.py), i.e. the tensors of a Sa2VA-4B
    fine-tune; its config names SaSaSa2VAModel."""
    ck = write_training_checkpoint(path, "sa2va-4b")
    obj = torch.load(ck.path, weights_only=False)
    text = training_config_text("sa2va-internvl3", lora_r=ck.lora_r, lora_alpha=ck.lora_alpha,
                                path="./pretrained/internvl2_5/InternVL2_5-4B")
    assert "projects.sa2va.models.Sa2VAModel" in text
    obj["meta"]["cfg"] = text.replace("projects.sa2va.models.Sa2VAModel", "projects.sasasa2va.models.SaSaSa2VAModel")
    torch.save(obj, ck.path)
    return ck.path


def test_a_sasasa2va_checkpoint_is_refused_not_converted_by_a_near_miss(tmp_path, base_cache, cli):
    path = _sasasa2va_checkpoint(tmp_path / "work_dirs" / "iter_50.pth")
    keys, cfg = _keys_and_config(path)
    near_miss = detect_family(keys, load_all_builtin(), None)  # the keys alone fit a Sa2VA family
    assert near_miss.chosen is not None and near_miss.chosen.name == "sa2va-v1-internvl-qwen2"
    assert detect_family(keys, load_all_builtin(), cfg).chosen is None

    out = tmp_path / "out"
    r = cli(path, out, "--base", base_cache("sa2va-4b"))
    assert r.returncode == 5, r.stderr
    assert len(r.error_lines) == 1
    line = r.error_lines[0]
    assert "SaSaSa2VAModel" in line and "SaSaSa2VA" in line
    assert "--keymap FILE" in r.stderr and not out.exists()
    # inspect still shows what it is, without picking a family
    rep = json.loads(cli("inspect", path, "--json").stdout)
    assert rep["family"]["keymap"] is None and "SaSaSa2VAModel" in rep["family"]["note"]


@pytest.mark.parametrize("text, name", [
    ("model = dict(type='projects.vrt_sa2va.models.VRTSa2VAModel')\n", "VRT"),
    ("model = dict(type='projects.samtok.models.SAMTokModel')\n", "SAMTok"),
])
def test_other_known_projects_are_refused_by_name(text, name, tmp_path):
    keys, _ = _keys_and_config(write_training_checkpoint(tmp_path / "iter_1.pth", "sa2va-qwen3-vl").path)
    det = detect_family(keys, load_all_builtin(), text)
    assert det.chosen is None and det.note.startswith("unsupported: " + name)


# ---------------------------------------------------------------- LLaVA-1.5


EMB, HEAD = "model.model.language_model.embed_tokens.weight", "model.lm_head.weight"


def test_llava_converts_and_every_tensor_matches_the_reference(make_family, tmp_path):
    fam = make_family(LLAVA)
    sd = torch.load(fam.ckpt.path, weights_only=False)["state_dict"]
    root = "mllm.model.base_model.model."
    assert root + "model.language_model.embed_tokens.modules_to_save.default.weight" in sd
    assert root + "model.language_model.layers.0.mlp.down_proj.lora_B.default.weight" in sd
    out = tmp_path / "out"
    result = convert(fam.ckpt.path, out, ConvertOptions(base=fam.base))
    assert result.plan.keymap == LLAVA_KEYMAP
    assert_matches_reference(out, fam)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Sa2VAChatModelLlava"]
    assert cfg["auto_map"]["AutoModel"] == "modeling_sa2va_llava.Sa2VAChatModelLlava"
    assert cfg["tie_word_embeddings"] is False and cfg["text_config"]["tie_word_embeddings"] is False
    assert cfg["text_config"]["vocab_size"] == fam.ckpt.vocab_rows


def _padded_base(src: Path, dst: Path, multiple: int = 64) -> tuple[Path, int]:
    """The base with its embedding and head padded to a multiple of 64 rows, as llava-hf ships them
    (32064 for a 32002-entry tokenizer); config.json says the padded size."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    padded = None
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(dst / shard)
        for name in (EMB, HEAD):
            if name in tensors:
                rows = tensors[name].shape[0]
                padded = -(-rows // multiple) * multiple + multiple
                extra = torch.full((padded - rows, tensors[name].shape[1]), 7.0, dtype=tensors[name].dtype)
                tensors[name] = torch.cat([tensors[name], extra])
        save_file(tensors, dst / shard, metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["text_config"]["vocab_size"] = padded
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst, padded


def test_llava_vocabulary_follows_the_tokenizer_not_the_padded_base(base_cache, tmp_path):
    """Upstream's rule: the padded rows go, vocab_size = len(tokenizer) (32064 -> 32007 for the 7B)."""
    from tokenizers import Tokenizer

    base, padded = _padded_base(base_cache(LLAVA), tmp_path / "padded")
    ck = write_training_checkpoint(tmp_path / "w" / "iter_1.pth", LLAVA)
    out = tmp_path / "out"
    convert(ck.path, out, ConvertOptions(base=base))
    length = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    got = read_output(out)
    assert padded > length == ck.vocab_rows
    assert got[EMB].shape[0] == got[HEAD].shape[0] == length
    assert json.loads((out / "config.json").read_text())["text_config"]["vocab_size"] == length
    sd = torch.load(ck.path, weights_only=False)["state_dict"]
    assert torch.equal(got[HEAD], sd["mllm.model.base_model.model.lm_head.modules_to_save.default.weight"])


def test_llava_round_trip_on_cpu_uses_the_tokenizer_and_reports_masks(tmp_path_factory):
    from sa2va_convert.testing.fixtures import write_base_folder

    root = tmp_path_factory.mktemp("llava")
    base = write_base_folder(root / "base", LLAVA)
    ck = write_training_checkpoint(root / "work" / "iter_1.pth", LLAVA, base_dir=base)
    out = root / "out"
    convert(ck.path, out, ConvertOptions(base=base))
    steer_folder(out)
    report = verify_folder(out, device="cpu", max_new_tokens=2)
    assert report.ok
    r = report.roundtrip.to_dict()
    assert r["model_class"] == "Sa2VAChatModelLlava"
    assert r["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert not report.roundtrip.raw.get("processor"), "a LLaVA folder is called with tokenizer= only"
    image, video = r["runs"]
    assert image["prediction"].startswith("[SEG]")
    for run, frames in ((image, 1), (video, 2)):
        assert run["n_masks"] == 1 and run["masks"][0]["shape"] == [frames, 60, 80]


def test_llava_base_for_a_qwen_checkpoint_is_refused(make_family, base_cache, tmp_path):
    fam = make_family("sa2va-qwen3-vl")
    with pytest.raises(Exception) as e:
        convert(fam.ckpt.path, tmp_path / "out", ConvertOptions(base=base_cache(LLAVA)))
    assert "model\\.model\\.visual" in str(e.value)
