#!/usr/bin/env python3
"""``sa2va-convert eval`` at real size on a GPU: images/s and peak GPU memory (issue 15).

    PYTHONPATH=src python3 bench/bench_eval.py --preset sa2va-4b --images 50 --work /tmp/be

Steps (one JSON line each on stdout; BENCHMARKS.md records the figures):

1. generate a real-shape base folder (``Sizes.real(preset)``: the published shapes, bf16,
   ``fill='fast'`` values, our remote code) and a training checkpoint (bare state dict and
   ``--lora-alpha``, as bench/gpu_roundtrip.py: the GPU machine has no mmengine), then convert it
   (``--merge-device cuda --no-verify``);
2. write ``--images`` pictures of mixed sizes (640x480 ... 1280x720, the red ellipse of the round
   trip's test picture at varying places) with an ellipse mask each as ground truth;
3. ``sa2va-convert eval OUT --data DATA --prompt object --device cuda --json`` and print the
   model's images/s (images / Σ predict_forward seconds), the wall time, the share of answers
   without [SEG] and ``torch.cuda.max_memory_allocated`` of the model process
   (``cuda_max_allocated_bytes``: weights included, measured after loading, over every image).

A real-shape model with synthetic weights does not segment: its answers are gibberish up to
``--max-new-tokens`` (default 32) and mostly lack ``[SEG]``, so the figure is the cost of loading
once plus ~N generated tokens per image, and the mask path (SAM2) runs only when ``[SEG]``
appears; the no-[SEG] rate is printed beside it so the figure is read for what it is. Dice is
meaningless here (the tests measure it, on a fine-tune that does segment).

``--metric-cost`` measures instead what scoring costs beside the model, on CPU, with the tiny
example (``make_tiny_example``: a fine-tune that does segment, so every image has two non-empty
masks and clDice, boundary F and HD95 run in full): convert it, write ``--images`` pictures (the
mixed sizes above), run ``eval --device cpu``, then time, per saved prediction, ``measure`` (what
``eval`` runs per image: read both masks, count, clDice, boundary F, HD95) and ``mask_counts`` (the
counts alone) over ``--repeats`` runs each (median), against the model's own seconds per image from
metrics.csv. It also times ``shape_scores`` on a 1280x720 frame filled edge to edge (the crop to
the masks' box saves nothing there: the worst case per pixel).

    PYTHONPATH=src OMP_NUM_THREADS=1 python3 bench/bench_eval.py --metric-cost --images 10 --work /tmp/bm

``--shape-overhead`` answers the question a user has about those scores: how much longer does
``eval`` take with them? It runs the same ``evaluate()`` on the tiny example with the shape scores
and with ``metrics.shape_scores`` stubbed out in this process (the baseline; eval has no such mode),
alternating the order, ``--pairs`` times, on the test suite's small images and on 640x480 ... 1280x720:

    PYTHONPATH=src OMP_NUM_THREADS=1 python3 bench/bench_eval.py --shape-overhead --images 10 --pairs 3 --work /tmp/bm

matplotlib is needed for report.png: on a machine without it (and without a registry), install
it here with ``pip install --target .evaldeps matplotlib`` for the GPU machine's Python version and
carry ``.evaldeps`` with ``PYTHONPATH=src:.evaldeps``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def step(name: str, argv: list[str], env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env={**os.environ, **(env or {})})
    out: dict = {"step": name, "rc": p.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    try:
        out["report"] = json.loads(p.stdout)
    except ValueError:
        out["stdout_tail"] = p.stdout[-2000:]
    if p.returncode:
        out["stderr_tail"] = p.stderr[-3000:]
    return out


def write_images(data: Path, n: int) -> None:
    """``n`` pictures of mixed sizes, each with its ellipse as the ground-truth mask."""
    import numpy as np
    from PIL import Image

    from sa2va_convert.testing.finetune import synthetic_picture

    sizes = [(640, 480), (800, 600), (1024, 768), (1280, 720), (720, 960)]
    (data / "images").mkdir(parents=True, exist_ok=True)
    (data / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        shift = (i * 37) % (w // 4) - w // 8
        synthetic_picture(w, h, shift).save(data / "images" / f"img{i:03d}.png")
        y, x = np.mgrid[0:h, 0:w]
        inside = ((x - (0.4 * w + shift)) / (0.2 * w)) ** 2 + ((y - 0.5 * h) / (0.25 * h)) ** 2 <= 1
        Image.fromarray(inside.astype(np.uint8) * 255, "L").save(data / "masks" / f"img{i:03d}.png")


def metric_cost(work: Path, n: int, repeats: int, max_new_tokens: int) -> int:
    """The per-image cost of scoring a saved prediction against the model's time for that image."""
    import csv
    import platform
    import statistics

    import numpy as np

    from sa2va_convert.api import ConvertOptions, convert
    from sa2va_convert.evaluate.metrics import mask_counts, measure, shape_scores
    from sa2va_convert.testing import make_tiny_example

    t0 = time.perf_counter()
    ex = make_tiny_example(work / "tiny")
    convert(ex.checkpoint_path, work / "hf", ConvertOptions(base=ex.base_dir, roundtrip=False))
    write_images(work / "data", n)
    print(json.dumps({"step": "generate+convert", "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
    cli = [sys.executable, "-m", "sa2va_convert.cli"]
    r = step("eval", [*cli, "eval", work / "hf", "--data", work / "data", "--prompt", "object", "--out",
                      work / "report", "--device", "cpu", "--max-new-tokens", str(max_new_tokens), "--json",
                      "--force"])
    if r["rc"]:
        print(json.dumps({k: v for k, v in r.items() if k != "report"}), flush=True)
        return r["rc"]
    with open(work / "report" / "metrics.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))

    def timed(fn, *a) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(*a)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    per = []
    for row in rows:
        pred, mask = Path(row["prediction_file"]), Path(row["mask"])
        full, counts_only = timed(measure, pred, mask), timed(mask_counts, pred, mask)
        per.append({"stem": row["stem"], "size": f"{row['width']}x{row['height']}", "pred_area": int(row["pred_area"]),
                    "model_s": float(row["seconds"]), "measure_ms": round(1e3 * full, 2),
                    "counts_only_ms": round(1e3 * counts_only, 2), "shape_ms": round(1e3 * (full - counts_only), 2),
                    "measure_share": round(full / float(row["seconds"]), 4)})
        print(json.dumps({"step": "image", **per[-1]}), flush=True)
    frame = np.zeros((720, 1280), bool)
    frame[:, :] = True
    other = frame.copy()
    other[100:620, 200:1100] = False  # a hole: an outline inside as well as the frame's edge
    worst = timed(shape_scores, frame, other)
    model = sum(p["model_s"] for p in per)
    scored = sum(p["measure_ms"] for p in per) / 1e3
    print(json.dumps({
        "step": "metric_cost", "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpu(s)",
        "images": len(per), "model_s_per_image_median": round(statistics.median(p["model_s"] for p in per), 4),
        "measure_ms_per_image_median": round(statistics.median(p["measure_ms"] for p in per), 2),
        "shape_ms_per_image_median": round(statistics.median(p["shape_ms"] for p in per), 2),
        "measure_share_of_model_time": round(scored / model, 4) if model else None,
        "shape_share_of_model_time": round(sum(p["shape_ms"] for p in per) / 1e3 / model, 4) if model else None,
        "worst_case_full_frame_1280x720_shape_ms": round(1e3 * worst, 2), "repeats": repeats,
        "eval_wall_s": r["wall_s"], "eval_model_s": round(model, 3),
    }), flush=True)
    return 0


def write_small_images(data: Path, n: int) -> None:
    """``n`` pictures of the test suite's sizes (56x72 ... 96x64), ellipse masks as ground truth."""
    import numpy as np
    from PIL import Image

    from sa2va_convert.testing.finetune import synthetic_picture

    sizes = [(80, 60), (56, 72), (96, 64), (64, 48), (72, 56)]
    (data / "images").mkdir(parents=True, exist_ok=True)
    (data / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        shift = (i * 3) % 9 - 4
        synthetic_picture(w, h, shift).save(data / "images" / f"img{i:03d}.png")
        y, x = np.mgrid[0:h, 0:w]
        inside = ((x - (0.4 * w + shift)) / (0.2 * w)) ** 2 + ((y - 0.5 * h) / (0.25 * h)) ** 2 <= 1
        Image.fromarray(inside.astype(np.uint8) * 255, "L").save(data / "masks" / f"img{i:03d}.png")


def shape_overhead(work: Path, n: int, pairs: int, max_new_tokens: int) -> int:
    """What clDice, boundary F and HD95 add to ``eval``'s wall clock, measured as a user meets it:
    the same ``evaluate()`` call (model process, scorer thread overlapping it, report) with the shape
    scores on, and with ``metrics.shape_scores`` replaced by a stub that computes nothing (this
    process only: the baseline of the bench, never a mode of eval), interleaved ``pairs`` times on
    two sets (the test suite's small images, and 640x480 ... 1280x720)."""
    import platform
    import statistics

    from sa2va_convert.api import ConvertOptions, convert
    from sa2va_convert.evaluate import metrics
    from sa2va_convert.evaluate import run as run_module
    from sa2va_convert.evaluate.run import evaluate
    from sa2va_convert.testing import make_tiny_example

    if not (work / "hf" / "config.json").is_file():
        ex = make_tiny_example(work / "tiny")
        convert(ex.checkpoint_path, work / "hf", ConvertOptions(base=ex.base_dir, roundtrip=False))
    sets = {"small 56x72..96x64": work / "data_small", "large 640x480..1280x720": work / "data"}
    if not (work / "data_small" / "images").is_dir():
        write_small_images(work / "data_small", n)
    if not (work / "data" / "images").is_dir():
        write_images(work / "data", n)
    real = metrics.shape_scores

    def stub(pred, truth, tolerance=metrics.BOUNDARY_TOLERANCE):
        return {"cldice": None, "boundary_f": None, "hd95": None}

    # the scoring left after the model process has exited (what overlapping did not hide): timed
    # around _Scorer.finish, which scores the lines the thread had not reached yet
    tails: list[float] = []
    real_finish = run_module._Scorer.finish

    def timed_finish(self):
        t = time.perf_counter()
        try:
            return real_finish(self)
        finally:
            tails.append(time.perf_counter() - t)

    run_module._Scorer.finish = timed_finish  # type: ignore[method-assign]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    summary = {}
    for label, data in sets.items():
        walls: dict[str, list[float]] = {"with": [], "without": []}
        tail: dict[str, list[float]] = {"with": [], "without": []}
        model_s: list[float] = []
        for i in range(pairs):
            for mode in (("with", "without") if i % 2 == 0 else ("without", "with")):
                metrics.shape_scores = real if mode == "with" else stub
                try:
                    rep = evaluate([work / "hf"], data, out=work / f"r_{mode}", prompt="the object", device="cpu",
                                   force=True, max_new_tokens=max_new_tokens)
                finally:
                    metrics.shape_scores = real
                walls[mode].append(rep.wall_seconds)
                tail[mode].append(tails[-1])
                if mode == "with":
                    model_s.append(rep.models[0].seconds)
                print(json.dumps({"step": "eval", "set": label, "mode": mode, "pair": i,
                                  "wall_s": round(rep.wall_seconds, 3), "model_s": rep.models[0].seconds,
                                  "scoring_tail_s": round(tails[-1], 4)}),
                      flush=True)
        w_with, w_without = statistics.median(walls["with"]), statistics.median(walls["without"])
        summary[label] = {
            "images": n, "wall_with_s_median": round(w_with, 3), "wall_without_s_median": round(w_without, 3),
            "overhead_s_per_image": round((w_with - w_without) / n, 4),
            "overhead_share_of_wall": round((w_with - w_without) / w_without, 4),
            "model_s_per_image": round(statistics.median(model_s) / n, 4),
            "overhead_share_of_model_time": round((w_with - w_without) / statistics.median(model_s), 3),
            "scoring_tail_with_s_median": round(statistics.median(tail["with"]), 4),
            "scoring_tail_without_s_median": round(statistics.median(tail["without"]), 4),
        }
    print(json.dumps({"step": "shape_overhead", "machine": f"{platform.processor() or platform.machine()}, "
                      f"{os.cpu_count()} cpu(s)", "pairs": pairs, "sets": summary}), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="sa2va-4b")
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--work", type=Path, default=Path("/tmp/be"))
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="test-size shapes (a CPU smoke run of this script)")
    ap.add_argument("--skip-generate", action="store_true", help="reuse WORK/out and WORK/data from an earlier run")
    ap.add_argument("--metric-cost", action="store_true",
                    help="time scoring (counts, clDice, boundary F, HD95) against the model per image (tiny, CPU)")
    ap.add_argument("--repeats", type=int, default=5, help="--metric-cost: timings per image (median)")
    ap.add_argument("--shape-overhead", action="store_true",
                    help="eval's wall clock with and without clDice/boundary F/HD95, interleaved (tiny, CPU)")
    ap.add_argument("--pairs", type=int, default=3, help="--shape-overhead: with/without pairs per image set")
    args = ap.parse_args()
    if args.shape_overhead:
        return shape_overhead(args.work, args.images, args.pairs, min(args.max_new_tokens, 16))
    if args.metric_cost:
        return metric_cost(args.work, args.images, args.repeats, min(args.max_new_tokens, 16))
    work, out, data = args.work, args.work / "out", args.work / "data"
    cli = [sys.executable, "-m", "sa2va_convert.cli"]

    if not args.skip_generate:
        from sa2va_convert.testing.fixtures import write_base_folder, write_training_checkpoint
        from sa2va_convert.testing.layouts import Sizes

        t0 = time.perf_counter()
        sizes = Sizes.tiny() if args.tiny else Sizes.real(args.preset)
        base = write_base_folder(work / "base", args.preset, sizes, dtype="bf16", fill="fast")
        ck = write_training_checkpoint(work / "iter_100.pth", args.preset, sizes, fmt="state_dict", fill="fast")
        write_images(data, args.images)
        print(json.dumps({"step": "generate", "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
        r = step("convert", [*cli, ck.path, out, "--base", base, "--lora-alpha", str(ck.lora_alpha),
                             "--merge-device", "cuda" if args.device.startswith("cuda") else "cpu", "--no-verify",
                             "--json", "--force"])
        print(json.dumps({k: v for k, v in r.items() if k != "report"}), flush=True)
        if r["rc"]:
            return r["rc"]

    r = step("eval", [*cli, "eval", out, "--data", data, "--prompt", "object", "--out", work / "report",
                      "--device", args.device, "--max-new-tokens", str(args.max_new_tokens), "--json", "--force"])
    rep = r.get("report") or {}
    m = (rep.get("models") or [{}])[0]
    peak = m.get("cuda_max_allocated_bytes")
    print(json.dumps({
        "step": "eval", "rc": r["rc"], "preset": args.preset, "images": m.get("images"), "device": m.get("device"),
        "dtype": m.get("dtype"), "images_per_s": m.get("images_per_s"), "predict_seconds": m.get("seconds"),
        "wall_s": r["wall_s"], "peak_gpu_gib": round(peak / 2**30, 2) if peak else None,
        "no_seg_rate": m.get("no_seg_rate"), "max_new_tokens": args.max_new_tokens,
        "failures": len(rep.get("failures") or []), **({"stderr_tail": r["stderr_tail"]} if r["rc"] else {}),
    }), flush=True)
    return r["rc"]


if __name__ == "__main__":
    sys.exit(main())
