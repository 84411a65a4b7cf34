"""``sa2va-convert eval``: score converted folders on the user's own images, honestly.

For each model, one child process (the model runner of ``verify`` and ``predict``: ``runner/child.py``,
mode ``eval``) loads the folder once and runs its own ``predict_forward`` on every image, never
forcing ``[SEG]``: an answer without ``[SEG]`` is an empty prediction. The child saves the union
of the ``[SEG]`` masks as ``predictions/<model>/<stem>.png`` and streams one JSON line per image
(its answer, mask count, seconds) to a file; it scores nothing. This process counts each saved
PNG against the ground truth (its pixel counts and, from the masks, clDice, boundary F and HD95)
and turns the counts into Dice/IoU/... (``metrics.py``, the one
home of every score), then writes the report (``report.py``). So every number comes from a mask
the model produced and that lies next to the report, and only one image's masks are in memory
at a time.

Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1) each rank evaluates every N-th image
with its own child on its own GPU (``LOCAL_RANK``, passed to the child as its only visible GPU),
and rank 0 gathers the per-image rows (a few numbers each) and writes the report. The gather uses
torch.distributed's gloo backend on GPUs too: these processes never touch a GPU themselves (their
children do), and a NCCL communicator would need a CUDA context in each of them, on the GPU the
model needs; gloo also spans nodes over TCP, as torchrun's multi-node launcher expects. The report
folder must then be on a filesystem every node sees (each rank's child writes its predictions).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..errors import ConvertError, EvalFailuresError, EvalGateError, InputError, OutputError, UsageError
from ..read.adapter_folder import is_model_folder, resolve_adapter
from ..runner.failure import child_failure, debug_details
from ..runner.memory import check_fits
from ..runner.process import ChildRun, check_device, resolve_python, run_child
from ..runner.report import judge_loading, report_from
from .adapter_swap import SwapPlan, plan_swaps
from .compare import Comparison, compare, compare_models, paired_values
from .data import PLAIN, MaskRule, Sample, load_dataset, write_truth
from .defaults import DEFAULT_IMAGE_TIMEOUT
from .metrics import (
    EMPTY_GT_RULES,
    LEADER_METRICS,
    SHAPE_KEYS,
    ModelSummary,
    best_model,
    leaders,
    measure,
    per_image,
    summarise,
)
from .report import (
    METRICS,
    PAIRED,
    PLOT,
    SUMMARY,
    read_metrics,
    write_metrics,
    write_paired,
    write_summary,
)
from .report_html import HTML, IMAGES, write_html
from .report_plots import ITERATIONS_PLOT, iteration_intervals, plot_iterations, plot_report

WORK = ".work"  # per-model, per-rank item lists and streamed results; removed when the run completes
#: how the ground truth was read (--mask-threshold, --ignore-index): --resume must not mix rules
RULE = "mask_rule.json"
#: a COCO file's truth masks, decoded from its polygons and RLE (never written into the user's data folder)
TRUTH = "truth"
OURS = (METRICS, SUMMARY, PLOT, PAIRED, HTML, IMAGES, ITERATIONS_PLOT, RULE, "predictions", "overlays", TRUTH, WORK)
#: the per-image scores compared image by image with the baseline (HD95: lower is better, see compare.py)
PAIRED_METRICS = ("dice", "iou", "cldice", "boundary_f", "hd95")
#: the per-model numbers --fail-under may name (higher is better for each), and the short names it also takes
GATE_METRICS = (
    "mean_dice",
    "giou",
    "ciou",
    "mean_precision",
    "mean_recall",
    "mean_dice_with_object",
    "mean_cldice",
    "mean_boundary_f",
)
GATE_ALIASES = {
    "dice": "mean_dice",
    "iou": "giou",
    "precision": "mean_precision",
    "recall": "mean_recall",
    "cldice": "mean_cldice",
    "boundary_f": "mean_boundary_f",
}
#: the per-model numbers --fail-above may name (lower is better: a distance), and their short names
GATE_ABOVE_METRICS = ("mean_hd95",)
GATE_ABOVE_ALIASES = {"hd95": "mean_hd95"}
#: the report name of a model's masks with [SEG] forced (--force-seg): a pseudo-model of its own
FORCED_SUFFIX = "[forced]"
MEASURED = ("intersection", "union", "pred_area", "true_area")  # the pixel counts a row's scores come from
DTYPES = ("bf16", "fp16", "fp32")
_ITER = re.compile(r"^iter_(\d+)$")


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: its report name (``predictions/<name>/``), folder and training iteration."""

    name: str
    folder: Path
    iteration: int | None


def _iteration(name: str) -> int | None:
    m = _ITER.match(name)
    return int(m.group(1)) if m else None


def forced_name(model: str) -> str:
    """``base`` -> ``base[forced]``: the rows, summary and comparisons of ``base``'s forced masks."""
    return model + FORCED_SUFFIX


def _check_name(name: str) -> str:
    """A name becomes a folder (``predictions/<name>/``) and a CSV value: one plain path component;
    ``NAME[forced]`` is --force-seg's, never a model's."""
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip():
        raise UsageError(f"--name {name!r} cannot name a model", hint="use a plain name such as base or lr1e-5")
    if name.endswith(FORCED_SUFFIX):
        raise UsageError(
            f"--name {name!r} ends with {FORCED_SUFFIX}, which names the --force-seg rows of a model",
            hint="choose a name without it",
        )
    return name


def resolve_models(paths: list[str | os.PathLike], names: list[str] | None = None) -> list[ModelSpec]:
    """Converted folders, and folders of ``iter_N`` converted folders (``convert --all``) expanded
    in iteration order. Names are ``names`` (one per path; a run folder's become ``NAME-iter_N``) or
    else the folder names, made unique with ``-2``, ``-3``, ... (two folders called ``hf``)."""
    if not paths:
        raise UsageError("no MODEL given", hint="sa2va-convert eval OUT_FOLDER --data DATA")
    if names is not None and len(names) != len(paths):
        raise UsageError(
            f"{len(names)} --name for {len(paths)} MODEL(s)", hint="give one --name per MODEL, in the same order"
        )
    found: list[tuple[Path, str, int | None]] = []  # (folder, name as given: a symlink keeps its own name)
    for i, raw in enumerate(paths):
        p = Path(raw)
        given = _check_name(names[i]) if names is not None else None
        if is_model_folder(p):
            name = p.resolve().name if p.name in ("", ".", "..") else p.name
            found.append((p.resolve(), given or name, _iteration(name)))
            continue
        if not p.is_dir():
            raise InputError(
                "model folder not found" if not p.exists() else "not a model folder",
                path=p,
                hint="pass a converted HuggingFace folder (with config.json), or a folder of iter_N ones",
            )
        iters = sorted(
            (int(m.group(1)), c)
            for c in p.iterdir()
            if c.is_dir() and (m := _ITER.match(c.name)) and is_model_folder(c)
        )
        if not iters:
            raise InputError(
                "not a model folder (no config.json) and no iter_N model folders inside",
                path=p,
                hint="pass a converted folder (sa2va-convert CKPT OUT writes one), or the OUT of convert --all",
            )
        found.extend((c.resolve(), f"{given}-{c.name}" if given else c.name, n) for n, c in iters)
    if names is not None:
        taken = [f[1] for f in found]
        twice = sorted({n for n in taken if taken.count(n) > 1})
        if twice:
            raise UsageError(f"--name gives two models the name {twice[0]!r}", hint="give each MODEL its own --name")
    specs: list[ModelSpec] = []
    used: set[str] = set()
    for folder, given, it in found:
        name, k = given, 2
        while name in used:
            name, k = f"{given}-{k}", k + 1
        used.add(name)
        specs.append(ModelSpec(name, folder, it))
    return specs


# ---------------------------------------------------------------- distributed


@dataclass
class Dist:
    """torchrun's view of this process (world size 1 when not under torchrun)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    group: bool = False

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        return cls(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))

    def init(self, timeout_s: float) -> None:
        if self.world <= 1 or self.group:
            return
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=timedelta(seconds=max(timeout_s, 1800.0)))
        self.group = True

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` on rank 0 (in rank order), ``[]`` elsewhere; ``[obj]`` alone."""
        if self.world <= 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world if self.rank == 0 else []
        dist.gather_object(obj, out if self.rank == 0 else None, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world <= 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.group = False

    @contextlib.contextmanager
    def own_gpu(self, device: str) -> Iterator[str]:
        """Under torchrun, the child sees only this rank's GPU (``LOCAL_RANK`` of the visible ones),
        so the model's own ``.cuda()`` calls land on it; yields the device to pass to the child."""
        if self.world <= 1 or device == "cpu" or device.startswith("cuda:"):
            yield device
            return
        before = os.environ.get("CUDA_VISIBLE_DEVICES")
        visible = [v for v in (before or "").split(",") if v.strip()]
        os.environ["CUDA_VISIBLE_DEVICES"] = (
            visible[self.local_rank % len(visible)] if visible else str(self.local_rank)
        )
        try:
            yield device
        finally:
            if before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = before


# ---------------------------------------------------------------- the report


@dataclass
class EvalReport:
    """What ``eval`` measured; ``to_dict()`` is ``summary.json`` and the ``--json`` output."""

    out: str
    data: str
    models: list[ModelSummary] = field(default_factory=list)
    best: str | None = None
    #: the best model's Dice against the baseline (or, when the baseline is best, against the runner-up)
    best_interval: dict[str, Any] | None = None
    baseline: str | None = None
    empty_gt: str = "score"
    #: --force-seg: each model's masks with [SEG] forced are also scored, as the pseudo-model NAME[forced]
    force_seg: bool = False
    comparisons: list[Comparison] = field(default_factory=list)
    #: what the numbers do not show: metrics that disagree on the best model, intervals that cover 0
    cautions: list[str] = field(default_factory=list)
    #: the conditions of --fail-under / --require-better and which failed (None when none was set)
    gate: dict[str, Any] | None = None
    #: iter_N models: mean Dice with its bootstrap interval per iteration (report_plots.iteration_intervals)
    dice_over_iterations: list[dict[str, Any]] | None = None
    failures: list[dict[str, str]] = field(default_factory=list)
    images: int = 0
    resumed: int = 0
    evaluated: int = 0
    world_size: int = 1
    wall_seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        # schema_version as in every --json document (cli_common.SCHEMA_VERSION): summary.json is one too
        return {
            "schema_version": 1,
            "ok": not self.failures,
            "out": self.out,
            "data": self.data,
            "images": self.images,
            "models": [m.to_dict() for m in self.models],
            "best": self.best,
            "best_interval": self.best_interval,
            "baseline": self.baseline,
            "empty_gt": {"rule": self.empty_gt, "meaning": EMPTY_GT_MEANING[self.empty_gt]},
            "force_seg": self.force_seg,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "cautions": self.cautions,
            "gate": self.gate,
            "dice_over_iterations": self.dice_over_iterations,
            "failures": self.failures,
            "resumed": self.resumed,
            "evaluated": self.evaluated,
            "world_size": self.world_size,
            "wall_seconds": round(self.wall_seconds, 3),
            "files": self.files,
            "notes": self.notes,
            "definitions": DEFINITIONS,
        }


EMPTY_GT_MEANING = {
    "score": "images with an empty ground truth are scored like any other: an empty prediction there scores 1 "
    "(Dice, IoU, precision, recall), any predicted pixel 0",
    "skip": "images with an empty ground truth are left out of every mean, cIoU and comparison (counted in n_empty_gt)",
}

DEFINITIONS = {
    "dice": "2|P∩T| / (|P|+|T|) per image, P = union of the masks of every [SEG] in the answer, T = ground truth "
    "(any non-zero pixel; a JPEG mask's pixels above --mask-threshold); pixels of the --ignore-index value are in "
    "neither P nor T; 1.0 when both are empty, 0.0 when only one is",
    "mean_dice": "mean of the per-image Dice over the evaluated images (failed images are not scored; see failures)",
    "giou": "mean of the per-image IoU |P∩T| / |P∪T|",
    "ciou": "cumulative IoU: Σ|P∩T| / Σ|P∪T| over all images (upstream's RefCOCO definition; big objects weigh more)",
    "no_seg_rate": "share of answers without [SEG]: an empty prediction, scored as such (the free answers are "
    "never forced; see forced)",
    "forced": "with --force-seg, NAME[forced] is a pseudo-model of NAME's masks with [SEG] forced, scored like "
    "any model (rows in metrics.csv, masks under predictions/NAME/forced/): where the free answer has [SEG] its "
    "mask is the forced one (column forced = reused, not predicted twice); where it has none, the image ran "
    "again with [SEG] and the end token imposed on generation (forced = forced; n_forced counts them). So "
    "NAME[forced] measures mask quality, NAME's no_seg_rate the [SEG] decision. Forced pseudo-models are "
    "compared with the baseline's forced one, never with a free model; best and the gate judge free models",
    "images_per_s": "evaluated images / Σ seconds of predict_forward per image (one device; model loading excluded)",
    "n_empty_gt": "scored images whose ground truth is empty; n_empty_gt_empty_pred of them the model left empty "
    "too; n_in_means the images the means are over (see empty_gt for the rule)",
    "mean_dice_with_object": "mean of the per-image Dice over the images whose ground truth is not empty, whatever "
    "the rule",
    "cldice": "centerline Dice (Shit et al. 2021) per image: Tprec = |S(P)∩T|/|S(P)|, Tsens = |S(T)∩P|/|S(T)|, "
    "clDice = 2·Tprec·Tsens/(Tprec+Tsens), S = skimage.morphology.skeletonize; 1.0 when both masks are empty, 0.0 "
    "when only one is; mean_cldice is its mean over n_cldice images (those in the means)",
    "boundary_f": "boundary F-score per image at boundary_tolerance px (2): outline = mask minus its erosion by a 3x3 "
    "square (the frame's edge counts as outside); precision = share of P's outline pixels within the tolerance "
    "(Euclidean) of T's outline, recall the same of T's outline against P's; F = 2PR/(P+R); 1.0 when both masks are "
    "empty, 0.0 when only one is; mean_boundary_f is its mean over n_boundary_f images",
    "hd95": "95th percentile (numpy's linear interpolation) of the outline-to-outline distances in pixels, both "
    "directions pooled (every outline pixel of P to the nearest of T, and of T to P); lower is better; 0.0 when both "
    "masks are empty, null (no number) when only one is; mean_hd95 is its mean over the n_hd95 images where it is "
    "defined, so it leaves out every image where one mask was empty (see mean_dice for those)",
    "comparisons": "per metric (dice, iou, cldice, boundary_f, hd95), each model against the baseline over the n "
    "images both have a value for (hd95 is missing where one mask is empty): per-image differences "
    "(model - baseline, in paired.csv), wins/ties/losses (better/equal/worse per image: higher, but lower for "
    "hd95, higher_is_better false), their mean with a 95 % "
    "percentile bootstrap interval (resamples of the images with replacement, numpy.random.default_rng(seed)) "
    "and a two-sided Wilcoxon signed-rank p-value (null, with p_value_note, where the data cannot support one)",
    "dice_over_iterations": "per iter_N model (two or more), its mean Dice and a 95 % percentile bootstrap interval "
    "of that mean: its own per-image Dice (the images in the means) resampled with replacement, as the comparisons "
    "(same seed and resamples); null unless two or more models carry an iteration",
    "best_interval": "the best model's (highest mean Dice) Dice difference to the baseline with its interval; when "
    "the baseline is best, its difference to the runner-up",
}


def _check_out(out: Path, *, resume: bool, force: bool, rule: MaskRule = PLAIN) -> None:
    """Refuse to mix two runs in one folder (read-only: every rank runs it before any rank writes)."""
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a folder", path=out, hint="choose another --out")
    if out.is_dir() and any((out / n).exists() for n in OURS) and not (resume or force):
        raise OutputError(
            "already holds an eval report",
            path=out,
            hint="pass --resume to continue it, --force to start over, or choose another --out",
        )
    if resume and (out / METRICS).is_file() and _earlier_rule(out) != rule:
        said = _earlier_rule(out).describe() or "non-zero is foreground, no void value"
        raise UsageError(
            f"the earlier run in {out.name}/ read the ground truth with another rule ({said}): its rows would not "
            "be comparable with this run's",
            hint="resume with the same --mask-threshold and --ignore-index, or pass --force to start over",
        )


def _earlier_rule(out: Path) -> MaskRule:
    """The rule an earlier run in ``out`` wrote down; a run before the rule file existed read plainly."""
    try:
        d = json.loads((out / RULE).read_text(encoding="utf-8"))
        return MaskRule(d.get("threshold"), d.get("ignore_index"))
    except (OSError, ValueError, AttributeError):
        return PLAIN


def _clean_out(out: Path, *, resume: bool, force: bool, rule: MaskRule = PLAIN) -> None:
    """Rank 0, after every rank checked: --force removes our files (only ours); a finished run's
    summary.json and report.png go until this run is finished too."""
    if force and not resume:
        for n in OURS:
            p = out / n
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    for n in (SUMMARY, PLOT, PAIRED, HTML, ITERATIONS_PLOT):
        with contextlib.suppress(FileNotFoundError):
            (out / n).unlink()
    shutil.rmtree(out / IMAGES, ignore_errors=True)
    (out / WORK).mkdir(parents=True, exist_ok=True)
    (out / RULE).write_text(json.dumps({"threshold": rule.threshold, "ignore_index": rule.ignore_index}) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete lines of a streamed results file (a line cut by a crash is ignored)."""
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _finished_rows(
    out: Path, specs: list[ModelSpec], samples: list[Sample], force_seg: bool = False
) -> dict[tuple[str, str], dict]:
    """(model, stem) -> row already scored by an earlier run (metrics.csv, then the streamed results
    of an interrupted one) whose prediction PNG is still there; failed images are tried again. The
    forced rows (``NAME[forced]``) count only with ``force_seg``: a run without it reports none."""
    by_stem = {s.stem: s for s in samples}
    names = {s.name for s in specs} | ({forced_name(s.name) for s in specs} if force_seg else set())
    done: dict[tuple[str, str], dict] = {}
    rows: list[dict[str, Any]] = read_metrics(out / METRICS) if (out / METRICS).is_file() else []
    for spec in specs:
        for path in _rank_results(out / WORK, spec.name):
            for r in _read_jsonl(path):
                if r.get("stem") in by_stem:
                    rows.extend(_complete(r, spec, by_stem[r["stem"]], out))
    for r in rows:
        model, stem = r.get("model"), r.get("stem")
        if (
            isinstance(model, str)
            and isinstance(stem, str)
            and model in names
            and stem in by_stem
            and r.get("status") in ("ok", "no_seg")
            and r.get("prediction_file")
            and Path(r["prediction_file"]).is_file()
            and _same_question(r, by_stem[stem])
        ):
            done[(model, stem)] = r
    return done


def _same_question(row: dict[str, Any], sample: Sample) -> bool:
    """Whether an earlier row answered this run's question: the same prompt (a changed --prompt or
    --prompt-map, or an older default wording, gives another answer) against the same truth file
    (another class map points a key at another class). A row that did not is predicted again, never
    kept beside this run's rows: a report must not mix two questions under one key."""
    return row.get("prompt") == sample.prompt and row.get("mask") == str(sample.mask)


def _rank_results(folder: Path, model: str) -> list[Path]:
    """``{model}.rank{N}.results.jsonl`` files in ``folder``, matched as plain strings: a model name is the
    user's folder name and may hold glob characters (``run[1]``), so it is never used as a pattern."""
    prefix, suffix = f"{model}.rank", ".results.jsonl"
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(
        folder / n
        for n in names
        if n.startswith(prefix) and n.endswith(suffix) and n[len(prefix) : -len(suffix)].isdigit()
    )


def _pred_path(out: Path, model: str, stem: str, forced: bool = False) -> Path:
    """Where a model's mask for ``stem`` lies: ``predictions/<model>/<stem>.png``, and with [SEG]
    forced ``predictions/<model>/forced/<stem>.png`` (a stem is a file name, so never ``forced/``)."""
    return out / "predictions" / model / ("forced" if forced else "") / f"{stem}.png"


def _complete(row: dict[str, Any], spec: ModelSpec, sample: Sample, out: Path) -> list[dict[str, Any]]:
    """A child's result line as metrics.csv rows: the free answer's (unless the line says it was not
    saved: a resumed run that only lacked the forced mask) and, when the line has one, the forced
    mask's (model ``NAME[forced]``). Each gets what the child does not repeat (model, paths) and the
    pixel counts of its saved prediction against the ground truth, which only this process makes."""
    rows: list[dict[str, Any]] = []
    free: dict[str, Any] | None = None
    if row.get("free_saved", True):
        free = _scored(dict(row), spec.name, spec, sample, _pred_path(out, spec.name, sample.stem))
        rows.append(free)
    forced = row.get("forced_row")
    if forced is not None or (row.get("forced_asked") and row.get("status") == "failed"):
        r = {k: v for k, v in row.items() if k != "forced_row"}
        r.update(forced or {})
        path = _pred_path(out, spec.name, sample.stem, forced=True)
        # a reused mask is the free one, pixel for pixel: its scores are taken over, not computed twice
        same = free if (forced or {}).get("forced") == "reused" and free and free["status"] != "failed" else None
        rows.append(_scored(r, forced_name(spec.name), spec, sample, path, same))
    return rows


def _scored(
    r: dict[str, Any], model: str, spec: ModelSpec, sample: Sample, path: Path, same: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``r`` completed as a metrics.csv row of ``model``, its mask at ``path`` scored (or its scores
    copied from ``same``, the row of the identical free mask)."""
    r.update(
        model=model,
        iteration=spec.iteration,
        stem=sample.stem,
        image=str(sample.image),
        mask=str(sample.mask),
        prompt=r.get("prompt", sample.prompt),  # the question the child was asked (a resumed run checks it)
        answer=r.get("prediction", r.get("answer", "")),
    )
    if r.get("status") == "ok" and same is not None:
        r.update({k: same[k] for k in (*MEASURED, *SHAPE_KEYS)})
    elif r.get("status") == "ok":
        try:
            r.update(measure(path, sample.mask, sample.rule))
        except Exception as e:  # as in the child: this image is a recorded failure, the others are still scored
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            r.update(status="failed", error=f"{type(e).__name__}: {lines[0][:400] if lines else type(e).__name__}")
    if r.get("status") == "ok" and int(r.get("seg_count") or 0) == 0:
        r["status"] = "no_seg"  # an answer without [SEG]: an empty prediction, scored as such
    r["prediction_file"] = str(path) if r.get("status") != "failed" else ""
    return r


class _Scorer:
    """Scores the child's result lines as they are streamed, in a thread of this process, while the
    child predicts the next images: clDice's skeletons and the outline distances cost a fraction of a
    second per large image on one core, which would otherwise add up after the model has finished,
    while this process sits idle waiting for it. The child saves an image's PNG before its line, so a
    complete line's prediction is on disk; only complete lines are read (one cut by a crash is not)."""

    def __init__(self, results: Path, complete: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> None:
        self._results, self._complete = results, complete
        self._offset = results.stat().st_size  # lines already there were scored by an earlier run
        self._rows: list[dict[str, Any]] = []
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="eval-scorer", daemon=True)

    def _poll(self) -> None:
        with open(self._results, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        for line in chunk[:end].decode("utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            self._rows.extend(self._complete(row))

    def _loop(self) -> None:
        try:
            while not self._stopping.wait(0.2):
                self._poll()
        except BaseException as e:  # re-raised by finish(), in the caller's thread
            self._error = e

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def finish(self) -> list[dict[str, Any]]:
        """Every row of this run, after the child has exited: the lines the thread had not reached yet
        are scored here."""
        self.stop()
        if self._error is not None:
            raise self._error
        self._poll()
        return self._rows


@dataclass
class _ModelFiles:
    """One model's item list, streamed results and their scorer, for this rank's share."""

    items: Path
    results: Path
    scorer: _Scorer


def _model_files(
    spec: ModelSpec,
    share: list[Sample],
    need: dict[str, tuple[bool, bool]] | None,
    out: Path,
    dist: Dist,
    overlays: bool,
) -> _ModelFiles:
    """Write ``spec``'s item list for the child and keep an interrupted run's result lines."""
    work = out / WORK
    tag = f"{spec.name}.rank{dist.rank}"
    items, results = work / f"{tag}.items.jsonl", work / f"{tag}.results.jsonl"
    (out / "predictions" / spec.name).mkdir(parents=True, exist_ok=True)
    if overlays:
        (out / "overlays" / spec.name).mkdir(parents=True, exist_ok=True)
    lines = []
    for s in share:
        free, forced = (need or {}).get(s.stem, (True, False))
        item = {
            **s.to_dict(),
            "pred_path": str(_pred_path(out, spec.name, s.stem)),
            "overlay_path": str(out / "overlays" / spec.name / f"{s.stem}.png") if overlays else None,
            "save_free": free,
            "forced_path": str(_pred_path(out, spec.name, s.stem, forced=True)) if forced else None,
        }
        lines.append(json.dumps(item))
    if any(need.get(s.stem, (True, False))[1] for s in share) if need else False:
        (out / "predictions" / spec.name / "forced").mkdir(parents=True, exist_ok=True)
    items.write_text("\n".join(lines) + "\n", encoding="utf-8")
    earlier = _read_jsonl(results)  # an interrupted run's lines; a line cut by the crash is dropped here
    results.write_text("".join(json.dumps(r) + "\n" for r in earlier), encoding="utf-8")
    by_stem = {s.stem: s for s in share}
    scorer = _Scorer(results, lambda r: _complete(r, spec, by_stem[r["stem"]], out) if r.get("stem") in by_stem else [])
    return _ModelFiles(items, results, scorer)


def _model_part(
    run: ChildRun, spec: ModelSpec, rows: list[dict[str, Any]], *, exe: str, device: str, timeout: float
) -> dict[str, Any]:
    """A model's rows with the facts of the process that made them, or the error it failed with."""
    report = report_from(run, spec.folder, exe)
    if run.timed_out or not report.ok:
        err = child_failure(run, folder=spec.folder, python=exe, device=device, timeout=timeout, what="evaluation")
        err.hint = _eval_hint(err.hint)
        return {"rows": rows, "error": err.to_dict(), "details": debug_details(run)}
    try:
        judge_loading(report, spec.folder)
    except ConvertError as e:
        return {"rows": rows, "error": e.to_dict(), "details": ""}
    raw = report.raw
    return {
        "rows": rows,
        "child": {
            "device": report.device,
            "dtype": report.dtype,
            "cuda_max_allocated_bytes": (raw.get("cuda_memory") or {}).get("max_allocated_bytes"),
            "warnings": report.warnings,
        },
    }


def _run_model(
    spec: ModelSpec,
    share: list[Sample],
    *,
    need: dict[str, tuple[bool, bool]] | None = None,
    out: Path,
    dist: Dist,
    exe: str,
    device: str,
    dtype: str | None,
    max_new_tokens: int,
    overlays: bool,
    image_timeout: float,
    on_stage: Callable[[str], None],
) -> dict[str, Any]:
    """This rank's share of one model's images in one child; returns its rows and facts (or its error).
    ``need``: stem -> (free answer wanted, forced mask wanted); default: the free answer alone."""
    if not share:
        return {"rows": [], "child": None}
    files = _model_files(spec, share, need, out, dist, overlays)
    check_fits(spec.folder, device, what="evaluation")
    timeout = image_timeout * (len(share) + 1)
    args = {
        "mode": "eval",
        "folder": str(spec.folder),
        "dtype": dtype,
        "max_new_tokens": int(max_new_tokens),
        "items": str(files.items),
        "results": str(files.results),
    }
    run = run_scoring_child(
        args, [files.scorer], dist=dist, exe=exe, device=device, timeout=timeout, label=spec.name, on_stage=on_stage
    )
    rows = files.scorer.finish()
    return _model_part(run, spec, rows, exe=exe, device=device, timeout=timeout)


def _run_swapped(
    group: list[ModelSpec],
    shares: dict[str, list[Sample]],
    needs: dict[str, dict[str, tuple[bool, bool]]],
    *,
    out: Path,
    dist: Dist,
    exe: str,
    device: str,
    dtype: str | None,
    max_new_tokens: int,
    overlays: bool,
    image_timeout: float,
    on_stage: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """This rank's shares of several adapters on one base in ONE child (``adapter_swap.py``): the base
    loaded once, each adapter merged, evaluated and taken off again. Returns each model's part as
    ``_run_model`` would (its own rows from its own results file; its error from its own report in the
    child's words); a model the child did not reach (a crash or a base it could not restore) has no
    part, and is then evaluated in a process of its own."""
    found = resolve_adapter(group[0].folder)
    assert found is not None  # plan_swaps grouped adapter folders only
    files = {spec.name: _model_files(spec, shares[spec.name], needs[spec.name], out, dist, overlays) for spec in group}
    reports = {spec.name: out / WORK / f"{spec.name}.rank{dist.rank}.adapter.json" for spec in group}
    for path in reports.values():
        path.unlink(missing_ok=True)
    check_fits(group[0].folder, device, what="evaluation")
    timeout = image_timeout * (sum(len(shares[s.name]) + 1 for s in group))
    adapters = []
    for spec in group:
        own = resolve_adapter(spec.folder)
        assert own is not None
        adapters.append(
            {
                "name": spec.name,
                "adapter": str(own.adapter),
                "adapter_dtype": own.dtype,
                "items": str(files[spec.name].items),
                "results": str(files[spec.name].results),
                "report": str(reports[spec.name]),
            }
        )
    label = f"{len(group)} adapters on one base"
    on_stage(f"{label}: {', '.join(s.name for s in group)} in one model process (the base loaded once)")
    args = {
        "mode": "eval_adapters",
        "folder": str(found.base),
        "dtype": dtype,
        "max_new_tokens": int(max_new_tokens),
        "adapters": adapters,
    }
    scorers = [f.scorer for f in files.values()]
    run = run_scoring_child(
        args, scorers, dist=dist, exe=exe, device=device, timeout=timeout, label=label, on_stage=on_stage
    )
    parts: dict[str, dict[str, Any]] = {}
    crashed = run.timed_out or not (run.result or {}).get("ok")
    for spec in group:
        rows = files[spec.name].scorer.finish()
        own_report = _read_json(reports[spec.name])
        if own_report is not None:
            own_run = ChildRun(
                result=own_report,
                returncode=0 if own_report.get("ok") else 1,
                stderr_tail=run.stderr_tail,
                last_stage=str(own_report.get("stage") or ""),
                seconds=float((own_report.get("timings") or {}).get("total") or 0.0),
            )
            parts[spec.name] = _model_part(own_run, spec, rows, exe=exe, device=device, timeout=timeout)
            parts[spec.name]["base_loads"] = {"kept_bytes": int(own_report.get("kept_bytes") or 0)}
        elif crashed:  # the adapter the child was on (or the base's load): the child's own failure
            parts[spec.name] = _model_part(run, spec, rows, exe=exe, device=device, timeout=timeout)
            break
        else:  # not reached (the base could not be restored): a process of its own
            break
    return parts


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _eval_hint(hint: str | None) -> str | None:
    """The round trip's hints, said for eval (its commands and options, not verify's)."""
    if not hint:
        return hint
    hint = re.sub(r"`sa2va-convert verify[^`]*`", "`sa2va-convert eval ... --device cuda`", hint)
    hint = re.sub(r"; --no-roundtrip checks the files only|, or convert with\s+--no-verify", "", hint)
    hint = hint.replace("--timeout", "--timeout (seconds per image)")
    return hint + "; `sa2va-convert verify FOLDER` checks the folder" if "--debug" in hint else hint


_PROGRESS = re.compile(r"^evaluating image (\d+)/(\d+)$")


def run_scoring_child(
    args: dict[str, Any],
    scorers: Sequence[_Scorer],
    *,
    dist: Dist,
    exe: str,
    device: str,
    timeout: float,
    label: str,
    on_stage: Callable[[str], None],
) -> ChildRun:
    """One model process for ``args`` (image, adapter and video eval alike), on this rank's own GPU (its
    ``device`` filled in here), with ``scorers`` scoring the results files as the child appends to them."""
    with dist.own_gpu(device) as child_device:
        for scorer in scorers:
            scorer.start()
        try:
            return run_child(
                {**args, "device": child_device}, python=exe, timeout=timeout, on_stage=_throttled(label, on_stage)
            )
        finally:
            for scorer in scorers:
                scorer.stop()


def _throttled(name: str, on_stage: Callable[[str], None]) -> Callable[[str], None]:
    """The child's stages, prefixed with the model; per-image ones only every 10% (CI logs stay short)."""

    def say(msg: str) -> None:
        m = _PROGRESS.match(msg)
        if m:
            n, total = int(m.group(1)), int(m.group(2))
            if n != 1 and n != total and n % max(1, total // 10):
                return
        if msg != "done":
            on_stage(f"{name}: {msg}")

    return say


def _raise_from(d: dict[str, Any], details: str = "") -> None:
    """Raise the error a rank reported (as a dict: it crossed process boundaries), same class and code;
    ``details`` (the model process's traceback) is shown by ``--debug``."""
    from ..errors import VerifyEnvironmentError, VerifyError

    cls = {e.kind: e for e in (VerifyError, VerifyEnvironmentError, InputError, OutputError, UsageError)}.get(
        d.get("kind", ""), VerifyError
    )
    err = cls(d["message"], path=d.get("path"), hint=d.get("hint"))
    err.details = details
    raise err


def require_modules(needed: tuple[tuple[str, str], ...], what: str) -> None:
    """Each (module, package) importable, or one line naming the package and the extra, before any work."""
    for module, package in needed:
        if importlib.util.find_spec(module) is None:
            raise UsageError(
                f"{what} {package}, which is not installed",
                hint=f"pip install 'sa2va-convert[eval]' (or pip install {package})",
            )


def check_baseline(baseline: str | None, specs: list[ModelSpec]) -> None:
    """A misspelt --baseline is a usage error before any model loads (image and video eval)."""
    if baseline is not None and baseline not in {s.name for s in specs}:
        raise UsageError(
            f"--baseline {baseline!r} is none of the models",
            hint="name one of: " + ", ".join(s.name for s in specs),
        )


def evaluate(
    models: list[str | os.PathLike],
    data: str | os.PathLike,
    *,
    out: str | os.PathLike = "eval_report",
    prompt: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    python: str | os.PathLike | None = None,
    limit: int | None = None,
    overlays: bool = False,
    resume: bool = False,
    force: bool = False,
    max_new_tokens: int = 32,
    image_timeout: float = DEFAULT_IMAGE_TIMEOUT,
    baseline: str | None = None,
    empty_gt: str = "score",
    fail_under: dict[str, float] | None = None,
    require_better: bool = False,
    fail_above: dict[str, float] | None = None,
    force_seg: bool = False,
    names: list[str] | None = None,
    mask_threshold: float | None = None,
    ignore_index: int | None = None,
    images: str | os.PathLike | None = None,
    prompt_map: str | os.PathLike | None = None,
    share_base: bool = True,
    on_stage: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate every model on ``data`` and write the report into ``out``.

    ``share_base`` (default): adapter folders on one base are evaluated in one model process that loads
    the base once (``adapter_swap.py``); False gives each its own process, as a merged folder gets.

    Raises InputError (exit 3) for bad data or a folder that is not a model, before any model
    loads; VerifyError/VerifyEnvironmentError (7/9) when a model cannot run; EvalFailuresError
    (exit 10, with ``.report``) after writing the report when some images failed.
    """
    started = time.perf_counter()
    say = on_stage or (lambda _m: None)
    dist = Dist.from_env()
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", hint="use --dtype bf16, fp16 or fp32 (default: the folder's)")
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(
            "eval draws report.png with matplotlib, which is not installed",
            hint="pip install 'sa2va-convert[eval]' (or pip install matplotlib)",
        )
    if empty_gt not in EMPTY_GT_RULES:
        raise UsageError(f"unknown empty-ground-truth rule {empty_gt!r}", hint="use --empty-gt score or skip")
    # found now, not after every model ran: every saved mask is scored with both (clDice, boundary F, HD95)
    require_modules(
        (("scipy", "scipy"), ("skimage", "scikit-image")),
        "eval scores the masks' shape (clDice, boundary F, HD95) with",
    )
    specs = resolve_models(list(models), names)
    if force_seg and any(s.name.endswith(FORCED_SUFFIX) for s in specs):
        clash = next(s for s in specs if s.name.endswith(FORCED_SUFFIX))
        raise UsageError(
            f"model {clash.name!r} ends with {FORCED_SUFFIX}, which --force-seg uses for forced masks",
            path=clash.folder,
            hint="give it another --name",
        )
    check_baseline(baseline, specs)
    gate = _gate_spec(fail_under, require_better, len(specs), fail_above)
    say(f"checking {data}")
    rule = MaskRule(mask_threshold, ignore_index)
    out = Path(out).resolve()
    samples = load_dataset(
        data, prompt, limit=limit, rule=rule, images=images, prompt_map=prompt_map, truth_dir=out / TRUTH
    )
    exe = resolve_python(python)
    device = check_device(device)
    _check_out(out, resume=resume, force=force, rule=rule)
    dist.init(image_timeout * (len(samples) + 1) * len(specs))
    try:
        if dist.rank == 0:
            _clean_out(out, resume=resume, force=force, rule=rule)
            write_truth(samples)  # COCO: the decoded masks, into OUT/truth/ (the same ones again on --resume)
        dist.broadcast(None)  # a barrier: nobody writes before rank 0 has cleaned
        (out / WORK).mkdir(parents=True, exist_ok=True)
        return _evaluate(
            specs,
            samples,
            out=out,
            data=str(data),
            dist=dist,
            exe=exe,
            device=device,
            dtype=dtype,
            max_new_tokens=max_new_tokens,
            overlays=overlays,
            resume=resume,
            image_timeout=image_timeout,
            baseline=baseline or specs[0].name,
            empty_gt=empty_gt,
            force_seg=force_seg,
            gate=gate,
            say=say,
            started=started,
            share_base=share_base,
        )
    finally:
        dist.close()


def _evaluate(
    specs: list[ModelSpec],
    samples: list[Sample],
    *,
    out: Path,
    data: str,
    dist: Dist,
    exe: str,
    device: str,
    dtype: str | None,
    max_new_tokens: int,
    overlays: bool,
    resume: bool,
    image_timeout: float,
    baseline: str,
    empty_gt: str,
    gate: dict[str, Any] | None,
    say: Callable[[str], None],
    started: float,
    force_seg: bool = False,
    share_base: bool = True,
) -> EvalReport:
    done = _finished_rows(out, specs, samples, force_seg) if resume else {}
    # --force-seg added on --resume: where a kept free answer has [SEG], its mask is the forced one
    reused = _reuse_free_masks(out, specs, done) if force_seg and dist.rank == 0 else {}
    done.update(reused)
    # every rank must agree on what is left: rank 0's view of the finished rows decides
    done_keys = dist.broadcast(sorted(done)) if dist.world > 1 else sorted(done)
    done_set = {tuple(k) for k in done_keys}
    # report order: every model's free rows, then (--force-seg) every model's forced rows
    names = [s.name for s in specs] + ([forced_name(s.name) for s in specs] if force_seg else [])
    rows_by_model: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for key, row in done.items():
        rows_by_model[key[0]].append(row)
    facts: dict[str, dict[str, Any]] = {}
    evaluated = 0
    # per model and image: is the free answer still to do, and (--force-seg) the forced mask?
    needs = {
        spec.name: {
            s.stem: (
                (spec.name, s.stem) not in done_set,
                force_seg and (forced_name(spec.name), s.stem) not in done_set,
            )
            for s in samples
        }
        for spec in specs
    }
    todos = {spec.name: [s for s in samples if any(needs[spec.name][s.stem])] for spec in specs}
    shares = {name: todo[dist.rank :: dist.world] for name, todo in todos.items()}
    # adapters on one base: one model process each group, the base loaded once (adapter_swap.py)
    swaps = plan_swaps([s for s in specs if shares[s.name]], dtype) if share_base else SwapPlan()
    swapped: dict[str, dict[str, Any]] = {}
    swap_notes = list(swaps.notes)
    for spec in specs:
        need, todo, share = needs[spec.name], todos[spec.name], shares[spec.name]
        if todo:
            say(
                f"{spec.name}: {len(todo)} image(s)"
                + (f" over {dist.world} ranks" if dist.world > 1 else "")
                + (f" ({len(samples) - len(todo)} done earlier)" if len(todo) < len(samples) else "")
            )
        group = swaps.group_of(spec.name)
        if group is not None and group[0].name == spec.name:
            try:
                swapped = _run_swapped(
                    group,
                    shares,
                    needs,
                    out=out,
                    dist=dist,
                    exe=exe,
                    device=device,
                    dtype=dtype,
                    max_new_tokens=max_new_tokens,
                    overlays=overlays,
                    image_timeout=image_timeout,
                    on_stage=say,
                )
            except ConvertError as e:  # e.g. not enough RAM: reported for the group's first model, as alone
                e.hint = _eval_hint(e.hint)
                swapped = {spec.name: {"rows": [], "error": e.to_dict(), "details": ""}}
            loaded_for = [n for n, p in swapped.items() if p.get("base_loads")]
            if loaded_for:
                kept = max(swapped[n]["base_loads"]["kept_bytes"] for n in loaded_for)
                swap_notes.append(
                    f"base loaded once for {len(loaded_for)} adapters ({', '.join(loaded_for)}): one model process "
                    "merged each adapter, evaluated it and restored the base exactly from CPU copies of the "
                    f"tensors the adapters change ({kept / 2**20:.1f} MiB)"
                    + (f" (on each of {dist.world} ranks)" if dist.world > 1 else "")
                )
            left = [m.name for m in group if m.name not in swapped]
            if left:
                swap_notes.append(f"evaluated one process each after the shared process stopped: {', '.join(left)}")
        try:
            part = (
                swapped.pop(spec.name)
                if spec.name in swapped
                else _run_model(
                    spec,
                    share,
                    need=need,
                    out=out,
                    dist=dist,
                    exe=exe,
                    device=device,
                    dtype=dtype,
                    max_new_tokens=max_new_tokens,
                    overlays=overlays,
                    image_timeout=image_timeout,
                    on_stage=say,
                )
            )
        except ConvertError as e:  # e.g. not enough RAM: the other ranks must hear of it too
            e.hint = _eval_hint(e.hint)
            part = {"rows": [], "error": e.to_dict(), "details": ""}
        parts = dist.gather(part)
        verdict = None
        if dist.rank == 0:
            for p in parts:
                for r in p["rows"]:
                    rows_by_model[r["model"]].append(r)
                evaluated += len(p["rows"])  # rows a model process made in this run (free and forced)
                if p.get("child"):
                    facts.setdefault(spec.name, {}).update({k: v for k, v in p["child"].items() if v is not None})
            order = {s.stem: i for i, s in enumerate(samples)}
            for n in (spec.name, forced_name(spec.name)):
                if n in rows_by_model:
                    rows_by_model[n].sort(key=lambda r: order[r["stem"]])
            write_metrics(out / METRICS, [r for n in names for r in rows_by_model[n]])
            errors = [p for p in parts if p.get("error")]
            verdict = errors[0] if errors else None
        verdict = dist.broadcast(verdict)
        if verdict is not None:
            err = verdict["error"]
            kept = len(rows_by_model[spec.name]) if dist.rank == 0 else 0
            if kept:
                say(
                    f"{spec.name}: the model process failed; the {kept} image(s) it finished are kept in {METRICS} "
                    "(--resume continues)"
                )
            _raise_from(err, verdict.get("details") or "")
    report = EvalReport(
        out=str(out),
        data=data,
        images=len(samples),
        world_size=dist.world,
        resumed=len(done) - len(reused),
        evaluated=evaluated,
        notes=swap_notes,
    )
    if dist.rank != 0:
        report.wall_seconds = time.perf_counter() - started
        return report
    values: dict[str, dict[str, dict[str, float | None]]] = {}
    by_name = {s.name: s for s in specs} | {forced_name(s.name): s for s in specs}
    for name in names:
        spec, rows = by_name[name], rows_by_model[name]
        summary = summarise(name, str(spec.folder), spec.iteration, rows, empty_gt)
        f = facts.get(spec.name, {})
        summary.device, summary.dtype = f.get("device"), f.get("dtype")
        summary.cuda_max_allocated_bytes = f.get("cuda_max_allocated_bytes")
        if name != spec.name:
            summary.forced_of = spec.name
            summary.n_forced = sum(1 for r in rows if r.get("forced") == "forced" and r["status"] != "failed")
        report.models.append(summary)
        values[name] = per_image(rows, empty_gt)
        report.failures += [
            {"model": name, "stem": r["stem"], "image": r["image"], "error": r.get("error", "")}
            for r in rows
            if r["status"] == "failed"
        ]
    free = [m for m in report.models if m.forced_of is None]
    best = best_model(free)  # a forced mask answers another question: never "best"
    report.best = best.model if best else None
    report.baseline = baseline
    report.empty_gt = empty_gt
    report.force_seg = force_seg
    pairs: list[tuple[str, str]] = []
    if len(specs) > 1:
        # free models against the baseline; forced ones against the baseline's forced masks: never mixed
        free_names = [s.name for s in specs]
        report.comparisons = compare_models(baseline, values, PAIRED_METRICS, models=free_names)
        pairs = [(baseline, n) for n in free_names if n != baseline]
        if force_seg:
            forced_names = [forced_name(n) for n in free_names]
            report.comparisons += compare_models(forced_name(baseline), values, PAIRED_METRICS, models=forced_names)
            pairs += [(forced_name(baseline), n) for n in forced_names if n != forced_name(baseline)]
        report.best_interval = _best_interval(report, values)
        report.cautions = _cautions(report)
    if gate is not None:
        report.gate = {**gate, "failed": _gate_failures(report, gate)}
        report.gate["passed"] = not report.gate["failed"]
    report.files = {
        "metrics": str(out / METRICS),
        "summary": str(out / SUMMARY),
        "plot": str(out / PLOT),
        "html": str(out / HTML),
        "predictions": str(out / "predictions"),
    }
    report.dice_over_iterations = iteration_intervals(report.models, values)
    if report.dice_over_iterations:
        report.files["iterations_plot"] = str(out / ITERATIONS_PLOT)
    if overlays:
        report.files["overlays"] = str(out / "overlays")
    if any(m.no_seg for m in free):
        report.notes.append(
            "answers without [SEG] are empty predictions (scored, never forced)"
            + ("; NAME[forced] scores the masks with [SEG] forced, compared only with each other" if force_seg else "")
        )
    if force_seg:
        forced_counts = ", ".join(f"{m.forced_of} {m.n_forced}" for m in report.models if m.forced_of)
        report.notes.append(
            f"--force-seg: images predicted again with [SEG] forced per model: {forced_counts}; on the others the "
            "free answer had [SEG] and its mask is the forced one"
        )
    report.notes.append(_empty_gt_note(report))
    rule = samples[0].rule.describe() if samples else ""
    if rule:
        report.notes.append(f"ground truth read with: {rule}")
    say("writing the report")
    if len(specs) > 1:
        report.files["paired"] = str(out / PAIRED)
        write_paired(out / PAIRED, pairs, values, PAIRED_METRICS)
    plot_report(out / PLOT, report.models, values, report.comparisons, report.baseline, empty_gt)
    if report.dice_over_iterations:
        plot_iterations(out / ITERATIONS_PLOT, report.dice_over_iterations, report.models, report.best, empty_gt)
    report.wall_seconds = time.perf_counter() - started
    write_html(out, report.to_dict(), rows_by_model, samples, values)  # before summary.json: that comes last
    write_summary(out / SUMMARY, report.to_dict())
    shutil.rmtree(out / WORK, ignore_errors=True)
    return report


def _reuse_free_masks(
    out: Path, specs: list[ModelSpec], done: dict[tuple[str, str], dict]
) -> dict[tuple[str, str], dict]:
    """The forced rows a resumed run needs no model for: a kept free answer with [SEG] (status ok)
    whose forced row is missing gets its free mask as the forced one, copied (under a temporary
    name, then renamed) to ``predictions/<model>/forced/``, with the free row's scores. Rank 0 alone."""
    made: dict[tuple[str, str], dict] = {}
    for spec in specs:
        forced = forced_name(spec.name)
        for (model, stem), row in done.items():
            if model != spec.name or row.get("status") != "ok" or (forced, stem) in done:
                continue
            target = _pred_path(out, spec.name, stem, forced=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            shutil.copyfile(row["prediction_file"], tmp)
            os.replace(tmp, target)
            made[(forced, stem)] = {**row, "model": forced, "forced": "reused", "prediction_file": str(target)}
    return made


def _best_interval(report: EvalReport, values: dict[str, dict[str, dict[str, float | None]]]) -> dict[str, Any] | None:
    """The best model's Dice lead with its interval: against the baseline, or, when the baseline
    itself is best, against the runner-up (a lead over nobody says nothing)."""
    if report.best is None:
        return None
    if report.best != report.baseline:
        c = next(c for c in report.comparisons if c.model == report.best and c.metric == "dice")
    else:
        runner_up = best_model([m for m in report.models if m.model != report.best and m.forced_of is None])
        if runner_up is None:
            return None
        _, r, b = paired_values(values[runner_up.model], values[report.best], "dice")
        c = compare(runner_up.model, report.best, "dice", r, b)
    return {
        "model": report.best,
        "against": c.baseline,
        "metric": "dice",
        "mean_difference": c.mean_difference,
        "ci95": c.ci95,
        "n": c.n,
        "covers_zero": c.covers_zero,
    }


def _empty_gt_note(report: EvalReport) -> str:
    """How many images the empty-ground-truth rule touched, said every time (even 0: the reader
    should not have to guess the rule)."""
    n_empty = max((m.n_empty_gt for m in report.models), default=0)
    n_all = max((m.n_images for m in report.models), default=0)
    head = f"empty ground truth: {n_empty} of {n_all} scored image(s); rule --empty-gt {report.empty_gt}"
    if not n_empty:
        return head + " (touched no image)"
    if report.empty_gt == "skip":
        return head + f": those {n_empty} are left out of every mean and comparison"
    left = ", ".join(f"{m.model} {m.n_empty_gt_empty_pred}" for m in report.models)
    return (
        head + f": an empty prediction there scores 1 (left empty per model: {left}); "
        "mean_dice_with_object leaves them out, as --empty-gt skip does"
    )


def _ci(ci: list[float] | None) -> str:
    return "none (no paired image)" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _cautions(report: EvalReport) -> list[str]:
    """What a reader of the table could get wrong: metrics naming different best models, and
    differences whose interval covers 0 (not shown to be more than noise on these images)."""
    out: list[str] = []
    lead = leaders([m for m in report.models if m.forced_of is None])
    if len(set(lead.values())) > 1:
        picks = ", ".join(f"{LEADER_METRICS[k]} picks {m}" for k, m in lead.items())
        out.append(f"the metrics disagree on the best model: {picks}")
    bi = report.best_interval
    if bi is not None and bi["against"] != report.baseline and bi["covers_zero"]:
        out.append(
            f"best: {bi['model']}'s Dice lead over the runner-up {bi['against']} has the interval {_ci(bi['ci95'])}, "
            "which covers 0: not shown to be better on these images"
        )
    covering: dict[tuple[str, str], list[str]] = {}
    for c in report.comparisons:
        if c.ci95 is None:
            out.append(
                f"{c.model} vs {c.baseline}: no image has a {c.metric} value for both, so there is no {c.metric} "
                "comparison" + (" (HD95 is undefined where one mask is empty)" if c.metric == "hd95" else "")
            )
        elif c.covers_zero:
            covering.setdefault((c.model, c.baseline), []).append(f"{c.metric} {_ci(c.ci95)}")
    for (model, base), said in covering.items():  # one line per pair of models, every metric on it
        out.append(
            f"{model} vs {base}: the difference's interval covers 0 for {', '.join(said)}: "
            "no difference shown on these images"
        )
    return out


def parse_fail_under(values: list[str] | tuple[str, ...], option: str = "--fail-under") -> dict[str, float]:
    """``["dice=0.80", ...]`` (the command line's form) -> ``{"dice": 0.8, ...}`` (for --fail-under
    and --fail-above alike; the names are checked by ``_gate_spec``)."""
    example = "hd95=10" if option == "--fail-above" else "dice=0.80"
    out: dict[str, float] = {}
    for v in values:
        name, sep, raw = v.partition("=")
        try:
            number = float(raw)
        except ValueError:
            number = float("nan")
        if not sep or number != number:
            raise UsageError(f"{option} {v!r} is not METRIC=NUMBER", hint=f"e.g. {option} {example}")
        out[name.strip()] = number
    return out


def _resolve_gate(
    option: str, given: dict[str, float] | None, metrics: tuple[str, ...], aliases: dict[str, str], example: str
) -> dict[str, float]:
    known = {*metrics, *aliases}
    resolved: dict[str, float] = {}
    for name, threshold in (given or {}).items():
        if name not in known:
            other = "--fail-above" if option == "--fail-under" else "--fail-under"
            wrong_way = name in ({*GATE_ABOVE_METRICS, *GATE_ABOVE_ALIASES} | {*GATE_METRICS, *GATE_ALIASES})
            raise UsageError(
                f"{option} names {'a metric it does not take' if wrong_way else 'an unknown metric'} {name!r}"
                + (f" ({other} takes it: lower HD95 is better)" if wrong_way else ""),
                hint="use one of " + ", ".join(sorted(known)) + f", e.g. {option} {example}",
            )
        resolved[aliases.get(name, name)] = float(threshold)
    return resolved


def _gate_spec(
    fail_under: dict[str, float] | None,
    require_better: bool,
    n_models: int,
    fail_above: dict[str, float] | None = None,
) -> dict[str, Any] | None:
    """The gate's conditions, checked before any model loads (a typo must not cost an evaluation).
    ``--fail-under`` takes the metrics where higher is better, ``--fail-above`` the one where lower
    is (HD95, a distance in pixels), so a threshold can never be read the wrong way round."""
    if not fail_under and not require_better and not fail_above:
        return None
    resolved = _resolve_gate("--fail-under", fail_under, GATE_METRICS, GATE_ALIASES, "dice=0.80")
    above = _resolve_gate("--fail-above", fail_above, GATE_ABOVE_METRICS, GATE_ABOVE_ALIASES, "hd95=10")
    if require_better and n_models < 2:
        raise UsageError(
            "--require-better needs a baseline and at least one model to compare with it",
            hint="pass the baseline folder and the fine-tune's, e.g. eval base/ finetune/ --require-better",
        )
    return {"fail_under": resolved, "fail_above": above, "require_better": require_better}


def _gate_failures(report: EvalReport, gate: dict[str, Any]) -> list[str]:
    """Every condition that does not hold, one line each. --fail-under judges the models being tested:
    every model but the baseline (the only model, when there is one)."""
    failed: list[str] = []
    free = [m for m in report.models if m.forced_of is None]  # the gate judges the answers, not forced masks
    judged = [m for m in free if m.model != report.baseline] or free
    for key, threshold in gate["fail_under"].items():
        for m in judged:
            value = getattr(m, key)
            if value is None or value < threshold:
                shown = "none (no image scored)" if value is None else f"{value:.4f}"
                failed.append(f"--fail-under {key}={threshold:g}: {m.model} has {key} {shown}")
    for key, threshold in gate.get("fail_above", {}).items():
        for m in judged:
            value = getattr(m, key)
            if value is None:
                failed.append(f"--fail-above {key}={threshold:g}: {m.model} has no {key} (no image with both masks)")
            elif value > threshold:
                failed.append(f"--fail-above {key}={threshold:g}: {m.model} has {key} {value:.4f}")
            elif m.n_hd95 < m.n_in_means:  # a mean over the images it did not miss would reward the misses
                failed.append(
                    f"--fail-above {key}={threshold:g}: {m.model} has {key} {value:.4f} over only {m.n_hd95} of "
                    f"{m.n_in_means} images (HD95 is undefined where one mask is empty)"
                )
    if gate["require_better"]:
        for c in report.comparisons:
            if c.metric == "dice" and c.model in {m.model for m in free} and not c.shown_better:
                diff = "-" if c.mean_difference is None else f"{c.mean_difference:+.4f}"
                failed.append(
                    f"--require-better: {c.model}'s Dice against {c.baseline} is {diff}, interval {_ci(c.ci95)}, "
                    "which does not lie above 0"
                )
    return failed


def check_gate(report: EvalReport) -> None:
    """Raise EvalGateError (exit 11) when a --fail-under / --require-better condition does not hold;
    the report is already written."""
    if report.gate and report.gate["failed"]:
        failed = report.gate["failed"]
        more = f" (and {len(failed) - 1} more condition(s), listed under gate in {SUMMARY})" if len(failed) > 1 else ""
        err = EvalGateError(f"gate failed: {failed[0]}{more}", path=report.out)
        err.report = report
        raise err


def check_failures(report: EvalReport) -> None:
    """Raise EvalFailuresError (exit 10) when some images failed; the report is already written."""
    if report.failures:
        first = report.failures[0]
        err = EvalFailuresError(
            f"{len(report.failures)} image(s) failed, e.g. {first['model']}/{first['stem']}: {first['error']}",
            path=first["image"],
            hint=f"see the failures in {Path(report.out) / SUMMARY}; fix or remove those images, "
            "then --resume to retry them",
        )
        err.report = report
        raise err


__all__ = [
    "evaluate",
    "check_failures",
    "check_gate",
    "parse_fail_under",
    "resolve_models",
    "EvalReport",
    "ModelSpec",
    "DEFINITIONS",
]
