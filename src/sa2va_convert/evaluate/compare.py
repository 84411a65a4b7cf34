"""Paired comparison of two models on the same images: is the difference more than noise?

Two means alone cannot say that: on a dozen images a fine-tune's mean Dice can lead by 0.04 while
its per-image differences point both ways. So every model is compared with the baseline *image by
image* (the same image, the same ground truth), and only the per-image differences are summarised:

- wins/ties/losses count the images where the model scores better/the same/worse (a tie is an exact
  tie: the same pixel counts give the same float). Better is higher for every metric but HD95, a
  distance, where it is lower (``LOWER_IS_BETTER``); the difference is always model - baseline, so an
  HD95 improvement is a negative difference, and "shown better" means an interval below 0 there;
- a value that is undefined on an image (HD95 where one mask is empty: None) leaves that image out
  of that metric's pairing, so ``n`` says how many images each comparison is over;
- the mean difference gets a 95 % paired percentile bootstrap interval. The images are resampled
  with replacement ``resamples`` times from ``numpy.random.default_rng(seed)``, drawing the whole
  index matrix as ``rng.integers(0, n, size=(resamples, n))`` (in row chunks, which draws the same
  stream), so anyone can recompute the interval from metrics.csv, the seed and the count;
- a Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided, zero differences dropped, scipy's
  own choice of exact or normal-approximation method) gives a p-value. Where it cannot say anything
  (every difference is 0, or fewer than ``MIN_NONZERO`` differences are not, so that no outcome could
  reach p < 0.05) the p-value is null with the reason, never a number the data cannot support.

Only numpy and scipy: no torch, so this runs in the reporting process. scipy is imported inside
``wilcoxon_p``, when a report is made (the ``eval`` extra), not when ``eval`` is registered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SEED = 0
RESAMPLES = 10_000
#: the smallest number of non-zero differences at which a two-sided exact signed-rank test can reach
#: p < 0.05 (its smallest p-value is 2 / 2**n: 0.0625 for 5, 0.03125 for 6)
MIN_NONZERO = 6
METHOD = (
    "paired percentile bootstrap of the mean difference; Wilcoxon signed-rank test, two-sided, zero differences "
    "dropped (scipy.stats.wilcoxon)"
)
#: metrics where a smaller value is the better one (a distance in pixels)
LOWER_IS_BETTER = frozenset({"hd95"})
_CHUNK = 1 << 22  # indices per chunk of the bootstrap: memory stays ~32 MiB on any dataset size


@dataclass
class Comparison:
    """One model against the baseline on one metric, over the images both scored."""

    baseline: str
    model: str
    metric: str
    mean_difference: float | None  # model - baseline
    ci95: list[float] | None
    wins: int
    ties: int
    losses: int
    p_value: float | None
    p_value_note: str | None
    method: str
    n: int
    resamples: int
    seed: int
    higher_is_better: bool = True

    @property
    def covers_zero(self) -> bool:
        return self.ci95 is None or self.ci95[0] <= 0.0 <= self.ci95[1]

    @property
    def above_zero(self) -> bool:
        return self.ci95 is not None and self.ci95[0] > 0.0

    @property
    def shown_better(self) -> bool:
        """The interval lies wholly on the model's better side of 0 (above it, below it for HD95)."""
        if self.ci95 is None:
            return False
        return self.ci95[0] > 0.0 if self.higher_is_better else self.ci95[1] < 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def bootstrap_ci(
    differences: Sequence[float] | np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float] | None:
    """95 % percentile interval of the mean of ``differences`` over paired resamples (None when empty)."""
    d = np.asarray(differences, dtype=np.float64)
    n = d.size
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    rows = max(1, _CHUNK // n)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def wilcoxon_p(differences: Sequence[float] | np.ndarray) -> tuple[float | None, str | None]:
    """(p-value, None), or (None, why there is none)."""
    d = np.asarray(differences, dtype=np.float64)
    nonzero = int(np.count_nonzero(d))
    if d.size == 0:
        return None, "no image has a value for both models"
    if nonzero == 0:
        return None, f"all {d.size} paired differences are 0: nothing to test"
    if nonzero < MIN_NONZERO:
        return None, (
            f"only {nonzero} non-zero paired difference(s): a two-sided signed-rank test cannot reach p < 0.05 "
            f"with fewer than {MIN_NONZERO}"
        )
    from scipy.stats import wilcoxon

    p = float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    if not np.isfinite(p):
        return None, "scipy.stats.wilcoxon gave no finite p-value"
    return p, None


def compare(
    baseline: str,
    model: str,
    metric: str,
    base_values: Sequence[float],
    model_values: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Comparison:
    """``model`` against ``baseline`` on paired per-image values (same images, same order)."""
    b = np.asarray(base_values, dtype=np.float64)
    m = np.asarray(model_values, dtype=np.float64)
    if b.shape != m.shape:
        raise ValueError(f"{len(b)} baseline values against {len(m)} model values: not paired")
    d = m - b
    ci = bootstrap_ci(d, resamples=resamples, seed=seed)
    p, note = wilcoxon_p(d)
    higher = metric not in LOWER_IS_BETTER
    better, worse = (d > 0, d < 0) if higher else (d < 0, d > 0)
    return Comparison(
        baseline=baseline,
        model=model,
        metric=metric,
        mean_difference=float(d.mean()) if d.size else None,
        ci95=list(ci) if ci is not None else None,
        wins=int(np.count_nonzero(better)),
        ties=int(np.count_nonzero(d == 0)),
        losses=int(np.count_nonzero(worse)),
        p_value=p,
        p_value_note=note,
        method=METHOD,
        n=int(d.size),
        resamples=resamples,
        seed=seed,
        higher_is_better=higher,
    )


def paired_values(
    base: Mapping[str, Mapping[str, float | None]], model: Mapping[str, Mapping[str, float | None]], metric: str
) -> tuple[list[str], list[float], list[float]]:
    """The stems both sides have a ``metric`` value for (in the baseline's order), with the values:
    an image either failed or without that value (HD95 with one mask empty) cannot be paired."""
    stems = [s for s in base if s in model and base[s].get(metric) is not None and model[s].get(metric) is not None]
    return stems, [float(base[s][metric]) for s in stems], [float(model[s][metric]) for s in stems]  # type: ignore[arg-type]


def compare_models(
    baseline: str,
    values: Mapping[str, Mapping[str, Mapping[str, float | None]]],
    metrics: Sequence[str] = ("dice", "iou"),
    *,
    models: Sequence[str] | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> list[Comparison]:
    """Every other model of ``values`` (model -> stem -> metric -> value, in report order; or only
    ``models``) against ``baseline``, per metric, over the stems both have a value for (``paired_values``:
    a difference needs both sides)."""
    base = values[baseline]
    out: list[Comparison] = []
    for model in models if models is not None else list(values):
        if model == baseline:
            continue
        for metric in metrics:
            _, b, m = paired_values(base, values[model], metric)
            out.append(compare(baseline, model, metric, b, m, resamples=resamples, seed=seed))
    return out


__all__ = [
    "Comparison",
    "compare",
    "compare_models",
    "paired_values",
    "LOWER_IS_BETTER",
    "bootstrap_ci",
    "wilcoxon_p",
    "SEED",
    "RESAMPLES",
    "MIN_NONZERO",
    "METHOD",
]
