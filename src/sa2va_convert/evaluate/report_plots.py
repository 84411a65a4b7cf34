"""``report.png`` (the paired differences) and ``dice_over_iterations.png`` (a run's checkpoints).

Two means side by side hide what a paired comparison is about: the same image scored by two models.
So with a baseline and at least one other model ``report.png`` draws, per model, a line per image
from the baseline's Dice to the model's Dice (a slope chart: green where the model wins, red where
it loses, grey on a tie), with the mean difference and its 95 % paired bootstrap interval drawn as
an error bar around the model's mean, and a last panel with every model's mean difference and
interval against 0. The numbers are those of ``summary.json``'s ``comparisons`` (computed once, in
``compare.py``), never recomputed here. With a single model there is nothing to pair: the plot is
its per-image Dice (box and every image as a dot).

When two or more models are ``iter_N`` folders (the output of ``convert --all``),
``dice_over_iterations.png`` plots each checkpoint's mean Dice against its iteration with a 95 %
bootstrap interval of that mean (``iteration_intervals``: the images resampled from the checkpoint's
own per-image Dice with ``compare.bootstrap_ci``, the same seed and number of resamples as the
comparisons), so the user sees where the fine-tune peaked and whether the peak stands out from noise.
Models without an iteration (a base given beside the run folder) are drawn as horizontal lines.

matplotlib (Agg, headless) is imported inside the functions: the ``eval`` extra, paid only when a
report is written (README, "Evaluate a fine-tune", says why matplotlib).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .compare import RESAMPLES, SEED, Comparison, bootstrap_ci
from .metrics import ModelSummary
from .report import PLOT, write_atomic

ITERATIONS_PLOT = "dice_over_iterations.png"
#: per-image lines are labelled with their stem up to this many images (beyond, labels would overlap)
MAX_LABELLED = 12
#: slope panels drawn (one per model against the baseline); every model is in the interval panel
MAX_SLOPE_PANELS = 6
WIN, LOSS, TIE = "#2ca02c", "#d62728", "#9a9a9a"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def empty_gt_title(rule: str, summaries: Sequence[ModelSummary]) -> str:
    """The empty-ground-truth rule in words, for a plot's title (the reader must not have to guess it)."""
    n_empty = max((m.n_empty_gt for m in summaries), default=0)
    if not n_empty:
        return f"empty ground truth: --empty-gt {rule}, no image has an empty ground truth"
    what = "scored (an empty prediction there is Dice 1)" if rule == "score" else "left out of the means"
    return f"empty ground truth: --empty-gt {rule}, {n_empty} image(s) {what}"


def iteration_intervals(
    summaries: Sequence[ModelSummary],
    values: Mapping[str, Mapping[str, Mapping[str, Any]]],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> list[dict[str, Any]] | None:
    """Per ``iter_N`` model, its mean Dice with a 95 % bootstrap interval of that mean over its own
    images in the means (``values`` is ``metrics.per_image`` per model, so the empty-gt rule holds);
    None unless at least two models carry an iteration (nothing to plot against)."""
    its = [m for m in summaries if m.iteration is not None and m.forced_of is None]  # free answers only
    if len(its) < 2:
        return None
    out: list[dict[str, Any]] = []
    for m in sorted(its, key=lambda s: (s.iteration, summaries.index(s))):
        dice = [v["dice"] for v in values.get(m.model, {}).values()]
        ci = bootstrap_ci(dice, resamples=resamples, seed=seed)
        out.append(
            {
                "model": m.model,
                "iteration": m.iteration,
                "mean_dice": m.mean_dice,
                "ci95": list(ci) if ci is not None else None,
                "n": len(dice),
                "resamples": resamples,
                "seed": seed,
            }
        )
    return out


def _single_model(ax: Any, summary: ModelSummary, dice: list[float]) -> None:
    import numpy as np

    ax.boxplot([dice or [np.nan]], showfliers=False)
    rng = np.random.RandomState(0)
    ax.scatter(1 + rng.uniform(-0.12, 0.12, len(dice)), dice, s=12, alpha=0.7, color="#333333", zorder=3)
    ax.set_xticks([1], [summary.model])
    ax.set_ylim(-0.04, 1.04)
    ax.set_ylabel("Dice per image")
    mean = "n/a" if summary.mean_dice is None else f"{summary.mean_dice:.3f}"
    ax.set_title(f"{summary.model}: mean Dice {mean} over {len(dice)} image(s)", fontsize=9)


def _slope(
    ax: Any, baseline: str, model: str, values: Mapping[str, Mapping[str, Mapping[str, Any]]], c: Comparison | None
) -> None:
    """One model against the baseline: a line per image, the means, the interval of the difference."""
    import numpy as np

    base, mine = values.get(baseline, {}), values.get(model, {})
    stems = [s for s in base if s in mine]
    colours = {}
    for s in stems:
        b, m = base[s]["dice"], mine[s]["dice"]
        colours[s] = WIN if m > b else LOSS if m < b else TIE
        ax.plot([0, 1], [b, m], color=colours[s], alpha=0.75, lw=1.2, marker="o", ms=3)
    if len(stems) <= MAX_LABELLED:
        for s, y in _spread([(s, mine[s]["dice"]) for s in stems]):
            ax.annotate(
                s, (1, mine[s]["dice"]), xytext=(1.06, y), textcoords="data", fontsize=6, va="center", color=colours[s]
            )
    if stems:
        bm = float(np.mean([base[s]["dice"] for s in stems]))
        mm = float(np.mean([mine[s]["dice"] for s in stems]))
        ax.plot([0, 1], [bm, mm], color="black", lw=2.4, zorder=4)
        if c is not None and c.ci95 is not None:
            lo, hi = c.ci95
            ax.errorbar(
                [1.62],
                [mm],
                yerr=[[mm - (bm + lo)], [(bm + hi) - mm]],
                fmt="D",
                color="black",
                capsize=4,
                zorder=5,
            )
    ax.set_xlim(-0.25, 1.75)
    ax.set_ylim(-0.04, 1.04)
    ax.set_xticks([0, 1], [baseline, model], fontsize=8)
    if c is None or c.mean_difference is None:
        ax.set_title(f"{model}: no image scored for both", fontsize=9)
    else:
        ci = "none" if c.ci95 is None else f"[{c.ci95[0]:+.3f}, {c.ci95[1]:+.3f}]"
        ax.set_title(
            f"{model} - {baseline}: Dice {c.mean_difference:+.3f} {ci}\nwins/ties/losses {c.wins}/{c.ties}/{c.losses}",
            fontsize=8,
        )


def _spread(points: list[tuple[str, float]], gap: float = 0.05) -> list[tuple[str, float]]:
    """Label heights: the points' own, pushed apart downwards to at least ``gap`` from the top one
    (images with the same Dice, e.g. several at 1.0, would print their stems on top of each other),
    then lifted together if that ran below the axis."""
    placed: list[tuple[str, float]] = []
    for name, y in sorted(points, key=lambda p: -p[1]):
        if placed and y > placed[-1][1] - gap:
            y = placed[-1][1] - gap
        placed.append((name, y))
    low = min((y for _, y in placed), default=0.0)
    lift = max(0.0, -0.02 - low)
    return [(name, y + lift) for name, y in placed]


def _intervals(ax: Any, comparisons: list[Comparison]) -> None:
    """Every model's mean Dice difference to the baseline with its interval, against 0."""
    dice = [c for c in comparisons if c.metric == "dice"]
    for y, c in enumerate(dice):
        if c.mean_difference is None or c.ci95 is None:
            continue
        colour = WIN if c.ci95[0] > 0 else LOSS if c.ci95[1] < 0 else TIE
        ax.errorbar(
            [c.mean_difference],
            [y],
            xerr=[[c.mean_difference - c.ci95[0]], [c.ci95[1] - c.mean_difference]],
            fmt="o",
            color=colour,
            capsize=4,
        )
    ax.axvline(0, color="black", lw=0.8)
    first = dice[0].baseline if dice else None  # forced masks have their own baseline (BASE[forced]): say so
    ax.set_yticks(
        range(len(dice)), [c.model if c.baseline == first else f"{c.model} vs {c.baseline}" for c in dice], fontsize=8
    )
    ax.set_ylim(-0.6, len(dice) - 0.4)
    ax.invert_yaxis()
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("mean Dice difference to the baseline, 95 % interval")
    resamples = dice[0].resamples if dice else RESAMPLES
    ax.set_title(f"paired bootstrap, {resamples} resamples", fontsize=9)


def plot_report(
    path: Path,
    summaries: list[ModelSummary],
    values: Mapping[str, Mapping[str, Mapping[str, Any]]],
    comparisons: list[Comparison],
    baseline: str | None,
    empty_gt: str,
) -> None:
    """``report.png``: the paired slope charts and intervals (one model: its per-image Dice)."""
    plt = _pyplot()
    # the slope charts compare free answers with the free baseline; a --force-seg pseudo-model
    # (NAME[forced]) is only ever compared with the baseline's forced masks: in the interval panel
    others = [m.model for m in summaries if m.model != baseline and m.forced_of is None]
    if baseline is None or not others:
        fig, ax = plt.subplots(1, 1, figsize=(5.5, 4.4), dpi=100)
        if summaries:
            only = summaries[0]
            _single_model(ax, only, [v["dice"] for v in values.get(only.model, {}).values()])
        fig.suptitle(empty_gt_title(empty_gt, summaries), fontsize=9)
    else:
        shown = others[:MAX_SLOPE_PANELS]
        width = [3.0] * len(shown) + [4.2]
        fig, axes = plt.subplots(
            1, len(width), figsize=(sum(width) + 0.6, 4.8), dpi=100, gridspec_kw={"width_ratios": width}
        )
        by_model = {c.model: c for c in comparisons if c.metric == "dice"}
        for ax, model in zip(axes[:-1], shown, strict=True):
            _slope(ax, baseline, model, values, by_model.get(model))
        axes[0].set_ylabel("Dice per image")
        _intervals(axes[-1], comparisons)
        n = len(values.get(baseline, {}))
        more = f"; {len(others) - len(shown)} more model(s) in the last panel only" if len(others) > len(shown) else ""
        fig.suptitle(
            f"paired Dice against the baseline {baseline}: {n} image(s) in the means{more}\n"
            f"{empty_gt_title(empty_gt, summaries)}",
            fontsize=9,
        )
        fig.text(
            0.01,
            0.005,
            "a line per image (green: the model wins, red: loses, grey: tie); black: the means; "
            "diamond: the model's mean with the 95 % interval of the mean difference",
            fontsize=7,
            color="#555555",
        )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    write_atomic(path, _png(fig))


def plot_iterations(
    path: Path, points: list[dict[str, Any]], summaries: list[ModelSummary], best: str | None, empty_gt: str
) -> None:
    """``dice_over_iterations.png``: mean Dice with its bootstrap interval per checkpoint; other
    models (no iteration) as dashed horizontal lines at their mean Dice."""
    plt = _pyplot()
    fig, ax = plt.subplots(1, 1, figsize=(7.5, 4.2), dpi=100)
    drawn = [p for p in points if p["mean_dice"] is not None]
    its = [p["iteration"] for p in drawn]
    means = [p["mean_dice"] for p in drawn]
    ax.plot(its, means, marker="o", color="#1f77b4", label="mean Dice")
    with_ci = [p for p in drawn if p["ci95"] is not None]
    if with_ci:
        ax.fill_between(
            [p["iteration"] for p in with_ci],
            [p["ci95"][0] for p in with_ci],
            [p["ci95"][1] for p in with_ci],
            color="#1f77b4",
            alpha=0.18,
            label="95 % bootstrap interval",
        )
        ax.errorbar(
            [p["iteration"] for p in with_ci],
            [p["mean_dice"] for p in with_ci],
            yerr=[
                [p["mean_dice"] - p["ci95"][0] for p in with_ci],
                [p["ci95"][1] - p["mean_dice"] for p in with_ci],
            ],
            fmt="none",
            ecolor="#1f77b4",
            capsize=3,
        )
    peak = max(drawn, key=lambda p: p["mean_dice"], default=None)
    if peak is not None:
        ax.scatter(
            [peak["iteration"]],
            [peak["mean_dice"]],
            s=150,
            facecolors="none",
            edgecolors="#d62728",
            zorder=4,
            label=f"peak: {peak['model']}" + (" (best)" if peak["model"] == best else ""),
        )
    for k, m in enumerate(s for s in summaries if s.iteration is None and s.mean_dice is not None):
        ax.axhline(m.mean_dice, ls="--", lw=1, color=["#7f7f7f", "#8c564b", "#e377c2"][k % 3], label=m.model)
    ax.set_ylim(-0.04, 1.04)
    ax.set_xlabel("training iteration")
    ax.set_ylabel("mean Dice")
    n = max((p["n"] for p in points), default=0)
    resamples = points[0]["resamples"] if points else RESAMPLES
    ax.set_title(
        f"mean Dice over training ({n} image(s), bootstrap {resamples} resamples)\n"
        f"{empty_gt_title(empty_gt, summaries)}",
        fontsize=9,
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    write_atomic(path, _png(fig))


__all__ = [
    "plot_report",
    "plot_iterations",
    "iteration_intervals",
    "empty_gt_title",
    "PLOT",
    "ITERATIONS_PLOT",
]
