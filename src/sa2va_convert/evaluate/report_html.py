"""``report.html``: the report a person reads, self-contained in the report folder.

On top, what ``summary.json`` says, in the same numbers (the page is rendered from the summary's own
dictionary, never from a second computation): the models' table, the empty-ground-truth rule and
how many images it touched, the paired comparisons with their intervals and p-values, the cautions,
the gate, the notes, then ``report.png`` and, for a run's checkpoints, ``dice_over_iterations.png``
with its table. Below, one block per row key (``stem``): the input with the ground truth outlined,
and each model's prediction outlined beside it with that model's scores (the ``metrics.csv``
values) and answer, **worst first** by the difference to the baseline's Dice (the smallest
difference of any model on that image; with one model, its lowest Dice first), so the images where
a fine-tune lost come first. At most ``MAX_IMAGES`` blocks: a page must stay light, and the rest
is in ``metrics.csv`` (the page says so).

Images are files inside the report folder, referenced by relative paths (``report_images/*.jpg``,
``report.png``), not data URIs: a data URI costs a third more bytes than the file and is parsed
with the page, so a few hundred thumbnails would make one slow multi-megabyte HTML; as files they
are fetched by the browser as needed and the HTML stays small. The folder is the unit: moved or
zipped whole, the page opens from disk anywhere, with no server and no network (no CDN, font or
external script; the style and the one small script are inline). Thumbnails are downscaled JPEGs
(longest side ``THUMB`` px) with the outlines drawn in (the browser needs no overlay logic). The
inline script only checks that every image loaded, and says so on the page when one did not (a
report folder copied without ``report_images/``); it records the result in the DOM, which is what
the test reads in a headless Chromium.

Every user string (model names, prompts, answers, errors, paths, stems) goes through
``html.escape``. Written atomically, like every report file, and only when the run finished
(``run.py`` removes it when a run starts, as it does ``summary.json``).
"""

from __future__ import annotations

import html
import io
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import Sample, read_mask, read_truth
from .report import full_row, write_atomic
from .report_plots import ITERATIONS_PLOT, PLOT

HTML = "report.html"
IMAGES = "report_images"
#: longest side of a thumbnail in px (small images are enlarged up to 4x so an outline stays visible)
THUMB = 256
MAX_IMAGES = 200
TRUTH_COLOUR = (0, 230, 0)
PRED_COLOUR = (255, 0, 255)


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.{digits}f}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.3f}"


def _interval(ci: Sequence[float] | None) -> str:
    return "none" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _cell(value: Any, digits: int = 3, key: str | None = None) -> str:
    """A table cell whose shown text is rounded and whose ``data-value`` is the exact JSON number."""
    attr = f' data-key="{esc(key)}"' if key else ""
    return f"<td{attr} data-value='{esc(json.dumps(value))}'>{esc(_num(value, digits))}</td>"


# ---------------------------------------------------------------- thumbnails


def _outline(mask: np.ndarray, thick: bool) -> np.ndarray:
    """The mask's edge, by scikit-image (the ``eval`` extra, already loaded for clDice): ``inner``
    is the mask's own edge pixels (one pixel wide), ``thick`` adds the pixels just outside it, which
    stays visible on a downscaled photo."""
    from skimage.segmentation import find_boundaries

    return np.asarray(find_boundaries(mask, mode="thick" if thick else "inner"), dtype=bool)


def _size(w: int, h: int) -> tuple[int, int]:
    scale = min(THUMB / max(w, h), 4.0)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255, "L").resize(size, Image.Resampling.NEAREST)) > 0


def _jpeg(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def _drawn(base: np.ndarray, outlines: list[tuple[np.ndarray, tuple[int, int, int]]]) -> np.ndarray:
    out = base.copy()
    for edge, colour in outlines:
        out[edge] = colour
    return out


@dataclass
class Thumbs:
    """One image's thumbnails, as paths relative to the report folder."""

    truth: str | None = None
    models: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # why the input could not be drawn (a failed row's unreadable file)


def _thumbnails(out: Path, index: int, sample: Sample, models: list[tuple[str, str | None]]) -> Thumbs:
    """The input with the truth outlined, and each model's prediction outlined over it; a prediction
    file that is missing or unreadable gets no thumbnail (its figure says why)."""
    from ..runner.child import load_rgb  # the model's own view of the image (16-bit windowed, RGB)

    made = Thumbs()
    try:
        image = load_rgb(str(sample.image))
        size = _size(*image.size)
        base = np.asarray(image.resize(size))
        truth, _ = read_truth(sample.mask, sample.rule)
        truth_edge = _resize_mask(truth, size)
    except Exception as e:  # noqa: BLE001 -- a failed row's unreadable image (PIL raises several kinds):
        # the thumbnail is an illustration, the numbers are already written: the page says why instead
        made.error = f"{type(e).__name__}: {e}"
        return made
    thin, thick = _outline(truth_edge, False), _outline(truth_edge, True)
    rel = f"{IMAGES}/{index:05d}_truth.jpg"
    write_atomic(out / rel, _jpeg(_drawn(base, [(thick, TRUTH_COLOUR)])))
    made.truth = rel
    for k, (model, prediction) in enumerate(models):
        if not prediction:
            continue
        try:
            pred = _resize_mask(read_mask(Path(prediction)), size)
        except Exception:  # noqa: BLE001 -- as above: the figure then shows the scores without a picture
            continue
        rel = f"{IMAGES}/{index:05d}_m{k}.jpg"
        write_atomic(out / rel, _jpeg(_drawn(base, [(thin, TRUTH_COLOUR), (_outline(pred, True), PRED_COLOUR)])))
        made.models[model] = rel
    return made


# ---------------------------------------------------------------- ordering


def worst_first(
    stems: list[str],
    values: Mapping[str, Mapping[str, Mapping[str, Any]]],
    baseline: str | None,
    baseline_of: dict[str, str] | None = None,
) -> list[tuple[str, float | None]]:
    """Stems with their sort key: the smallest Dice difference of any model to its baseline on that
    image (one model: its Dice), ascending; images not compared (failed, or left out by the
    empty-gt rule) after them, in data order. ``baseline_of`` names another baseline for a model
    (--force-seg: ``NAME[forced]`` is compared with the baseline's forced masks, never its free ones)."""
    bases = {m: (baseline_of or {}).get(m, baseline) for m in values}
    others = [m for m in values if m != bases[m]]
    keyed: list[tuple[str, float | None]] = []
    for s in stems:
        if baseline is not None and others:
            diffs = [
                values[m][s]["dice"] - values[b][s]["dice"]
                for m in others
                if (b := bases[m] or "") in values and s in values[m] and s in values[b]
            ]
            keyed.append((s, min(diffs) if diffs else None))
        else:
            only = next(iter(values.values()), {}).get(s)
            keyed.append((s, only["dice"] if only else None))
    order = {s: i for i, s in enumerate(stems)}
    return sorted(keyed, key=lambda t: (t[1] is None, t[1] if t[1] is not None else 0.0, order[t[0]]))


# ---------------------------------------------------------------- the page

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.2em;color:#222}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin-top:1.4em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f3f3f3}td.name,th.name{text-align:left}.best{font-weight:bold}
.caution{color:#a15c00}.failed{color:#b00020}.passed{color:#1b7f2a}.small{font-size:12px;color:#555}
.row{border-top:1px solid #ccc;padding:.5em 0}.panels{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;max-width:260px}figure img{display:block;max-width:256px;image-rendering:auto}
figcaption{font-size:12px}.loss{color:#b00020}.win{color:#1b7f2a}.key{display:inline-block;width:1em;height:.6em}
#broken{display:none;background:#fde;border:1px solid #b00020;padding:.4em}
pre{white-space:pre-wrap;margin:0;font-size:11px;max-width:256px}
"""

# Sets data-rendered on every <img> and data-images-rendered/-total on <body>, shows #broken when an
# image did not load. Runs on "load", when every image has loaded or failed.
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images), ok = 0;
  imgs.forEach(function (img) {
    var r = img.complete && img.naturalWidth > 0;
    img.setAttribute('data-rendered', r ? 'yes' : 'no');
    img.setAttribute('data-resolved', img.currentSrc || img.src);
    if (r) { ok += 1; }
  });
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-rendered', String(ok));
  if (ok < imgs.length) {
    var b = document.getElementById('broken');
    b.textContent = (imgs.length - ok) + ' of ' + imgs.length + ' images did not load: keep report_images/ and '
      + 'the PNG files next to report.html (move or copy the report folder whole).';
    b.style.display = 'block';
  }
});
"""

MODEL_COLUMNS = (
    ("images", "images", 0),
    ("n_empty_gt", "empty GT", 0),
    ("n_in_means", "in means", 0),
    ("mean_dice", "mean Dice", 4),
    ("mean_dice_with_object", "Dice w/ object", 4),
    ("giou", "gIoU", 4),
    ("ciou", "cIoU", 4),
    ("mean_precision", "precision", 4),
    ("mean_recall", "recall", 4),
    ("mean_cldice", "clDice", 4),
    ("mean_boundary_f", "boundary F", 4),
    ("mean_hd95", "HD95 px", 2),
    ("no_seg_rate", "no [SEG]", 3),
    ("failures", "failed", 0),
)
SCORE_KEYS = (("dice", "Dice"), ("iou", "IoU"), ("cldice", "clDice"), ("boundary_f", "boundary F"), ("hd95", "HD95"))


def _models_table(summary: dict[str, Any]) -> list[str]:
    head = "".join(f"<th>{esc(title)}</th>" for _, title, _ in MODEL_COLUMNS)
    out = [f'<table id="models"><tr><th class="name">model</th><th>iteration</th>{head}</tr>']
    for m in summary["models"]:
        best = ' class="name best"' if m["model"] == summary.get("best") else ' class="name"'
        mark = " ★" if m["model"] == summary.get("best") else ""
        cells = "".join(_cell(m.get(key), digits, key) for key, _, digits in MODEL_COLUMNS)
        out.append(
            f'<tr data-model="{esc(m["model"])}"><td{best}>{esc(m["model"])}{mark}</td>'
            f"{_cell(m.get('iteration'), 0, 'iteration')}{cells}</tr>"
        )
    out.append("</table>")
    return out


def comparisons_table(summary: dict[str, Any], unit: str = "image") -> list[str]:
    """The comparisons of ``summary.json`` as a table (image and video reports share it); the baseline
    is a column because --force-seg compares NAME[forced] with BASE[forced], not with BASE."""
    comps = summary.get("comparisons") or []
    if not comps:
        return ["<p>One model: nothing to compare (pass a baseline and a fine-tune).</p>"]
    first = comps[0]
    out = [
        f"<p>Each model against the baseline <b>{esc(summary.get('baseline'))}</b>, {esc(unit)} by {esc(unit)} "
        f"(model − baseline): {esc(first['method'])}; {esc(first['resamples'])} resamples, seed "
        f"{esc(first['seed'])}; the per-{esc(unit)} differences are in <code>paired.csv</code>. "
        "Green: the interval shows the model better, red: worse (for HD95, lower is better).</p>",
        '<table id="comparisons"><tr><th class="name">model</th><th class="name">baseline</th><th>metric</th>'
        "<th>mean difference</th>"
        "<th>95 % interval</th><th>wins</th><th>ties</th><th>losses</th><th>n</th><th>p-value</th></tr>",
    ]
    for c in comps:
        covers = c["ci95"] is None or c["ci95"][0] <= 0 <= c["ci95"][1]
        up = c["ci95"] is not None and c["ci95"][0] > 0
        better = up if c.get("higher_is_better", True) else not up  # HD95: a positive difference is worse
        cls = "" if covers else (' class="win"' if better else ' class="loss"')
        p = _num(c["p_value"], 4) if c["p_value"] is not None else f"none: {c.get('p_value_note') or ''}"
        out.append(
            f'<tr data-model="{esc(c["model"])}" data-metric="{esc(c["metric"])}">'
            f'<td class="name">{esc(c["model"])}</td><td class="name">{esc(c["baseline"])}</td>'
            f"<td>{esc(c['metric'])}</td>"
            f"{_cell(c['mean_difference'], 4, 'mean_difference')}"
            f"<td data-key=\"ci95\" data-value='{esc(json.dumps(c['ci95']))}'{cls}>{esc(_interval(c['ci95']))}</td>"
            f"{_cell(c['wins'], 0, 'wins')}{_cell(c['ties'], 0, 'ties')}{_cell(c['losses'], 0, 'losses')}"
            f"{_cell(c['n'], 0, 'n')}<td data-key=\"p_value\" data-value='{esc(json.dumps(c['p_value']))}'>"
            f"{esc(p)}</td></tr>"
        )
    out.append("</table>")
    bi = summary.get("best_interval")
    if summary.get("best") and bi:
        out.append(
            f'<p id="best">Best (highest mean Dice): <b>{esc(summary["best"])}</b>, Dice '
            f"{esc(_signed(bi['mean_difference']))} {esc(_interval(bi['ci95']))} against {esc(bi['against'])}"
            + (" — the interval covers 0: not shown to be better on these images." if bi["covers_zero"] else ".")
            + "</p>"
        )
    return out


def _rules(summary: dict[str, Any]) -> list[str]:
    rule = summary["empty_gt"]
    out = [
        f'<p id="empty-gt">Empty ground truth: <b>--empty-gt {esc(rule["rule"])}</b>: {esc(rule["meaning"])}.</p>',
        '<ul id="notes">',
    ]
    out += [f"<li>{esc(n)}</li>" for n in summary.get("notes") or []]
    out.append("</ul>")
    cautions = summary.get("cautions") or []
    out.append('<ul id="cautions">' + "".join(f'<li class="caution">{esc(c)}</li>' for c in cautions) + "</ul>")
    if not cautions and summary.get("comparisons"):
        out.append("<p>No caution: the metrics agree on the best model and no interval covers 0.</p>")
    gate = summary.get("gate")
    if gate:
        status = '<b class="passed">passed</b>' if gate["passed"] else '<b class="failed">failed</b>'
        out.append(f'<div id="gate"><p>Gate: {status}</p><ul>')
        out += [f'<li class="failed">{esc(line)}</li>' for line in gate["failed"]]
        out.append("</ul></div>")
    failures = summary.get("failures") or []
    if failures:
        out.append('<ul id="failures">')
        out += [f'<li class="failed">{esc(f["model"])}/{esc(f["stem"])}: {esc(f["error"])}</li>' for f in failures]
        out.append("</ul>")
    return out


def _iterations(summary: dict[str, Any], iterations_plot: bool) -> list[str]:
    points = summary.get("dice_over_iterations")
    if not points:
        return []
    out = [
        "<h2>Checkpoints over training</h2>",
        "<p>Mean Dice per checkpoint with a 95 % bootstrap interval of that mean (its own images resampled "
        f"{esc(points[0]['resamples'])} times, seed {esc(points[0]['seed'])}): where the fine-tune peaked, and "
        "whether the peak stands out from the noise.</p>",
    ]
    if iterations_plot:
        out.append(f'<img src="{ITERATIONS_PLOT}" alt="mean Dice against the training iteration">')
    out.append(
        '<table id="iterations"><tr><th>iteration</th><th class="name">model</th><th>mean Dice</th>'
        "<th>95 % interval</th><th>n</th></tr>"
    )
    for p in points:
        out.append(
            f'<tr data-model="{esc(p["model"])}">{_cell(p["iteration"], 0, "iteration")}'
            f'<td class="name">{esc(p["model"])}</td>{_cell(p["mean_dice"], 4, "mean_dice")}'
            f"<td data-key=\"ci95\" data-value='{esc(json.dumps(p['ci95']))}'>{esc(_interval(p['ci95']))}</td>"
            f"{_cell(p['n'], 0, 'n')}</tr>"
        )
    out.append("</table>")
    return out


def _figure(model: str, row: dict[str, Any] | None, thumb: str | None, diff: float | None, is_baseline: bool) -> str:
    if row is None:
        return f'<figure data-model="{esc(model)}"><figcaption><b>{esc(model)}</b>: not evaluated</figcaption></figure>'
    full = full_row(row)
    data = " ".join(f'data-{k.replace("_", "-")}="{esc(full[k])}"' for k, _ in SCORE_KEYS)
    img = f'<img src="{esc(thumb)}" alt="{esc(model)}: prediction outlined">' if thumb else ""
    if row.get("status") == "failed":
        lines = [f'<span class="failed">failed: {esc(row.get("error"))}</span>']
    else:
        scores = ", ".join(
            f"{title} {esc(_num(float(full[k]), 3 if k != 'hd95' else 1))}" if full[k] != "" else f"{title} —"
            for k, title in SCORE_KEYS
        )
        lines = [scores]
        if is_baseline:
            lines.append("baseline")
        elif diff is not None:
            cls = "win" if diff > 0 else "loss" if diff < 0 else ""
            lines.append(f'<span class="{cls}">Dice {diff:+.3f} vs baseline</span>')
        if row.get("status") == "no_seg":
            lines.append("no [SEG]: empty prediction")
        lines.append(f"<pre>{esc(row.get('answer'))}</pre>")
    return (
        f'<figure data-model="{esc(model)}" {data} data-difference="{"" if diff is None else f"{diff:.6f}"}">'
        f"{img}<figcaption><b>{esc(model)}</b><br>{'<br>'.join(lines)}</figcaption></figure>"
    )


def _per_image(
    out: Path,
    summary: dict[str, Any],
    rows_by_model: dict[str, list[dict[str, Any]]],
    samples: list[Sample],
    values: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> list[str]:
    baseline = summary.get("baseline")
    models = [m["model"] for m in summary["models"]]
    by_stem = {s.stem: (i, s) for i, s in enumerate(samples)}
    rows = {m: {r["stem"]: r for r in rows_by_model.get(m, [])} for m in models}
    baseline_of = {
        m["model"]: f"{baseline}{m['model'][len(m['forced_of']) :]}" for m in summary["models"] if m.get("forced_of")
    }  # NAME[forced] against the baseline's own forced masks (BASE[forced])
    order = worst_first([s.stem for s in samples], values, baseline if len(models) > 1 else None, baseline_of)
    shown = order[:MAX_IMAGES]
    how = "the smallest Dice difference of any model to the baseline" if len(models) > 1 else "Dice"
    res = [
        "<h2>Per image, worst first</h2>",
        f"<p>Ordered by {how}, ascending; images not compared (failed, or left out by the empty-gt rule) last. "
        f'<span class="key" style="background:rgb{TRUTH_COLOUR}"></span> ground truth, '
        f'<span class="key" style="background:rgb{PRED_COLOUR}"></span> the model\'s prediction (the union of its '
        "[SEG] masks). Scores as in <code>metrics.csv</code>.</p>",
    ]
    if len(order) > len(shown):
        res.append(f"<p>Showing the {len(shown)} worst of {len(order)} images; every image is in metrics.csv.</p>")
    for stem, key in shown:
        index, sample = by_stem[stem]
        preds = [(m, (rows[m].get(stem) or {}).get("prediction_file") or None) for m in models]
        thumbs = _thumbnails(out, index, sample, preds)
        prompt = (rows[models[0]].get(stem) or {}).get("prompt") or sample.prompt
        res.append(
            f'<div class="row" data-stem="{esc(stem)}" data-key="{"" if key is None else f"{key:.6f}"}">'
            f'<h3>{esc(stem)}</h3><p class="small">prompt: {esc(prompt)}<br>image: {esc(sample.image)}</p>'
            '<div class="panels">'
        )
        if thumbs.truth:
            true_area = (rows[models[0]].get(stem) or {}).get("true_area", "")
            res.append(
                f'<figure data-model=""><img src="{esc(thumbs.truth)}" alt="{esc(stem)}: ground truth outlined">'
                f"<figcaption><b>input + ground truth</b><br>true area {esc(true_area)} px</figcaption></figure>"
            )
        else:
            res.append(f'<figure><figcaption class="failed">{esc(thumbs.error)}</figcaption></figure>')
        for m in models:
            row = rows[m].get(stem)
            mine = values.get(m, {}).get(stem)
            own_base = baseline_of.get(m, baseline)
            base_val = values.get(own_base or "", {}).get(stem)
            diff = mine["dice"] - base_val["dice"] if (mine and base_val and m != own_base) else None
            res.append(_figure(m, row, thumbs.models.get(m), diff, m == own_base and len(models) > 1))
        res.append("</div></div>")
    return res


def write_html(
    out: Path,
    summary: dict[str, Any],
    rows_by_model: dict[str, list[dict[str, Any]]],
    samples: list[Sample],
    values: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> Path:
    """Thumbnails under ``report_images/`` (replaced whole), then ``report.html``; returns its path."""
    shutil.rmtree(out / IMAGES, ignore_errors=True)
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>eval report: {esc(summary.get('data'))}</title><style>{STYLE}</style></head><body>",
        '<div id="broken"></div>',
        "<h1>sa2va-convert eval report</h1>",
        f'<p class="small">data: {esc(summary.get("data"))}; {esc(summary.get("images"))} image(s); '
        f"report folder: {esc(summary.get('out'))}; the same numbers as <code>summary.json</code>.</p>",
        "<h2>Summary</h2>",
        *_models_table(summary),
        *_rules(summary),
        "<h2>Comparisons</h2>",
        *comparisons_table(summary),
    ]
    if (out / PLOT).is_file():
        parts.append(f'<img src="{PLOT}" alt="paired Dice per image against the baseline, with the intervals">')
    parts += _iterations(summary, (out / ITERATIONS_PLOT).is_file())
    parts += _per_image(out, summary, rows_by_model, samples, values)
    parts.append(f"<script>{SCRIPT}</script></body></html>\n")
    path = out / HTML
    write_atomic(path, "\n".join(parts).encode("utf-8"))
    return path


__all__ = [
    "write_html",
    "worst_first",
    "comparisons_table",
    "esc",
    "STYLE",
    "SCRIPT",
    "HTML",
    "IMAGES",
    "MAX_IMAGES",
    "THUMB",
]
