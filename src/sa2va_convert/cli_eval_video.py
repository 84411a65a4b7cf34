"""``sa2va-convert eval`` on a video set: the options that apply, the table, the exit codes.

``cli_eval.py`` hands over here when ``--data`` is one of the video layouts
(``evaluate.video_data.is_video_data``), so the image command's code stays as it was.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from .cli_common import emit_json
from .errors import EvalFailuresError, EvalGateError, UsageError

COLUMNS = ["model", "expressions", "clips", "J", "F", "J&F", "R", "no [SEG]", "failed", "frames/s"]


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    return [
        [
            m["model"] + (" *" if m["model"] == report.get("best") else ""),
            str(m["expressions"]),
            str(m["clips"]),
            _f(m["j"]),
            _f(m["f"]),
            _f(m["jf"]),
            _f(m["r"]),
            str(m["no_seg"]),
            str(m["failures"]),
            _f(m["frames_per_s"], 2),
        ]
        for m in report["models"]
    ]


def render_video_eval(report: dict[str, Any], *, echo: Callable[[str], None]) -> None:
    from .cli_compare import comparison_lines, outcome_lines

    rows = table_rows(report)
    echo(f"eval on {report['expressions']} expression(s) of {report['clips']} clip(s) of {report['data']}")
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    for r in [COLUMNS, *rows]:
        echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    for line in [*comparison_lines(report), *outcome_lines(report, unit="expression", key="key")]:
        echo(line)
    files = report.get("files") or {}
    echo(
        f"report: {files.get('html')}, {files.get('summary')}, {files.get('metrics')}; "
        f"masks and results.json under {files.get('predictions')}"
    )


def refuse_image_options(**given: Any) -> None:
    """Options of image eval that have no meaning (yet) on video: refused by name before anything runs."""
    for name, value in given.items():
        if value:
            raise UsageError(
                f"{name} does not apply to a video set",
                hint=f"drop {name}: video is scored with DAVIS's J and F (empty frames by DAVIS's rules); "
                "gate with --fail-under jf=0.6 / --require-better",
            )


def run_video_eval(*, json_out: bool, rank0: bool, on_stage: Callable[[str], None], **kwargs: Any) -> None:
    from .evaluate.video_run import check_video_failures, check_video_gate, evaluate_video

    report = evaluate_video(on_stage=on_stage, **kwargs)
    if not rank0:
        return
    d = report.to_dict()
    if json_out:
        emit_json(d)
    else:
        render_video_eval(d, echo=click.echo)
    try:
        check_video_failures(report)  # failed expressions first: a gate judged on part of the set says little
        check_video_gate(report)
    except (EvalFailuresError, EvalGateError) as e:
        click.echo(f"error: {e.one_line()}", err=True)
        sys.exit(e.exit_code)


__all__ = ["run_video_eval", "render_video_eval", "refuse_image_options"]
