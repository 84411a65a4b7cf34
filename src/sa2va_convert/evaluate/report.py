"""The report folder: ``metrics.csv``, ``summary.json``, ``report.png``, written atomically.

Every file is written under a temporary name and renamed into place, so a reader (a person, a CI
job, ``--resume``) sees either the previous complete file or the new complete one, never half of
one. ``summary.json`` and ``report.png`` exist only for a finished run: they are removed when a
run starts and written at its end, so a folder without them is visibly unfinished.

``report.png`` is drawn with matplotlib (Agg backend, no display needed): it is what the field
already uses for such plots, it is the one plotting library most Python environments with torch
already have, and it writes a PNG with no browser or server. It is imported only here, only when
the report is written (the ``eval`` extra).
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
from .metrics import SHAPE_KEYS, ModelSummary, scores, shape_value

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


def plot_report(
    path: Path, summaries: list[ModelSummary], dice_by_model: dict[str, list[float]], best: str | None
) -> None:
    """Mean Dice per model (a line over the iteration when every model is an iter_N, bars
    otherwise) beside the per-image Dice distribution of each model (box + every image as a dot)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    names = [s.model for s in summaries]
    means = [s.mean_dice if s.mean_dice is not None else np.nan for s in summaries]
    by_iter = all(s.iteration is not None for s in summaries) and len(summaries) > 1
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8.0, 1.2 * len(names) + 6), 4.2), dpi=100)
    if by_iter:
        its = [s.iteration for s in summaries]
        ax1.plot(its, means, marker="o", color="#1f77b4")
        ax1.set_xlabel("training iteration")
        for s in summaries:
            if s.model == best:
                ax1.scatter(
                    [s.iteration],
                    [s.mean_dice],
                    s=140,
                    facecolors="none",
                    edgecolors="#d62728",
                    zorder=3,
                    label=f"best: {s.model}",
                )
        if best:
            ax1.legend(loc="lower right", fontsize=8)
    else:
        colours = ["#d62728" if n == best else "#1f77b4" for n in names]
        bars = ax1.bar(range(len(names)), np.nan_to_num(means), color=colours)
        ax1.set_xticks(
            range(len(names)),
            names,
            rotation=30 if len(names) > 3 else 0,
            ha="right" if len(names) > 3 else "center",
            fontsize=8,
        )
        for b, v in zip(bars, means, strict=True):
            ax1.text(
                b.get_x() + b.get_width() / 2,
                (0 if np.isnan(v) else v) + 0.02,
                "n/a" if np.isnan(v) else f"{v:.3f}",
                ha="center",
                fontsize=8,
            )
    ax1.set_ylim(0, 1.08)
    ax1.set_ylabel("mean Dice")
    ax1.set_title("mean Dice per model" + (" (red: best)" if best and not by_iter else ""))
    data = [dice_by_model.get(n) or [np.nan] for n in names]
    ax2.boxplot(data, showfliers=False)
    rng = np.random.RandomState(0)
    for i, d in enumerate(data, 1):
        ax2.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, s=10, alpha=0.6, color="#333333", zorder=3)
    ax2.set_xticks(
        range(1, len(names) + 1),
        names,
        rotation=30 if len(names) > 3 else 0,
        ha="right" if len(names) > 3 else "center",
        fontsize=8,
    )
    ax2.set_ylim(-0.04, 1.04)
    ax2.set_ylabel("Dice per image")
    n_images = max((len(d) for d in dice_by_model.values()), default=0)
    ax2.set_title(f"per-image Dice ({n_images} images)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue())


__all__ = [
    "write_atomic",
    "write_metrics",
    "write_paired",
    "read_metrics",
    "write_summary",
    "plot_report",
    "full_row",
    "CSV_COLUMNS",
    "METRICS",
    "PAIRED",
    "SUMMARY",
    "PLOT",
]
