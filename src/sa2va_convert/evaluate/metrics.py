"""Segmentation metrics: every score of ``eval``, from the masks on disk, in plain Python/numpy.

The model process only predicts: it saves the union of an answer's ``[SEG]`` masks as a PNG.
This process reads that PNG and the ground truth once per row (``measure``, what ``run.py`` calls):
it counts the pixels (intersection, union, predicted area, true area: ``counts``), from which every
ratio is computed (``scores``), and takes the shape scores that need the masks themselves
(``shape_scores``: clDice, boundary F, HD95). So the rules live in one place, a resumed run scores
exactly what lies on disk, and the count-based scores of a metrics.csv row can be recomputed without
any mask in memory. ``mask_counts`` is the counts alone (``bench/bench_eval.py`` times the two apart).

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

Shape of the mask. Dice and IoU count pixels, so a thin structure (a cable, a crack, a vessel)
broken in the middle loses a handful of pixels and keeps a Dice near 1, and a ragged outline
costs little against a large area. Three values look at the shape instead, and need the masks,
not counts: they are computed once, when a saved prediction is scored (``measure``), and written
to metrics.csv with its counts, so a resumed run keeps them and re-scoring the PNGs gives them again:

- clDice (Shit et al., CVPR 2021): the share of the prediction's skeleton inside the truth
  (Tprec) and of the truth's skeleton inside the prediction (Tsens), combined as a harmonic mean;
  a broken line loses the skeleton's continuity where Dice barely moves;
- boundary F at a tolerance of ``BOUNDARY_TOLERANCE`` px: precision and recall of the outline
  pixels (a mask minus its erosion by a 3x3 square; a mask touching the frame has outline there),
  each matched within the tolerance (Euclidean distance) to the other mask's outline;
- HD95: the 95th percentile (numpy's linear interpolation) of the outline-to-outline distances,
  both directions pooled, in pixels; lower is better, and it is the one value without an upper bound.

Empty masks follow the rule above where a value has one: both empty scores clDice 1, boundary F 1,
HD95 0; one empty scores clDice 0 and boundary F 0, and has no HD95 (null: a distance to nothing
is not a number, and any stand-in would move the mean), so ``mean_hd95`` says how many images it is
over (``n_hd95``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import PLAIN, MaskRule, read_mask, read_truth

EMPTY_GT_RULES = ("score", "skip")
#: pixels within which an outline pixel counts as found by boundary F (2 px: a bf16 model or an
#: annotator's pen moves an edge by a pixel or two; the DAVIS benchmark's tolerance is of this order)
BOUNDARY_TOLERANCE = 2.0
#: per-image values computed from the masks, not from the counts (``shape_scores``): metrics.csv columns
SHAPE_KEYS = ("cldice", "boundary_f", "hd95")


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


def _read_pair(prediction: Path, truth: Path, rule: MaskRule = PLAIN) -> tuple[np.ndarray, np.ndarray]:
    """Void pixels (``rule.ignore_index``) become background in both masks: they then add to no
    count, and a prediction that matches the truth outside them still scores 1 on every value."""
    pred = read_mask(prediction)
    true, valid = read_truth(truth, rule)
    if pred.shape != true.shape:
        raise ValueError(
            f"ground-truth mask {truth} is {true.shape[0]}x{true.shape[1]}, the image is "
            f"{pred.shape[0]}x{pred.shape[1]} (H x W)"
        )
    if valid is not None:
        pred = pred & valid
    return pred, true


def mask_counts(prediction: Path, truth: Path, rule: MaskRule = PLAIN) -> dict[str, int]:
    """Pixel counts of a saved prediction PNG against its ground-truth mask (``data.read_truth``)."""
    return counts(*_read_pair(prediction, truth, rule))


def measure(prediction: Path, truth: Path, rule: MaskRule = PLAIN) -> dict[str, Any]:
    """Everything a metrics.csv row records of a saved prediction: its pixel counts and its shape
    scores, from one read of the two masks (what ``run.py`` calls for each saved PNG)."""
    pred, true = _read_pair(prediction, truth, rule)
    return {**counts(pred, true), **shape_scores(pred, true)}


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


def _imports() -> tuple[Any, Any]:
    """scipy.ndimage and skimage's skeletonize, imported when a mask is scored (not when ``eval``
    is registered: ``--help`` stays fast), with the extra to install when they are missing."""
    try:
        from scipy import ndimage
        from skimage.morphology import skeletonize
    except ImportError as e:
        raise ImportError(
            f"eval's clDice, boundary F and HD95 need scipy and scikit-image ({e}): pip install 'sa2va-convert[eval]'"
        ) from None
    return ndimage, skeletonize


def _crop(pred: np.ndarray, truth: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the box around their union plus ``margin`` px (clipped to the frame): every
    outline and skeleton pixel lies inside, and beyond it there is only background, so the values are
    those of the whole frame at a fraction of the cost on a large image with a small object."""
    rows, cols = np.nonzero(pred | truth)
    h, w = pred.shape
    r0, r1 = max(int(rows.min()) - margin, 0), min(int(rows.max()) + margin + 1, h)
    c0, c1 = max(int(cols.min()) - margin, 0), min(int(cols.max()) + margin + 1, w)
    return pred[r0:r1, c0:c1], truth[r0:r1, c0:c1]


def shape_scores(pred: np.ndarray, truth: np.ndarray, tolerance: float = BOUNDARY_TOLERANCE) -> dict[str, float | None]:
    """clDice, boundary F and HD95 of two bool (H, W) masks (the rules are in the module's docstring)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
    has_p, has_t = bool(pred.any()), bool(truth.any())
    if not (has_p and has_t):
        both = not (has_p or has_t)
        return {"cldice": 1.0 if both else 0.0, "boundary_f": 1.0 if both else 0.0, "hd95": 0.0 if both else None}
    ndimage, skeletonize = _imports()
    pred, truth = _crop(pred, truth, 2)  # skeletonize and erosion see background around the union

    skel_p, skel_t = skeletonize(pred), skeletonize(truth)
    tprec = _share(skel_p & truth, skel_p)
    tsens = _share(skel_t & pred, skel_t)
    cldice = 2 * tprec * tsens / (tprec + tsens) if tprec + tsens else 0.0

    square = np.ones((3, 3), bool)
    edge_p = pred & ~ndimage.binary_erosion(pred, square, border_value=0)
    edge_t = truth & ~ndimage.binary_erosion(truth, square, border_value=0)
    # distance of every pixel to the nearest outline pixel of the other mask (exact Euclidean)
    to_t = ndimage.distance_transform_edt(~edge_t)
    to_p = ndimage.distance_transform_edt(~edge_p)
    d_pt, d_tp = to_t[edge_p], to_p[edge_t]
    precision, recall = float(np.mean(d_pt <= tolerance)), float(np.mean(d_tp <= tolerance))
    boundary_f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    hd95 = float(np.percentile(np.concatenate([d_pt, d_tp]), 95))
    # rounded as metrics.csv writes them, so a fresh run's means equal a resumed run's
    return {"cldice": round(cldice, 6), "boundary_f": round(boundary_f, 6), "hd95": round(hd95, 6)}


def _share(part: np.ndarray, whole: np.ndarray) -> float:
    n = int(np.count_nonzero(whole))
    return int(np.count_nonzero(part)) / n if n else 0.0


def shape_value(row: dict[str, Any], key: str) -> float | None:
    """A row's clDice/boundary F/HD95 as a number: a float from ``measure``, the text of metrics.csv
    on a resumed run, and None where the value is undefined (HD95 with one mask empty)."""
    v = row.get(key)
    if v is None or v == "":
        return None
    return float(v)


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
    mean_cldice: float | None = None  # mean of the per-image clDice over the images in the means
    n_cldice: int = 0  # images that mean is over
    mean_boundary_f: float | None = None  # mean of the per-image boundary F (at boundary_tolerance px)
    n_boundary_f: int = 0
    mean_hd95: float | None = None  # mean of the per-image HD95 (px) where it is defined: lower is better
    n_hd95: int = 0  # images with an HD95 (both masks empty or both not): fewer than n_in_means when one was empty
    boundary_tolerance: float = BOUNDARY_TOLERANCE
    #: --force-seg: this pseudo-model's rows are the masks of ``forced_of`` with [SEG] forced
    forced_of: str | None = None
    n_forced: int = 0  # of those, images predicted again with [SEG] forced (the others reuse the free answer)

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

    shape: dict[str, list[float]] = {}
    for key in SHAPE_KEYS:
        values = [shape_value(r, key) for r in kept]
        shape[key] = [v for v in values if v is not None]

    def shape_mean(key: str) -> float | None:
        return float(np.mean(shape[key])) if shape[key] else None

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
        mean_cldice=shape_mean("cldice"),
        n_cldice=len(shape["cldice"]),
        mean_boundary_f=shape_mean("boundary_f"),
        n_boundary_f=len(shape["boundary_f"]),
        mean_hd95=shape_mean("hd95"),
        n_hd95=len(shape["hd95"]),
    )


def per_image(rows: Iterable[dict[str, Any]], empty_gt: str = "score") -> dict[str, dict[str, float | None]]:
    """stem -> scores of every image in a model's means (not failed; under ``skip`` not empty truth),
    the count-based ones and the shape ones (HD95 None where undefined), for pairing by image: a
    comparison follows the same rule as the means."""
    _check_rule(empty_gt)
    out: dict[str, dict[str, float | None]] = {}
    for r in rows:
        if _in_means(r, empty_gt):
            values: dict[str, float | None] = dict(
                scores(int(r["intersection"]), int(r["union"]), int(r["pred_area"]), int(r["true_area"]))
            )
            values.update({k: shape_value(r, k) for k in SHAPE_KEYS})
            out[r["stem"]] = values
    return out


#: the per-model numbers that can each name a best model, with the name the output gives them
LEADER_METRICS = {
    "mean_dice": "mean Dice",
    "giou": "gIoU",
    "ciou": "cIoU",
    "mean_cldice": "clDice",
    "mean_boundary_f": "boundary F",
    "mean_hd95": "HD95",
}
#: summary numbers where the smaller is the better (a distance)
LOWER_IS_BETTER_SUMMARY = frozenset({"mean_hd95"})


def leaders(summaries: list[ModelSummary]) -> dict[str, str]:
    """Which model each of ``LEADER_METRICS`` would call best (the earlier model on a tie), so the
    output can say when they disagree instead of showing Dice's choice alone. HD95 picks the lowest
    mean, and only among models with an HD95 on every image in their means: a model whose mask is
    empty where the truth is not has no HD95 there, and a mean over the images it did not miss would
    reward the miss."""
    out: dict[str, str] = {}
    for key in LEADER_METRICS:
        lower = key in LOWER_IS_BETTER_SUMMARY
        scored = [s for s in summaries if getattr(s, key) is not None and not (lower and s.n_hd95 != s.n_in_means)]
        if scored:
            sign = -1.0 if lower else 1.0
            out[key] = max(scored, key=lambda s: (sign * getattr(s, key), -summaries.index(s))).model
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
    "measure",
    "shape_scores",
    "shape_value",
    "SHAPE_KEYS",
    "BOUNDARY_TOLERANCE",
    "summarise",
    "best_model",
    "per_image",
    "leaders",
    "LEADER_METRICS",
    "LOWER_IS_BETTER_SUMMARY",
    "EMPTY_GT_RULES",
    "ModelSummary",
]
