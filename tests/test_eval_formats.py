"""``eval``'s ground-truth formats: lossy masks with a threshold, a void label, GIF masks, several
prompts per image, 16-bit images.

Each mask is written here with its own library (PIL, numpy) and read back through the command's
own reading code (``load_dataset``, ``measure``); one end-to-end run on the tiny converted model
scores its own saved predictions, re-saved as JPEG, GIF and a multi-prompt manifest.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")

from sa2va_convert.errors import InputError, UsageError  # noqa: E402
from sa2va_convert.evaluate.data import MaskRule, load_dataset, read_truth  # noqa: E402
from sa2va_convert.evaluate.metrics import measure  # noqa: E402

ENV = {"CI": "1", "OMP_NUM_THREADS": "1"}


def _ellipse(h: int = 48, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 3)) ** 2 <= 1


def _png(path: Path, mask: np.ndarray) -> Path:
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(path)
    return path


def _jpeg(path: Path, mask: np.ndarray, quality: int = 60) -> Path:
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(path, quality=quality)
    return path


def _pair(root: Path, mask_name: str, size: tuple[int, int] = (64, 48)) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    Image.new("RGB", size, (90, 120, 30)).save(root / "images" / f"{Path(mask_name).stem}.png")
    return root / "masks" / mask_name


# ------------------------------------------------------------------ lossy masks


def test_a_jpeg_mask_is_refused_without_a_threshold_naming_the_file(tmp_path):
    mask = _jpeg(_pair(tmp_path, "a.jpg"), _ellipse())
    with pytest.raises(InputError) as e:
        load_dataset(tmp_path, "x")
    assert e.value.path is not None and Path(str(e.value.path)) == mask
    assert "lossy" in e.value.message and "--mask-threshold" in (e.value.hint or "")
    assert load_dataset(tmp_path, "x", rule=MaskRule(threshold=127))[0].mask == mask.resolve()


def test_a_perfect_prediction_of_a_jpeg_mask_scores_1_with_a_threshold(tmp_path):
    truth = _ellipse()
    pred = _png(tmp_path / "pred.png", truth)
    jpg = _jpeg(tmp_path / "truth.jpg", truth, quality=50)
    raw = np.asarray(Image.open(jpg))
    assert ((raw != 0) != truth).sum() > 0  # the noise is there: the non-zero rule would be wrong
    got = measure(pred, jpg, MaskRule(threshold=127))
    assert got["intersection"] == got["union"] == truth.sum()  # every pixel back on its side
    assert got["cldice"] == 1.0 and got["boundary_f"] == 1.0 and got["hd95"] == 0.0


def test_png_and_npy_keep_the_non_zero_rule_under_a_threshold(tmp_path):
    truth = _ellipse()
    ones = tmp_path / "ones.png"
    Image.fromarray(truth.astype(np.uint8), "L").save(ones)  # 0/1: a threshold of 127 must not empty it
    np.save(tmp_path / "t.npy", truth.astype(np.uint8))
    rule = MaskRule(threshold=127)
    for path in (ones, tmp_path / "t.npy"):
        fg, valid = read_truth(path, rule)
        assert valid is None and np.array_equal(fg, truth)


def test_bad_threshold_and_ignore_index_are_usage_errors(tmp_path):
    _png(_pair(tmp_path, "a.png"), _ellipse())
    with pytest.raises(UsageError, match="--mask-threshold"):
        load_dataset(tmp_path, "x", rule=MaskRule(threshold=300))
    with pytest.raises(UsageError, match="--ignore-index"):
        load_dataset(tmp_path, "x", rule=MaskRule(ignore_index=-1))


# ------------------------------------------------------------------ the void label


def test_void_pixels_count_for_nothing(tmp_path):
    """A handmade VOC-style mask: object 1, background 0, a void band 255 (as a palette PNG)."""
    h, w = 20, 30
    mask = np.zeros((h, w), np.uint8)
    mask[5:15, 5:20] = 1
    mask[4:16, 20:24] = 255  # void: right of the object
    mask[0:2, 0:30] = 255  # void: the top rows
    img = Image.fromarray(mask, "P")
    img.putpalette([0, 0, 0, 128, 0, 0] + [0, 0, 0] * 253 + [224, 224, 192])
    truth = tmp_path / "voc.png"
    img.save(truth)
    # the prediction covers the object, the whole void band and the top rows, plus 3 real false positives
    pred = np.zeros((h, w), bool)
    pred[5:15, 5:24] = True
    pred[0:2, :] = True
    pred[18, 0:3] = True
    pred_png = _png(tmp_path / "pred.png", pred)
    rule = MaskRule(ignore_index=255)
    got = measure(pred_png, truth, rule)
    assert got["true_area"] == 150  # the void value is not foreground
    assert got["intersection"] == 150
    assert got["pred_area"] == 153  # the prediction's pixels on void are not counted
    assert got["union"] == 153
    without = measure(pred_png, truth)  # no --ignore-index: 255 is non-zero, so foreground
    assert without["true_area"] == 150 + 4 * 12 - 0 + 2 * 30 - 0
    fg, valid = read_truth(truth, rule)
    assert valid is not None and int((~valid).sum()) == 4 * 12 + 2 * 30 and not (fg & ~valid).any()


# ------------------------------------------------------------------ GIF masks


def test_gif_masks_in_a_folder_are_read_as_palette_indices(tmp_path):
    truth = _ellipse()
    labels = truth.astype(np.uint8) * 2  # label 2 on 0
    labels[:3, :] = 255
    gif = _pair(tmp_path, "a.gif")
    img = Image.fromarray(labels, "P")
    # index 2 drawn black, index 0 white: a colour reading would swap them; the indices decide
    img.putpalette([255, 255, 255, 0, 0, 0, 0, 0, 0] + [9, 9, 9] * 253)
    img.save(gif, optimize=False)  # keep the indices as written (Pillow would renumber unused entries)
    assert Image.open(gif).format == "GIF" and np.array_equal(np.asarray(Image.open(gif)), labels)
    samples = load_dataset(tmp_path, "x")
    assert [s.mask for s in samples] == [gif.resolve()]
    fg, valid = read_truth(gif)
    assert valid is None and np.array_equal(fg, labels != 0)
    fg, valid = read_truth(gif, MaskRule(ignore_index=255))
    assert np.array_equal(fg, truth & (labels != 255)) and valid is not None and int((~valid).sum()) == 3 * 64
    pred = _png(tmp_path / "pred.png", labels == 2)
    got = measure(pred, gif, MaskRule(ignore_index=255))
    assert got["intersection"] == got["union"] == got["true_area"] == int((labels == 2).sum())
