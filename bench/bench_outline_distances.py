"""Outline-to-outline distances for boundary F and HD95: scipy's Euclidean distance transform of the whole
(cropped) box against a nearest-neighbour query over the outline pixels only (scipy.spatial.cKDTree), on
the same masks in the same run. Both are exact Euclidean distances between pixel centres; the run checks
that they are equal, element for element, before it reports a time.

    PYTHONPATH=src OMP_NUM_THREADS=1 python3 bench/bench_outline_distances.py [--repeats 5]

Masks: blobs and rings at the sizes eval's tiny example uses (640x480 to 1280x720), a thin broken line,
and the worst case of bench_eval.py (a full 1280x720 frame with a large hole).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from sa2va_convert.evaluate.metrics import _crop


def outlines(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, np.ones((3, 3), bool), border_value=0)


def by_transform(edge_p: np.ndarray, edge_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    to_t, to_p = ndimage.distance_transform_edt(~edge_t), ndimage.distance_transform_edt(~edge_p)
    return to_t[edge_p], to_p[edge_t]


def by_tree(edge_p: np.ndarray, edge_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pts_p, pts_t = np.argwhere(edge_p), np.argwhere(edge_t)
    return cKDTree(pts_t).query(pts_p)[0], cKDTree(pts_p).query(pts_t)[0]


def cases(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for h, w in ((480, 640), (600, 800), (720, 1280)):
        yy, xx = np.mgrid[:h, :w]
        truth = (yy - h / 2) ** 2 / (h / 4) ** 2 + (xx - w / 2) ** 2 / (w / 5) ** 2 < 1
        pred = ndimage.binary_dilation(np.roll(truth, (7, -5), (0, 1)), iterations=2) & (rng.random((h, w)) > 0.02)
        out[f"blob {w}x{h}"] = (pred, truth)
        ring = truth & ~ndimage.binary_erosion(truth, iterations=12)
        out[f"ring {w}x{h}"] = (np.roll(ring, 3, 1), ring)
    line = np.zeros((480, 640), bool)
    line[240, 40:600] = True
    broken = line.copy()
    broken[240, 300:306] = False
    out["broken line 640x480"] = (broken, line)
    frame = np.ones((720, 1280), bool)
    holed = frame.copy()
    holed[100:620, 200:1100] = False
    out["frame with a hole 1280x720"] = (frame, holed)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for name, (pred, truth) in cases(rng).items():
        pred, truth = _crop(pred, truth, 2)  # as eval's metrics do: the box around both, plus 2 px
        edge_p, edge_t = outlines(pred), outlines(truth)
        a, b = by_transform(edge_p, edge_t), by_tree(edge_p, edge_t)
        equal = all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        times: dict[str, list[float]] = {"transform": [], "tree": []}
        for _ in range(args.repeats):  # interleaved: both see the same machine state
            for label, fn in (("transform", by_transform), ("tree", by_tree)):
                t = time.perf_counter()
                fn(edge_p, edge_t)
                times[label].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(json.dumps({"case": name, "outline_px": [int(edge_p.sum()), int(edge_t.sum())], "equal": equal,
                          "transform_ms": round(med["transform"], 2), "tree_ms": round(med["tree"], 2),
                          "speedup": round(med["transform"] / med["tree"], 2)}), flush=True)
        if not equal:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
