#!/usr/bin/env python3
"""What ``report.html`` (its thumbnails) and the paired ``report.png`` add to ``eval``'s report writing.

    PYTHONPATH=src OMP_NUM_THREADS=1 python3 bench/bench_report.py --images 200 --models 2 --work /tmp/br

No model runs here: the cost measured is the report's, after the predictions exist. ``--images``
pictures of the mixed sizes ``bench_eval.py`` uses (640x480 ... 1280x720) are written with an
ellipse mask as ground truth and, per model, a shifted ellipse as its saved prediction; the rows are
scored with ``measure`` (what ``eval`` runs per image: the baseline in the same run), then the report
files are written as ``run.py`` writes them and timed, each ``--repeats`` times (median):

- ``measure`` per image and model (read both masks, counts, clDice, boundary F, HD95): the baseline;
- ``write_metrics`` + ``write_paired`` + ``write_summary`` (the text files);
- ``plot_report`` (report.png, paired) and ``plot_iterations`` (dice_over_iterations.png, with the
  models named iter_N);
- ``write_html`` (the thumbnails of at most ``MAX_IMAGES`` rows, and the page).

One JSON object on stdout; BENCHMARKS.md records the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(640, 480), (800, 600), (1024, 768), (1280, 720), (720, 1280)]


def ellipse(w: int, h: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def write_data(work: Path, n: int, models: list[str]) -> tuple[list, dict]:
    from sa2va_convert.evaluate.data import Sample

    rng = np.random.default_rng(0)
    (work / "images").mkdir(parents=True)
    (work / "masks").mkdir()
    samples, preds = [], {m: {} for m in models}
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        img = (rng.random((h // 16, w // 16, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR).save(work / "images" / f"{i:04d}.jpg")
        cx, cy, rx, ry = w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7), w * 0.2, h * 0.15
        Image.fromarray(ellipse(w, h, cx, cy, rx, ry).astype(np.uint8) * 255, "L").save(work / "masks" / f"{i:04d}.png")
        stem = f"{i:04d}"
        samples.append(Sample(stem, work / "images" / f"{stem}.jpg", work / "masks" / f"{stem}.png", "<image>x"))
        for k, m in enumerate(models):
            (work / "predictions" / m).mkdir(parents=True, exist_ok=True)
            shift = rng.normal(0, 6 + 20 * k)
            pred = ellipse(w, h, cx + shift, cy - shift / 2, rx * (1 + 0.1 * k), ry)
            path = work / "predictions" / m / f"{stem}.png"
            Image.fromarray(pred.astype(np.uint8) * 255, "L").save(path)
            preds[m][stem] = path
    return samples, preds


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/br"))
    a = ap.parse_args()

    from sa2va_convert.evaluate.compare import compare_models
    from sa2va_convert.evaluate.metrics import measure, per_image, summarise
    from sa2va_convert.evaluate.report import write_metrics, write_paired, write_summary
    from sa2va_convert.evaluate.report_html import MAX_IMAGES, write_html
    from sa2va_convert.evaluate.report_plots import iteration_intervals, plot_iterations, plot_report
    from sa2va_convert.evaluate.run import EvalReport

    shutil.rmtree(a.work, ignore_errors=True)
    models = [f"iter_{1000 * (k + 1)}" for k in range(a.models)]
    samples, preds = write_data(a.work, a.images, models)
    out = a.work / "report"
    out.mkdir()

    rows: dict[str, list[dict]] = {m: [] for m in models}
    t0 = time.perf_counter()
    for m in models:
        for s in samples:
            got = measure(preds[m][s.stem], s.mask)
            rows[m].append({"model": m, "iteration": m.split("_")[1], "stem": s.stem, "status": "ok", **got,
                            "seg_count": 1, "seconds": 1.0, "n_masks": 1, "image": str(s.image), "mask": str(s.mask),
                            "prompt": s.prompt, "prediction_file": str(preds[m][s.stem]), "answer": "[SEG]"})
    measure_s = time.perf_counter() - t0
    n_pairs = len(models) * len(samples)

    summaries = [summarise(m, "", int(m.split("_")[1]), rows[m]) for m in models]
    values = {m: per_image(rows[m]) for m in models}
    comparisons = compare_models(models[0], values) if len(models) > 1 else []
    report = EvalReport(out=str(out), data=str(a.work), models=summaries, baseline=models[0], images=len(samples),
                        comparisons=comparisons)
    report.dice_over_iterations = iteration_intervals(summaries, values)

    def text_files() -> None:
        write_metrics(out / "metrics.csv", [r for m in models for r in rows[m]])
        write_paired(out / "paired.csv", models[0], values, ("dice", "iou"))
        write_summary(out / "summary.json", report.to_dict())

    def plots() -> None:
        plot_report(out / "report.png", summaries, values, comparisons, models[0], "score")
        if report.dice_over_iterations:
            plot_iterations(out / "dice_over_iterations.png", report.dice_over_iterations, summaries, None, "score")

    def page() -> None:
        write_html(out, report.to_dict(), rows, samples, values)

    result = {
        "images": len(samples),
        "models": len(models),
        "html_rows": min(len(samples), MAX_IMAGES),
        "measure_s_per_image_and_model": round(measure_s / n_pairs, 5),
        "text_files_s": round(median_s(text_files, a.repeats), 4),
        "plots_s": round(median_s(plots, a.repeats), 4),
        "html_s": round(median_s(page, a.repeats), 4),
        "repeats": a.repeats,
    }
    result["html_s_per_row"] = round(result["html_s"] / result["html_rows"], 5)
    result["html_bytes"] = (out / "report.html").stat().st_size
    result["thumbnail_bytes"] = sum(p.stat().st_size for p in (out / "report_images").iterdir())
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
