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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..errors import ConvertError, EvalFailuresError, EvalGateError, InputError, OutputError, UsageError
from ..read.adapter_folder import is_adapter_folder
from ..runner.failure import child_failure, debug_details
from ..runner.memory import check_fits
from ..runner.process import check_device, resolve_python, run_child
from ..runner.report import judge_loading, report_from
from .compare import Comparison, compare, compare_models
from .data import PLAIN, MaskRule, Sample, load_dataset, write_truth
from .defaults import DEFAULT_IMAGE_TIMEOUT
from .metrics import (
    EMPTY_GT_RULES,
    LEADER_METRICS,
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
    plot_report,
    read_metrics,
    write_metrics,
    write_paired,
    write_summary,
)

WORK = ".work"  # per-model, per-rank item lists and streamed results; removed when the run completes
#: how the ground truth was read (--mask-threshold, --ignore-index): --resume must not mix rules
RULE = "mask_rule.json"
#: a COCO file's truth masks, decoded from its polygons and RLE (never written into the user's data folder)
TRUTH = "truth"
OURS = (METRICS, SUMMARY, PLOT, PAIRED, RULE, "predictions", "overlays", TRUTH, WORK)
PAIRED_METRICS = ("dice", "iou")  # the per-image scores compared image by image with the baseline
#: the per-model numbers --fail-under may name (higher is better for each), and the short names it also takes
GATE_METRICS = ("mean_dice", "giou", "ciou", "mean_precision", "mean_recall", "mean_dice_with_object")
GATE_ALIASES = {"dice": "mean_dice", "iou": "giou", "precision": "mean_precision", "recall": "mean_recall"}
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


def _check_name(name: str) -> str:
    """A name becomes a folder (``predictions/<name>/``) and a CSV value: one plain path component."""
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip():
        raise UsageError(f"--name {name!r} cannot name a model", hint="use a plain name such as base or lr1e-5")
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
        if (p / "config.json").is_file() or is_adapter_folder(p):
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
            if c.is_dir() and (m := _ITER.match(c.name)) and ((c / "config.json").is_file() or is_adapter_folder(c))
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
    comparisons: list[Comparison] = field(default_factory=list)
    #: what the numbers do not show: metrics that disagree on the best model, intervals that cover 0
    cautions: list[str] = field(default_factory=list)
    #: the conditions of --fail-under / --require-better and which failed (None when none was set)
    gate: dict[str, Any] | None = None
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
            "comparisons": [c.to_dict() for c in self.comparisons],
            "cautions": self.cautions,
            "gate": self.gate,
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
    "no_seg_rate": "share of answers without [SEG]: an empty prediction, scored as such, never forced",
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
    "comparisons": "per metric, each model against the baseline over the images both scored: per-image differences "
    "(model - baseline, in paired.csv), wins/ties/losses (higher/equal/lower per image), their mean with a 95 % "
    "percentile bootstrap interval (resamples of the images with replacement, numpy.random.default_rng(seed)) "
    "and a two-sided Wilcoxon signed-rank p-value (null, with p_value_note, where the data cannot support one)",
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
    for n in (SUMMARY, PLOT, PAIRED):
        with contextlib.suppress(FileNotFoundError):
            (out / n).unlink()
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


def _finished_rows(out: Path, specs: list[ModelSpec], samples: list[Sample]) -> dict[tuple[str, str], dict]:
    """(model, stem) -> row already scored by an earlier run (metrics.csv, then the streamed results
    of an interrupted one) whose prediction PNG is still there; failed images are tried again."""
    by_stem = {s.stem: s for s in samples}
    names = {s.name for s in specs}
    done: dict[tuple[str, str], dict] = {}
    rows: list[dict[str, Any]] = read_metrics(out / METRICS) if (out / METRICS).is_file() else []
    for spec in specs:
        for path in _rank_results(out / WORK, spec.name):
            for r in _read_jsonl(path):
                if r.get("stem") in by_stem:
                    rows.append(_complete(r, spec, by_stem[r["stem"]], out))
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
        ):
            done[(model, stem)] = r
    return done


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


def _pred_path(out: Path, model: str, stem: str) -> Path:
    return out / "predictions" / model / f"{stem}.png"


def _complete(row: dict[str, Any], spec: ModelSpec, sample: Sample, out: Path) -> dict[str, Any]:
    """A child's result line with what the child does not repeat (model, paths, prompt answer) and
    the pixel counts of its saved prediction against the ground truth, which only this process makes."""
    r = dict(row)
    r.update(
        model=spec.name,
        iteration=spec.iteration,
        stem=sample.stem,
        image=str(sample.image),
        mask=str(sample.mask),
        prompt=sample.prompt,
        answer=row.get("prediction", row.get("answer", "")),
    )
    if r.get("status") == "ok":
        try:
            r.update(measure(_pred_path(out, spec.name, sample.stem), sample.mask, sample.rule))
        except Exception as e:  # as in the child: this image is a recorded failure, the others are still scored
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            r.update(status="failed", error=f"{type(e).__name__}: {lines[0][:400] if lines else type(e).__name__}")
    if r.get("status") == "ok" and int(r.get("seg_count") or 0) == 0:
        r["status"] = "no_seg"  # an answer without [SEG]: an empty prediction, scored as such
    r["prediction_file"] = str(_pred_path(out, spec.name, sample.stem)) if r.get("status") != "failed" else ""
    return r


class _Scorer:
    """Scores the child's result lines as they are streamed, in a thread of this process, while the
    child predicts the next images: clDice's skeletons and the outline distances cost a fraction of a
    second per large image on one core, which would otherwise add up after the model has finished,
    while this process sits idle waiting for it. The child saves an image's PNG before its line, so a
    complete line's prediction is on disk; only complete lines are read (one cut by a crash is not)."""

    def __init__(self, results: Path, complete: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
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
            done = self._complete(row)
            if done is not None:
                self._rows.append(done)

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


def _run_model(
    spec: ModelSpec,
    share: list[Sample],
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
) -> dict[str, Any]:
    """This rank's share of one model's images in one child; returns its rows and facts (or its error)."""
    if not share:
        return {"rows": [], "child": None}
    work = out / WORK
    tag = f"{spec.name}.rank{dist.rank}"
    items, results = work / f"{tag}.items.jsonl", work / f"{tag}.results.jsonl"
    (out / "predictions" / spec.name).mkdir(parents=True, exist_ok=True)
    if overlays:
        (out / "overlays" / spec.name).mkdir(parents=True, exist_ok=True)
    lines = []
    for s in share:
        item = {
            **s.to_dict(),
            "pred_path": str(_pred_path(out, spec.name, s.stem)),
            "overlay_path": str(out / "overlays" / spec.name / f"{s.stem}.png") if overlays else None,
        }
        lines.append(json.dumps(item))
    items.write_text("\n".join(lines) + "\n", encoding="utf-8")
    earlier = _read_jsonl(results)  # an interrupted run's lines; a line cut by the crash is dropped here
    results.write_text("".join(json.dumps(r) + "\n" for r in earlier), encoding="utf-8")
    by_stem = {s.stem: s for s in share}
    scorer = _Scorer(
        results, lambda r: _complete(r, spec, by_stem[r["stem"]], out) if r.get("stem") in by_stem else None
    )
    check_fits(spec.folder, device, what="evaluation")
    timeout = image_timeout * (len(share) + 1)
    with dist.own_gpu(device) as child_device:
        args = {
            "mode": "eval",
            "folder": str(spec.folder),
            "device": child_device,
            "dtype": dtype,
            "max_new_tokens": int(max_new_tokens),
            "items": str(items),
            "results": str(results),
        }
        scorer.start()
        try:
            run = run_child(args, python=exe, timeout=timeout, on_stage=_throttled(spec.name, on_stage))
        finally:
            scorer.stop()
    report = report_from(run, spec.folder, exe)
    rows = scorer.finish()
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


def _eval_hint(hint: str | None) -> str | None:
    """The round trip's hints, said for eval (its commands and options, not verify's)."""
    if not hint:
        return hint
    hint = re.sub(r"`sa2va-convert verify[^`]*`", "`sa2va-convert eval ... --device cuda`", hint)
    hint = re.sub(r"; --no-roundtrip checks the files only|, or convert with\s+--no-verify", "", hint)
    hint = hint.replace("--timeout", "--timeout (seconds per image)")
    return hint + "; `sa2va-convert verify FOLDER` checks the folder" if "--debug" in hint else hint


_PROGRESS = re.compile(r"^evaluating image (\d+)/(\d+)$")


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
    names: list[str] | None = None,
    mask_threshold: float | None = None,
    ignore_index: int | None = None,
    images: str | os.PathLike | None = None,
    prompt_map: str | os.PathLike | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate every model on ``data`` and write the report into ``out``.

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
    for module, package in (("scipy", "scipy"), ("skimage", "scikit-image")):
        if importlib.util.find_spec(module) is None:
            raise UsageError(
                f"eval scores the masks' shape (clDice, boundary F, HD95) with {package}, which is not installed",
                hint=f"pip install 'sa2va-convert[eval]' (or pip install {package})",
            )
    specs = resolve_models(list(models), names)
    if baseline is not None and baseline not in {s.name for s in specs}:
        raise UsageError(
            f"--baseline {baseline!r} is none of the models",
            hint="name one of: " + ", ".join(s.name for s in specs),
        )
    gate = _gate_spec(fail_under, require_better, len(specs))
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
            gate=gate,
            say=say,
            started=started,
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
) -> EvalReport:
    done = _finished_rows(out, specs, samples) if resume else {}
    # every rank must agree on what is left: rank 0's view of the finished rows decides
    done_keys = dist.broadcast(sorted(done)) if dist.world > 1 else sorted(done)
    done_set = {tuple(k) for k in done_keys}
    rows_by_model: dict[str, list[dict[str, Any]]] = {s.name: [] for s in specs}
    for key, row in done.items():
        rows_by_model[key[0]].append(row)
    facts: dict[str, dict[str, Any]] = {}
    evaluated = 0
    for spec in specs:
        todo = [s for s in samples if (spec.name, s.stem) not in done_set]
        share = todo[dist.rank :: dist.world]
        if todo:
            say(
                f"{spec.name}: {len(todo)} image(s)"
                + (f" over {dist.world} ranks" if dist.world > 1 else "")
                + (f" ({len(samples) - len(todo)} done earlier)" if len(todo) < len(samples) else "")
            )
        try:
            part = _run_model(
                spec,
                share,
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
        except ConvertError as e:  # e.g. not enough RAM: the other ranks must hear of it too
            e.hint = _eval_hint(e.hint)
            part = {"rows": [], "error": e.to_dict(), "details": ""}
        parts = dist.gather(part)
        verdict = None
        if dist.rank == 0:
            for p in parts:
                rows_by_model[spec.name].extend(p["rows"])
                evaluated += len(p["rows"])
                if p.get("child"):
                    facts.setdefault(spec.name, {}).update({k: v for k, v in p["child"].items() if v is not None})
            order = {s.stem: i for i, s in enumerate(samples)}
            rows_by_model[spec.name].sort(key=lambda r: order[r["stem"]])
            write_metrics(out / METRICS, [r for s in specs for r in rows_by_model[s.name]])
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
        out=str(out), data=data, images=len(samples), world_size=dist.world, resumed=len(done), evaluated=evaluated
    )
    if dist.rank != 0:
        report.wall_seconds = time.perf_counter() - started
        return report
    dice: dict[str, list[float]] = {}
    values: dict[str, dict[str, dict[str, float]]] = {}
    for spec in specs:
        rows = rows_by_model[spec.name]
        summary = summarise(spec.name, str(spec.folder), spec.iteration, rows, empty_gt)
        f = facts.get(spec.name, {})
        summary.device, summary.dtype = f.get("device"), f.get("dtype")
        summary.cuda_max_allocated_bytes = f.get("cuda_max_allocated_bytes")
        report.models.append(summary)
        values[spec.name] = per_image(rows, empty_gt)
        dice[spec.name] = [v["dice"] for v in values[spec.name].values()]
        report.failures += [
            {"model": spec.name, "stem": r["stem"], "image": r["image"], "error": r.get("error", "")}
            for r in rows
            if r["status"] == "failed"
        ]
    best = best_model(report.models)
    report.best = best.model if best else None
    report.baseline = baseline
    report.empty_gt = empty_gt
    if len(specs) > 1:
        report.comparisons = compare_models(baseline, values, PAIRED_METRICS)
        report.best_interval = _best_interval(report, values)
        report.cautions = _cautions(report)
    if gate is not None:
        report.gate = {**gate, "failed": _gate_failures(report, gate)}
        report.gate["passed"] = not report.gate["failed"]
    report.files = {
        "metrics": str(out / METRICS),
        "summary": str(out / SUMMARY),
        "plot": str(out / PLOT),
        "predictions": str(out / "predictions"),
    }
    if overlays:
        report.files["overlays"] = str(out / "overlays")
    if any(m.no_seg for m in report.models):
        report.notes.append("answers without [SEG] are empty predictions (scored, never forced)")
    report.notes.append(_empty_gt_note(report))
    rule = samples[0].rule.describe() if samples else ""
    if rule:
        report.notes.append(f"ground truth read with: {rule}")
    say("writing the report")
    if len(specs) > 1:
        report.files["paired"] = str(out / PAIRED)
        write_paired(out / PAIRED, baseline, values, PAIRED_METRICS)
    plot_report(out / PLOT, report.models, dice, report.best)
    report.wall_seconds = time.perf_counter() - started
    write_summary(out / SUMMARY, report.to_dict())
    shutil.rmtree(out / WORK, ignore_errors=True)
    return report


def _best_interval(report: EvalReport, values: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any] | None:
    """The best model's Dice lead with its interval: against the baseline, or, when the baseline
    itself is best, against the runner-up (a lead over nobody says nothing)."""
    if report.best is None:
        return None
    if report.best != report.baseline:
        c = next(c for c in report.comparisons if c.model == report.best and c.metric == "dice")
    else:
        runner_up = best_model([m for m in report.models if m.model != report.best])
        if runner_up is None:
            return None
        b, r = values[report.best], values[runner_up.model]
        stems = [s for s in b if s in r]
        c = compare(runner_up.model, report.best, "dice", [r[s]["dice"] for s in stems], [b[s]["dice"] for s in stems])
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
    lead = leaders(report.models)
    if len(set(lead.values())) > 1:
        picks = ", ".join(f"{LEADER_METRICS[k]} picks {m}" for k, m in lead.items())
        out.append(f"the metrics disagree on the best model: {picks}")
    bi = report.best_interval
    if bi is not None and bi["against"] != report.baseline and bi["covers_zero"]:
        out.append(
            f"best: {bi['model']}'s Dice lead over the runner-up {bi['against']} has the interval {_ci(bi['ci95'])}, "
            "which covers 0: not shown to be better on these images"
        )
    for c in report.comparisons:
        if c.ci95 is None:
            out.append(f"{c.model} vs {c.baseline}: no image was scored for both, so there is no {c.metric} comparison")
        elif c.covers_zero:
            out.append(
                f"{c.model} vs {c.baseline}: the {c.metric} difference's interval {_ci(c.ci95)} covers 0: "
                "no difference shown on these images"
            )
    return out


def parse_fail_under(values: list[str] | tuple[str, ...]) -> dict[str, float]:
    """``["dice=0.80", ...]`` (the command line's form) -> ``{"mean_dice": 0.8, ...}``."""
    out: dict[str, float] = {}
    for v in values:
        name, sep, raw = v.partition("=")
        try:
            number = float(raw)
        except ValueError:
            number = float("nan")
        if not sep or number != number:
            raise UsageError(f"--fail-under {v!r} is not METRIC=NUMBER", hint="e.g. --fail-under dice=0.80")
        out[name.strip()] = number
    return out


def _gate_spec(fail_under: dict[str, float] | None, require_better: bool, n_models: int) -> dict[str, Any] | None:
    """The gate's conditions, checked before any model loads (a typo must not cost an evaluation)."""
    if not fail_under and not require_better:
        return None
    known = {*GATE_METRICS, *GATE_ALIASES}
    resolved: dict[str, float] = {}
    for name, threshold in (fail_under or {}).items():
        if name not in known:
            raise UsageError(
                f"--fail-under names an unknown metric {name!r}",
                hint="use one of " + ", ".join(sorted(known)) + ", e.g. --fail-under dice=0.80",
            )
        resolved[GATE_ALIASES.get(name, name)] = float(threshold)
    if require_better and n_models < 2:
        raise UsageError(
            "--require-better needs a baseline and at least one model to compare with it",
            hint="pass the baseline folder and the fine-tune's, e.g. eval base/ finetune/ --require-better",
        )
    return {"fail_under": resolved, "require_better": require_better}


def _gate_failures(report: EvalReport, gate: dict[str, Any]) -> list[str]:
    """Every condition that does not hold, one line each. --fail-under judges the models being tested:
    every model but the baseline (the only model, when there is one)."""
    failed: list[str] = []
    judged = [m for m in report.models if m.model != report.baseline] or report.models
    for key, threshold in gate["fail_under"].items():
        for m in judged:
            value = getattr(m, key)
            if value is None or value < threshold:
                shown = "none (no image scored)" if value is None else f"{value:.4f}"
                failed.append(f"--fail-under {key}={threshold:g}: {m.model} has {key} {shown}")
    if gate["require_better"]:
        for c in report.comparisons:
            if c.metric == "dice" and not c.above_zero:
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
