"""``predict``: the folder's own predict_forward on a user's image, run in a child process, saved as PNGs.

Uses a converted Qwen-VL tiny example (the family that also takes ``processor=``), steered so
that greedy decoding says ``[SEG] <p> [SEG] ...`` (see test_verify.steer_folder). The CLI tests at
the end need ``verify``/``predict`` wired into ``sa2va_convert.cli`` and are skipped until then.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
Image = pytest.importorskip("PIL.Image")

from test_verify import convert_tiny, shard_files, steer_folder  # noqa: E402

from sa2va_convert import cli as cli_module  # noqa: E402
from sa2va_convert.errors import InputError, VerifyError  # noqa: E402
from sa2va_convert.predict import mask_file_names, predict, wrap_prompt  # noqa: E402

IMAGE_W, IMAGE_H = 70, 50  # not square: catches (W, H) mix-ups
WIRED = "verify" in cli_module.main.commands and "predict" in cli_module.main.commands
needs_wiring = pytest.mark.skipif(not WIRED, reason="needs verify/predict wired into sa2va_convert.cli")


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory) -> Path:
    return steer_folder(convert_tiny(tmp_path_factory.mktemp("predict"), "sa2va-qwen2_5-vl"))


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    y, x = np.mgrid[0:IMAGE_H, 0:IMAGE_W]
    img = np.stack([x * 3, y * 5, (x + y) % 256], -1).astype(np.uint8)
    img[10:30, 20:50] = (0, 200, 0)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(img, "RGB").save(path)
    return path


def test_wrap_prompt():
    # upstream's RES template (projects/sa2va/evaluation/dataset/RES.py line 186), the expression as written
    assert wrap_prompt("red car") == "<image>\n Please segment red car in this image."
    assert wrap_prompt(" the red car. ") == "<image>\n Please segment the red car in this image."
    assert wrap_prompt("<image>What is in the picture?") == "<image>What is in the picture?"
    with pytest.raises(InputError):
        wrap_prompt("  ")


def test_mask_file_names(tmp_path):
    assert [p.name for p in mask_file_names(tmp_path / "mask.png", 3)] == ["mask.png", "mask_1.png", "mask_2.png"]


def test_predict_saves_one_png_per_seg_and_an_overlay(qwen_folder, picture, tmp_path):
    save, overlay = tmp_path / "res" / "mask.png", tmp_path / "res" / "overlay.png"
    # "[SEG]<p>[SEG]<p>": a [SEG] that ends a capped answer would get no mask, as upstream's code gives none
    report = predict(qwen_folder, picture, "green box", device="cpu", save=save, overlay=overlay, max_new_tokens=4)
    d = report.to_dict()
    json.dumps(d)
    assert d["prompt"] == "<image>\n Please segment green box in this image."
    assert d["prediction"].count("[SEG]") == 2 and d["n_masks"] == 2
    assert d["mask_shapes"] == [[1, IMAGE_H, IMAGE_W]] * 2
    assert d["mask_files"] == [str(p) for p in mask_file_names(save, 2)]
    assert d["overlay_file"] == str(overlay) and d["device"] == "cpu" and d["dtype"] == "bf16"
    source = np.asarray(Image.open(picture).convert("RGB"))
    union = np.zeros((IMAGE_H, IMAGE_W), bool)
    for path in d["mask_files"]:
        m = Image.open(path)
        assert m.mode == "L" and m.size == (IMAGE_W, IMAGE_H)
        arr = np.asarray(m)
        assert set(np.unique(arr)) <= {0, 255}
        union |= arr == 255
    over = np.asarray(Image.open(overlay))
    assert over.shape == (IMAGE_H, IMAGE_W, 3)
    assert (over[~union] == source[~union]).all()  # untouched outside the masks
    assert (over[union] != source[union]).any(axis=-1).all() if union.any() else True


def test_missing_image_is_an_input_error(qwen_folder, tmp_path):
    with pytest.raises(InputError, match="image not found"):
        predict(qwen_folder, tmp_path / "nope.png", "cat")


def test_unreadable_image_is_an_input_error(qwen_folder, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read the image"):
        predict(qwen_folder, bad, "cat", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_says_how_to_fix_it(qwen_folder, picture):
    with pytest.raises(VerifyError) as e:
        predict(qwen_folder, picture, "cat", device="cuda")
    assert "\n" not in str(e.value) and "--device cuda asked for" in str(e.value)
    assert "predict" in e.value.hint and "--python" in e.value.hint


# ------------------------------------------------------------------ CLI (needs the wiring in cli.py)


@needs_wiring
def test_cli_verify_json(qwen_folder, cli):
    res = cli("verify", qwen_folder, "--device", "cpu", "--max-new-tokens", "2", "--no-video", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and report["roundtrip"]["runs"][0]["n_masks"] == 1
    assert report["roundtrip"]["loading_info"]["missing_keys"] == []


@needs_wiring
def test_cli_verify_broken_folder_exits_7_with_one_line(qwen_folder, cli, tmp_path):
    folder = Path(shutil.copytree(qwen_folder, tmp_path / "broken"))
    (folder / shard_files(folder)[0]).unlink()
    res = cli("verify", folder)
    assert res.returncode == 7
    assert len(res.error_lines) == 1 and "missing" in res.error_lines[0], res.stderr


@needs_wiring
def test_cli_predict(qwen_folder, picture, cli, tmp_path):
    res = cli("predict", qwen_folder, picture, "green box", "--device", "cpu", "--max-new-tokens", "2",
              "--save", tmp_path / "mask.png", "--overlay", tmp_path / "overlay.png")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "mask.png").is_file() and (tmp_path / "overlay.png").is_file()
    assert "[SEG]" in res.stdout
