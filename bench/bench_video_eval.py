#!/usr/bin/env python3
"""Video eval on CPU with the tiny model: frames/s, and memory against clip length (issue 27).

    PYTHONPATH=src OMP_NUM_THREADS=1 python3 bench/bench_video_eval.py --work /tmp/bv --frames 8 32 128

Steps (one JSON line each on stdout; BENCHMARKS.md records the figures):

1. the tiny example (``make_tiny_example``: a fine-tune that answers ``[SEG]``), converted;
2. for each clip length N in ``--frames``: one clip of N frames of ``--size`` (default 640x480; the
   round trip's test picture with the ellipse moving) and its ground truth, as a frames folder;
3. ``sa2va-convert eval OUT --data DATA --device cpu --json`` per clip length, in a fresh process:
   frames/s (frames / Σ predict_forward seconds, from summary.json), the wall time, and the peak
   RSS of the larger of the model process and the scoring process (``ru_maxrss`` over the run's
   process tree, read by a wrapper process per run);
4. the scoring alone (``video_run.score_expression``: read each frame's PNG and truth, J, F) in a fresh
   process: seconds and peak RSS, which must not grow with N (one frame in memory at a time);
5. the baseline in the same run: a process that loads the same model and calls ``predict_forward``
   with the clip decoded *eagerly* into a list of PIL frames (what upstream's ``refVOS.py`` hands to
   the model), against the same call with the lazily decoding sequence the child uses
   (``runner.child.LazyFrames``); both report their peak RSS.

The tiny model's own per-frame memory is small (its SAM stand-in works at 64 px), so the difference
between the two is what holding the decoded frames costs; a real Sa2VA keeps a 1024x1024 grounding
tensor per frame inside ``predict_forward`` whatever we pass (upstream modeling_sa2va_chat.py), which
no caller can avoid.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

#: runs one command and prints the largest peak RSS among it and its descendants (the eval process and its
#: model process), so each clip length's figure is its own run's
WRAP = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r)"
)

PROBE = r"""
import json, resource, sys, time, torch
from transformers import AutoModel, AutoTokenizer
from sa2va_convert.runner.child import LazyFrames, cap_generation, cuda_on_cpu, load_rgb
folder, mode, frames = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
cap_generation(model, tok, 16)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
video = [load_rgb(p) for p in frames] if mode == "eager" else LazyFrames(frames)
t = time.perf_counter()
with torch.no_grad(), cuda_on_cpu():
    out = model.predict_forward(video=video, text="<image>\nPlease segment the red object.", tokenizer=tok)
s = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mode": mode, "frames": len(frames), "seconds": round(s, 3), "frames_per_s": round(len(frames) / s, 2),
                  "rss_after_load_mib": round(before / 1024, 1), "peak_rss_mib": round(peak / 1024, 1),
                  "answer": out["prediction"]}))
"""


SCORE = r"""
import json, resource, sys, time
from pathlib import Path
from sa2va_convert.evaluate.video_data import load_video_dataset
from sa2va_convert.evaluate.video_run import score_expression
data, preds = sys.argv[1], Path(sys.argv[2])
sample = load_video_dataset(data, "the red object")[0]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
row = score_expression(sample, preds)
s = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"frames": row["n_frames"], "seconds": round(s, 3), "frames_per_s": round(row["n_frames"] / s, 1),
                  "rss_before_mib": round(before / 1024, 1), "peak_rss_mib": round(peak / 1024, 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--size", default="640x480")
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.split("x"))
    import numpy as np
    from PIL import Image

    from sa2va_convert.api import ConvertOptions, convert
    from sa2va_convert.testing import make_tiny_example
    from sa2va_convert.testing.finetune import synthetic_picture

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").is_file():
        ex = make_tiny_example(work / "tiny")
        convert(ex.checkpoint_path, model, ConvertOptions(base=ex.base_dir, roundtrip=False))
    env = {**os.environ, "CI": "1"}
    for n in args.frames:
        data = work / f"clips{n}"
        if not data.is_dir():
            (data / "frames" / "clip").mkdir(parents=True)
            (data / "masks" / "clip").mkdir(parents=True)
            y, x = np.mgrid[0:h, 0:w]
            for i in range(n):
                shift = (i * 3) % (w // 4)
                synthetic_picture(w, h, shift).save(data / "frames" / "clip" / f"{i:05d}.jpg", quality=90)
                m = ((x - (0.4 * w + shift)) / (0.2 * w)) ** 2 + ((y - 0.5 * h) / (0.25 * h)) ** 2 <= 1
                Image.fromarray(m.astype(np.uint8) * 255, "L").save(data / "masks" / "clip" / f"{i:05d}.png")
        out = work / f"report{n}"
        t0 = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-c", WRAP, sys.executable, "-m", "sa2va_convert.cli", "eval", str(model), "--data", str(data), "--prompt",
             "the red object", "--out", str(out), "--device", "cpu", "--force", "--json", "--max-new-tokens", "16"],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        peak = int(p.stderr.strip().splitlines()[-1].split()[-1]) if p.returncode == 0 else 0
        rep = json.loads(p.stdout) if p.returncode == 0 else {"error": p.stderr[-1500:]}
        m = (rep.get("models") or [{}])[0]
        print(json.dumps({
            "step": "eval", "frames": n, "size": args.size, "rc": p.returncode, "wall_s": round(wall, 2),
            "frames_per_s": m.get("frames_per_s"), "jf": m.get("jf"),
            "peak_rss_mib": round(peak / 1024, 1),
        }), flush=True)  # fmt: skip
        q = subprocess.run(
            [sys.executable, "-c", SCORE, str(data), str(out / "predictions" / "model" / "clip" / "0")],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        line = q.stdout.strip().splitlines()[-1] if q.returncode == 0 else json.dumps({"error": q.stderr[-800:]})
        print(json.dumps({"step": "score", **json.loads(line)}), flush=True)
        frames = [str(p) for p in sorted((data / "frames" / "clip").iterdir())]
        for mode in ("eager", "lazy"):
            q = subprocess.run(
                [sys.executable, "-c", PROBE, str(model), mode, json.dumps(frames)],
                capture_output=True, text=True, env=env,
            )  # fmt: skip
            line = q.stdout.strip().splitlines()[-1] if q.returncode == 0 else json.dumps({"error": q.stderr[-800:]})
            print(json.dumps({"step": "predict_forward", **json.loads(line)}), flush=True)


if __name__ == "__main__":
    main()
