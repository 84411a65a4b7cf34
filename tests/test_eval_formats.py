"""``eval``'s ground-truth formats: lossy masks with a threshold, a void label, GIF masks, several
prompts per image, 16-bit images, COCO instance JSON.

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


# ------------------------------------------------------------------ several prompts per image


def _manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text("".join(json.dumps({"image": i, "mask": m, "prompt": p}) + "\n" for i, m, p in rows))
    return path


def test_an_image_on_several_rows_gets_one_key_per_row(tmp_path):
    _png(_pair(tmp_path, "a.png"), _ellipse())
    _png(_pair(tmp_path, "b.png"), _ellipse())
    _png(tmp_path / "masks" / "a2.png", ~_ellipse())
    m = _manifest(tmp_path / "set.jsonl", [("images/a.png", "masks/a.png", "car"),
                                           ("images/b.png", "masks/b.png", "car"),
                                           ("images/a.png", "masks/a2.png", "road")])
    samples = load_dataset(m)
    assert [(s.stem, s.mask.name, s.prompt) for s in samples] == [
        ("a-p1", "a.png", "<image>\n Please segment car in this image."),
        ("b", "b.png", "<image>\n Please segment car in this image."),
        ("a-p2", "a2.png", "<image>\n Please segment road in this image."),
    ]
    # two different images with one stem are still refused (their predictions would share a file)
    (tmp_path / "other").mkdir()
    _png(tmp_path / "other" / "b.png", _ellipse())
    m = _manifest(tmp_path / "bad.jsonl", [("images/b.png", "masks/b.png", "car"),
                                           ("other/b.png", "masks/b.png", "car")])
    with pytest.raises(InputError, match="two rows have images named 'b'"):
        load_dataset(m)
    # nor may a key made for a repeated image take another image's name
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "a-p1.png")
    m = _manifest(tmp_path / "clash.jsonl", [("images/a-p1.png", "masks/b.png", "car"),
                                             ("images/a.png", "masks/a.png", "car"),
                                             ("images/a.png", "masks/a.png", "road")])
    with pytest.raises(InputError, match="row key 'a-p1' is taken"):
        load_dataset(m)


# ------------------------------------------------------------------ end to end on the tiny model


def run_eval(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sa2va_convert.cli", "eval", *map(str, args), "--max-new-tokens", "16",
           "--device", "cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **ENV})


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The README demo's segmenting fine-tune, converted (it answers [SEG] to any request)."""
    pytest.importorskip("transformers")
    from sa2va_convert.api import ConvertOptions, convert
    from sa2va_convert.testing import make_tiny_example

    root = tmp_path_factory.mktemp("tiny")
    ex = make_tiny_example(root / "tiny")
    convert(ex.checkpoint_path, root / "finetune", ConvertOptions(base=ex.base_dir, roundtrip=False))
    return root / "finetune"


def test_end_to_end_jpeg_gif_void_and_several_prompts(tiny_model, tmp_path):
    """The fine-tune's own predictions, re-saved as a JPEG, a GIF and a palette PNG with a void band,
    are the ground truth of a second run over three rows naming one image: every row scores 1."""
    from sa2va_convert.testing.finetune import synthetic_picture

    model = tiny_model
    data = tmp_path / "data"
    data.mkdir()
    w, h = 80, 60
    synthetic_picture(w, h, 0).save(data / "pic.png")
    _png(data / "zero.png", np.zeros((h, w), bool))
    prompts = ["object", "red object", "object"]
    first = _manifest(data / "first.jsonl", [("pic.png", "zero.png", p) for p in prompts])
    r = run_eval(model, "--data", first, "--out", tmp_path / "r1")
    assert r.returncode == 0, r.stderr[-3000:]
    preds = {k: np.asarray(Image.open(tmp_path / "r1" / "predictions" / "finetune" / f"pic-{k}.png")) != 0
             for k in ("p1", "p2", "p3")}
    assert all(0.02 < p.mean() < 0.98 for p in preds.values()), {k: p.mean() for k, p in preds.items()}
    # foreground 200, not 255: under --ignore-index 255 a 0/255 mask would be all void
    Image.fromarray(preds["p1"].astype(np.uint8) * 200, "L").save(data / "t1.jpg", quality=75)
    gif = Image.fromarray(preds["p2"].astype(np.uint8), "P")
    gif.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
    gif.save(data / "t2.gif", optimize=False)
    voc = preds["p3"].astype(np.uint8)
    band = np.zeros_like(preds["p3"])
    band[:, : w // 4] = True
    voc[band] = 255  # the model's pixels there are neither right nor wrong
    t3 = Image.fromarray(voc, "P")
    t3.putpalette([0, 0, 0, 128, 0, 0] + [0, 0, 0] * 253 + [224, 224, 192])
    t3.save(data / "t3.png")
    assert set(np.unique(np.asarray(Image.open(data / "t3.png")))) == {0, 1, 255}
    second = _manifest(data / "second.jsonl", [("pic.png", "t1.jpg", prompts[0]), ("pic.png", "t2.gif", prompts[1]),
                                               ("pic.png", "t3.png", prompts[2])])
    refused = run_eval(model, "--data", second, "--out", tmp_path / "r0")
    errors = [ln for ln in refused.stderr.splitlines() if ln.startswith("error:")]
    assert refused.returncode == 3 and len(errors) == 1 and "t1.jpg" in errors[0] and "--mask-threshold" in errors[0]
    out = tmp_path / "r2"
    r = run_eval(model, "--data", second, "--out", out, "--mask-threshold", 127, "--ignore-index", 255, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_rows(out / "metrics.csv")
    assert [(x["stem"], x["prompt"]) for x in rows] == [
        (f"pic-p{i + 1}", f"<image>\n Please segment {p} in this image.") for i, p in enumerate(prompts)]
    for x in rows:
        assert x["status"] == "ok" and float(x["dice"]) > 0.99, x
        assert int(x["true_area"]) > 0.5 * int(preds[x["stem"][-2:]].sum()), x
        assert Path(x["prediction_file"]).name == f"{x['stem']}.png" and Path(x["prediction_file"]).is_file()
    void = rows[2]
    assert int(void["true_area"]) == int((preds["p3"] & ~band).sum()) == int(void["pred_area"])
    report = json.loads(r.stdout)
    assert any("value 255 is void" in n for n in report["notes"]), report["notes"]
    again = run_eval(model, "--data", second, "--out", out, "--mask-threshold", 127, "--ignore-index", 255,
                     "--resume", "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["resumed"] == 3 and json.loads(again.stdout)["evaluated"] == 0
    # the kept rows were read with --ignore-index 255: a resume without it would mix two rules
    mixed = run_eval(model, "--data", second, "--out", out, "--mask-threshold", 127, "--resume")
    errors = [ln for ln in mixed.stderr.splitlines() if ln.startswith("error:")]
    assert mixed.returncode == 2 and len(errors) == 1 and "value 255 is void" in errors[0], mixed.stderr[-2000:]


# ------------------------------------------------------------------ 16-bit images


def _sixteen_bit(path: Path) -> np.ndarray:
    """A 12-bit-range scan saved as a 16-bit greyscale PNG: every value above 255."""
    yy, xx = np.mgrid[:48, :64]
    arr = (1000 + 40 * xx + 10 * yy).astype(np.uint16)
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    return arr


def test_16_bit_and_float_images_are_windowed_to_their_own_range(tmp_path):
    from sa2va_convert.runner.child import load_rgb

    arr = _sixteen_bit(tmp_path / "scan.png")
    assert (np.asarray(Image.open(tmp_path / "scan.png").convert("RGB")) == 255).mean() > 0.9  # PIL's clip
    rgb = np.asarray(load_rgb(str(tmp_path / "scan.png")))
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8 and rgb.min() == 0 and rgb.max() == 255
    want = np.round((arr - arr.min()) * 255.0 / (arr.max() - arr.min())).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], want) and np.array_equal(rgb[..., 2], want)
    Image.fromarray(arr.astype(np.float32) / 7.0, "F").save(tmp_path / "depth.tif")
    assert np.array_equal(np.asarray(load_rgb(str(tmp_path / "depth.tif")))[..., 1], want)
    Image.fromarray(np.full((4, 5), 3000, np.uint16)).save(tmp_path / "flat.png")
    assert not np.asarray(load_rgb(str(tmp_path / "flat.png"))).any()  # constant: black, not a division by 0
    Image.new("RGB", (5, 4), (10, 200, 30)).save(tmp_path / "rgb.png")
    assert np.asarray(load_rgb(str(tmp_path / "rgb.png")))[0, 0].tolist() == [10, 200, 30]  # 8-bit: untouched


def test_end_to_end_a_16_bit_image_reaches_the_model_windowed(tiny_model, tmp_path):
    """The overlay is the image the model was given, tinted under the mask: outside it, it must be
    the windowed scan, not PIL's white."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    arr = _sixteen_bit(data / "images" / "scan.png")
    _png(data / "masks" / "scan.png", _ellipse())
    out = tmp_path / "rep"
    r = run_eval(tiny_model, "--data", data, "--prompt", "object", "--out", out, "--overlays")
    assert r.returncode == 0, r.stderr[-3000:]
    pred = np.asarray(Image.open(out / "predictions" / "finetune" / "scan.png")) != 0
    overlay = np.asarray(Image.open(out / "overlays" / "finetune" / "scan.png"))
    want = np.round((arr - arr.min()) * 255.0 / (arr.max() - arr.min())).astype(np.uint8)
    assert (~pred).any() and np.array_equal(overlay[~pred][:, 0], want[~pred])


# ------------------------------------------------------------------ COCO instance JSON


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, written by hand: run lengths over the column-major pixels, zeros first."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _coco_set(root: Path, images_dir: Path | None = None) -> tuple[Path, dict[str, np.ndarray]]:
    """Two images: a.png with two "cat" instances (a polygon, an uncompressed RLE) and a "dog"
    (compressed RLE from pycocotools.mask.encode); b.png with one "cat" polygon. The expected truths
    come from pycocotools itself (the polygon) and from the arrays the RLEs were made of."""
    cm = pytest.importorskip("pycocotools.mask")
    h, w = 48, 64
    images_dir = images_dir or root
    root.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b"):
        Image.new("RGB", (w, h), (90, 120, 30)).save(images_dir / f"{name}.png")
    square = [[4.0, 4.0, 20.0, 4.0, 20.0, 20.0, 4.0, 20.0]]
    poly = cm.decode(cm.merge(cm.frPyObjects(square, h, w))).astype(bool)
    assert 200 < poly.sum() < 330  # a 16x16 square, give or take its edge pixels
    blob = _ellipse(h, w) & (np.arange(w)[None, :] > 40)
    dog = np.zeros((h, w), bool)
    dog[30:44, 2:30] = True
    enc = cm.encode(np.asfortranarray(dog.astype(np.uint8)))
    enc["counts"] = enc["counts"].decode("ascii")
    tri = [[30.0, 5.0, 60.0, 5.0, 45.0, 40.0]]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": h, "width": w},
                   {"id": 2, "file_name": "b.png", "height": h, "width": w},
                   {"id": 3, "file_name": "unannotated.png", "height": h, "width": w}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": square, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": _uncompressed_rle(blob), "iscrowd": 1},
            {"id": 3, "image_id": 1, "category_id": 7, "segmentation": enc, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 1, "segmentation": tri, "iscrowd": 0},
        ],
    }
    path = root / "annotations.json"
    path.write_text(json.dumps(coco))
    expected = {"a-c1": poly | blob, "a-c7": dog, "b-c1": cm.decode(cm.merge(cm.frPyObjects(tri, h, w))).astype(bool)}
    return path, expected


def test_coco_gives_one_row_per_image_and_category_with_the_union_as_truth(tmp_path):
    from sa2va_convert.evaluate.data import write_truth

    ann, expected = _coco_set(tmp_path / "data")
    truth = tmp_path / "report" / "truth"
    samples = load_dataset(ann, truth_dir=truth)
    assert [(s.stem, s.prompt) for s in samples] == [
        ("a-c1", "<image>\n Please segment cat in this image."), ("a-c7", "<image>\n Please segment dog in this image."),
        ("b-c1", "<image>\n Please segment cat in this image.")]
    assert all(s.mask.parent == truth.resolve() and not s.mask.exists() for s in samples)  # nothing decoded yet
    write_truth(samples)
    assert sorted(p.name for p in truth.iterdir()) == sorted(s.mask.name for s in samples)  # renamed into place
    for s in samples:
        fg, valid = read_truth(s.mask)
        assert valid is None and (fg == expected[s.stem]).all(), s.stem
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["a.png", "annotations.json", "b.png"]


def test_coco_images_folder_and_prompt_map(tmp_path):
    ann, _ = _coco_set(tmp_path / "data", images_dir=tmp_path / "pics")
    with pytest.raises(InputError) as e:
        load_dataset(ann, truth_dir=tmp_path / "t")
    assert "a.png" in e.value.message and "--images" in (e.value.hint or "")
    pmap = tmp_path / "map.json"
    pmap.write_text(json.dumps({"cat": "small cat", "7": "brown dog"}))
    samples = load_dataset(ann, images=tmp_path / "pics", prompt_map=pmap, truth_dir=tmp_path / "t")
    assert [s.prompt for s in samples] == ["<image>\n Please segment small cat in this image.",
                                           "<image>\n Please segment brown dog in this image.",
                                           "<image>\n Please segment small cat in this image."]
    assert samples[0].image == (tmp_path / "pics" / "a.png").resolve()
    pmap.write_text(json.dumps({"horse": "a horse"}))
    with pytest.raises(InputError) as e:
        load_dataset(ann, images=tmp_path / "pics", prompt_map=pmap, truth_dir=tmp_path / "t")
    assert "'horse'" in e.value.message and "1 'cat'" in (e.value.hint or "")
    with pytest.raises(UsageError):
        load_dataset(ann, "x", images=tmp_path / "pics", truth_dir=tmp_path / "t")  # --prompt has no place here
    with pytest.raises(UsageError):
        load_dataset(tmp_path / "pics", "x", prompt_map=pmap)  # only for COCO


def test_coco_size_mismatch_and_box_only_annotations_are_refused(tmp_path):
    ann, _ = _coco_set(tmp_path)
    d = json.loads(ann.read_text())
    d["images"][1]["width"] = 65
    ann.write_text(json.dumps(d))
    with pytest.raises(InputError) as e:
        load_dataset(ann, truth_dir=tmp_path / "t")
    assert Path(str(e.value.path)).name == "b.png" and "65x48" in e.value.message
    d["images"][1]["width"] = 64
    d["annotations"][3]["segmentation"] = {"bbox": [1, 2, 3, 4]}
    ann.write_text(json.dumps(d))
    with pytest.raises(InputError) as e:
        load_dataset(ann, truth_dir=tmp_path / "t")
    assert "annotation 3" in e.value.message


def test_a_missing_pycocotools_is_one_usage_error(tmp_path, monkeypatch):
    ann, _ = _coco_set(tmp_path)
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(UsageError) as e:
        load_dataset(ann, truth_dir=tmp_path / "t")
    assert e.value.exit_code == 2 and "pycocotools, which is not installed" in e.value.message
    assert "sa2va-convert[eval]" in (e.value.hint or "")


# ------------------------------------------------------------------ multi-class masks with a prompt map


def test_class_index_masks_give_one_row_per_image_and_mapped_class(tmp_path):
    h, w = 48, 64
    labels = np.zeros((h, w), np.uint8)
    labels[5:20, 5:30] = 1
    labels[25:40, 10:50] = 2
    labels[0:4, :] = 5  # a class the map does not name: background for every row
    Image.fromarray(labels, "L").save(_pair(tmp_path, "s1.png"))
    only_one = np.where(labels == 1, 1, 0).astype(np.uint8)
    Image.fromarray(only_one, "L").save(_pair(tmp_path, "s2.png"))
    pmap = tmp_path / "map.json"
    pmap.write_text(json.dumps({"2": "kidney", "1": "liver"}))
    samples = load_dataset(tmp_path, prompt_map=pmap)
    assert [(s.stem, s.prompt) for s in samples] == [
        ("s1-c1", "<image>\n Please segment liver in this image."), ("s1-c2", "<image>\n Please segment kidney in this image."),
        ("s2-c1", "<image>\n Please segment liver in this image."), ("s2-c2", "<image>\n Please segment kidney in this image.")]
    for s in samples:
        fg, _ = read_truth(s.mask, s.rule)
        source = labels if s.stem.startswith("s1") else only_one
        assert (fg == (source == int(s.stem[-1]))).all(), s.stem
    assert not read_truth(samples[3].mask, samples[3].rule)[0].any()  # kidney absent from s2: empty truth
    pred = _png(tmp_path / "pred.png", labels == 2)
    got = measure(pred, samples[1].mask, samples[1].rule)
    assert got["intersection"] == got["union"] == (labels == 2).sum()
    assert [s.stem for s in load_dataset(tmp_path, prompt_map=pmap, limit=3)] == ["s1-c1", "s1-c2", "s2-c1"]
    manifest = _manifest(tmp_path / "m.jsonl", [("images/s1.png", "masks/s1.png", "ignored")])
    assert [s.stem for s in load_dataset(manifest, prompt_map=pmap)] == ["s1-c1", "s1-c2"]
    with pytest.raises(UsageError):
        load_dataset(tmp_path, "organ", prompt_map=pmap)
    # a class that is also the void value could never score: refused (exit 2) before anything runs
    with pytest.raises(UsageError) as void:
        load_dataset(tmp_path, prompt_map=pmap, rule=MaskRule(ignore_index=2))
    assert void.value.exit_code == 2 and "class 2" in void.value.message and "--ignore-index 2" in void.value.message
    assert len(load_dataset(tmp_path, prompt_map=pmap, rule=MaskRule(ignore_index=5))) == 4  # 5 is no mapped class
    pmap.write_text(json.dumps({"liver": "liver"}))
    with pytest.raises(InputError) as e:
        load_dataset(tmp_path, prompt_map=pmap)
    assert "'liver'" in e.value.message and "class index" in e.value.message


def test_end_to_end_coco_truth_reaches_the_scorer_and_resume_keeps_it(tiny_model, tmp_path):
    """A COCO file evaluated on the tiny model: one row per image and category, each scored against
    the decoded union (its true_area is the union's), the masks written under the report, not the data."""
    ann, expected = _coco_set(tmp_path / "data")
    pmap = tmp_path / "map.json"
    pmap.write_text(json.dumps({"dog": "brown dog"}))
    out = tmp_path / "r"
    r = run_eval(tiny_model, "--data", ann, "--prompt-map", pmap, "--out", out, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_rows(out / "metrics.csv")
    assert [(x["stem"], x["prompt"]) for x in rows] == [
        ("a-c1", "<image>\n Please segment cat in this image."), ("a-c7", "<image>\n Please segment brown dog in this image."),
        ("b-c1", "<image>\n Please segment cat in this image.")]
    for x in rows:
        assert x["status"] == "ok" and int(x["true_area"]) == int(expected[x["stem"]].sum()), x
        assert Path(x["prediction_file"]).name == f"{x['stem']}.png"
        assert (np.asarray(Image.open(out / "truth" / f"{x['stem']}.png")) != 0).sum() == expected[x["stem"]].sum()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["a.png", "annotations.json", "b.png"]
    again = run_eval(tiny_model, "--data", ann, "--prompt-map", pmap, "--out", out, "--resume", "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["resumed"] == 3 and json.loads(again.stdout)["evaluated"] == 0
    bad = run_eval(tiny_model, "--data", ann, "--prompt", "x", "--out", tmp_path / "r2")
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "--prompt" in errors[0], bad.stderr[-2000:]


def test_end_to_end_class_index_masks_with_a_prompt_map(tiny_model, tmp_path):
    """A folder of class-index masks on the tiny model: one metrics.csv row per image and mapped class,
    each with its class's area as true_area (0 for a class the image lacks)."""
    from sa2va_convert.testing.finetune import synthetic_picture

    w, h = 80, 60
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    synthetic_picture(w, h, 0).save(tmp_path / "data" / "images" / "scan.png")
    labels = np.zeros((h, w), np.uint8)
    labels[5:25, 5:40] = 1
    labels[30:50, 20:70] = 2
    Image.fromarray(labels, "L").save(tmp_path / "data" / "masks" / "scan.png")
    pmap = tmp_path / "map.json"
    pmap.write_text(json.dumps({"1": "liver", "2": "kidney", "3": "spleen"}))
    out = tmp_path / "r"
    # --force-seg too: the fine-tune answers [SEG], so each forced mask is its free one, saved again by
    # the model process in the same pass (not predicted twice) and scored by copying the free row
    r = run_eval(tiny_model, "--data", tmp_path / "data", "--prompt-map", pmap, "--out", out, "--force-seg")
    assert r.returncode == 0, r.stderr[-3000:]
    every = read_rows(out / "metrics.csv")
    rows = [x for x in every if x["model"] == "finetune"]
    forced = [x for x in every if x["model"] == "finetune[forced]"]
    assert [x["stem"] for x in forced] == [x["stem"] for x in rows] and all(x["forced"] == "reused" for x in forced)
    for free, f in zip(rows, forced):
        assert (np.asarray(Image.open(f["prediction_file"])) == np.asarray(Image.open(free["prediction_file"]))).all()
        assert Path(f["prediction_file"]).parent.name == "forced"
        keys = ("intersection", "union", "pred_area", "true_area", "dice", "cldice", "boundary_f", "hd95", "seg_count")
        assert [f[k] for k in keys] == [free[k] for k in keys]
    assert [(x["stem"], x["prompt"]) for x in rows] == [
        ("scan-c1", "<image>\n Please segment liver in this image."), ("scan-c2", "<image>\n Please segment kidney in this image."),
        ("scan-c3", "<image>\n Please segment spleen in this image.")]
    assert [int(x["true_area"]) for x in rows] == [int((labels == k).sum()) for k in (1, 2, 3)]
    assert all(x["status"] == "ok" for x in rows) and int(rows[2]["true_area"]) == 0
    # --resume after the map changed one class's words: that row is asked again, the others are kept
    # (what --resume keeps is decided by _finished_rows, read here from the run's real files: no model)
    from sa2va_convert.evaluate.run import _finished_rows, resolve_models

    pmap.write_text(json.dumps({"1": "liver", "2": "left kidney", "3": "spleen"}))
    samples = load_dataset(tmp_path / "data", prompt_map=pmap)
    kept = _finished_rows(out, resolve_models([tiny_model]), samples)
    assert sorted(kept) == [("finetune", "scan-c1"), ("finetune", "scan-c3")]
    assert all(kept[k]["prompt"] == next(s.prompt for s in samples if s.stem == k[1]) for k in kept)
