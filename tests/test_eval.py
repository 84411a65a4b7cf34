"""``sa2va-convert eval`` (issue 15): Dice/IoU of converted fine-tunes on a user's own images.

The models are the README demo's segmenting fine-tune (``make_tiny_example``: its LoRA and its
head are both needed for ``[SEG]``) and its two twins without the LoRA / without the head
(``drop_from_checkpoint``, as tests/test_finetune_arrived.py builds them), each converted for real.

The dataset's ground truth is what the fine-tune should find: the masks of a model assembled in
*this* process from the independent fp32 reference tensors (``reference_output``: base +
checkpoint, merged the plain way), never from anything ``eval`` wrote. One image's ground truth
is cut (its left third cleared, as an annotator who disagrees), so the scores are not all ~1.

Every run is the real CLI in a subprocess, whose child process runs each model's own
``predict_forward``; each test recomputes Dice and IoU here, in plain numpy, from the prediction
PNGs it saved and the ground truth, and finds the report's numbers.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from click.testing import CliRunner  # noqa: E402

from sa2va_convert.api import ConvertOptions, convert  # noqa: E402
from sa2va_convert.cli import main as cli_main  # noqa: E402
from sa2va_convert.evaluate.data import load_dataset  # noqa: E402
from sa2va_convert.evaluate.metrics import counts, scores  # noqa: E402
from sa2va_convert.testing import make_tiny_example, reference_output  # noqa: E402
from sa2va_convert.testing.finetune import SEG_TOKEN, STOP_TOKEN, drop_from_checkpoint, synthetic_picture  # noqa: E402
from sa2va_convert.runner.child import cap_generation, cuda_on_cpu  # noqa: E402

# (stem, width, height, shift of the red ellipse): small, not square, both orientations
PICTURES = [("a_wide", 80, 60, 0), ("b_tall", 56, 72, -4), ("c_cut", 96, 64, 8), ("d_npy", 64, 48, 3),
            ("e_ones", 72, 56, -6)]
CUT = "c_cut"  # ground truth with its left third cleared
#: -> "<image>\n Please segment the object in this image." (upstream's template; the fine-tune answers [SEG] to any request)
PROMPT = "the object"
WRAPPED = "<image>\n Please segment the object in this image."  # what eval sends the model
ENV = {"CI": "1", "OMP_NUM_THREADS": "1"}  # plain output; one thread: the same arithmetic in every run


def run_eval(*args: object, timeout: float = 300, torchrun: int = 0) -> subprocess.CompletedProcess:
    """The real command in a subprocess (under ``torch.distributed.run`` when ``torchrun``)."""
    env = {**os.environ, **ENV}
    args = (*args, "--max-new-tokens", 16)  # the twins' "no [SEG]" is checked over 16 tokens (finetune.py)
    cmd = [sys.executable, "-m", "sa2va_convert.cli", "eval", *map(str, args)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
               "--master_port", str(29500 + os.getpid() % 1000), "-m", "sa2va_convert.cli", "eval", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


# ------------------------------------------------------------------ the models and the dataset


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("eval")
    ex = make_tiny_example(root / "tiny")
    models = root / "models"
    models.mkdir()
    folders = {"finetune": models / "finetune"}
    # no round trip here: eval itself loads each model and segments with it (the round trip is
    # tested in test_verify); it would cost ~5 s per model on the suite's critical path
    opts = ConvertOptions(base=ex.base_dir, roundtrip=False)
    convert(ex.checkpoint_path, folders["finetune"], opts)
    for dropped in ("lora", "head"):
        twin = drop_from_checkpoint(ex.checkpoint.path, root / f"no_{dropped}" / "iter_100.pth", [dropped])
        folders[f"no_{dropped}"] = models / f"no_{dropped}"
        convert(twin, folders[f"no_{dropped}"], opts)
    data = root / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    truth = {}
    for stem, w, h, shift in PICTURES:
        img = synthetic_picture(w, h, shift)
        img.save(data / "images" / f"{stem}.png")
        gt = reference_mask(ex, img)
        assert 0.05 < gt.mean() < 0.95, (stem, gt.mean())  # a real object, not an empty or full frame
        if stem == CUT:
            gt[:, : w // 3] = False
        if stem == "d_npy":
            np.save(data / "masks" / f"{stem}.npy", gt)
        elif stem == "e_ones":  # 0/1 PNG: any non-zero pixel is foreground
            Image.fromarray(gt.astype(np.uint8), "L").save(data / "masks" / f"{stem}.png")
        else:
            Image.fromarray(gt.astype(np.uint8) * 255, "L").save(data / "masks" / f"{stem}.png")
        truth[stem] = gt
    return SimpleNamespace(root=root, ex=ex, folders=folders, data=data, truth=truth)


_REFERENCE: dict = {}


def reference_mask(ex, image) -> np.ndarray:
    """The union of the masks of a model built from the fp32 reference tensors, in this process."""
    from transformers import AutoModel, AutoTokenizer

    if not _REFERENCE:
        model = AutoModel.from_pretrained(str(ex.base_dir), trust_remote_code=True, dtype=torch.float32).eval()
        missing, unexpected = model.load_state_dict(
            dict(reference_output(ex.base_dir, ex.checkpoint.path, scale=ex.checkpoint.scale)), strict=True)
        assert not missing and not unexpected
        tok = AutoTokenizer.from_pretrained(str(ex.base_dir), trust_remote_code=True)
        cap_generation(model, tok, 8)
        _REFERENCE.update(model=model, tok=tok)
    with torch.no_grad(), cuda_on_cpu():
        out = _REFERENCE["model"].predict_forward(image=image, text=WRAPPED,
                                                  tokenizer=_REFERENCE["tok"])
    assert out["prediction"] == SEG_TOKEN + STOP_TOKEN
    union = np.zeros((image.size[1], image.size[0]), bool)
    for m in out["prediction_masks"]:
        union |= m[0]
    return union


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def recompute(world, out: Path, model: str, stems: list[str]) -> dict:
    """Dice/IoU per image and the model's aggregates, from the saved PNGs and the ground truth only."""
    per, inter, union = {}, 0, 0
    for stem in stems:
        with Image.open(out / "predictions" / model / f"{stem}.png") as im:
            assert im.mode == "L"
            arr = np.asarray(im)
        assert set(np.unique(arr).tolist()) <= {0, 255}
        pred, gt = arr == 255, world.truth[stem]
        assert pred.shape == gt.shape
        i, u = int((pred & gt).sum()), int((pred | gt).sum())
        dice = 2 * i / (pred.sum() + gt.sum()) if (pred.sum() + gt.sum()) else 1.0
        per[stem] = {"dice": dice, "iou": i / u if u else 1.0, "pred_area": int(pred.sum())}
        inter, union = inter + i, union + u
    return {"per": per, "mean_dice": float(np.mean([p["dice"] for p in per.values()])),
            "giou": float(np.mean([p["iou"] for p in per.values()])), "ciou": inter / union}


@pytest.fixture(scope="module")
def main_run(world) -> SimpleNamespace:
    """One run comparing the fine-tune with its two twins (three models, one report)."""
    out = world.root / "report"
    f = world.folders
    r = run_eval(f["finetune"], f["no_lora"], f["no_head"], "--data", world.data, "--prompt", PROMPT, "--out", out,
                 "--device", "cpu", "--overlays")
    assert r.returncode == 0, r.stderr[-3000:]
    return SimpleNamespace(out=out, report=json.loads((out / "summary.json").read_text()), stdout=r.stdout)


# ------------------------------------------------------------------ the scores


def test_fine_tune_scores_high_and_its_twins_low_recomputed_from_the_saved_masks(world, main_run):
    report, out = main_run.report, main_run.out
    stems = [p[0] for p in PICTURES]
    models = {m["model"]: m for m in report["models"]}
    assert list(models) == ["finetune", "no_lora", "no_head"]
    assert report["ok"] and report["best"] == "finetune" and report["images"] == len(stems) and not report["failures"]
    rows = read_rows(out / "metrics.csv")
    assert [(r["model"], r["stem"]) for r in rows] == [(m, s) for m in models for s in stems]
    for name, summary in models.items():
        mine = recompute(world, out, name, stems)
        assert summary["images"] == len(stems) and summary["failures"] == 0
        assert summary["mean_dice"] == pytest.approx(mine["mean_dice"], abs=1e-9)
        assert summary["giou"] == pytest.approx(mine["giou"], abs=1e-9)
        assert summary["ciou"] == pytest.approx(mine["ciou"], abs=1e-9)
        for row in (r for r in rows if r["model"] == name):
            p = mine["per"][row["stem"]]
            assert float(row["dice"]) == pytest.approx(p["dice"], abs=1e-6)
            assert float(row["iou"]) == pytest.approx(p["iou"], abs=1e-6)
            assert int(row["pred_area"]) == p["pred_area"]
            assert Path(row["prediction_file"]) == out / "predictions" / name / f"{row['stem']}.png"
            assert (out / "overlays" / name / f"{row['stem']}.png").is_file()
    ft = recompute(world, out, "finetune", stems)
    # the fine-tune finds what the fp32 reference finds (bf16 moves a few boundary pixels) ...
    assert all(p["dice"] > 0.98 for s, p in ft["per"].items() if s != CUT), ft["per"]
    assert 0.5 < ft["per"][CUT]["dice"] < 0.9  # ... and is marked down where the ground truth disagrees
    assert models["finetune"]["mean_dice"] > 0.9 and models["finetune"]["no_seg_rate"] == 0
    # the twins answer without [SEG]: empty predictions, scored 0, never forced
    for twin in ("no_lora", "no_head"):
        assert models[twin]["mean_dice"] == 0 and models[twin]["ciou"] == 0
        assert models[twin]["no_seg_rate"] == 1 and models[twin]["no_seg"] == len(stems)
        assert all(p["pred_area"] == 0 for p in recompute(world, out, twin, stems)["per"].values())
        assert {r["status"] for r in rows if r["model"] == twin} == {"no_seg"}
        assert all(SEG_TOKEN not in r["answer"] for r in rows if r["model"] == twin)
    assert {r["answer"] for r in rows if r["model"] == "finetune"} == {SEG_TOKEN + STOP_TOKEN}


def test_report_files_and_the_plain_table(main_run):
    out = main_run.out
    summary = main_run.report
    assert "ciou" in summary["definitions"] and not (out / ".work").exists()
    with Image.open(out / "report.png") as im:
        assert im.format == "PNG" and im.size[0] > 600
    assert not list(out.rglob("*.tmp*"))  # atomic writes leave no temporary files
    lines = main_run.stdout.splitlines()  # piped: aligned plain text, no box drawing
    assert lines[1].split()[:4] == ["model", "images", "mean", "Dice"]
    assert [ln.split()[0] for ln in lines[2:5]] == ["finetune", "no_lora", "no_head"]
    assert lines[2].startswith("finetune *") and "best: finetune" in main_run.stdout
    assert not any(ch in main_run.stdout for ch in "┏━│")
    dice = {ln.split()[0]: ln.split()[3 if ln.startswith("finetune *") else 2] for ln in lines[2:5]}
    assert dice == {m["model"]: f"{m['mean_dice']:.3f}" for m in summary["models"]}


# ------------------------------------------------------------------ paired comparison


def counts_scores(row: dict) -> dict:
    """Dice and IoU from a metrics.csv row's pixel counts, written out here (not metrics.scores)."""
    i, u, p, t = (int(row[k]) for k in ("intersection", "union", "pred_area", "true_area"))
    return {"dice": 2 * i / (p + t) if p + t else 1.0, "iou": i / u if u else 1.0}


PAIRED = ("dice", "iou", "cldice", "boundary_f", "hd95")


def row_value(row: dict, metric: str) -> float | None:
    """Dice/IoU from the counts (written out here); the shape values as metrics.csv has them (each
    checked against a second implementation below), None where empty (HD95 with one mask empty)."""
    if metric in ("dice", "iou"):
        return counts_scores(row)[metric]
    return float(row[metric]) if row[metric] != "" else None


def recompute_comparison(rows: list[dict], c: dict, skip_empty: bool = False) -> dict:
    """A comparison from metrics.csv alone: the pairing (only images where both have the value),
    the counting (better = lower for HD95), the bootstrap from its seed."""
    def per(model):
        return {r["stem"]: r for r in rows if r["model"] == model and r["status"] != "failed"
                and not (skip_empty and int(r["true_area"]) == 0)}
    base, mod = per(c["baseline"]), per(c["model"])
    metric = c["metric"]
    stems = [s for s in base if s in mod and row_value(base[s], metric) is not None
             and row_value(mod[s], metric) is not None]
    d = np.array([row_value(mod[s], metric) - row_value(base[s], metric) for s in stems])
    sign = -1 if metric == "hd95" else 1
    out = {"d": d, "wins": int((sign * d > 0).sum()), "ties": int((d == 0).sum()), "losses": int((sign * d < 0).sum())}
    if len(d):
        rng = np.random.default_rng(c["seed"])
        means = d[rng.integers(0, len(d), size=(c["resamples"], len(d)))].mean(axis=1)
        out.update(mean=d.mean(), ci=list(np.percentile(means, [2.5, 97.5])))
    else:
        out.update(mean=None, ci=None)
    return out


def check_comparisons(report: dict, rows: list[dict], skip_empty: bool = False) -> None:
    from scipy.stats import wilcoxon

    names = [m["model"] for m in report["models"] if not m.get("forced_of")]
    assert [(c["model"], c["metric"]) for c in report["comparisons"] if c["baseline"] == report["baseline"]] == [
        (m, k) for m in names if m != report["baseline"] for k in PAIRED]
    for c in report["comparisons"]:
        mine = recompute_comparison(rows, c, skip_empty)
        assert c["resamples"] >= 1000 and isinstance(c["seed"], int) and c["n"] == len(mine["d"])
        assert c["higher_is_better"] is (c["metric"] != "hd95")
        if mine["mean"] is None:
            assert c["mean_difference"] is None and c["ci95"] is None and c["p_value"] is None
            continue
        assert c["mean_difference"] == pytest.approx(mine["mean"], abs=1e-12)
        assert c["ci95"] == pytest.approx(mine["ci"], abs=1e-12)
        assert (c["wins"], c["ties"], c["losses"]) == (mine["wins"], mine["ties"], mine["losses"])
        nonzero = int(np.count_nonzero(mine["d"]))
        if nonzero >= 6:
            assert c["p_value"] == pytest.approx(wilcoxon(mine["d"]).pvalue, rel=1e-12) and not c["p_value_note"]
        else:  # no p-value the data cannot support, and why
            assert c["p_value"] is None and c["p_value_note"]
        assert "bootstrap" in c["method"] and "Wilcoxon" in c["method"]


def test_paired_comparison_against_the_first_model(main_run):
    report = main_run.report
    rows = read_rows(main_run.out / "metrics.csv")
    assert report["baseline"] == "finetune"
    check_comparisons(report, rows)
    # 5 images: a signed-rank test cannot reach p < 0.05 on 5 differences, so it says so
    scored = [c for c in report["comparisons"] if c["metric"] != "hd95"]
    assert all(c["p_value"] is None and "fewer than 6" in c["p_value_note"] for c in scored)
    assert all(c["losses"] == 5 and c["ci95"][1] < 0 for c in scored)
    # the twins answer without [SEG]: an empty mask against an object has no HD95, so nothing pairs
    assert all(c["n"] == 0 and c["p_value_note"] == "no image has a value for both models"
               for c in report["comparisons"] if c["metric"] == "hd95")
    paired = read_rows(main_run.out / "paired.csv")
    assert sorted({(r["model"], r["metric"]) for r in paired}) == sorted(
        (c["model"], c["metric"]) for c in scored)
    # the baseline is best: named with its lead over the runner-up (the earlier of two tied twins)
    bi = report["best_interval"]
    assert bi["model"] == "finetune" and bi["against"] == "no_lora" and bi["ci95"][0] > 0 and not bi["covers_zero"]
    # Dice, gIoU and cIoU agree; no interval covers 0; only HD95 has nothing to pair (said, not hidden)
    assert report["cautions"] == [
        f"{m} vs finetune: no image has a hd95 value for both, so there is no hd95 comparison (HD95 is undefined "
        "where one mask is empty)" for m in ("no_lora", "no_head")]
    paired = read_rows(main_run.out / "paired.csv")
    assert len(paired) == 2 * 4 * len(PICTURES)  # 2 twins x (Dice, IoU, clDice, boundary F); no HD95 pairs
    for r in paired:
        assert float(r["difference"]) == pytest.approx(float(r["model_value"]) - float(r["baseline_value"]), abs=2e-6)
    assert "against the baseline finetune" in main_run.stdout
    assert "best: finetune (mean Dice" in main_run.stdout and "against no_lora" in main_run.stdout


def test_bootstrap_and_test_edge_cases():
    code = ("import sys, sa2va_convert.evaluate.compare; "
            "print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"  # no torch ever; scipy only when a p-value is computed
    from sa2va_convert.evaluate.compare import MIN_NONZERO, bootstrap_ci, compare, wilcoxon_p

    assert wilcoxon_p([0.0] * 8) == (None, "all 8 paired differences are 0: nothing to test")
    assert wilcoxon_p([])[0] is None and bootstrap_ci([]) is None
    assert wilcoxon_p([0.1] * (MIN_NONZERO - 1) + [0.0] * 20)[0] is None
    c = compare("a", "b", "dice", [0.5, 0.5, 0.5], [0.5, 0.6, 0.4])
    assert (c.wins, c.ties, c.losses, c.n) == (1, 1, 1, 3) and c.covers_zero
    from sa2va_convert.evaluate.run import EvalReport, _cautions

    nothing = compare("a", "b", "dice", [], [])
    assert nothing.ci95 is None and nothing.mean_difference is None and nothing.p_value is None
    assert _cautions(EvalReport(out="", data="", baseline="a", comparisons=[nothing, c])) == [
        "b vs a: no image has a dice value for both, so there is no dice comparison",
        f"b vs a: the difference's interval covers 0 for dice [{c.ci95[0]:+.3f}, {c.ci95[1]:+.3f}]: no difference "
        "shown on these images"]
    # HD95 is a distance: lower is better, so a negative difference is a win and "shown better" lies below 0
    h = compare("a", "b", "hd95", [5.0, 5.0, 5.0, 4.0], [1.0, 2.0, 9.0, 4.0])
    assert (h.wins, h.ties, h.losses, h.higher_is_better) == (2, 1, 1, False)
    assert compare("a", "b", "hd95", [9.0] * 4, [1.0, 2.0, 3.0, 1.0]).shown_better
    assert not compare("a", "b", "dice", [0.9] * 4, [0.1, 0.2, 0.3, 0.1]).shown_better
    # an undefined value (None) pairs with nothing: n counts only the images both sides have
    from sa2va_convert.evaluate.compare import compare_models

    values = {"a": {"x": {"hd95": 3.0}, "y": {"hd95": None}, "z": {"hd95": 2.0}},
              "b": {"x": {"hd95": 1.0}, "y": {"hd95": 7.0}, "z": {"hd95": None}}}
    (only,) = compare_models("a", values, ["hd95"])
    assert (only.n, only.mean_difference, only.wins) == (1, -2.0, 1)
    # chunked draws are the one-shot draw: the interval is reproducible from (seed, resamples) alone
    d = np.linspace(-1, 1, 257) ** 3
    rng = np.random.default_rng(7)
    means = d[rng.integers(0, d.size, size=(3000, d.size))].mean(axis=1)
    assert bootstrap_ci(d, resamples=3000, seed=7) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])),
                                                                     abs=1e-15)


def test_metrics_that_disagree_are_named():
    from sa2va_convert.evaluate.metrics import ModelSummary, leaders

    def summary(name, dice, giou, ciou):
        return ModelSummary(name, "", None, 3, 0, 0, dice, giou, ciou, None, None, 0.0, 1.0, None)

    ms = [summary("base", 0.182, 0.15, 0.30), summary("tuned", 0.219, 0.14, 0.20)]
    assert leaders(ms) == {"mean_dice": "tuned", "giou": "base", "ciou": "base"}


# ------------------------------------------------------------------ empty ground truth, the gate


@pytest.fixture(scope="module")
def mixed_run(world) -> SimpleNamespace:
    """A base (the twin without the LoRA, which never segments) and the fine-tune on 7 images: the
    5 above, one more with an object, and one whose ground truth is empty (nothing to find)."""
    data = world.root / "mixed"
    shutil.copytree(world.data, data)
    img = synthetic_picture(68, 52, 5)
    img.save(data / "images" / "g_more.png")
    Image.fromarray(reference_mask(world.ex, img).astype(np.uint8) * 255, "L").save(data / "masks" / "g_more.png")
    img = synthetic_picture(64, 64, -2)
    img.save(data / "images" / "f_empty.png")
    Image.fromarray(np.zeros((64, 64), np.uint8), "L").save(data / "masks" / "f_empty.png")
    out = world.root / "mixed_report"
    r = run_eval(world.folders["no_lora"], world.folders["finetune"], "--data", data, "--prompt", PROMPT,
                 "--out", out, "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return SimpleNamespace(data=data, out=out, report=json.loads(r.stdout))


def rerun(mixed_run, tmp_path, *args):
    """The mixed run again on a copy of its report with --resume: nothing is predicted, only scored."""
    out = tmp_path / "rep"
    shutil.copytree(mixed_run.out, out)
    r = CliRunner().invoke(cli_main, ["eval", str(mixed_run.out.parent / "models" / "no_lora"),
                                      str(mixed_run.out.parent / "models" / "finetune"), "--data",
                                      str(mixed_run.data), "--prompt", PROMPT, "--out", str(out), "--device", "cpu",
                                      "--resume", *map(str, args)], env=ENV)
    return r, out


def test_empty_ground_truth_is_scored_by_default_and_said(mixed_run):
    report, out = mixed_run.report, mixed_run.out
    rows = read_rows(out / "metrics.csv")
    assert report["empty_gt"]["rule"] == "score" and report["baseline"] == "no_lora"
    with Image.open(out / "predictions" / "finetune" / "f_empty.png") as im:
        tuned_empty_pred = not np.asarray(im).any()
    assert not tuned_empty_pred  # the fine-tune segments something that is not there
    models = {m["model"]: m for m in report["models"]}
    for m in models.values():
        assert (m["n_images"], m["n_empty_gt"], m["n_in_means"]) == (7, 1, 7)
        mine = [counts_scores(r)["dice"] for r in rows if r["model"] == m["model"]]
        with_object = [counts_scores(r)["dice"] for r in rows if r["model"] == m["model"] and r["true_area"] != "0"]
        assert m["mean_dice"] == pytest.approx(np.mean(mine), abs=1e-12)
        assert m["mean_dice_with_object"] == pytest.approx(np.mean(with_object), abs=1e-12)
    # the base says nothing anywhere: a perfect 1 on the empty image, 0 elsewhere
    assert models["no_lora"]["n_empty_gt_empty_pred"] == 1 and models["no_lora"]["mean_dice"] == pytest.approx(1 / 7)
    assert models["no_lora"]["mean_dice_with_object"] == 0 and models["finetune"]["n_empty_gt_empty_pred"] == 0
    check_comparisons(report, rows)
    dice = next(c for c in report["comparisons"] if c["metric"] == "dice")
    assert (dice["wins"], dice["losses"], dice["n"]) == (6, 1, 7) and dice["p_value"] is not None
    note = next(n for n in report["notes"] if n.startswith("empty ground truth"))
    assert "1 of 7" in note and "--empty-gt score" in note and "no_lora 1" in note


def test_empty_gt_skip_leaves_those_images_out(mixed_run, tmp_path):
    r, out = rerun(mixed_run, tmp_path, "--empty-gt", "skip", "--json")
    assert r.exit_code == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    rows = read_rows(out / "metrics.csv")
    assert report["empty_gt"]["rule"] == "skip" and report["evaluated"] == 0  # re-scored, not re-predicted
    for m in report["models"]:
        assert (m["n_images"], m["n_empty_gt"], m["n_in_means"]) == (7, 1, 6)
        assert m["mean_dice"] == pytest.approx(m["mean_dice_with_object"], abs=1e-12)
        mine = [counts_scores(r) for r in rows if r["model"] == m["model"] and r["true_area"] != "0"]
        assert m["giou"] == pytest.approx(np.mean([x["iou"] for x in mine]), abs=1e-12)
    assert next(m for m in report["models"] if m["model"] == "no_lora")["mean_dice"] == 0
    check_comparisons(report, rows, skip_empty=True)
    assert all(c["n"] == 6 and c["wins"] == 6 for c in report["comparisons"] if c["metric"] in ("dice", "iou"))
    assert any("left out of every mean" in n for n in report["notes"])


@pytest.mark.parametrize("args, code, says", [
    (["--fail-under", "dice=0.5", "--fail-under", "iou=0.4", "--require-better"], 0, None),
    (["--fail-under", "dice=0.99"], 11, "--fail-under mean_dice=0.99: finetune has mean_dice 0."),
    (["--fail-under", "ciou=0.999"], 11, "--fail-under ciou=0.999: finetune has ciou 0."),
    (["--require-better", "--baseline", "finetune"], 11,
     "--require-better: no_lora's Dice against finetune is -0."),
    (["--fail-under", "cldice=0.999"], 11, "--fail-under mean_cldice=0.999: finetune has mean_cldice 0."),
    # the fine-tune paints the empty-truth image: no HD95 there, and a mean without it is not accepted
    (["--fail-above", "hd95=1000"], 11, "over only 6 of 7 images (HD95 is undefined where one mask is empty)"),
    (["--fail-above", "hd95=0.001", "--empty-gt", "skip"], 11, "--fail-above mean_hd95=0.001: finetune has "),
    (["--fail-above", "hd95=1000", "--fail-under", "boundary_f=0.5", "--empty-gt", "skip"], 0, None),
])
def test_the_ci_gate(mixed_run, tmp_path, args, code, says):
    """Judged after the report is written; its own exit code and one line naming the condition."""
    r, out = rerun(mixed_run, tmp_path, *args)
    assert r.exit_code == code, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())  # written whatever the verdict
    assert summary["gate"]["passed"] is (code == 0)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    if code:
        assert len(errors) == 1 and says in errors[0] and errors[0].startswith(f"error: {out}: gate failed: ")
        assert says in r.stdout  # the table's output lists it too
    else:
        assert not errors and "gate: passed" in r.stdout


@pytest.mark.parametrize("args, says", [
    (["--fail-under", "dcie=0.8"], "unknown metric 'dcie'"),
    (["--fail-under", "dice"], "is not METRIC=NUMBER"),
    (["--fail-under", "hd95=3"], "(--fail-above takes it: lower HD95 is better)"),
    (["--fail-above", "dice=0.5"], "--fail-above names a metric it does not take 'dice'"),
    (["--baseline", "nope"], "--baseline 'nope' is none of the models"),
])
def test_gate_and_baseline_typos_are_exit_2_before_any_model_loads(mixed_run, tmp_path, args, says):
    r, out = rerun(mixed_run, tmp_path, *args)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and says in errors[0], r.stderr
    assert (out / "summary.json").read_text() == (mixed_run.out / "summary.json").read_text()  # nothing touched


# ------------------------------------------------------------------ --force-seg


def png_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im)
    assert set(np.unique(arr).tolist()) <= {0, 255}
    return arr == 255


def test_force_seg_added_on_resume_scores_forced_masks_apart(mixed_run, tmp_path):
    """--force-seg on a copy of the mixed run's report with --resume: the free rows are kept (their
    PNGs untouched), only the forced masks are made. The base, which never says [SEG], is run again
    with [SEG] forced on every image; the fine-tune's answers have [SEG], so its forced masks are its
    free ones, copied without starting its model. Forced rows are their own pseudo-models, compared only with each other; a resume
    without the flag reports none of them."""
    free_pngs = {p.relative_to(mixed_run.out): p.read_bytes() for p in (mixed_run.out / "predictions").rglob("*.png")}
    r, out = rerun(mixed_run, tmp_path, "--force-seg", "--json")
    assert r.exit_code == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    # 14 free rows kept; the model made only the base's 7 forced rows (the fine-tune's were copied)
    assert report["force_seg"] and report["evaluated"] == 7 and report["resumed"] == 14
    assert {p: (out / p).read_bytes() for p in free_pngs} == free_pngs  # the scored free masks stay as they were
    models = {m["model"]: m for m in report["models"]}
    assert list(models) == ["no_lora", "finetune", "no_lora[forced]", "finetune[forced]"]
    assert (models["no_lora[forced]"]["forced_of"], models["no_lora[forced]"]["n_forced"]) == ("no_lora", 7)
    assert (models["finetune[forced]"]["forced_of"], models["finetune[forced]"]["n_forced"]) == ("finetune", 0)
    assert report["best"] == "finetune"  # never a forced pseudo-model
    rows = read_rows(out / "metrics.csv")
    truth = {s: mask for s, mask in mixed_truth(mixed_run).items()}
    for name in ("no_lora[forced]", "finetune[forced]"):
        mine = [x for x in rows if x["model"] == name]
        assert [x["stem"] for x in mine] == sorted(truth)
        base = name.removesuffix("[forced]")
        dice = []
        for x in mine:
            path = Path(x["prediction_file"])
            assert path == out / "predictions" / base / "forced" / f"{x['stem']}.png"
            pred, gt = png_mask(path), truth[x["stem"]]
            free = png_mask(out / "predictions" / base / f"{x['stem']}.png")
            if base == "finetune":  # its answer had [SEG]: the same mask, not predicted twice
                assert x["forced"] == "reused" and (pred == free).all()
            else:  # no [SEG] in the free answer: run again with [SEG] forced, and it now paints a mask
                assert x["forced"] == "forced" and not free.any() and pred.any() and int(x["seg_count"]) >= 1
            i, t = int((pred & gt).sum()), int(pred.sum() + gt.sum())
            assert (int(x["intersection"]), int(x["pred_area"])) == (i, int(pred.sum()))
            dice.append(2 * i / t if t else 1.0)
        assert models[name]["mean_dice"] == pytest.approx(np.mean(dice), abs=1e-12)
    # forced masks are compared with the baseline's forced masks, free answers with free ones
    assert {(c["baseline"], c["model"]) for c in report["comparisons"]} == {
        ("no_lora", "finetune"), ("no_lora[forced]", "finetune[forced]")}
    check_comparisons(report, rows)
    paired = read_rows(out / "paired.csv")
    assert {(x["baseline"], x["model"]) for x in paired} == {
        ("no_lora", "finetune"), ("no_lora[forced]", "finetune[forced]")}
    assert any("no_lora 7, finetune 0" in n for n in report["notes"])
    # resumed again without --force-seg: nothing predicted, and the forced rows are not reported
    again = CliRunner().invoke(cli_main, ["eval", str(mixed_run.out.parent / "models" / "no_lora"),
                                          str(mixed_run.out.parent / "models" / "finetune"), "--data",
                                          str(mixed_run.data), "--prompt", PROMPT, "--out", str(out), "--device",
                                          "cpu", "--resume", "--json"], env=ENV)
    assert again.exit_code == 0, again.stderr[-3000:]
    plain = json.loads(again.stdout)
    assert [m["model"] for m in plain["models"]] == ["no_lora", "finetune"] and plain["evaluated"] == 0
    assert not plain["force_seg"] and {x["model"] for x in read_rows(out / "metrics.csv")} == {"no_lora", "finetune"}


def mixed_truth(mixed_run) -> dict[str, np.ndarray]:
    """The mixed set's ground truth, read back from its files (npy or PNG, any non-zero pixel)."""
    out = {}
    for f in sorted((mixed_run.data / "masks").iterdir()):
        arr = np.load(f) if f.suffix == ".npy" else np.asarray(Image.open(f))
        out[f.stem] = arr != 0
    return out


# ------------------------------------------------------------------ scale: torchrun, resume


def test_torchrun_two_ranks_on_cpu_equals_one_process(world, main_run, tmp_path):
    """A folder of iter_N folders (as convert --all writes), evaluated by 2 ranks (gloo): the same
    rows and metrics as the one-process run, the models in iteration order, best named."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "iter_1000").symlink_to(world.folders["finetune"])
    (runs / "iter_200").symlink_to(world.folders["no_lora"])
    (runs / "notes").mkdir()  # not a model: ignored inside a run folder
    out = tmp_path / "rep"
    r = run_eval(runs, "--data", world.data, "--prompt", PROMPT, "--out", out, "--device", "cpu", "--json",
                 torchrun=2, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(r.stdout)  # rank 0 alone prints
    assert report == json.loads((out / "summary.json").read_text())
    assert report["world_size"] == 2 and report["evaluated"] == 2 * len(PICTURES)
    assert [(m["model"], m["iteration"]) for m in report["models"]] == [("iter_200", 200), ("iter_1000", 1000)]
    assert report["best"] == "iter_1000"
    same = {"iter_200": "no_lora", "iter_1000": "finetune"}
    keep = ("stem", "status", "intersection", "union", "pred_area", "true_area", "dice", "iou")
    one = [(row["model"], *(row[k] for k in keep)) for row in read_rows(main_run.out / "metrics.csv")]
    two = [(same[row["model"]], *(row[k] for k in keep)) for row in read_rows(out / "metrics.csv")]
    assert sorted(two) == sorted(r for r in one if r[0] in same.values())
    single = {m["model"]: m for m in main_run.report["models"]}
    for m in report["models"]:
        for key in ("images", "mean_dice", "giou", "ciou", "no_seg_rate", "failures"):
            assert m[key] == single[same[m["model"]]][key], key
    with Image.open(out / "report.png") as im:  # the paired lines of iter_1000 against iter_200
        assert im.format == "PNG"
    check_dice_over_iterations(report, out)


def test_an_interrupted_run_resumes_from_the_streamed_results(world, main_run, tmp_path):
    """SIGTERM while the model process is mid-set: exit 130, no summary.json; --resume keeps the
    images it finished (streamed line by line) and does only the rest."""
    out = tmp_path / "rep"
    args = [sys.executable, "-m", "sa2va_convert.cli", "eval", str(world.folders["finetune"]), "--data",
            str(world.data), "--prompt", PROMPT, "--out", str(out), "--device", "cpu", "--max-new-tokens", "16"]
    streamed = out / ".work" / "finetune.rank0.results.jsonl"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if streamed.is_file() and streamed.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]  # the hint names the flag that continues
    assert len(errors) == 1 and errors[0].startswith(f"error: {out}: interrupted") and "with --resume" in errors[0]
    assert not (out / "summary.json").exists() and not (out / "report.png").exists()
    finished = streamed.read_text().count("\n")
    assert finished >= 1
    if finished == len(PICTURES):  # a timing race on a loaded machine, not a failure: nothing left to resume
        pytest.skip("the model process finished every image before the signal landed")
    r = run_eval(world.folders["finetune"], "--data", world.data, "--prompt", PROMPT, "--out", out, "--device", "cpu",
                 "--json", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["resumed"] == finished and report["evaluated"] == len(PICTURES) - finished
    ft = next(m for m in main_run.report["models"] if m["model"] == "finetune")
    for key in ("images", "mean_dice", "giou", "ciou", "no_seg_rate", "mean_cldice", "mean_boundary_f", "mean_hd95",
                "n_hd95"):
        assert report["models"][0][key] == ft[key], key


# ------------------------------------------------------------------ failures and bad inputs


def test_a_failed_image_exits_10_and_resume_retries_only_it(world, main_run, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    stems = ("a_wide", "b_tall", "c_cut")
    for stem in stems:
        (data / "images" / f"{stem}.png").write_bytes((world.data / "images" / f"{stem}.png").read_bytes())
        (data / "masks" / f"{stem}.png").write_bytes((world.data / "masks" / f"{stem}.png").read_bytes())
    whole = (data / "images" / "b_tall.png").read_bytes()
    (data / "images" / "b_tall.png").write_bytes(whole[: len(whole) // 2])  # header intact, pixels cut
    out = tmp_path / "rep"
    args = (world.folders["finetune"], "--data", data, "--prompt", PROMPT, "--out", out, "--device", "cpu", "--json")
    r = run_eval(*args)
    assert r.returncode == 10, r.stderr[-3000:]
    report = json.loads(r.stdout)  # one JSON document, the failures in it
    assert not report["ok"] and [f["stem"] for f in report["failures"]] == ["b_tall"]
    assert report["models"][0]["images"] == 2 and report["models"][0]["failures"] == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {data / 'images' / 'b_tall.png'}: 1 image(s) failed")
    rows = {row["stem"]: row for row in read_rows(out / "metrics.csv")}
    assert rows["b_tall"]["status"] == "failed" and "b_tall" not in str(rows["b_tall"]["prediction_file"])
    assert rows["b_tall"]["error"] and rows["b_tall"]["dice"] == ""
    assert not (out / "predictions" / "finetune" / "b_tall.png").exists()
    kept = {p: p.stat().st_mtime_ns for p in (out / "predictions" / "finetune").iterdir()}

    again = run_eval(*args)
    assert again.returncode == 6 and "--resume" in again.stderr  # never mixed into a report silently
    (data / "images" / "b_tall.png").write_bytes(whole)  # the user fixes the image and resumes
    second = run_eval(*args, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads(second.stdout)
    assert report["ok"] and report["resumed"] == 2 and report["evaluated"] == 1 and not report["failures"]
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished images not predicted again
    mine = recompute(world, out, "finetune", list(stems))
    assert report["models"][0]["mean_dice"] == pytest.approx(mine["mean_dice"], abs=1e-9)
    assert report["models"][0]["ciou"] == pytest.approx(mine["ciou"], abs=1e-9)
    full = {(row["stem"], row["dice"]) for row in read_rows(main_run.out / "metrics.csv") if row["model"] == "finetune"}
    assert {(row["stem"], row["dice"]) for row in read_rows(out / "metrics.csv")} <= full


def make_data(root: Path, pairs: dict[str, tuple[tuple[int, int] | None, tuple[int, int] | None]]) -> Path:
    """images/ and masks/ with the given (image size, mask size) per stem (None: left out)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem, (isize, msize) in pairs.items():
        if isize:
            synthetic_picture(*isize).save(root / "images" / f"{stem}.png")
        if msize:
            Image.fromarray(np.zeros(msize[::-1], np.uint8), "L").save(root / "masks" / f"{stem}.png")
    return root


def _unreadable_image(d: Path) -> Path:
    make_data(d, {"a": ((40, 30), (40, 30))})
    (d / "images" / "a.png").write_text("not a picture")
    return d


def _manifest_with_empty_prompt(d: Path) -> Path:
    make_data(d, {"a": ((40, 30), (40, 30))})
    (d / "set.jsonl").write_text('{"image": "images/a.png", "mask": "masks/a.png", "prompt": ""}\n')
    return d / "set.jsonl"


ONE = {"a": ((40, 30), (40, 30))}
BAD = {  # case: (build the data, prompt arguments, what the error line says)
    "no images": (lambda d: make_data(d, {}), ["--prompt", PROMPT], "images: no images in images/"),
    "image without mask": (lambda d: make_data(d, {**ONE, "b": ((40, 30), None)}), ["--prompt", PROMPT],
                           "images/b.png: image has no mask"),
    "mask without image": (lambda d: make_data(d, {**ONE, "c": (None, (40, 30))}), ["--prompt", PROMPT],
                           "masks/c.png: mask has no image"),
    "mask of another size": (lambda d: make_data(d, {"a": ((40, 30), (30, 40))}), ["--prompt", PROMPT],
                             "masks/a.png: mask is 30x40 but its image a.png is 40x30"),
    "unreadable image": (_unreadable_image, ["--prompt", PROMPT], "images/a.png: cannot read the image"),
    "empty prompt": (lambda d: make_data(d, ONE), ["--prompt", " "], "the prompt is empty"),
    "no prompt": (lambda d: make_data(d, ONE), [], "no prompt"),
    "empty prompt in a manifest row": (_manifest_with_empty_prompt, ["--prompt", PROMPT],
                                       "set.jsonl:1: the prompt is empty"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_is_one_line_exit_3_and_nothing_written(world, tmp_path, case):
    """In this process (the command's own code, no model is loaded before the data is checked)."""
    build, prompt_args, expected = BAD[case]
    data = build(tmp_path / "data")
    out = tmp_path / "rep"
    r = CliRunner().invoke(cli_main, ["eval", str(world.folders["finetune"]), "--data", str(data), *prompt_args,
                                      "--out", str(out), "--device", "cpu"], env=ENV)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 3, r.stderr[-2000:]
    assert len(errors) == 1 and expected in errors[0] and "(fix: " in errors[0], errors
    assert not out.exists()


def test_a_folder_that_is_not_a_model(world, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "rep"
    r = run_eval(world.folders["finetune"], tmp_path / "empty", "--data", world.data, "--prompt", PROMPT,
                 "--out", out)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 3 and len(errors) == 1, r.stderr
    assert errors[0].startswith(f"error: {tmp_path / 'empty'}: not a model folder") and "(fix: " in errors[0]
    assert not out.exists()


def test_a_model_that_cannot_load_is_exit_7_and_no_report(world, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(world.folders["finetune"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "modeling_missing.Missing"
    (broken / "config.json").write_text(json.dumps(config))
    out = tmp_path / "rep"
    r = run_eval(broken, "--data", world.data, "--prompt", PROMPT, "--out", out, "--device", "cpu")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 7 and len(errors) == 1, r.stderr[-2000:]
    assert errors[0].startswith(f"error: {broken}: evaluation failed while building the config")
    assert "modeling_missing.py" in errors[0] and "--no-roundtrip" not in errors[0]
    assert not (out / "summary.json").exists() and not (out / "report.png").exists()


# ------------------------------------------------------------------ data loading and metrics (no model)


def test_manifests_jsonl_and_csv_with_per_row_prompts(world, tmp_path):
    rel = os.path.relpath(world.data, tmp_path)
    (tmp_path / "set.jsonl").write_text(
        json.dumps({"image": f"{rel}/images/a_wide.png", "mask": f"{rel}/masks/a_wide.png", "prompt": "red car"})
        + "\n\n" + json.dumps({"image": f"{rel}/images/d_npy.png", "mask": f"{rel}/masks/d_npy.npy"}) + "\n")
    samples = load_dataset(tmp_path / "set.jsonl", "vessel")
    assert [(s.stem, s.prompt) for s in samples] == [("a_wide", "<image>\n Please segment red car in this image."),
                                                      ("d_npy", "<image>\n Please segment vessel in this image.")]
    assert samples[1].mask == (world.data / "masks" / "d_npy.npy").resolve()
    (tmp_path / "set.csv").write_text(f"image,mask,prompt\n{rel}/images/b_tall.png,{rel}/masks/b_tall.png,\n")
    assert load_dataset(tmp_path / "set.csv", "cat")[0].prompt == "<image>\n Please segment cat in this image."
    (tmp_path / "bad.csv").write_text(f"image,mask\n{rel}/images/nope.png,{rel}/masks/b_tall.png\n")
    with pytest.raises(Exception, match=r"bad.csv:2: image not found"):
        load_dataset(tmp_path / "bad.csv", "cat")
    folder = load_dataset(world.data, "x", limit=2)
    assert [s.stem for s in folder] == ["a_wide", "b_tall"]


def test_score_conventions():
    pred = np.array([[1, 1, 0, 0]], bool)
    truth = np.array([[0, 1, 1, 0]], bool)
    s = scores(1, 3, 2, 2)
    assert s == {"dice": 0.5, "iou": 1 / 3, "precision": 0.5, "recall": 0.5}
    assert int((pred & truth).sum()) == 1 and int((pred | truth).sum()) == 3
    assert scores(0, 0, 0, 0) == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}  # nothing to find
    assert scores(0, 5, 0, 5) == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}  # missed it all
    assert scores(0, 5, 5, 0)["dice"] == 0.0  # found something that is not there


def test_model_names_default_unique_or_given(tmp_path):
    from sa2va_convert.errors import UsageError
    from sa2va_convert.evaluate.run import resolve_models

    for folder in ("a/hf", "b/hf", "run/iter_5", "run/iter_10"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "config.json").write_text("{}")
    a, b, run = tmp_path / "a" / "hf", tmp_path / "b" / "hf", tmp_path / "run"
    assert [s.name for s in resolve_models([a, b])] == ["hf", "hf-2"]
    specs = resolve_models([a, b, run], ["base", "tuned", "lr"])
    assert [(s.name, s.iteration) for s in specs] == [("base", None), ("tuned", None), ("lr-iter_5", 5),
                                                      ("lr-iter_10", 10)]
    for names, says in ((["x"], "1 --name for 2 MODEL(s)"), (["x", "x"], "two models the name 'x'"),
                        (["x", "a/b"], "cannot name a model"), (["x", ".."], "cannot name a model"),
                        (["x", "y[forced]"], "names the --force-seg rows")):
        with pytest.raises(UsageError, match=re.escape(says)):
            resolve_models([a, b], names)


# ------------------------------------------------------------------ shape: clDice, boundary F, HD95
#
# Written out here a second way: outlines by neighbour checks on a padded copy (not an erosion),
# nearest distances by brute force over every pair of outline pixels (not a distance transform),
# and clDice from skimage's skeletonize on the whole frame (metrics.py works on a crop) with numpy
# set arithmetic.


def _outline(m: np.ndarray) -> np.ndarray:
    """Pixels of ``m`` with at least one of their 8 neighbours outside it (or outside the frame)."""
    p = np.pad(m, 1, constant_values=False)
    h, w = m.shape
    inside_all = np.ones_like(m)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            inside_all &= p[1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w]
    return m & ~inside_all


def _nearest(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For every True pixel of ``a``, the Euclidean distance to the nearest True pixel of ``b``."""
    pa, pb = np.argwhere(a).astype(float), np.argwhere(b).astype(float)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)


def independent_shape(pred: np.ndarray, truth: np.ndarray, tol: float = 2.0) -> dict:
    from skimage.morphology import skeletonize

    if not pred.any() and not truth.any():
        return {"cldice": 1.0, "boundary_f": 1.0, "hd95": 0.0}
    if not pred.any() or not truth.any():
        return {"cldice": 0.0, "boundary_f": 0.0, "hd95": None}
    sp, st = set(map(tuple, np.argwhere(skeletonize(pred)))), set(map(tuple, np.argwhere(skeletonize(truth))))
    in_t, in_p = set(map(tuple, np.argwhere(truth))), set(map(tuple, np.argwhere(pred)))
    tprec, tsens = len(sp & in_t) / len(sp), len(st & in_p) / len(st)
    cl = 2 * tprec * tsens / (tprec + tsens) if tprec + tsens else 0.0
    op, ot = _outline(pred), _outline(truth)
    d_pt, d_tp = _nearest(op, ot), _nearest(ot, op)
    bp, br = (d_pt <= tol).mean(), (d_tp <= tol).mean()
    return {"cldice": cl, "boundary_f": 2 * bp * br / (bp + br) if bp + br else 0.0,
            "hd95": float(np.percentile(np.concatenate([d_pt, d_tp]), 95))}


def assert_same_shape(got: dict, want: dict) -> None:
    for k in ("cldice", "boundary_f", "hd95"):
        if want[k] is None:
            assert got[k] is None, (k, got, want)
        else:
            assert got[k] == pytest.approx(want[k], abs=1.5e-6), (k, got, want)


def _rect(h, w, r0, r1, c0, c1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[r0:r1, c0:c1] = True
    return m


def _broken_line() -> tuple[np.ndarray, np.ndarray]:
    """A bar with a long 1-px line leaving it (truth), and the same with the line cut in the middle."""
    truth = _rect(40, 120, 10, 30, 5, 25)
    truth[20, 25:115] = True
    pred = truth.copy()
    pred[20, 60:80] = False
    return pred, truth


def _shape_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from scipy.ndimage import binary_erosion

    box = _rect(48, 64, 10, 35, 12, 50)
    disk = np.hypot(*np.mgrid[-20:21, -20:21]) <= 15
    return {
        "identical": (box, box.copy()),
        "shifted_1": (np.roll(box, 1, axis=1), box),
        "shifted_3": (np.roll(box, 3, axis=0), box),
        "shifted_7": (np.roll(disk, 7, axis=1), disk),
        "eroded": (binary_erosion(disk, iterations=2), disk),
        "empty_vs_empty": (np.zeros((9, 7), bool), np.zeros((9, 7), bool)),
        "empty_pred": (np.zeros_like(box), box),
        "empty_truth": (box, np.zeros_like(box)),
        "one_pixel": (_rect(5, 5, 2, 3, 2, 3), _rect(5, 5, 2, 3, 2, 3)),
        "one_pixel_apart": (_rect(9, 9, 1, 2, 1, 2), _rect(9, 9, 7, 8, 6, 7)),
        "touches_the_frame": (_rect(20, 20, 0, 12, 0, 20), _rect(20, 20, 0, 10, 0, 20)),
        "broken_line": _broken_line(),
    }


@pytest.mark.parametrize("case", list(_shape_cases()))
def test_shape_scores_equal_an_independent_implementation(case):
    from sa2va_convert.evaluate.metrics import shape_scores

    pred, truth = _shape_cases()[case]
    got, want = shape_scores(pred, truth), independent_shape(pred, truth)
    assert_same_shape(got, want)
    expected = {  # what each case must give, whatever either implementation says
        "identical": {"cldice": 1.0, "boundary_f": 1.0, "hd95": 0.0},
        "empty_vs_empty": {"cldice": 1.0, "boundary_f": 1.0, "hd95": 0.0},
        "empty_pred": {"cldice": 0.0, "boundary_f": 0.0, "hd95": None},
        "empty_truth": {"cldice": 0.0, "boundary_f": 0.0, "hd95": None},
        "one_pixel": {"cldice": 1.0, "boundary_f": 1.0, "hd95": 0.0},
        "one_pixel_apart": {"cldice": 0.0, "boundary_f": 0.0, "hd95": pytest.approx(np.hypot(6, 5))},
    }.get(case)
    if expected:
        assert got == expected
    if case == "shifted_1":
        assert got["boundary_f"] == 1.0 and got["hd95"] == 1.0  # within the 2 px tolerance
    if case == "shifted_3":
        assert got["boundary_f"] < 1.0 and got["hd95"] == 3.0
    if case == "broken_line":  # pixels barely notice the cut; the centerline does
        s = scores(**counts(pred, truth))
        assert s["dice"] > 0.97 and got["cldice"] < s["dice"] - 0.05


def test_shape_scores_on_random_masks_equal_an_independent_implementation():
    from scipy.ndimage import gaussian_filter

    from sa2va_convert.evaluate.metrics import shape_scores

    rng = np.random.default_rng(3)
    for i in range(24):
        h, w = int(rng.integers(8, 70)), int(rng.integers(8, 70))
        blobs = [gaussian_filter(rng.random((h, w)), sigma=float(rng.uniform(0.5, 4))) for _ in range(2)]
        pred, truth = (b > np.quantile(b, rng.uniform(0.3, 0.95)) for b in blobs)
        if i % 6 == 0:
            truth = pred.copy()
            truth[rng.integers(0, h), :] ^= True  # a one-row disagreement, lines included
        assert_same_shape(shape_scores(pred, truth), independent_shape(pred, truth))
        tol = float(rng.choice([0.0, 1.0, 1.5, 3.0]))
        assert_same_shape(shape_scores(pred, truth, tol), independent_shape(pred, truth, tol))


def check_shape_columns(rows: list[dict], out: Path, truth: dict, summaries: list[dict]) -> None:
    """metrics.csv's clDice/boundary F/HD95 equal the independent values from the saved PNGs, and
    summary.json's means (with their counts) are the means of those."""
    for m in summaries:
        mine = {}
        for row in (r for r in rows if r["model"] == m["model"]):
            with Image.open(out / "predictions" / m["model"] / f"{row['stem']}.png") as im:
                pred = np.asarray(im) == 255
            mine[row["stem"]] = want = independent_shape(pred, truth[row["stem"]])
            for k in ("cldice", "boundary_f", "hd95"):
                assert (row[k] == "") == (want[k] is None), (m["model"], row["stem"], k)
                if want[k] is not None:
                    assert float(row[k]) == pytest.approx(want[k], abs=1.5e-6)
        for k in ("cldice", "boundary_f", "hd95"):
            defined = [v[k] for v in mine.values() if v[k] is not None]
            assert m[f"n_{k}"] == len(defined)
            if defined:
                assert m[f"mean_{k}"] == pytest.approx(np.mean(defined), abs=2e-6)
            else:
                assert m[f"mean_{k}"] is None


def test_shape_columns_recomputed_from_the_saved_masks(world, main_run):
    rows = read_rows(main_run.out / "metrics.csv")
    check_shape_columns(rows, main_run.out, world.truth, main_run.report["models"])
    models = {m["model"]: m for m in main_run.report["models"]}
    assert models["finetune"]["mean_cldice"] > 0.8 and models["finetune"]["n_hd95"] == len(PICTURES)
    for twin in ("no_lora", "no_head"):  # nothing predicted: 0, 0, and no HD95 at all (not a made-up distance)
        assert (models[twin]["mean_cldice"], models[twin]["mean_boundary_f"]) == (0.0, 0.0)
        assert (models[twin]["mean_hd95"], models[twin]["n_hd95"]) == (None, 0)
    for k in ("cldice", "boundary_f", "hd95"):
        assert k in main_run.report["definitions"]
    lines = main_run.stdout.splitlines()  # the table: the three means, HD95 with its count when not all images
    assert lines[1].split()[-5:] == ["clDice", "boundary", "F", "HD95", "px"]
    ft = models["finetune"]
    assert lines[2].split()[-3:] == [f"{ft['mean_cldice']:.3f}", f"{ft['mean_boundary_f']:.3f}", f"{ft['mean_hd95']:.2f}"]
    assert lines[3].split()[-4:] == ["0.000", "0.000", "-", f"(0/{len(PICTURES)})"]


def test_shape_columns_with_an_empty_truth_and_kept_by_resume(world, mixed_run, tmp_path):
    truth = dict(world.truth)
    for stem in ("g_more", "f_empty"):
        with Image.open(mixed_run.data / "masks" / f"{stem}.png") as im:
            truth[stem] = np.asarray(im) > 0
    rows = read_rows(mixed_run.out / "metrics.csv")
    check_shape_columns(rows, mixed_run.out, truth, mixed_run.report["models"])
    row = {(r["model"], r["stem"]): r for r in rows}
    assert (row["no_lora", "f_empty"]["cldice"], row["no_lora", "f_empty"]["hd95"]) == ("1.000000", "0.000000")
    assert row["finetune", "f_empty"]["hd95"] == "" and row["finetune", "f_empty"]["boundary_f"] == "0.000000"
    # --resume re-scores nothing from the masks: the rows keep their values, the means are the same
    r, out = rerun(mixed_run, tmp_path, "--json")
    assert r.exit_code == 0, r.stderr[-3000:]
    again = json.loads(r.stdout)
    assert again["evaluated"] == 0
    assert read_rows(out / "metrics.csv") == rows
    keys = ("mean_cldice", "n_cldice", "mean_boundary_f", "n_boundary_f", "mean_hd95", "n_hd95")
    assert [{k: m[k] for k in keys} for m in again["models"]] == [{k: m[k] for k in keys}
                                                                 for m in mixed_run.report["models"]]
    # and scoring the saved PNGs afresh gives the same numbers
    from sa2va_convert.evaluate.metrics import measure

    for (model, stem), r0 in row.items():
        fresh = measure(Path(r0["prediction_file"]), Path(r0["mask"]))
        for k in ("cldice", "boundary_f", "hd95"):
            assert ("" if fresh[k] is None else f"{fresh[k]:.6f}") == r0[k]


def test_the_scorer_scores_streamed_lines_while_the_child_runs(tmp_path):
    """Scoring overlaps the model: complete lines are scored as they arrive, in a thread; lines of an
    earlier run are not scored again; a line cut short (a crash) is never scored."""
    from sa2va_convert.evaluate.run import _Scorer

    results = tmp_path / "r.jsonl"
    results.write_text('{"stem": "earlier"}\n')
    seen: list[str] = []

    def complete(r):
        seen.append(r["stem"])
        return [] if r["stem"] == "not_ours" else [{**r, "scored": True}]

    scorer = _Scorer(results, complete)
    scorer.start()
    with open(results, "a") as f:
        f.write('{"stem": "a"}\n{"stem": "not_ours"}\n{"stem": "b"')
        f.flush()
        deadline = time.monotonic() + 10
        while "not_ours" not in seen and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen == ["a", "not_ours"]  # scored before the child has finished
        f.write('}\n{"stem": "cut')
    rows = scorer.finish()
    assert [r["stem"] for r in rows] == ["a", "b"] and all(r["scored"] for r in rows)
    assert seen == ["a", "not_ours", "b"]


def test_a_missing_scikit_image_is_one_line_before_any_model_loads(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    r = CliRunner().invoke(cli_main, ["eval", str(tmp_path / "no_model"), "--data", str(tmp_path), "--out",
                                      str(tmp_path / "rep")], env=ENV)
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "scikit-image, which is not installed" in errors[0], r.stderr
    assert "sa2va-convert[eval]" in r.stderr and not (tmp_path / "rep").exists()


# ------------------------------------------------------------------ report.html, report.png, checkpoints over training

CHROMIUM = Path("/usr/bin/chromium")
# needed on a closed network: no sandbox (root in CI), no GPU, no background or QUIC traffic
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


class _Page:
    """report.html parsed with the standard library: the elements with their attributes, in order."""

    def __init__(self, text: str):
        from html.parser import HTMLParser

        self.elements: list[tuple[str, dict]] = []
        page = self

        class P(HTMLParser):
            def handle_starttag(self, tag, attrs):
                page.elements.append((tag, dict(attrs)))

        P(convert_charrefs=True).feed(text)

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.elements if t == tag and all(a.get(k.replace("_", "-")) == v
                                                                 for k, v in attrs.items())]


def _value_cells(text: str, row_marker: str) -> dict[str, object]:
    """data-key -> JSON value of the cells of the table row starting at ``row_marker``."""
    row = text[text.index(row_marker):]
    row = row[: row.index("</tr>")]
    return {k: json.loads(html_unescape(v)) for k, v in re.findall(r"data-key=\"([^\"]+)\" data-value='([^']*)'", row)}


def html_unescape(s: str) -> str:
    import html

    return html.unescape(s)


def worst_first_from_csv(rows: list[dict], baseline: str) -> list[str]:
    """The page's order recomputed from metrics.csv: the smallest Dice difference of any model to the
    baseline per image, ascending, ties in data order (the baseline's row order)."""
    stems = [r["stem"] for r in rows if r["model"] == baseline]
    dice = {(r["model"], r["stem"]): counts_scores(r)["dice"] for r in rows if r["status"] != "failed"}
    models = {r["model"] for r in rows} - {baseline}
    key = {s: min(dice[(m, s)] - dice[(baseline, s)] for m in models) for s in stems}
    return sorted(stems, key=lambda s: (key[s], stems.index(s)))


def test_report_html_shows_the_summary_and_every_image_worst_first(mixed_run):
    out, report = mixed_run.out, mixed_run.report
    text = (out / "report.html").read_text(encoding="utf-8")
    page = _Page(text)
    assert report["files"]["html"] == str(out / "report.html") and report["dice_over_iterations"] is None
    assert "bootstrap" in report["definitions"]["dice_over_iterations"]
    assert not (out / "dice_over_iterations.png").exists()  # no iter_N model: nothing over training
    # on top, summary.json's own numbers: every model's, every comparison's, the rule, the cautions
    for m in report["models"]:
        cells = _value_cells(text, f'<tr data-model="{m["model"]}"><td')
        assert len(cells) >= 14 and all(cells[k] == m[k] for k in cells), m["model"]
    for c in report["comparisons"]:
        cells = _value_cells(text, f'<tr data-model="{c["model"]}" data-metric="{c["metric"]}">')
        assert {k: cells[k] for k in ("mean_difference", "ci95", "wins", "ties", "losses", "n", "p_value")} == {
            k: c[k] for k in ("mean_difference", "ci95", "wins", "ties", "losses", "n", "p_value")}
    assert "--empty-gt score</b>: " + html_unescape(report["empty_gt"]["meaning"]) in html_unescape(text)
    assert all(html_unescape(n) in html_unescape(text) for n in report["notes"])
    # then each image, worst first by the difference to the baseline (recomputed from metrics.csv)
    rows = read_rows(out / "metrics.csv")
    order = [a["data-stem"] for a in page.find("div", **{"class": "row"})]
    assert order == worst_first_from_csv(rows, "no_lora") and order[0] == "f_empty"  # the one the fine-tune lost
    figures = [a for a in page.find("figure") if a.get("data-model")]
    assert len(figures) == 2 * len(order)
    by_key = {(r["model"], r["stem"]): r for r in rows}
    stems = iter(s for s in order for _ in range(2))
    for fig in figures:
        row = by_key[(fig["data-model"], next(stems))]
        assert [fig["data-" + k.replace("_", "-")] for k in ("dice", "iou", "cldice", "boundary_f", "hd95")] == [
            row[k] for k in ("dice", "iou", "cldice", "boundary_f", "hd95")]
        if fig["data-model"] == "finetune":
            want = counts_scores(row)["dice"] - counts_scores(by_key[("no_lora", row["stem"])])["dice"]
            assert float(fig["data-difference"]) == pytest.approx(want, abs=1e-6)
    # every image a relative path to a real, decodable file inside the report folder, of the image's shape
    srcs = [a["src"] for a in page.find("img")]
    assert len(srcs) == 1 + 3 * len(order) and srcs[0] == "report.png"
    for src in srcs:
        assert "://" not in src and not src.startswith(("/", "data:")), src
        path = (out / src).resolve()
        assert path.is_relative_to(out.resolve()) and path.is_file()
        with Image.open(path) as im:
            im.load()
            if src.endswith("_truth.jpg"):
                stem = order[srcs.index(src) // 3]
                w, h = next((p[1], p[2]) for p in PICTURES + [("g_more", 68, 52, 0), ("f_empty", 64, 64, 0)]
                            if p[0] == stem)
                assert im.format == "JPEG" and abs(im.size[0] / im.size[1] - w / h) < 0.03
    assert not list(out.rglob("*.tmp*"))


def _chromium(*args: str, user_data: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={user_data}", *args],
                          capture_output=True, text=True, timeout=timeout)


def _page_requests(netlog: Path) -> list[str]:
    """URLs the page asked the network for (Chromium's own background requests carry the initiator
    "not an origin"; a page opened from disk has the opaque initiator "null")."""
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return sorted({e["params"]["url"] for e in log["events"] if e["type"] == start and "url" in e.get("params", {})
                   and e["params"].get("initiator") != "not an origin"})


def _rendered(dom: str) -> tuple[int, int, list[str]]:
    page = _Page(dom)
    body = page.find("body")[0]
    return int(body["data-images-rendered"]), int(body["data-images-total"]), [
        a.get("data-resolved", "") for a in page.find("img")]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium package (apt-get install -y chromium)")
def test_report_html_renders_every_image_in_headless_chromium_with_no_network(mixed_run, tmp_path):
    out = mixed_run.out
    n_img = len(_Page((out / "report.html").read_text(encoding="utf-8")).find("img"))
    net = tmp_path / "net.json"
    r = _chromium("--virtual-time-budget=10000", f"--log-net-log={net}", "--dump-dom",
                  (out / "report.html").as_uri(), user_data=tmp_path / "profile")
    assert r.returncode == 0, r.stderr[-2000:]
    rendered, total, resolved = _rendered(r.stdout)
    assert (rendered, total) == (n_img, n_img) and n_img == 22  # report.png + 7 images x (truth + 2 models)
    assert all(u.startswith(out.as_uri() + "/") for u in resolved), resolved
    assert _page_requests(net) == []
    # the same checks see a broken image and a network request: a copy of the page with one of each
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("predictions"))
    broken = copy / "report.html"
    broken.write_text(broken.read_text(encoding="utf-8").replace(
        "<h1>", '<img src="http://127.0.0.1:9/x.png"><img src="report_images/missing.jpg"><h1>', 1), encoding="utf-8")
    r = _chromium("--virtual-time-budget=10000", f"--log-net-log={net}", "--dump-dom", broken.as_uri(),
                  user_data=tmp_path / "profile2")
    rendered, total, _ = _rendered(r.stdout)
    assert (rendered, total) == (n_img, n_img + 2) and "2 of 24 images did not load" in r.stdout
    assert _page_requests(net) == ["http://127.0.0.1:9/x.png"]
    # the screenshot the README shows (written into docs/ when SA2VA_WRITE_DOCS=1)
    shot = tmp_path / "eval_report_html.png"
    r = _chromium("--virtual-time-budget=10000", "--window-size=1200,2000", f"--screenshot={shot}",
                  (out / "report.html").as_uri(), user_data=tmp_path / "profile3")
    with Image.open(shot) as im:
        assert im.size == (1200, 2000) and len(im.convert("L").getcolors(1 << 16) or []) > 50  # not blank
    if os.environ.get("SA2VA_WRITE_DOCS") == "1":
        docs = Path(__file__).resolve().parent.parent / "docs"
        with Image.open(shot) as im:  # a palette PNG: a third of the bytes, the same page to the eye
            im.convert("RGB").quantize(256).save(docs / "eval_report_html.png", optimize=True)
        shutil.copyfile(out / "report.png", docs / "eval_report.png")


def check_dice_over_iterations(report: dict, out: Path) -> None:
    """Each checkpoint's mean Dice and its bootstrap interval, recomputed from metrics.csv with numpy
    (its own per-image Dice resampled from the seed), in summary.json, in the plot and on the page."""
    points = report["dice_over_iterations"]
    assert [(p["model"], p["iteration"]) for p in points] == [(m["model"], m["iteration"]) for m in report["models"]]
    rows = read_rows(out / "metrics.csv")
    text = (out / "report.html").read_text(encoding="utf-8")
    for p in points:
        d = np.array([counts_scores(r)["dice"] for r in rows if r["model"] == p["model"] and r["status"] != "failed"])
        rng = np.random.default_rng(p["seed"])
        means = d[rng.integers(0, d.size, size=(p["resamples"], d.size))].mean(axis=1)
        assert p["resamples"] == 10_000 and p["n"] == d.size
        assert p["mean_dice"] == pytest.approx(d.mean(), abs=1e-12)
        assert p["ci95"] == pytest.approx(list(np.percentile(means, [2.5, 97.5])), abs=1e-12)
        shown = text[text.index('<table id="iterations">'):]
        assert _value_cells(shown, f'<tr data-model="{p["model"]}">') == {
            "iteration": p["iteration"], "mean_dice": p["mean_dice"], "ci95": p["ci95"], "n": p["n"]}
    assert points[0]["ci95"][1] < points[1]["ci95"][0]  # the twin's 0 and the fine-tune's ~0.9 do not overlap
    with Image.open(out / "dice_over_iterations.png") as im:
        assert im.format == "PNG" and im.size[0] >= 600
    assert '<img src="dice_over_iterations.png"' in text and report["files"]["iterations_plot"]


def test_report_html_escapes_every_user_string(tmp_path):
    """Model names, stems, prompts, answers and errors with markup in them: shown as text, never run."""
    from sa2va_convert.evaluate.data import Sample
    from sa2va_convert.evaluate.metrics import per_image, summarise
    from sa2va_convert.evaluate.report_html import write_html
    from sa2va_convert.evaluate.run import EvalReport

    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>&amp;'
    names = ['base<b onmouseover=alert(1)>&"', "tuned'\"<u>"]  # a model name is one path component: no /
    (tmp_path / "in").mkdir()
    samples, rows = [], {n: [] for n in names}
    for k, stem in enumerate(["s<i>1", "s&2"]):
        image, mask = tmp_path / "in" / f"{k}.png", tmp_path / "in" / f"{k}_m.png"
        synthetic_picture(40, 30, k).save(image)
        truth = np.zeros((30, 40), np.uint8)
        truth[5:20, 10:30] = 255
        Image.fromarray(truth, "L").save(mask)
        samples.append(Sample(stem, image, mask, "<image>Please segment the " + evil))
        for j, name in enumerate(names):
            pred = tmp_path / "pred" / f"{j}_{k}.png"
            pred.parent.mkdir(exist_ok=True)
            p = np.zeros_like(truth)
            p[5 + j : 20, 10:30] = 255
            Image.fromarray(p, "L").save(pred)
            got = counts(p > 0, truth > 0)
            failed = (j, k) == (1, 1)
            rows[name].append({"model": name, "stem": stem, "status": "failed" if failed else "ok",
                               **({} if failed else got), "seg_count": 1, "seconds": 0.1, "image": str(image),
                               "mask": str(mask), "prompt": samples[-1].prompt, "answer": "[SEG]" + evil,
                               "prediction_file": "" if failed else str(pred), "error": evil if failed else "",
                               "cldice": "", "boundary_f": "", "hd95": ""})
    report = EvalReport(out=str(tmp_path / evil), data=evil, baseline=names[0], images=2)
    report.models = [summarise(n, "", None, rows[n]) for n in names]
    report.notes, report.cautions = [evil], [evil]
    values = {n: per_image(rows[n]) for n in names}
    path = write_html(tmp_path, report.to_dict(), rows, samples, values)
    text = path.read_text(encoding="utf-8")
    page = _Page(text)
    assert len(page.find("script")) == 1 and "<script>alert" not in text and "<u>" not in text
    assert not any("onerror" in attrs or "onmouseover" in attrs for _, attrs in page.elements)
    assert [a["data-stem"] for a in page.find("div", **{"class": "row"})] == ["s<i>1", "s&2"]
    assert {a["data-model"] for a in page.find("figure") if a.get("data-model")} == set(names)
    assert html_unescape(text).count(evil) >= 8  # shown as text: prompt, answers, error, names, notes, ...
    assert len(page.find("img")) == 2 + 3  # two truths, three predictions (the failed one has none)


def test_dice_over_iterations_beside_a_base_and_the_one_model_order(tmp_path):
    """iter_N models beside a base (eval base/ work_dirs/converted/): the base is no point of the curve;
    each point's interval recomputed with numpy from its seed. One model alone: lowest Dice first."""
    from sa2va_convert.evaluate.metrics import per_image, summarise
    from sa2va_convert.evaluate.report_html import worst_first
    from sa2va_convert.evaluate.report_plots import iteration_intervals, plot_iterations

    rng = np.random.default_rng(3)
    rows: dict[str, list[dict]] = {}
    for name in ("base", "iter_500", "iter_100"):
        rows[name] = []
        for k in range(9):
            t = int(rng.integers(50, 100))
            i = int(rng.integers(0, t))
            p = int(rng.integers(i, i + 40))
            rows[name].append({"stem": f"s{k}", "status": "ok", "intersection": i, "union": t + p - i,
                               "pred_area": p, "true_area": t, "seg_count": 1, "seconds": 0.1})
    summaries = [summarise(n, "", int(n[5:]) if n.startswith("iter_") else None, rows[n]) for n in rows]
    values = {n: per_image(rows[n]) for n in rows}
    points = iteration_intervals(summaries, values, resamples=2000, seed=5)
    assert [(p["model"], p["iteration"]) for p in points] == [("iter_100", 100), ("iter_500", 500)]
    for p in points:
        d = np.array([counts_scores(r)["dice"] for r in rows[p["model"]]])
        means = d[np.random.default_rng(5).integers(0, d.size, size=(2000, d.size))].mean(axis=1)
        assert (p["n"], p["resamples"], p["seed"]) == (9, 2000, 5)
        assert p["mean_dice"] == pytest.approx(d.mean(), abs=1e-12)
        assert p["ci95"] == pytest.approx(list(np.percentile(means, [2.5, 97.5])), abs=1e-12)
    assert iteration_intervals(summaries[:2], values) is None  # one checkpoint: no curve
    plot_iterations(tmp_path / "it.png", points, summaries, "iter_500", "score")
    with Image.open(tmp_path / "it.png") as im:
        assert im.format == "PNG" and im.size[0] >= 600
    only = {"base": values["base"]}
    dice = {s: counts_scores(r)["dice"] for s, r in zip([r["stem"] for r in rows["base"]], rows["base"])}
    assert [s for s, _ in worst_first(list(dice), only, None)] == sorted(dice, key=lambda s: dice[s])
