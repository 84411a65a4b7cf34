"""``--format adapter``: a fine-tune as a PEFT adapter on the released base (issue 28).

Real files throughout: fixture checkpoints of every family's keymap, the converter writing both the
merged folder and the adapter, transformers loading the base with our test remote code, PEFT's own
``PeftModel.from_pretrained`` + ``merge_and_unload`` (the merge users run), and the round trip's real
child process (``verify`` of an adapter folder: base found from the record, base + adapter loaded there).
Cheap by design (CI budget): tiny models, two model loads per family, one child process in the module.
"""

from __future__ import annotations

import hashlib

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from sa2va_convert.api import ConvertOptions, convert, convert_all, plan_conversion  # noqa: E402
from sa2va_convert.errors import InputError, PlanError, UsageError  # noqa: E402
from sa2va_convert.evaluate.adapter_swap import plan_swaps  # noqa: E402
from sa2va_convert.evaluate.run import resolve_models  # noqa: E402
from sa2va_convert.formats import ADAPTER_CONFIG, ADAPTER_RECORD, ADAPTER_WEIGHTS, weight_files  # noqa: E402
from sa2va_convert.runner.child import (  # noqa: E402
    call_predict,
    cap_generation,
    cuda_on_cpu,
    forced_tokens,
    nested_code_importable,
)
from sa2va_convert.testing.finetune import synthetic_picture  # noqa: E402
from sa2va_convert.testing.fixtures import write_training_checkpoint  # noqa: E402
from sa2va_convert.verify.folder import verify_folder  # noqa: E402

INTERNLM2_GENERATES = Version(transformers.__version__) < Version("4.50")
# one preset per built-in keymap (tests/test_families_sam3_llava.py FAMILY)
KEYMAP_PRESETS = {
    "sa2va-v1-internvl-qwen2": "sa2va-1b",
    "sa2va-v1-internvl-internlm2": "sa2va-8b",
    "sa2va-v2-internvl3": "sa2va-internvl3",
    "sa2va-v2-qwen-vl": "sa2va-qwen2_5-vl",
    "sa2va-v2-qwen3vl-sam3": "sa2va-qwen3-vl-sam3",
    "sa2va-v2-llava": "sa2va-llava-1.5",
}


def _load(folder: Path):
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    with nested_code_importable(folder):
        model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    processor = None
    if (folder / "preprocessor_config.json").is_file():
        processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
    return model, tok, processor


def _predict(model, tok, processor) -> dict:
    """The model's answer with [SEG] forced (as the round trip does), so the mask path runs on random weights."""
    cap_generation(model, tok, 3)
    seg = tok.convert_tokens_to_ids("[SEG]")
    with torch.no_grad(), cuda_on_cpu(), forced_tokens(model, [seg, tok.eos_token_id]):
        out = call_predict(model, tok, processor, image=synthetic_picture(), text="<image>Please segment it.")
    assert len(out["_masks"]) == 1
    return {"prediction": out["prediction"], "masks": [m.tobytes() for m in out["_masks"]]}


@pytest.mark.parametrize("keymap", sorted(KEYMAP_PRESETS))
def test_adapter_on_its_base_is_the_merged_folder(keymap, base_cache, tmp_path):
    """PEFT's own merge of base + adapter gives every tensor of the merged folder, bit for bit after
    the same cast, and the same predict_forward answer and masks."""
    from peft import PeftModel

    preset = KEYMAP_PRESETS[keymap]
    base = base_cache(preset)
    ck = write_training_checkpoint(tmp_path / "work" / "iter_1.pth", preset, base_dir=base)
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    convert(ck.path, merged, ConvertOptions(base=base, roundtrip=False))
    res = convert(ck.path, adapter, ConvertOptions(base=base, roundtrip=False, output_format="adapter"))
    assert res.plan.keymap == keymap
    assert sorted(p.name for p in adapter.iterdir()) == sorted(
        [ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_RECORD, "conversion_report.json"]
    )
    record = json.loads((adapter / ADAPTER_RECORD).read_text())
    assert record["base"]["path"] == str(base.resolve())
    assert record["base"]["weight_files"] == {  # an independent hash of each file, not the tool's own helper
        f: hashlib.sha256((base / f).read_bytes()).hexdigest() for f in weight_files(base)}
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == ck.lora_r and cfg["lora_alpha"] == ck.lora_alpha
    # the trained heads go whole as modules to save; the LoRA targets are named as the HF model names them
    assert any(m.endswith("sam_mask_decoder") for m in cfg["modules_to_save"]) and "text_hidden_fcs" in cfg[
        "modules_to_save"
    ]
    want = {f: load_file(merged / f) for f in weight_files(merged)}
    want_sd = {k: v for shard in want.values() for k, v in shard.items()}
    assert all(t + ".weight" in want_sd for t in cfg["target_modules"])
    assert adapter.joinpath(ADAPTER_WEIGHTS).stat().st_size < sum((merged / f).stat().st_size for f in want) / 2

    model, tok, processor = _load(base)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    got = model.state_dict()
    assert set(got) == set(want_sd)
    differ = [k for k, v in want_sd.items() if not torch.equal(got[k].to(v.dtype), v)]
    assert differ == []
    merged_model, merged_tok, merged_proc = _load(merged)
    if preset == "sa2va-8b" and not INTERNLM2_GENERATES:
        # upstream's InternLM2 code cannot generate under transformers >= 4.50 (FORMATS.md §9), on any
        # folder: the language model's logits on the prompt are compared instead
        ids = tok("<image>Please segment it.", return_tensors="pt").input_ids
        with torch.no_grad():
            assert torch.equal(model.language_model(ids).logits, merged_model.language_model(ids).logits)
    else:
        assert _predict(model, tok, processor) == _predict(merged_model, merged_tok, merged_proc)


def _base_copy(base_cache, root: Path) -> Path:
    """A private copy of the session's sa2va-1b base, which these tests may change (a few hundred KiB)."""
    copy = root / "base"
    shutil.copytree(base_cache("sa2va-1b"), copy)
    return copy


def test_all_format_adapter_then_verify_runs_base_plus_adapter_and_refuses_another_base(base_cache, tmp_path):
    """``--all --format adapter`` writes one adapter per checkpoint and a rerun skips them; ``verify`` finds
    the base from the record and runs the round trip on base + adapter in the child; a base whose bytes
    changed is refused (exit 5), a missing one is named (exit 3)."""
    base = _base_copy(base_cache, tmp_path)
    work = tmp_path / "work_dirs" / "exp"
    for i, it in enumerate((100, 200)):
        write_training_checkpoint(work / f"iter_{it}.pth", "sa2va-1b", base_dir=base, seed=10 + i, iteration=it)
    out = tmp_path / "runs"
    # in this process (the CLI's --format reaching ConvertOptions.output_format is tests/test_cli_conventions.py's):
    # a CLI process would import torch and PEFT again, ~6 s of CI for nothing the API run does not show
    options = ConvertOptions(base=base, roundtrip=False, output_format="adapter")
    assert [i.status for i in convert_all(work, out, options).items] == ["converted", "converted"]
    for it in ("iter_100", "iter_200"):
        assert (out / it / ADAPTER_WEIGHTS).is_file() and not (out / it / "config.json").exists()
    a100, a200 = (load_file(out / it / ADAPTER_WEIGHTS) for it in ("iter_100", "iter_200"))
    assert set(a100) == set(a200) and any(not torch.equal(a100[k], a200[k]) for k in a100)
    assert [i.status for i in convert_all(work, out, options).items] == ["skipped", "skipped"]
    # eval takes the run's folder of adapters as it takes one of merged folders (each loads base + adapter)
    specs = [(m.name, m.folder) for m in resolve_models([out])]
    assert specs == [(it, (out / it).resolve()) for it in ("iter_100", "iter_200")]

    rep = verify_folder(out / "iter_200", device="cpu", max_new_tokens=2, video=False).to_dict()
    rt = rep["roundtrip"]
    assert rep["ok"] and rep["keymap"] == "sa2va-v1-internvl-qwen2" and rep["checksums"]["of"] == "base"
    assert rt["loading_info"]["missing_keys"] == [] and rt["dtype"] == "bf16"
    forced = [run for run in rt["runs"] if run.get("forced") or run.get("seg_count")]
    assert forced and forced[0]["n_masks"] == 1 and forced[0]["masks"][0]["shape"] == [1, 60, 80]

    _eval_swapped_equals_one_process_each(out, tmp_path)

    shard = sorted(base.glob("model-*.safetensors"))[0]
    other = base_cache("sa2va-1b", seed=5)
    shard.write_bytes((other / shard.name).read_bytes())  # same names and shapes, another base's values
    with pytest.raises(PlanError, match="not the one this adapter was made for") as e:
        verify_folder(out / "iter_100", roundtrip=False)
    assert e.value.exit_code == 5 and Path(e.value.path) == shard
    shutil.rmtree(base)
    with pytest.raises(InputError, match="is not here") as missing:
        verify_folder(out / "iter_100", roundtrip=False)
    assert missing.value.exit_code == 3


def _eval_data(root: Path) -> Path:
    """Two small pictures (not square, both orientations) with a rectangle as their ground truth."""
    import numpy as np
    from PIL import Image

    for stem, (w, h, shift) in {"a_wide": (80, 60, 0), "b_tall": (56, 72, -4)}.items():
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        synthetic_picture(w, h, shift).save(root / "images" / f"{stem}.png")
        truth = np.zeros((h, w), np.uint8)
        truth[h // 4 : h // 2, w // 5 : w // 2] = 255
        Image.fromarray(truth, "L").save(root / "masks" / f"{stem}.png")
    return root


def _eval_swapped_equals_one_process_each(runs: Path, tmp_path: Path) -> None:
    """``eval`` over a run's adapters: one model process loads the base once, merges, evaluates and
    restores per adapter, and gives every mask PNG byte for byte and every metrics.csv value that one
    process per adapter gives (iter_200 after iter_100 in the shared process: a base not restored
    exactly would show in iter_200's answers and masks). With --force-seg every image has a mask from
    each adapter's own decoder (the fixture's random weights rarely answer [SEG] themselves)."""
    import csv

    from sa2va_convert.evaluate.run import evaluate

    data = _eval_data(tmp_path / "data")
    said: list[str] = []
    kw = dict(prompt="the object", device="cpu", max_new_tokens=3, force_seg=True)
    shared = evaluate([runs], data, out=tmp_path / "shared", on_stage=said.append, **kw).to_dict()
    alone = evaluate([runs], data, out=tmp_path / "alone", share_base=False, **kw).to_dict()
    assert "base loaded once for 2 adapters (iter_100, iter_200)" in " ".join(shared["notes"])
    assert not any("base loaded once" in n for n in alone["notes"])
    assert sum("in one model process" in m for m in said) == 1 and not any("iter_100: loading" in m for m in said)
    assert shared["ok"] and alone["ok"] and not shared["failures"]

    def rows(out: Path) -> list[dict]:
        with open(out / "metrics.csv", newline="") as f:
            return [{k: v for k, v in r.items() if k not in ("seconds", "prediction_file")} for r in csv.DictReader(f)]

    assert rows(tmp_path / "shared") == rows(tmp_path / "alone") and len(rows(tmp_path / "alone")) == 2 * 2 * 2
    pngs = sorted(p.relative_to(tmp_path / "alone") for p in (tmp_path / "alone" / "predictions").rglob("*.png"))
    assert len(pngs) == 2 * 2 * 2  # 2 adapters x 2 images, free and forced
    for p in pngs:
        assert (tmp_path / "shared" / p).read_bytes() == (tmp_path / "alone" / p).read_bytes(), p
    forced = {p.parts[1]: (tmp_path / "alone" / p).read_bytes() for p in pngs if "forced" in p.parts}
    assert forced["iter_100"] != forced["iter_200"]  # the two adapters' masks differ: the comparison can fail
    for key in ("mean_dice", "giou", "no_seg_rate"):
        assert [m[key] for m in shared["models"]] == [m[key] for m in alone["models"]]
    # an adapter whose merge casts the whole model keeps a process of its own, and the plan says why
    cast = tmp_path / "cast" / "iter_300"
    shutil.copytree(runs / "iter_200", cast)
    record = json.loads((cast / ADAPTER_RECORD).read_text())
    (cast / ADAPTER_RECORD).write_text(json.dumps({**record, "dtype": "fp32"}))
    models = resolve_models([runs / "iter_100", runs / "iter_200", cast])
    plan = plan_swaps(models, None)
    assert [[m.name for m in g] for g in plan.groups] == [["iter_100", "iter_200"]]
    assert "iter_300 (bf16 -> fp32)" in plan.notes[0]
    assert [[m.name for m in g] for g in plan_swaps(models, "bf16").groups] == [["iter_100", "iter_200", "iter_300"]]


def test_what_peft_cannot_hold_is_refused_before_writing(base_cache, tmp_path):
    base = base_cache("sa2va-1b")
    grown = write_training_checkpoint(tmp_path / "a" / "iter_1.pth", "sa2va-1b", base_dir=base, extra_tokens=("<x>",))
    out = tmp_path / "out"
    adapter = ConvertOptions(base=base, roundtrip=False, output_format="adapter")
    with pytest.raises(PlanError, match="adds tokens to the vocabulary") as e:
        convert(grown.path, out, adapter)
    assert e.value.exit_code == 5 and not out.exists()
    with pytest.raises(PlanError, match="adds tokens to the vocabulary"):  # --dry-run says so too
        plan_conversion(grown.path, out, adapter)
    plain = write_training_checkpoint(tmp_path / "b" / "iter_1.pth", "sa2va-1b", base_dir=base)
    planned = plan_conversion(plain.path, out, adapter)
    assert planned.disk_bytes < plan_conversion(plain.path, out, ConvertOptions(base=base)).disk_bytes / 2
    assert any(w.startswith("--format adapter: ") for w in planned.warnings) and not out.exists()
    with pytest.raises(UsageError, match="--pretrained") as u:
        ConvertOptions(base=base, pretrained=grown.path, output_format="adapter").validate()
    assert u.value.exit_code == 2


def test_predict_on_a_clip_takes_an_adapter_folder_and_gives_the_merged_folders_masks(base_cache, tmp_path):
    """``predict ADAPTER CLIP`` (frames or a video file) loads base + adapter as ``predict ADAPTER IMAGE`` does;
    it used to refuse the folder ("no config.json"). Same answer and per-frame mask files as the merged folder."""
    from sa2va_convert.predict_video import predict_video

    base = base_cache("sa2va-1b")
    ckpt = tmp_path / "work_dirs" / "exp" / "iter_100.pth"
    write_training_checkpoint(ckpt, "sa2va-1b", base_dir=base, seed=4, iteration=100)
    convert(ckpt, tmp_path / "merged", ConvertOptions(base=base, roundtrip=False))
    convert(ckpt, tmp_path / "adapter", ConvertOptions(base=base, roundtrip=False, output_format="adapter"))
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        synthetic_picture(80, 60, 2 * i).save(frames / f"{i:05d}.png")
    reports, masks = {}, {}
    for kind in ("merged", "adapter"):
        reports[kind] = predict_video(tmp_path / kind, frames, "the red object", device="cpu", max_new_tokens=8,
                                      save_dir=tmp_path / f"masks-{kind}")
        masks[kind] = {p.name: p.read_bytes() for p in sorted((tmp_path / f"masks-{kind}").iterdir())}
    assert reports["adapter"].prediction == reports["merged"].prediction
    assert reports["adapter"].mask_shapes == reports["merged"].mask_shapes
    assert list(masks["adapter"]) == ["00000.png", "00001.png"] and masks["adapter"] == masks["merged"]
