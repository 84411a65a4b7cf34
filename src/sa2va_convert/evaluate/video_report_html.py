"""``report.html`` of a video evaluation: the summary and comparisons on top, then each clip's strip of
frames (ground truth and prediction outlined), worst clips first.

It is the image report's page (``report_html``: the same style, the same comparisons table, the same
load check that marks every image rendered or not) over what a video run already wrote: the strips
are the ``strips/<clip>.png`` files themselves, referenced relatively, so the page opens from disk
with no server and no network and costs no second drawing of any frame.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .report import write_atomic
from .report_html import HTML, SCRIPT, STYLE, comparisons_table, esc

#: the per-model columns: summary.json key, heading, digits
VIDEO_COLUMNS = (
    ("expressions", "expressions", 0),
    ("clips", "clips", 0),
    ("jf", "J&F", 4),
    ("j", "J", 4),
    ("f", "F", 4),
    ("r", "R", 4),
    ("no_seg", "no [SEG]", 0),
    ("failures", "failed", 0),
    ("frames_per_s", "frames/s", 1),
)


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return '<td class="small">—</td>'
    text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return f"<td>{esc(text)}</td>"


def _models(summary: dict[str, Any]) -> list[str]:
    head = "".join(f"<th>{esc(title)}</th>" for _, title, _ in VIDEO_COLUMNS)
    out = [f'<table id="models"><tr><th class="name">model</th>{head}</tr>']
    for m in summary["models"]:
        best = m["model"] == summary.get("best")
        cells = "".join(_cell(m.get(key), digits) for key, _, digits in VIDEO_COLUMNS)
        out.append(
            f'<tr data-model="{esc(m["model"])}"><td class="name{" best" if best else ""}">'
            f"{esc(m['model'])}{' ★' if best else ''}</td>{cells}</tr>"
        )
    out.append("</table>")
    return out


def _strips(out: Path, summary: dict[str, Any]) -> list[str]:
    strips = summary.get("strips") or []
    if not strips:
        return ["<p>No strips were drawn (--no-strips).</p>"]
    res = [
        "<h2>Clips, worst first</h2>",
        "<p>Ordered by the clip's mean J&amp;F over models and expressions, ascending. Each strip: a row per "
        "expression and model, evenly spaced frames, the ground truth outlined in green and the prediction in "
        "magenta.</p>",
    ]
    for s in strips:
        rel = Path(os.path.relpath(s["file"], out)).as_posix()
        mean = "—" if s.get("mean_jf") is None else f"{s['mean_jf']:.4f}"
        res.append(
            f'<div class="row" data-clip="{esc(s["clip"])}"><h3>{esc(s["clip"])}</h3>'
            f'<p class="small">mean J&amp;F {esc(mean)}</p>'
            f'<img class="strip" src="{esc(rel)}" alt="{esc(s["clip"])}: frames with truth and prediction outlined">'
            "</div>"
        )
    return res


def write_video_html(out: Path, summary: dict[str, Any]) -> Path:
    """``report.html`` beside ``summary.json`` (written atomically, before it: summary.json comes last)."""
    notes = "".join(f"<li>{esc(n)}</li>" for n in summary.get("notes") or [])
    gate = summary.get("gate")
    gate_html = ""
    if gate:
        status = '<b class="passed">passed</b>' if gate["passed"] else '<b class="failed">failed</b>'
        failed = "".join(f'<li class="failed">{esc(line)}</li>' for line in gate["failed"])
        gate_html = f'<div id="gate"><p>Gate: {status}</p><ul>{failed}</ul></div>'
    failures = "".join(
        f'<li class="failed">{esc(f["model"])}/{esc(f["key"])}: {esc(f["error"])}</li>'
        for f in summary.get("failures") or []
    )
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>video eval report: {esc(summary.get('data'))}</title>",
        f"<style>{STYLE}img.strip{{max-width:100%;display:block}}</style></head><body>",
        '<div id="broken"></div>',
        "<h1>sa2va-convert video eval report</h1>",
        f'<p class="small">data: {esc(summary.get("data"))}; {esc(summary.get("clips"))} clip(s), '
        f"{esc(summary.get('expressions'))} expression(s); the same numbers as <code>summary.json</code>.</p>",
        "<h2>Summary</h2>",
        *_models(summary),
        f'<ul id="notes">{notes}</ul>{gate_html}',
        f'<ul id="failures">{failures}</ul>' if failures else "",
        "<h2>Comparisons</h2>",
        *comparisons_table(summary, unit="expression"),
        *_strips(out, summary),
        f"<script>{SCRIPT.replace('report_images/', 'strips/')}</script></body></html>\n",
    ]
    path = out / HTML
    write_atomic(path, "\n".join(parts).encode("utf-8"))
    return path


__all__ = ["write_video_html"]
