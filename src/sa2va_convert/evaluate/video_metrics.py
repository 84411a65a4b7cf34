"""J, F and J&F per frame and per expression, as the DAVIS benchmark (and Sa2VA's video evaluation) defines them.

Sa2VA's headline video numbers (MeViS, ReVOS, Ref-DAVIS17) are J&F. Upstream scores them with the
DAVIS measures ``db_eval_iou`` / ``db_eval_boundary`` (bytedance/Sa2VA
``third_parts/revos/utils/metircs.py``, called from ``tools/eval/eval_mevis.py`` lines 44-45 and
``tools/eval/eval_revos.py``), so a number we print is comparable with a paper's only if it follows
the same definitions, empty frames included. They are written here from those definitions (no code
copied):

- **J** (region similarity) of a frame: |P∩T| / |P∪T|; **1 when both masks are empty** (union 0).
- **F** (boundary accuracy) of a frame: the boundary of a mask is the set of pixels that differ from
  their right, lower or lower-right neighbour (the last row compares with the right neighbour
  only, the last column with the lower one, the bottom-right pixel is never boundary; pixels outside
  the frame do not count as background). A boundary pixel of P is *matched* when a boundary pixel
  of T lies within ``ceil(bound_th x diagonal)`` pixels (Euclidean; ``bound_th`` = 0.008, the
  diagonal of the frame's height x width), and the reverse for T. precision = matched P / |P's
  boundary|, recall = matched T / |T's boundary|, F = 2PR/(P+R) (0 when P+R = 0). Empty boundaries
  (DAVIS's rules): both empty -> P = R = 1 (F = 1); P's empty, T's not -> P = 1, R = 0 (F = 0);
  T's empty, P's not -> P = 0, R = 1 (F = 0).
- per expression, J and F are the means over the clip's frames and **J&F** is their mean;
  a dataset's J is the mean over expressions (upstream multiplies by 100 when it prints).
- **R** (ReVOS robustness, ``get_r2vos_robustness``) where a clip's foreground masks are given:
  per frame max(0, 1 - |P \\ T| / (|foreground| + 1e-6)), averaged over frames.

The match within a disk of radius r is a nearest-neighbour query between the two boundaries' pixel
coordinates (scipy's ``cKDTree``): a boundary pixel lies within r of the other boundary exactly when
its nearest pixel there is at most r away, which is what dilating that boundary by a disk of radius r
marks. Beside one pass over the frame for the boundary maps it costs in the boundaries' length, not
in the tolerance's area (a dilation) or the frame's (a distance transform per mask).
Everything here is one frame at a time: memory does not grow with the clip's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BOUND_TH = 0.008  # DAVIS's boundary tolerance, as a fraction of the frame's diagonal
ROBUSTNESS_EPS = 1e-6  # ReVOS's guard against an empty foreground (eval_revos.py, get_r2vos_robustness)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """The one-pixel boundary of a 2-D mask, DAVIS's convention (see the module docstring)."""
    m = np.asarray(mask, dtype=bool)
    right = np.zeros_like(m)
    below = np.zeros_like(m)
    diag = np.zeros_like(m)
    right[:, :-1] = m[:, 1:]
    below[:-1, :] = m[1:, :]
    diag[:-1, :-1] = m[1:, 1:]
    b = (m ^ right) | (m ^ below) | (m ^ diag)
    b[-1, :] = m[-1, :] ^ right[-1, :]
    b[:, -1] = m[:, -1] ^ below[:, -1]
    b[-1, -1] = False
    return b


def tolerance_px(height: int, width: int, bound_th: float = BOUND_TH) -> float:
    """The match radius in pixels: ``bound_th`` itself when >= 1, else ceil(bound_th x diagonal)."""
    return bound_th if bound_th >= 1 else float(math.ceil(bound_th * math.hypot(height, width)))


def region_j(truth: np.ndarray, pred: np.ndarray) -> float:
    """J of one frame: IoU, 1.0 when both masks are empty."""
    t, p = np.asarray(truth, dtype=bool), np.asarray(pred, dtype=bool)
    union = int(np.count_nonzero(t | p))
    return 1.0 if union == 0 else int(np.count_nonzero(t & p)) / union


def _matched(points: np.ndarray, targets: np.ndarray, radius: float) -> int:
    """How many of ``points`` (N x 2 pixel coordinates) have a ``targets`` pixel within ``radius``."""
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(targets).query(points, k=1, distance_upper_bound=radius + 0.5)
    return int(np.count_nonzero(dist <= radius))


def boundary_f(truth: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """F of one frame (DAVIS ``db_eval_boundary`` definition, empty-boundary rules included)."""
    t, p = np.asarray(truth, dtype=bool), np.asarray(pred, dtype=bool)
    if t.shape != p.shape:
        raise ValueError(f"truth {t.shape} and prediction {p.shape} differ in size")
    bt, bp = boundary_map(t), boundary_map(p)
    n_t, n_p = int(np.count_nonzero(bt)), int(np.count_nonzero(bp))
    if n_p == 0 and n_t == 0:
        return 1.0
    if n_p == 0 or n_t == 0:
        return 0.0  # precision 1 and recall 0, or the reverse: F = 0
    radius = tolerance_px(t.shape[0], t.shape[1], bound_th)
    pt, pp = np.argwhere(bt), np.argwhere(bp)
    precision = _matched(pp, pt, radius) / n_p
    recall = _matched(pt, pp, radius) / n_t
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def robustness(truth: np.ndarray, pred: np.ndarray, foreground: np.ndarray) -> float:
    """ReVOS's R of one frame: 1 - (predicted pixels outside the truth) / (foreground pixels), at least 0."""
    t, p, fg = (np.asarray(a, dtype=bool) for a in (truth, pred, foreground))
    wrong = int(np.count_nonzero(p & ~t))
    return max(1.0 - wrong / (int(np.count_nonzero(fg)) + ROBUSTNESS_EPS), 0.0)


@dataclass
class ExpressionScore:
    """Per-frame J, F (and R) of one expression, accumulated frame by frame."""

    j: list[float] = field(default_factory=list)
    f: list[float] = field(default_factory=list)
    r: list[float] = field(default_factory=list)
    empty_truth_frames: int = 0
    empty_pred_frames: int = 0

    def add(self, truth: np.ndarray, pred: np.ndarray, foreground: np.ndarray | None = None) -> None:
        self.j.append(region_j(truth, pred))
        self.f.append(boundary_f(truth, pred))
        if foreground is not None:
            self.r.append(robustness(truth, pred, foreground))
        self.empty_truth_frames += not np.any(truth)
        self.empty_pred_frames += not np.any(pred)

    def to_row(self) -> dict[str, Any]:
        """The expression's scores: J and F are means over its frames, J&F their mean."""
        if not self.j:
            return {"j": None, "f": None, "jf": None, "r": None, "n_frames": 0}
        j, f = float(np.mean(self.j)), float(np.mean(self.f))
        return {
            "j": j,
            "f": f,
            "jf": (j + f) / 2,
            "r": float(np.mean(self.r)) if self.r else None,
            "n_frames": len(self.j),
            "empty_truth_frames": self.empty_truth_frames,
            "empty_pred_frames": self.empty_pred_frames,
        }


def percent(x: float | None) -> float | None:
    """Upstream's printed form: x 100, two decimals (eval_mevis.py's results)."""
    return None if x is None else round(100 * x, 2)


__all__ = [
    "BOUND_TH",
    "ExpressionScore",
    "boundary_f",
    "boundary_map",
    "percent",
    "region_j",
    "robustness",
    "tolerance_px",
]
