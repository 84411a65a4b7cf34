"""Segmentation metrics: every score of ``eval``, from the masks on disk, in plain Python/numpy.

The model process only predicts: it saves the union of an answer's ``[SEG]`` masks as a PNG.
This process counts that PNG's pixels against the ground truth (intersection, union, predicted
area, true area: ``mask_counts``), and every ratio is computed from those counts (``scores``), so
the rules live in one place, a resumed run scores exactly what lies on disk, and a metrics.csv row
can be re-scored without any mask in memory.

Empty masks. A ratio whose denominator is zero is 1.0 when both masks are empty (nothing to find,
nothing found) and 0.0 otherwise. So an answer without ``[SEG]`` (an empty prediction) on an
image whose object is present scores Dice 0, precision 0, recall 0 -- it is never skipped.

Empty ground truth. Whether an image with nothing to find belongs in a mean is a convention the
field does not share. Scoring it (``score``, the default, and eval's rule from the start) credits a
model that rightly says nothing there, which is the skill a referring model needs when the prompt
names an absent object; but the credit is a perfect 1 won by silence, which on a small set can
decide a comparison. MONAI's default and nnU-Net leave such images out (``skip``). Both are
offered, and every summary says which rule ran, how many images had an empty truth and how many of
them the model left empty, and gives the mean over the images with an object either way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import read_mask

EMPTY_GT_RULES = ("score", "skip")


def _ratio(num: int, den: int, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return num / den


def scores(intersection: int, union: int, pred_area: int, true_area: int) -> dict[str, float]:
    """Dice, IoU, precision and recall of one image from its pixel counts."""
    empty = pred_area == 0 and true_area == 0
    return {
        "dice": _ratio(2 * intersection, pred_area + true_area, empty),
        "iou": _ratio(intersection, union, empty),
        "precision": _ratio(intersection, pred_area, empty),
        "recall": _ratio(intersection, true_area, empty),
    }


def mask_counts(prediction: Path, truth: Path) -> dict[str, int]:
    """Pixel counts of a saved prediction PNG against its ground-truth mask (``data.read_mask``)."""
    pred, true = read_mask(prediction), read_mask(truth)
    if pred.shape != true.shape:
        raise ValueError(
            f"ground-truth mask {truth} is {true.shape[0]}x{true.shape[1]}, the image is "
            f"{pred.shape[0]}x{pred.shape[1]} (H x W)"
        )
    return counts(pred, true)


def counts(pred: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """Pixel counts of two bool (H, W) masks of one shape: what ``scores`` takes."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
    return {
        "intersection": int(np.count_nonzero(pred & truth)),
        "union": int(np.count_nonzero(pred | truth)),
        "pred_area": int(np.count_nonzero(pred)),
        "true_area": int(np.count_nonzero(truth)),
    }


@dataclass
class ModelSummary:
    """Per-model aggregate over its evaluated images (failed images are counted, not scored)."""

    model: str
    folder: str
    iteration: int | None
    images: int
    failures: int
    no_seg: int
    mean_dice: float | None
    giou: float | None  # mean of per-image IoU
    ciou: float | None  # sum of intersections / sum of unions over all images
    mean_precision: float | None
    mean_recall: float | None
    no_seg_rate: float | None
    seconds: float  # sum of per-image predict_forward seconds (the model's own time)
    images_per_s: float | None
    device: str | None = None
    dtype: str | None = None
    cuda_max_allocated_bytes: int | None = None
    empty_gt: str = "score"  # the rule the means follow (EMPTY_GT_RULES)
    n_images: int = 0  # images scored (as ``images``), with or without an object
    n_empty_gt: int = 0  # of those, images whose ground truth is empty
    n_empty_gt_empty_pred: int = 0  # of those, where the prediction is empty too (Dice 1 under ``score``)
    n_in_means: int = 0  # images the means and cIoU are over (n_images, less n_empty_gt under ``skip``)
    mean_dice_with_object: float | None = None  # mean Dice over the images whose ground truth is not empty

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _check_rule(empty_gt: str) -> None:
    if empty_gt not in EMPTY_GT_RULES:
        raise ValueError(f"empty_gt must be one of {EMPTY_GT_RULES}, not {empty_gt!r}")


def _in_means(row: dict[str, Any], empty_gt: str) -> bool:
    return row["status"] != "failed" and not (empty_gt == "skip" and int(row["true_area"]) == 0)


def summarise(
    model: str, folder: str, iteration: int | None, rows: Iterable[dict[str, Any]], empty_gt: str = "score"
) -> ModelSummary:
    """Aggregate a model's metrics.csv rows (dicts with status, counts and seconds); ``empty_gt``
    says whether images with an empty ground truth are in the means (see the module's docstring)."""
    _check_rule(empty_gt)
    every = list(rows)
    failures = sum(1 for r in every if r["status"] == "failed")
    ok = [r for r in every if r["status"] != "failed"]
    n = len(ok)
    empty = [r for r in ok if int(r["true_area"]) == 0]
    kept = [r for r in ok if _in_means(r, empty_gt)]
    per = [scores(int(r["intersection"]), int(r["union"]), int(r["pred_area"]), int(r["true_area"])) for r in kept]
    with_object = [
        scores(int(r["intersection"]), int(r["union"]), int(r["pred_area"]), int(r["true_area"]))["dice"]
        for r in ok
        if int(r["true_area"]) > 0
    ]
    inter = sum(int(r["intersection"]) for r in kept)
    union = sum(int(r["union"]) for r in kept)
    no_seg = sum(1 for r in ok if int(r["seg_count"]) == 0)
    seconds = sum(float(r["seconds"]) for r in ok)

    def mean(key: str) -> float | None:
        return float(np.mean([p[key] for p in per])) if per else None

    return ModelSummary(
        model=model,
        folder=folder,
        iteration=iteration,
        images=n,
        failures=failures,
        no_seg=no_seg,
        mean_dice=mean("dice"),
        giou=mean("iou"),
        ciou=(inter / union if union else (1.0 if kept else None)),
        mean_precision=mean("precision"),
        mean_recall=mean("recall"),
        no_seg_rate=(no_seg / n if n else None),
        seconds=round(seconds, 3),
        images_per_s=(n / seconds if seconds > 0 else None),
        empty_gt=empty_gt,
        n_images=n,
        n_empty_gt=len(empty),
        n_empty_gt_empty_pred=sum(1 for r in empty if int(r["pred_area"]) == 0),
        n_in_means=len(kept),
        mean_dice_with_object=float(np.mean(with_object)) if with_object else None,
    )


def per_image(rows: Iterable[dict[str, Any]], empty_gt: str = "score") -> dict[str, dict[str, float]]:
    """stem -> scores of every image in a model's means (not failed; under ``skip`` not empty truth),
    for pairing by image: a comparison follows the same rule as the means."""
    _check_rule(empty_gt)
    return {
        r["stem"]: scores(int(r["intersection"]), int(r["union"]), int(r["pred_area"]), int(r["true_area"]))
        for r in rows
        if _in_means(r, empty_gt)
    }


#: the per-model numbers that can each name a best model, with the name the output gives them
LEADER_METRICS = {"mean_dice": "mean Dice", "giou": "gIoU", "ciou": "cIoU"}


def leaders(summaries: list[ModelSummary]) -> dict[str, str]:
    """Which model each of ``LEADER_METRICS`` would call best (the earlier model on a tie), so the
    output can say when they disagree instead of showing Dice's choice alone."""
    out: dict[str, str] = {}
    for key in LEADER_METRICS:
        scored = [s for s in summaries if getattr(s, key) is not None]
        if scored:
            out[key] = max(scored, key=lambda s: (getattr(s, key), -summaries.index(s))).model
    return out


def best_model(summaries: list[ModelSummary]) -> ModelSummary | None:
    """Highest mean Dice (ties: higher cIoU, then fewer failures, then the earlier model)."""
    scored = [s for s in summaries if s.mean_dice is not None]
    if not scored:
        return None
    return max(scored, key=lambda s: (s.mean_dice, s.ciou or 0.0, -s.failures, -summaries.index(s)))


__all__ = [
    "scores",
    "counts",
    "mask_counts",
    "summarise",
    "best_model",
    "per_image",
    "leaders",
    "LEADER_METRICS",
    "EMPTY_GT_RULES",
    "ModelSummary",
]
