"""``sa2va-convert eval`` / ``predict`` on video (issue 27): J, F, J&F as the DAVIS benchmark defines them.

The measures are checked against an implementation written here from DAVIS's definitions in another
way (boundaries by a loop over pixels and their existing right/lower/lower-right neighbours, matches
by brute-force distances between boundary pixels), on handmade cases and random masks. The end-to-end
runs use the README demo's segmenting fine-tune and its twin without the LoRA (which answers without
``[SEG]``), converted for real, on clips generated here, through the real CLI in a subprocess; every
J, F, J&F (and R) in the outputs is recomputed here from the saved frame PNGs and the ground truth,
and the upstream-format ``results.json`` is read back with pycocotools and scored with upstream's
formula (eval_mevis.py: per expression the mean over frames, J&F = their mean, x 100 over the set).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("scipy")
coco_mask = pytest.importorskip("pycocotools.mask")
Image = pytest.importorskip("PIL.Image")

from click.testing import CliRunner  # noqa: E402

from sa2va_convert.api import ConvertOptions, convert  # noqa: E402
from sa2va_convert.cli import main as cli_main  # noqa: E402
from sa2va_convert.evaluate.video_data import load_video_dataset  # noqa: E402
from sa2va_convert.evaluate.video_metrics import boundary_f, boundary_map, region_j, robustness  # noqa: E402
from sa2va_convert.testing import make_tiny_example  # noqa: E402
from sa2va_convert.testing.finetune import drop_from_checkpoint, synthetic_picture  # noqa: E402

ENV = {"CI": "1", "OMP_NUM_THREADS": "1"}
N_FRAMES = 4
CLIPS = {"clipA": (80, 60), "clipB": (56, 72)}  # (width, height): not square, both orientations
#: expression id -> (prompt, cut): a cut expression's truth is the object's left half, empty on the last frame
EXPRESSIONS = {"0": ("the red object", False), "1": ("the left part of the red object?", True)}


# ------------------------------------------------------------------ an independent implementation of DAVIS's J and F


def ind_boundary(m: np.ndarray) -> np.ndarray:
    """A pixel is boundary when it differs from one of its right, lower, lower-right neighbours that exist."""
    h, w = m.shape
    out = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            for dy, dx in ((0, 1), (1, 0), (1, 1)):
                if y + dy < h and x + dx < w and m[y, x] != m[y + dy, x + dx]:
                    out[y, x] = True
    # DAVIS's last row compares only with the right neighbour, its last column only with the lower one
    for x in range(w - 1):
        out[h - 1, x] = m[h - 1, x] != m[h - 1, x + 1]
    for y in range(h - 1):
        out[y, w - 1] = m[y, w - 1] != m[y + 1, w - 1]
    out[h - 1, w - 1] = False
    return out


def ind_j(t: np.ndarray, p: np.ndarray) -> float:
    u = np.logical_or(t, p).sum()
    return 1.0 if u == 0 else np.logical_and(t, p).sum() / u


def ind_f(t: np.ndarray, p: np.ndarray) -> float:
    bt, bp = ind_boundary(t), ind_boundary(p)
    r = math.ceil(0.008 * math.sqrt(t.shape[0] ** 2 + t.shape[1] ** 2))
    ct, cp = np.argwhere(bt), np.argwhere(bp)
    if len(cp) == 0 and len(ct) == 0:
        return 1.0
    if len(cp) == 0 or len(ct) == 0:
        return 0.0
    d2 = ((cp[:, None, :] - ct[None, :, :]) ** 2).sum(-1)
    precision = (d2.min(axis=1) <= r * r).mean()
    recall = (d2.min(axis=0) <= r * r).mean()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def ind_r(t: np.ndarray, p: np.ndarray, fg: np.ndarray) -> float:
    return max(1 - (p & ~t).sum() / (fg.sum() + 1e-6), 0.0)


def _square(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _blob(rng, h, w):
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.random((h, w)), 2.5) > 0.5


def _cases():
    sq = _square(50, 70, 10, 30, 12, 40)
    one = _square(20, 24, 5, 6, 7, 8)
    empty = np.zeros((30, 40), bool)
    return {
        "identical": (sq, sq),
        "shifted by 1 (within tolerance)": (sq, np.roll(sq, 1, axis=1)),
        "shifted by 4 (beyond it)": (sq, np.roll(sq, 4, axis=0)),
        "eroded": (sq, _square(50, 70, 12, 28, 14, 38)),
        "empty truth, empty prediction": (empty, empty),
        "empty prediction": (_square(30, 40, 3, 9, 3, 9), empty),
        "empty truth": (empty, _square(30, 40, 3, 9, 3, 9)),
        "one pixel, same": (one, one),
        "one pixel, moved": (one, np.roll(one, 1, axis=0)),
        "touching the frame's edges": (_square(30, 40, 0, 30, 25, 40), _square(30, 40, 0, 20, 20, 40)),
        "full frame against empty": (empty, ~empty),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_j_and_f_equal_an_independent_implementation(case):
    t, p = _cases()[case]
    assert np.array_equal(boundary_map(t), ind_boundary(t)) and np.array_equal(boundary_map(p), ind_boundary(p))
    assert region_j(t, p) == pytest.approx(ind_j(t, p), abs=1e-12)
    assert boundary_f(t, p) == pytest.approx(ind_f(t, p), abs=1e-12)
    fg = t | p | _square(*t.shape, 0, 2, 0, 2)
    assert robustness(t, p, fg) == pytest.approx(ind_r(t, p, fg), abs=1e-12)


def test_davis_edge_rules_by_hand():
    """Values worked out by hand from the definitions (not from either implementation)."""
    one = _square(20, 24, 5, 6, 7, 8)
    assert int(boundary_map(one).sum()) == 4  # the pixel, its left, upper and upper-left neighbours
    empty = np.zeros((30, 40), bool)
    assert (region_j(empty, empty), boundary_f(empty, empty)) == (1.0, 1.0)
    assert (region_j(one, np.zeros_like(one)), boundary_f(one, np.zeros_like(one))) == (0.0, 0.0)
    # a full frame has no boundary under DAVIS's rule (nothing outside the frame counts): F = 1 against an
    # empty truth, J = 0
    assert (region_j(empty, ~empty), boundary_f(empty, ~empty)) == (0.0, 1.0)


def test_j_and_f_on_random_masks_equal_an_independent_implementation():
    rng = np.random.default_rng(7)
    for _ in range(12):
        h, w = int(rng.integers(20, 48)), int(rng.integers(20, 64))
        t, p = _blob(rng, h, w), _blob(rng, h, w)
        assert region_j(t, p) == pytest.approx(ind_j(t, p), abs=1e-12)
        assert boundary_f(t, p) == pytest.approx(ind_f(t, p), abs=1e-12)


# ------------------------------------------------------------------ the models and the clips


def ellipse(w: int, h: int, shift: int) -> np.ndarray:
    """Where synthetic_picture draws its red ellipse."""
    y, x = np.mgrid[0:h, 0:w]
    return ((x - (0.4 * w + shift)) / (0.2 * w)) ** 2 + ((y - 0.5 * h) / (0.25 * h)) ** 2 <= 1


def truth_of(clip: str, exp: str, i: int) -> np.ndarray:
    w, h = CLIPS[clip]
    m = ellipse(w, h, 2 * i)
    if EXPRESSIONS[exp][1]:
        m[:, w // 2 :] = False
        if i == N_FRAMES - 1:
            m[:] = False
    return m


def run_cli(*args: object, timeout: float = 300, torchrun: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV}
    cmd = [sys.executable, "-m", "sa2va_convert.cli", *map(str, args)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
               "--master_port", str(29700 + os.getpid() % 1000), "-m", "sa2va_convert.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def vworld(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("video")
    ex = make_tiny_example(root / "tiny")
    models = root / "models"
    models.mkdir()
    opts = ConvertOptions(base=ex.base_dir, roundtrip=False)
    folders = {"finetune": models / "finetune", "no_lora": models / "no_lora"}
    convert(ex.checkpoint_path, folders["finetune"], opts)
    convert(drop_from_checkpoint(ex.checkpoint.path, root / "no_lora" / "iter_100.pth", ["lora"]),
            folders["no_lora"], opts)
    # layout (a): frames/<clip>/<frame>.jpg, masks/<clip>/<expression>/<frame>.png + prompt.txt
    data = root / "clips"
    # the MeViS/ReVOS layout: meta_expressions.json, mask_dict.json (RLE, null = empty), foreground, JPEGImages/
    mevis = root / "mevis"
    meta: dict = {"videos": {}}
    mask_dict: dict = {}
    foreground: dict = {}
    for clip, (w, h) in CLIPS.items():
        (data / "frames" / clip).mkdir(parents=True)
        (mevis / "JPEGImages" / clip).mkdir(parents=True)
        names = [f"{i:05d}" for i in range(N_FRAMES)]
        for i, n in enumerate(names):
            synthetic_picture(w, h, 2 * i).save(data / "frames" / clip / f"{n}.jpg", quality=95)
            shutil.copy(data / "frames" / clip / f"{n}.jpg", mevis / "JPEGImages" / clip / f"{n}.jpg")
        exps = {}
        for exp, (prompt, _) in EXPRESSIONS.items():
            md = data / "masks" / clip / exp
            md.mkdir(parents=True)
            (md / "prompt.txt").write_text(prompt)
            for i, n in enumerate(names):
                Image.fromarray(truth_of(clip, exp, i).astype(np.uint8) * 255, "L").save(md / f"{n}.png")
            # the truth as two annotations (its left and right halves): the score is on their union
            ids = []
            for half in (0, 1):
                anno = f"{clip}{exp}{half}"
                ids.append(anno)
                rles = []
                for i in range(N_FRAMES):
                    m = truth_of(clip, exp, i).copy()
                    m[:, : w // 2] = m[:, : w // 2] if half == 0 else False
                    m[:, w // 2 :] = m[:, w // 2 :] if half == 1 else False
                    if m.any():
                        rle = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
                        rles.append({"size": rle["size"], "counts": rle["counts"].decode()})
                    else:
                        rles.append(None)
                mask_dict[anno] = rles
            exps[exp] = {"exp": prompt, "anno_id": ids}
        meta["videos"][clip] = {"frames": names, "expressions": exps}
        fg_rles = []
        for i in range(N_FRAMES):
            rle = coco_mask.encode(np.asfortranarray(ellipse(w, h, 2 * i).astype(np.uint8)))
            fg_rles.append({"size": rle["size"], "counts": rle["counts"].decode()})
        foreground[clip] = {"masks_rle": fg_rles}
    # a third video whose second frame is cut short: its header reads (the checks pass), its pixels do not
    (mevis / "JPEGImages" / "broken").mkdir()
    for n in ("00000", "00001"):
        shutil.copy(data / "frames" / "clipA" / f"{n}.jpg", mevis / "JPEGImages" / "broken" / f"{n}.jpg")
    cut = mevis / "JPEGImages" / "broken" / "00001.jpg"
    cut.write_bytes(cut.read_bytes()[:-300])
    meta["videos"]["broken"] = {"frames": ["00000", "00001"], "expressions": {"0": {"exp": "the red object",
                                                                                    "anno_id": ["broken0"]}}}
    mask_dict["broken0"] = mask_dict["clipA00"][:2]
    (mevis / "meta_expressions.json").write_text(json.dumps(meta))
    (mevis / "mask_dict.json").write_text(json.dumps(mask_dict))
    (mevis / "mask_dict_foreground.json").write_text(json.dumps(foreground))
    return SimpleNamespace(root=root, folders=folders, data=data, mevis=mevis)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def recompute(rows: list[dict], with_r: bool = False) -> None:
    """Every row's J, F, J&F (and R) from its saved frame PNGs and the ground truth, independently."""
    for row in rows:
        assert row["status"] in ("ok", "no_seg"), row
        folder = Path(row["prediction_dir"])
        js, fs, rs = [], [], []
        for i in range(N_FRAMES):
            with Image.open(folder / f"{i:05d}.png") as im:
                arr = np.asarray(im)
            assert set(np.unique(arr).tolist()) <= {0, 255}
            p, t = arr == 255, truth_of(row["clip"], row["expression"], i)
            assert p.shape == t.shape
            js.append(ind_j(t, p))
            fs.append(ind_f(t, p))
            w, h = CLIPS[row["clip"]]
            rs.append(ind_r(t, p, ellipse(w, h, 2 * i)))
        j, f = float(np.mean(js)), float(np.mean(fs))
        assert float(row["j"]) == pytest.approx(j, abs=1e-6) and float(row["f"]) == pytest.approx(f, abs=1e-6)
        assert float(row["jf"]) == pytest.approx((j + f) / 2, abs=1e-6)
        assert (row["r"] != "") == with_r
        if with_r:
            assert float(row["r"]) == pytest.approx(float(np.mean(rs)), abs=1e-6)


@pytest.fixture(scope="module")
def folder_run(vworld) -> SimpleNamespace:
    out = vworld.root / "report"
    r = run_cli("eval", vworld.folders["finetune"], vworld.folders["no_lora"], "--data", vworld.data, "--out", out,
                "--device", "cpu", "--max-new-tokens", 16)
    assert r.returncode == 0, r.stderr[-3000:]
    return SimpleNamespace(out=out, report=json.loads((out / "summary.json").read_text()), stdout=r.stdout)


def test_frames_folder_every_score_recomputed_compared_and_resumed(vworld, folder_run, tmp_path):
    out, report = folder_run.out, folder_run.report
    rows = read_rows(out / "metrics.csv")
    assert [(r["model"], r["clip"], r["expression"]) for r in rows] == [
        (m, c, e) for m in ("finetune", "no_lora") for c in CLIPS for e in EXPRESSIONS]
    recompute(rows)
    by = {m: [r for r in rows if r["model"] == m] for m in ("finetune", "no_lora")}
    assert all(r["status"] == "ok" and r["answer"].startswith("[SEG]") for r in by["finetune"])
    assert all(r["status"] == "no_seg" for r in by["no_lora"])  # answered without [SEG]: empty frames, scored
    assert all(int(r["empty_pred_frames"]) == N_FRAMES for r in by["no_lora"])
    # the prompts as upstream's refVOS.py words them (a question asked as one)
    assert by["finetune"][0]["prompt"] == "<image>\nPlease segment the red object."
    assert by["finetune"][1]["prompt"] == "<image>\n the left part of the red object? Please respond with a " \
                                          "segmentation mask."
    # per model: J, F over expressions, J&F their mean; frames/s from the rows' seconds
    for m in report["models"]:
        rs = by[m["model"]]
        j, f = np.mean([float(r["j"]) for r in rs]), np.mean([float(r["f"]) for r in rs])
        assert m["j"] == pytest.approx(j, abs=1e-6) and m["f"] == pytest.approx(f, abs=1e-6)
        assert m["jf"] == pytest.approx((j + f) / 2, abs=1e-6)
        assert m["upstream"]["J&F"] == round(100 * (j + f) / 2, 2)
        assert m["expressions"] == 4 and m["clips"] == 2 and m["frames"] == 4 * N_FRAMES
        assert m["frames_per_s"] == pytest.approx(4 * N_FRAMES / sum(float(r["seconds"]) for r in rs), rel=1e-3)
    # the paired comparison (compare.py's bootstrap, as documented) over the expressions
    for c in report["comparisons"]:
        d = np.array([float(b[c["metric"]]) - float(a[c["metric"]]) for a, b in zip(by["finetune"], by["no_lora"])])
        assert c["baseline"] == "finetune" and c["model"] == "no_lora" and c["n"] == 4
        assert c["mean_difference"] == pytest.approx(d.mean(), abs=1e-6)
        assert (c["wins"], c["ties"], c["losses"]) == ((d > 0).sum(), (d == 0).sum(), (d < 0).sum())
        boot = d[np.random.default_rng(0).integers(0, 4, size=(10_000, 4))].mean(axis=1)
        assert c["ci95"] == pytest.approx(list(np.percentile(boot, [2.5, 97.5])), abs=1e-6)
    assert {c["metric"] for c in report["comparisons"]} == {"jf", "j", "f"}
    # upstream's prediction JSON, read back and scored with upstream's formula (eval_mevis.py)
    for model in ("finetune", "no_lora"):
        pred = json.loads((out / "predictions" / model / "results.json").read_text())
        jf_all = []
        for row in by[model]:
            entry = pred[row["clip"]][row["expression"]]
            assert entry["frames"] == [f"{i:05d}" for i in range(N_FRAMES)]
            js, fs = [], []
            for i, rle in enumerate(entry["prediction_masks"]):
                p = coco_mask.decode(rle).astype(bool)
                t = truth_of(row["clip"], row["expression"], i)
                js.append(ind_j(t, p))
                fs.append(ind_f(t, p))
            assert float(row["jf"]) == pytest.approx((np.mean(js) + np.mean(fs)) / 2, abs=1e-6)
            jf_all.append((np.mean(js), np.mean(fs)))
        m = next(x for x in report["models"] if x["model"] == model)
        j, f = np.mean([a for a, _ in jf_all]), np.mean([b for _, b in jf_all])
        assert m["upstream"]["J&F"] == round(100 * float((j + f) / 2), 2)
    # a strip per clip, worst first
    assert [s["clip"] for s in report["strips"]] == sorted(CLIPS, key=lambda c: np.mean(
        [float(r["jf"]) for r in rows if r["clip"] == c]))
    for s in report["strips"]:
        with Image.open(s["file"]) as im:
            assert im.format == "PNG" and im.size[1] == 96 * 4  # a row per (expression, model)
    assert "J&F" in folder_run.stdout and "no_lora" in folder_run.stdout
    # --resume on the finished report: nothing predicted again, the same numbers
    copy = tmp_path / "rep"
    shutil.copytree(out, copy)
    for r in rows:
        r["prediction_dir"] = r["prediction_dir"].replace(str(out), str(copy))
    with open(copy / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    (copy / "summary.json").unlink()
    # ... with a CI gate the fine-tune's twin cannot pass: the report is written, then exit 11
    r = run_cli("eval", vworld.folders["finetune"], vworld.folders["no_lora"], "--data", vworld.data, "--out", copy,
                "--device", "cpu", "--resume", "--fail-under", "jf=0.99", "--require-better")
    assert r.returncode == 11, r.stderr[-3000:]
    again = json.loads((copy / "summary.json").read_text())
    assert again["resumed"] == 8 and "checking" in r.stderr and "loading the model" not in r.stderr
    assert [m["jf"] for m in again["models"]] == [m["jf"] for m in report["models"]]
    assert again["gate"]["passed"] is False and len(again["gate"]["failed"]) == 2  # jf of no_lora; its interval
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith(
        f"{copy}: gate failed: {again['gate']['failed'][0]} (and 1 more, listed under gate in summary.json)")


CHROMIUM = Path("/usr/bin/chromium")


def test_report_html_lists_every_clip_worst_first_and_renders_in_headless_chromium(folder_run, tmp_path):
    """report.html: the models and comparisons of summary.json, then every strip, worst clip first, each
    a file inside the report folder; opened from disk in a real browser, every image renders."""
    import re

    out, report = folder_run.out, folder_run.report
    page = (out / "report.html").read_text(encoding="utf-8")
    assert report["files"]["html"] == str(out / "report.html")
    assert re.findall(r'data-clip="([^"]+)"', page) == [s["clip"] for s in report["strips"]]
    srcs = re.findall(r'<img class="strip" src="([^"]+)"', page)
    assert srcs == [f"strips/{s['clip']}.png" for s in report["strips"]] and all((out / x).is_file() for x in srcs)
    rows = re.findall(r'<tr data-model="([^"]+)" data-metric="([^"]+)">', page)
    assert rows == [(c["model"], c["metric"]) for c in report["comparisons"]]
    for m in report["models"]:  # each model's J&F as summary.json has it, to 4 places
        assert f"{m['jf']:.4f}" in page
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium package (apt-get install -y chromium) for the browser half")
    r = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
                        "--dump-dom", (out / "report.html").as_uri()], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    rendered = re.search(r'data-images-total="(\d+)" data-images-rendered="(\d+)"', r.stdout)
    assert rendered and rendered.groups() == (str(len(srcs)), str(len(srcs))), r.stdout[:2000]


def test_mevis_layout_under_torchrun_scores_the_rle_truth_and_robustness(vworld, folder_run, tmp_path):
    """meta_expressions.json + mask_dict.json (each truth split over two annotations) + the foreground
    dictionary (ReVOS's R), by 2 ranks (clips split between them, each rank its own model process): the
    same predictions as the one-process frames folder run (same frames, same prompts), every J, F, R
    recomputed; a video with a cut frame fails alone on its rank and is reported by rank 0."""
    out = tmp_path / "rep"
    r = run_cli("eval", vworld.folders["finetune"], "--data", vworld.mevis / "meta_expressions.json", "--out", out,
                "--device", "cpu", "--max-new-tokens", 16, "--json", torchrun=2, timeout=400)
    # the video with a cut frame fails alone (recorded, exit 10 after the report; torchrun turns a rank's
    # exit code into its own 1); the others are scored
    assert r.returncode != 0, r.stderr[-4000:]
    report = json.loads(r.stdout)
    assert report["world_size"] == 2 and report["expressions"] == 5 and report["ok"] is False
    assert [(f["key"], f["error"].split(":")[0]) for f in report["failures"]] == [("broken/0", "OSError")]
    assert "1 expression(s) failed, e.g. finetune/broken/0" in r.stderr
    rows = read_rows(out / "metrics.csv")
    assert [(r["clip"], r["status"]) for r in rows][-1] == ("broken", "failed")
    rows = rows[:-1]
    recompute(rows, with_r=True)
    assert "broken" not in json.loads((out / "predictions" / "finetune" / "results.json").read_text())
    before = {(r["clip"], r["expression"]): r for r in read_rows(folder_run.out / "metrics.csv")
              if r["model"] == "finetune"}
    for row in rows:
        assert (row["j"], row["f"]) == (before[row["clip"], row["expression"]]["j"],
                                        before[row["clip"], row["expression"]]["f"])
    m = report["models"][0]
    assert m["r"] == pytest.approx(np.mean([float(r["r"]) for r in rows]), abs=1e-6)


def test_a_manifest_names_the_same_clips(vworld, tmp_path):
    manifest = tmp_path / "clips.csv"
    lines = ["frames,masks,prompt,clip,expression"]
    for clip in CLIPS:
        for exp, (prompt, _) in EXPRESSIONS.items():
            lines.append(f"{vworld.data}/frames/{clip},{vworld.data}/masks/{clip}/{exp},{prompt},{clip},{exp}")
    manifest.write_text("\n".join(lines) + "\n")
    a, b = load_video_dataset(vworld.data), load_video_dataset(manifest)
    assert [(s.key, s.prompt, s.frames, s.masks, s.width, s.height) for s in a] == [
        (s.key, s.prompt, s.frames, s.masks, s.width, s.height) for s in b]


def test_bad_video_data_is_one_line_before_any_model_loads(vworld, tmp_path):
    data = tmp_path / "clips"
    shutil.copytree(vworld.data, data)
    (data / "masks" / "clipB" / "1" / "00002.png").unlink()
    out = tmp_path / "rep"
    r = CliRunner().invoke(cli_main, ["eval", str(vworld.folders["finetune"]), "--data", str(data), "--out", str(out),
                                      "--device", "cpu"], env=ENV)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 3 and len(errors) == 1, r.stderr[-2000:]
    assert "frame 00002.jpg has no mask" in errors[0] and "(fix: " in errors[0]
    assert not out.exists()
    r = CliRunner().invoke(cli_main, ["eval", str(vworld.folders["finetune"]), "--data", str(vworld.data), "--out",
                                      str(out), "--overlays"], env=ENV)
    assert r.exit_code == 2 and "--overlays does not apply to a video set" in r.stderr
    r = CliRunner().invoke(cli_main, ["eval", str(vworld.folders["finetune"]), "--data", str(vworld.data), "--out",
                                      str(out), "--fail-under", "dice=0.5"], env=ENV)
    assert r.exit_code == 2 and "--fail-under names 'dice', which is not a video score" in r.stderr
    assert not out.exists()


def test_predict_on_a_video_file_writes_a_mask_per_frame_and_a_gif(vworld, tmp_path):
    av = pytest.importorskip("av")
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 80, 60, "yuv420p"
        for i in range(5):
            for packet in stream.encode(av.VideoFrame.from_image(synthetic_picture(80, 60, 2 * i))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    r = run_cli("predict", vworld.folders["finetune"], video, "the red object", "--device", "cpu", "--save",
                tmp_path / "masks", "--overlay", tmp_path / "o.gif", "--json", "--max-new-tokens", 16)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["prediction"].startswith("[SEG]") and out["mask_shapes"] == [[5, 60, 80]]
    masks = sorted((tmp_path / "masks").iterdir())
    assert [p.name for p in masks] == [f"{i:05d}.png" for i in range(5)]
    for p in masks:
        with Image.open(p) as im:
            assert im.size == (80, 60) and np.asarray(im).any()
    with Image.open(tmp_path / "o.gif") as im:
        assert im.format == "GIF" and im.n_frames == 5 and im.size == (80, 60)
