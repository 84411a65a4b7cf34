"""The report folder: ``metrics.csv``, ``summary.json``, ``paired.csv``, written atomically.

Every file is written under a temporary name and renamed into place, so a reader (a person, a CI
job, ``--resume``) sees either the previous complete file or the new complete one, never half of
one. ``summary.json``, ``report.png`` and ``report.html`` exist only for a finished run: they are
removed when a run starts and written at its end, so a folder without them is visibly unfinished.

The plots (``report.png``, ``dice_over_iterations.png``) are drawn in ``report_plots.py`` and the
page in ``report_html.py``; both write through ``write_atomic`` here.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import OutputError
from .compare import paired_values
from .metrics import SHAPE_KEYS, scores, shape_value

CSV_COLUMNS = (
    "model",
    "iteration",
    "stem",
    "status",
    "dice",
    "iou",
    "precision",
    "recall",
    "cldice",
    "boundary_f",
    "hd95",
    "intersection",
    "union",
    "pred_area",
    "true_area",
    "seg_count",
    "n_masks",
    "forced",
    "height",
    "width",
    "seconds",
    "image",
    "mask",
    "prompt",
    "prediction_file",
    "answer",
    "error",
)
PAIRED_COLUMNS = ("baseline", "model", "metric", "stem", "baseline_value", "model_value", "difference")
METRICS = "metrics.csv"
PAIRED = "paired.csv"
SUMMARY = "summary.json"
PLOT = "report.png"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OutputError(
            f"cannot write {path.name} ({e.strerror or e})", path=path, hint="choose a writable --out with free space"
        ) from None


def full_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics.csv row with its scores filled in from the counts (empty for a failed image)."""
    out = {k: row.get(k, "") for k in CSV_COLUMNS}
    if row.get("status") != "failed":
        s = scores(int(row["intersection"]), int(row["union"]), int(row["pred_area"]), int(row["true_area"]))
        out.update({k: f"{v:.6f}" for k, v in s.items()})
        for k in SHAPE_KEYS:  # computed from the masks when the row was scored: kept as they are
            v = shape_value(row, k)
            out[k] = "" if v is None else f"{v:.6f}"
    for k in ("iteration",):
        out[k] = "" if out[k] is None else out[k]
    return out


def write_metrics(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(full_row(r))
    write_atomic(path, buf.getvalue().encode("utf-8"))


def write_paired(
    path: Path,
    pairs: Iterable[tuple[str, str]],
    values: dict[str, dict[str, dict[str, float | None]]],
    metrics: Iterable[str],
) -> None:
    """Per image, each (baseline, model) pair's difference (model - baseline, whatever the metric's
    better direction), over the images both have a value for (``compare.paired_values``): the rows
    the comparison's interval and test are computed from."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PAIRED_COLUMNS)
    metrics = list(metrics)
    for baseline, model in pairs:
        for metric in metrics:
            stems, base, mine = paired_values(values[baseline], values[model], metric)
            for stem, x, y in zip(stems, base, mine, strict=True):
                w.writerow([baseline, model, metric, stem, f"{x:.6f}", f"{y:.6f}", f"{y - x:.6f}"])
    write_atomic(path, buf.getvalue().encode("utf-8"))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of an earlier run's metrics.csv (for --resume); a file that is not ours is refused."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
                raise OutputError(
                    "metrics.csv was not written by this version of sa2va-convert eval",
                    path=path,
                    hint="choose another --out, or pass --force to start over",
                )
            return [dict(r) for r in reader]
    except (OSError, UnicodeDecodeError) as e:
        raise OutputError(
            f"cannot read metrics.csv to resume ({e})", path=path, hint="pass --force to start over"
        ) from None


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))


__all__ = [
    "write_atomic",
    "write_metrics",
    "write_paired",
    "read_metrics",
    "write_summary",
    "full_row",
    "CSV_COLUMNS",
    "METRICS",
    "PAIRED",
    "SUMMARY",
    "PLOT",
]
