"""``sa2va-convert eval`` on video: J, F and J&F per expression, as Sa2VA's own benchmarks compute them.

The image path's design, for clips: per model one child process (``runner/child.py``, mode
``eval_video``) loads the folder once and runs its own ``predict_forward(video=frames)`` on every
expression, saving the first ``[SEG]``'s mask of every frame as
``predictions/<model>/<clip>/<expression>/<frame>.png`` (upstream's submission layout,
``sa2va_eval_ref_vos.py`` ``mask_save``) and streaming one line per expression. This process scores
the saved PNGs against the ground truth frame by frame (``video_metrics.py``) while the child works,
writes ``metrics.csv`` (a row per model x clip x expression), the paired comparison with the
baseline (``compare.py``, unchanged: the unit is the expression, as upstream's mean is), a
prediction JSON in upstream's format per model (``predictions/<model>/results.json``: video ->
expression -> COCO RLE per frame, what ``tools/eval/eval_mevis.py`` reads), a strip of frames per
clip (``strips/<clip>.png``: ground truth and prediction outlined), and ``summary.json``.

Under torchrun the *clips* are split over the ranks (every expression of a clip on one rank), and
rank 0 gathers the rows; ``--resume`` keeps every expression whose row and frame PNGs are there.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConvertError, OutputError, UsageError
from ..runner.failure import child_failure, debug_details
from ..runner.memory import check_fits
from ..runner.process import check_device, resolve_python
from ..runner.report import judge_loading, report_from
from .compare import Comparison, compare_models
from .report import write_atomic, write_summary
from .report_html import HTML
from .run import (
    DTYPES,
    Dist,
    ModelSpec,
    _eval_hint,
    _raise_from,
    _rank_results,
    _read_jsonl,
    _Scorer,
    check_baseline,
    require_modules,
    resolve_models,
    run_scoring_child,
)
from .video_data import VideoSample, load_video_dataset
from .video_metrics import BOUND_TH, ExpressionScore, percent
from .video_report_html import write_video_html

METRICS = "metrics.csv"
SUMMARY = "summary.json"
PAIRED = "paired.csv"
RESULTS = "results.json"
STRIPS = "strips"
WORK = ".work"
OURS = (METRICS, SUMMARY, PAIRED, HTML, "predictions", STRIPS, WORK)
PAIRED_METRICS = ("jf", "j", "f")
COLUMNS = (
    "model",
    "iteration",
    "clip",
    "expression",
    "status",
    "j",
    "f",
    "jf",
    "r",
    "n_frames",
    "empty_truth_frames",
    "empty_pred_frames",
    "seg_count",
    "n_masks",
    "height",
    "width",
    "seconds",
    "text",
    "prompt",
    "prediction_dir",
    "answer",
    "error",
)
STRIP_FRAMES = 6  # frames shown per clip in its strip, evenly spaced
STRIP_HEIGHT = 96
TRUTH_COLOUR = (40, 220, 60)  # green: the ground truth's outline in a strip
PRED_COLOUR = (255, 40, 255)  # magenta: the prediction's (red would vanish on red objects)

DEFINITIONS = {
    "j": "region similarity: per frame |P∩T| / |P∪T| (1 when both are empty), averaged over the clip's frames; "
    "P = the mask of the answer's first [SEG] (upstream's prediction_masks[0]), all-empty when the answer has none",
    "f": "boundary accuracy (DAVIS): per frame the F-measure of the one-pixel boundaries matched within "
    f"ceil({BOUND_TH} x frame diagonal) px; both boundaries empty 1, one empty 0; averaged over the clip's frames",
    "jf": "(J + F) / 2 per expression; a model's J, F, J&F are means over expressions (upstream prints them x 100)",
    "r": "ReVOS robustness, where mask_dict_foreground.json is given: per frame max(0, 1 - |P minus T| / "
    "|foreground|), averaged over frames",
    "frames_per_s": "frames / Σ seconds of predict_forward per expression (one device; model loading excluded)",
    "comparisons": "per metric (jf, j, f), each model against the baseline over the expressions both scored: "
    "differences, wins/ties/losses, 95 % paired bootstrap interval and Wilcoxon signed-rank p (as image eval); "
    "expressions of one clip are not independent, so read the interval as optimistic when clips hold many",
}


@dataclass
class VideoModelSummary:
    model: str
    folder: str
    iteration: int | None
    expressions: int = 0
    clips: int = 0
    j: float | None = None
    f: float | None = None
    jf: float | None = None
    r: float | None = None
    no_seg: int = 0
    failures: int = 0
    frames: int = 0
    frames_per_s: float | None = None
    per_clip: list[dict[str, Any]] = field(default_factory=list)
    device: str | None = None
    dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["upstream"] = {"J": percent(self.j), "F": percent(self.f), "J&F": percent(self.jf), "R": percent(self.r)}
        return d


@dataclass
class VideoEvalReport:
    out: str
    data: str
    expressions: int = 0
    clips: int = 0
    models: list[VideoModelSummary] = field(default_factory=list)
    best: str | None = None
    baseline: str | None = None
    comparisons: list[Comparison] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    strips: list[dict[str, Any]] = field(default_factory=list)
    gate: dict[str, Any] | None = None
    resumed: int = 0
    world_size: int = 1
    wall_seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "ok": not self.failures,
            "kind": "video",
            "out": self.out,
            "data": self.data,
            "expressions": self.expressions,
            "clips": self.clips,
            "models": [m.to_dict() for m in self.models],
            "best": self.best,
            "baseline": self.baseline,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "failures": self.failures,
            "strips": self.strips,
            "gate": self.gate,
            "resumed": self.resumed,
            "world_size": self.world_size,
            "wall_seconds": round(self.wall_seconds, 3),
            "files": self.files,
            "notes": self.notes,
            "definitions": DEFINITIONS,
        }


# ---------------------------------------------------------------- scoring


def pred_dir(out: Path, model: str, s: VideoSample) -> Path:
    return out / "predictions" / model / s.clip / s.expression


def read_pred(folder: Path, frame: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(folder / f"{frame.stem}.png") as im:
        return np.asarray(im) > 0


def score_expression(s: VideoSample, folder: Path) -> dict[str, Any]:
    """J, F (and R) of one expression from its saved frame PNGs, one frame in memory at a time."""
    acc = ExpressionScore()
    for i, frame in enumerate(s.frames):
        pred, truth = read_pred(folder, frame), s.truth(i)
        if pred.shape != truth.shape:
            raise ValueError(f"prediction of frame {frame.name} is {pred.shape}, its truth {truth.shape}")
        acc.add(truth, pred, s.foreground(i) if s.has_foreground else None)
    return acc.to_row()


def _complete(row: dict[str, Any], spec: ModelSpec, s: VideoSample, out: Path) -> dict[str, Any]:
    r = dict(row)
    folder = pred_dir(out, spec.name, s)
    r.update(
        model=spec.name,
        iteration=spec.iteration,
        clip=s.clip,
        expression=s.expression,
        text=s.text,
        prompt=s.prompt,
        answer=row.get("prediction", row.get("answer", "")),
    )
    if r.get("status") == "ok":
        try:
            r.update(score_expression(s, folder))
        except Exception as e:  # this expression is a recorded failure; the others are still scored
            r.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}")
    if r.get("status") == "ok" and int(r.get("seg_count") or 0) == 0:
        r["status"] = "no_seg"
    r["prediction_dir"] = str(folder) if r.get("status") != "failed" else ""
    return r


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else v  # full precision: --resume recomputes the means from these


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    write_atomic(path, buf.getvalue().encode("utf-8"))


def read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise OutputError(
                "metrics.csv is not a video report of this version", path=path, hint="pass --force to start over"
            )
        rows = []
        for r in reader:
            d: dict[str, Any] = dict(r)
            for k in ("j", "f", "jf", "r", "seconds"):
                d[k] = float(d[k]) if d[k] != "" else None
            for k in ("n_frames", "empty_truth_frames", "empty_pred_frames", "seg_count", "n_masks", "height", "width"):
                d[k] = int(d[k]) if d[k] != "" else 0
            d["iteration"] = int(d["iteration"]) if d["iteration"] != "" else None
            rows.append(d)
        return rows


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def summarise(spec: ModelSpec, rows: list[dict[str, Any]]) -> VideoModelSummary:
    scored = [r for r in rows if r["status"] in ("ok", "no_seg")]
    m = VideoModelSummary(spec.name, str(spec.folder), spec.iteration)
    m.expressions = len(scored)
    m.failures = sum(r["status"] == "failed" for r in rows)
    m.no_seg = sum(r["status"] == "no_seg" for r in rows)
    m.j, m.f = _mean([r["j"] for r in scored]), _mean([r["f"] for r in scored])
    m.jf = None if m.j is None or m.f is None else (m.j + m.f) / 2
    m.r = _mean([r["r"] for r in scored if r.get("r") is not None])
    m.frames = sum(int(r["n_frames"]) for r in scored)
    seconds = sum(float(r["seconds"] or 0) for r in scored)
    m.frames_per_s = m.frames / seconds if seconds > 0 else None
    clips: dict[str, list[dict[str, Any]]] = {}
    for r in scored:
        clips.setdefault(r["clip"], []).append(r)
    m.clips = len(clips)
    m.per_clip = [
        {
            "clip": c,
            "expressions": len(rs),
            "j": _mean([r["j"] for r in rs]),
            "f": _mean([r["f"] for r in rs]),
            "jf": _mean([r["jf"] for r in rs]),
        }
        for c, rs in clips.items()
    ]
    return m


# ---------------------------------------------------------------- outputs beside the scores


def write_upstream_json(path: Path, rows: list[dict[str, Any]], by_key: dict[str, VideoSample]) -> None:
    """Upstream's prediction format ({video: {expression: {"prediction_masks": [COCO RLE per frame], ...}}},
    as sa2va_eval_ref_vos.py writes results.json), encoded from the saved PNGs and written one
    expression at a time, so that upstream's own eval_mevis.py / eval_revos.py score our predictions."""
    from pycocotools import mask as coco_mask

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    by_clip: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] in ("ok", "no_seg"):
            by_clip.setdefault(r["clip"], []).append(r)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("{")
        for ci, (clip, rs) in enumerate(by_clip.items()):
            f.write(("," if ci else "") + json.dumps(clip) + ": {")
            for ei, r in enumerate(rs):
                s = by_key[f"{clip}/{r['expression']}"]
                rles = []
                for frame in s.frames:
                    rle = coco_mask.encode(
                        np.asfortranarray(read_pred(Path(r["prediction_dir"]), frame).astype(np.uint8))
                    )
                    rles.append({"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")})
                entry = {
                    "video_id": clip,
                    "exp_id": r["expression"],
                    "exp": s.prompt,
                    "text_prediction": r.get("answer", ""),
                    "frames": s.frame_names,
                    "prediction_masks": rles,
                }
                f.write(("," if ei else "") + json.dumps(r["expression"]) + ": " + json.dumps(entry))
            f.write("}")
        f.write("}\n")
    os.replace(tmp, path)


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _resized(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255, "L").resize(size, Image.Resampling.NEAREST)) > 0


def write_strip(path: Path, samples: list[VideoSample], rows: list[dict[str, Any]]) -> None:
    """One PNG per clip: a row per (expression, model) of up to STRIP_FRAMES evenly spaced frames, the
    ground truth outlined in green and the prediction in magenta, the row's J&F written at its left.
    A separate file so that report.html can embed it (``<img src="strips/<clip>.png">``)."""
    from PIL import Image, ImageDraw

    first = samples[0]
    n = len(first.frames)
    k = min(STRIP_FRAMES, n)
    picks = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
    scale = STRIP_HEIGHT / first.height
    cw = max(1, round(first.width * scale))
    label_w = 150
    lines = [(s, r) for s in samples for r in rows if r["clip"] == s.clip and r["expression"] == s.expression]
    canvas = Image.new("RGB", (label_w + cw * len(picks), STRIP_HEIGHT * max(len(lines), 1)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for li, (s, r) in enumerate(lines):
        y = li * STRIP_HEIGHT
        jf = "-" if r.get("jf") is None else f"{r['jf']:.3f}"
        draw.text((4, y + 4), f"{r['model']}\nexpr {s.expression}\nJ&F {jf}\n{s.text[:22]}", fill=(0, 0, 0))
        for k, i in enumerate(picks):
            size = (cw, STRIP_HEIGHT)
            try:
                with Image.open(s.frames[i]) as im:
                    rgb = np.asarray(im.convert("RGB").resize(size, Image.Resampling.BILINEAR)).copy()
                rgb[_outline(_resized(s.truth(i), size))] = TRUTH_COLOUR
                if r.get("prediction_dir"):
                    rgb[_outline(_resized(read_pred(Path(r["prediction_dir"]), s.frames[i]), size))] = PRED_COLOUR
            except (OSError, ValueError):  # a frame that failed to decode (its expression is a recorded failure)
                rgb = np.full((STRIP_HEIGHT, cw, 3), 128, dtype=np.uint8)
            canvas.paste(Image.fromarray(rgb), (label_w + k * cw, y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


# ---------------------------------------------------------------- running the models


def _run_model(
    spec: ModelSpec,
    share: list[VideoSample],
    *,
    out: Path,
    dist: Dist,
    exe: str,
    device: str,
    dtype: str | None,
    max_new_tokens: int,
    timeout_per_item: float,
    on_stage: Callable[[str], None],
) -> dict[str, Any]:
    if not share:
        return {"rows": [], "child": None}
    work = out / WORK
    tag = f"{spec.name}.rank{dist.rank}"
    items, results = work / f"{tag}.items.jsonl", work / f"{tag}.results.jsonl"
    items.write_text(
        "".join(json.dumps({**s.to_item(), "pred_dir": str(pred_dir(out, spec.name, s))}) + "\n" for s in share),
        encoding="utf-8",
    )
    earlier = _read_jsonl(results)
    results.write_text("".join(json.dumps(r) + "\n" for r in earlier), encoding="utf-8")
    by_key = {s.key: s for s in share}

    def complete(r: dict[str, Any]) -> list[dict[str, Any]]:
        row = _complete(r, spec, by_key[r["key"]], out) if r.get("key") in by_key else None
        return [row] if row is not None else []

    scorer = _Scorer(results, complete)
    check_fits(spec.folder, device, what="evaluation")
    timeout = timeout_per_item * (len(share) + 1)
    args = {
        "mode": "eval_video",
        "folder": str(spec.folder),
        "dtype": dtype,
        "max_new_tokens": int(max_new_tokens),
        "items": str(items),
        "results": str(results),
    }
    run = run_scoring_child(
        args, [scorer], dist=dist, exe=exe, device=device, timeout=timeout, label=spec.name, on_stage=on_stage
    )
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
    return {"rows": rows, "child": {"device": report.device, "dtype": report.dtype}}


def _finished(out: Path, specs: list[ModelSpec], samples: list[VideoSample]) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, clip/expression) -> row kept from an earlier run: scored, with every frame's PNG still there.
    An interrupted run's rows are in metrics.csv up to its last finished model, and in the streamed
    results of the model it was running (``.work/<model>.rank<N>.results.jsonl``), scored here again."""
    by_key = {s.key: s for s in samples}
    names = {s.name for s in specs}
    rows = read_rows(out / METRICS) if (out / METRICS).is_file() else []
    for spec in specs:
        for path in _rank_results(out / WORK, spec.name):
            for line in _read_jsonl(path):
                if line.get("key") in by_key and line.get("status") == "ok":
                    rows.append(_complete(line, spec, by_key[line["key"]], out))
    done: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = f"{r['clip']}/{r['expression']}"
        s = by_key.get(key)
        if r["model"] not in names or s is None or r["status"] not in ("ok", "no_seg"):
            continue
        folder = Path(r["prediction_dir"])
        if all((folder / f"{p.stem}.png").is_file() for p in s.frames):
            done[(r["model"], key)] = r
    return done


def _check_out(out: Path, *, resume: bool, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a folder", path=out, hint="choose another --out")
    if out.is_dir() and any((out / n).exists() for n in OURS) and not (resume or force):
        raise OutputError(
            "already holds an eval report",
            path=out,
            hint="pass --resume to continue it, --force to start over, or choose another --out",
        )


def _clean_out(out: Path, *, resume: bool, force: bool) -> None:
    if force and not resume:
        for n in OURS:
            p = out / n
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    for n in (SUMMARY, PAIRED):
        (out / n).unlink(missing_ok=True)
    (out / WORK).mkdir(parents=True, exist_ok=True)


def evaluate_video(
    models: list[str | os.PathLike],
    data: str | os.PathLike,
    *,
    out: str | os.PathLike = "eval_report",
    prompt: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    python: str | os.PathLike | None = None,
    limit: int | None = None,
    resume: bool = False,
    force: bool = False,
    max_new_tokens: int = 32,
    timeout_per_item: float = 600.0,
    baseline: str | None = None,
    names: list[str] | None = None,
    images: str | os.PathLike | None = None,
    mask_dict: str | os.PathLike | None = None,
    strips: bool = True,
    fail_under: dict[str, float] | None = None,
    require_better: bool = False,
    on_stage: Callable[[str], None] | None = None,
) -> VideoEvalReport:
    """Evaluate every model on the video set ``data`` and write the report into ``out``.

    Bad data or a folder that is not a model stops (InputError, exit 3) before any model loads."""
    started = time.perf_counter()
    say = on_stage or (lambda _m: None)
    dist = Dist.from_env()
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", hint="use --dtype bf16, fp16 or fp32 (default: the folder's)")
    require_modules((("scipy", "scipy"), ("pycocotools", "pycocotools")), "video eval needs")
    specs = resolve_models(list(models), names)
    check_baseline(baseline, specs)
    gate = gate_spec(fail_under, require_better, len(specs))
    say(f"checking {data}")
    samples = load_video_dataset(data, prompt, limit=limit, images=images, mask_dict=mask_dict)
    out = Path(out).resolve()
    exe = resolve_python(python)
    device = check_device(device)
    _check_out(out, resume=resume, force=force)
    dist.init(timeout_per_item * (len(samples) + 1) * len(specs))
    try:
        if dist.rank == 0:
            _clean_out(out, resume=resume, force=force)
        dist.broadcast(None)
        (out / WORK).mkdir(parents=True, exist_ok=True)
        return _evaluate(
            specs, samples, out=out, data=str(data), dist=dist, exe=exe, device=device, dtype=dtype,
            max_new_tokens=max_new_tokens, resume=resume, timeout_per_item=timeout_per_item,
            baseline=baseline or specs[0].name, strips=strips, gate=gate, say=say, started=started,
        )  # fmt: skip
    finally:
        dist.close()


def _evaluate(
    specs: list[ModelSpec],
    samples: list[VideoSample],
    *,
    out: Path,
    data: str,
    dist: Dist,
    exe: str,
    device: str,
    dtype: str | None,
    max_new_tokens: int,
    resume: bool,
    timeout_per_item: float,
    baseline: str,
    strips: bool,
    gate: dict[str, Any] | None,
    say: Callable[[str], None],
    started: float,
) -> VideoEvalReport:
    done = _finished(out, specs, samples) if resume else {}
    done_keys = dist.broadcast(sorted(done)) if dist.world > 1 else sorted(done)
    done_set = {tuple(k) for k in done_keys}
    rows_by_model: dict[str, list[dict[str, Any]]] = {s.name: [] for s in specs}
    for (model, _), row in done.items():
        rows_by_model[model].append(row)
    clips = list(dict.fromkeys(s.clip for s in samples))
    mine = set(clips[dist.rank :: dist.world])  # clips, not frames or expressions, per rank
    facts: dict[str, dict[str, Any]] = {}
    order = {s.key: i for i, s in enumerate(samples)}
    for spec in specs:
        todo = [s for s in samples if (spec.name, s.key) not in done_set]
        if todo:
            say(f"{spec.name}: {len(todo)} expression(s)" + (f" over {dist.world} ranks" if dist.world > 1 else ""))
        try:
            part = _run_model(
                spec, [s for s in todo if s.clip in mine], out=out, dist=dist, exe=exe, device=device, dtype=dtype,
                max_new_tokens=max_new_tokens, timeout_per_item=timeout_per_item, on_stage=say,
            )  # fmt: skip
        except ConvertError as e:
            e.hint = _eval_hint(e.hint)
            part = {"rows": [], "error": e.to_dict(), "details": ""}
        parts = dist.gather(part)
        verdict = None
        if dist.rank == 0:
            for p in parts:
                rows_by_model[spec.name].extend(p["rows"])
                if p.get("child"):
                    facts[spec.name] = p["child"]
            rows_by_model[spec.name].sort(key=lambda r: order[f"{r['clip']}/{r['expression']}"])
            write_rows(out / METRICS, [r for s in specs for r in rows_by_model[s.name]])
            errors = [p for p in parts if p.get("error")]
            verdict = errors[0] if errors else None
        verdict = dist.broadcast(verdict)
        if verdict is not None:
            _raise_from(verdict["error"], verdict.get("details") or "")
    report = VideoEvalReport(
        out=str(out), data=data, expressions=len(samples), clips=len(clips), world_size=dist.world, resumed=len(done)
    )
    if dist.rank != 0:
        report.wall_seconds = time.perf_counter() - started
        return report
    by_key = {s.key: s for s in samples}
    values: dict[str, dict[str, dict[str, float]]] = {}
    for spec in specs:
        rows = rows_by_model[spec.name]
        summary = summarise(spec, rows)
        summary.device, summary.dtype = facts.get(spec.name, {}).get("device"), facts.get(spec.name, {}).get("dtype")
        report.models.append(summary)
        values[spec.name] = {
            f"{r['clip']}/{r['expression']}": {k: float(r[k]) for k in PAIRED_METRICS}
            for r in rows
            if r["status"] in ("ok", "no_seg")
        }
        report.failures += [
            {"model": spec.name, "key": f"{r['clip']}/{r['expression']}", "error": r.get("error", "")}
            for r in rows
            if r["status"] == "failed"
        ]
        say(f"{spec.name}: writing {RESULTS} (upstream's prediction format)")
        write_upstream_json(out / "predictions" / spec.name / RESULTS, rows, by_key)
    ranked = [m for m in report.models if m.jf is not None]
    report.best = max(ranked, key=lambda m: m.jf or 0.0).model if ranked else None
    report.baseline = baseline
    if len(specs) > 1:
        report.comparisons = compare_models(baseline, values, PAIRED_METRICS)
        _write_paired(out / PAIRED, baseline, values)
        report.files["paired"] = str(out / PAIRED)
    if gate is not None:
        report.gate = {**gate, "failed": gate_failures(report, gate)}
        report.gate["passed"] = not report.gate["failed"]
    if strips:
        report.strips = _write_strips(out, samples, rows_by_model, say)
    report.files.update(metrics=str(out / METRICS), summary=str(out / SUMMARY), predictions=str(out / "predictions"))
    if strips:
        report.files["strips"] = str(out / STRIPS)
    if any(m.no_seg for m in report.models):
        report.notes.append("answers without [SEG] are all-empty predictions on every frame (scored, never forced)")
    report.notes.append(
        "each expression got every frame of its clip, in order, as upstream's evaluation feeds them; "
        "which frames the language model sees is the model's own choice"
    )
    report.files["html"] = str(out / HTML)
    report.wall_seconds = time.perf_counter() - started
    write_video_html(out, report.to_dict())  # before summary.json: that comes last
    write_summary(out / SUMMARY, report.to_dict())
    shutil.rmtree(out / WORK, ignore_errors=True)
    return report


def _write_paired(path: Path, baseline: str, values: dict[str, dict[str, dict[str, float]]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("baseline", "model", "metric", "key", "baseline_value", "model_value", "difference"))
    base = values.get(baseline, {})
    for model, per in values.items():
        if model == baseline:
            continue
        for metric in PAIRED_METRICS:
            for key, b in base.items():
                if key in per:
                    x, y = b[metric], per[key][metric]
                    w.writerow([baseline, model, metric, key, f"{x:.6f}", f"{y:.6f}", f"{y - x:.6f}"])
    write_atomic(path, buf.getvalue().encode("utf-8"))


def _write_strips(
    out: Path, samples: list[VideoSample], rows_by_model: dict[str, list[dict[str, Any]]], say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """strips/<clip>.png for every clip, listed worst first (lowest mean J&F over models and expressions)."""
    say("drawing a strip of frames per clip")
    all_rows = [r for rows in rows_by_model.values() for r in rows]
    listed = []
    for clip in dict.fromkeys(s.clip for s in samples):
        rows = [r for r in all_rows if r["clip"] == clip]
        scored = [r["jf"] for r in rows if r.get("jf") is not None]
        path = out / STRIPS / f"{clip}.png"
        write_strip(path, [s for s in samples if s.clip == clip], rows)
        listed.append({"clip": clip, "file": str(path), "mean_jf": _mean(scored)})
    listed.sort(key=lambda d: (d["mean_jf"] is not None, d["mean_jf"] or 0.0))
    return listed


#: what --fail-under may name on video (higher is better for each)
GATE_METRICS = ("j", "f", "jf", "r")


def gate_spec(fail_under: dict[str, float] | None, require_better: bool, n_models: int) -> dict[str, Any] | None:
    """The gate's conditions, checked before any model loads (a typo must not cost an evaluation)."""
    if not fail_under and not require_better:
        return None
    for name in fail_under or {}:
        if name not in GATE_METRICS:
            raise UsageError(
                f"--fail-under names {name!r}, which is not a video score",
                hint="on video use j, f, jf or r, e.g. --fail-under jf=0.6",
            )
    if require_better and n_models < 2:
        raise UsageError(
            "--require-better needs a baseline and at least one model to compare with it",
            hint="pass the baseline folder and the fine-tune's, e.g. eval base/ finetune/ --require-better",
        )
    return {"fail_under": dict(fail_under or {}), "require_better": require_better}


def gate_failures(report: VideoEvalReport, gate: dict[str, Any]) -> list[str]:
    """Every condition that does not hold, one line each; --fail-under judges every model but the baseline
    (the only model, when there is one), --require-better each model's J&F interval against the baseline."""
    failed: list[str] = []
    judged = [m for m in report.models if m.model != report.baseline] or report.models
    for key, threshold in gate["fail_under"].items():
        for m in judged:
            value = getattr(m, key)
            if value is None or value < threshold:
                shown = "none (nothing scored)" if value is None else f"{value:.4f}"
                failed.append(f"--fail-under {key}={threshold:g}: {m.model} has {key} {shown}")
    if gate["require_better"]:
        for c in report.comparisons:
            if c.metric == "jf" and not c.above_zero:
                diff = "-" if c.mean_difference is None else f"{c.mean_difference:+.4f}"
                ci = "none" if c.ci95 is None else f"[{c.ci95[0]:+.3f}, {c.ci95[1]:+.3f}]"
                failed.append(
                    f"--require-better: {c.model}'s J&F against {c.baseline} is {diff}, interval {ci}, "
                    "which does not lie above 0"
                )
    return failed


def check_video_gate(report: VideoEvalReport) -> None:
    """Exit 11 when a --fail-under / --require-better condition does not hold (the report is written)."""
    from ..errors import EvalGateError

    if report.gate and report.gate["failed"]:
        failed = report.gate["failed"]
        more = f" (and {len(failed) - 1} more, listed under gate in {SUMMARY})" if len(failed) > 1 else ""
        raise EvalGateError(f"gate failed: {failed[0]}{more}", path=report.out)


def check_video_failures(report: VideoEvalReport) -> None:
    """Exit 10 when some expressions failed (the report is written)."""
    from ..errors import EvalFailuresError

    if report.failures:
        first = report.failures[0]
        err = EvalFailuresError(
            f"{len(report.failures)} expression(s) failed, e.g. {first['model']}/{first['key']}: {first['error']}",
            path=report.out,
            hint=f"see the failures in {Path(report.out) / SUMMARY}; fix them, then --resume to retry",
        )
        raise err


__all__ = ["evaluate_video", "VideoEvalReport", "check_video_failures", "check_video_gate", "score_expression"]
