"""The comparison lines that ``eval`` prints for images and for video: a module of their own so that
both CLI modules take them from below (``cli_eval`` dispatches to ``cli_eval_video``)."""

from __future__ import annotations

from typing import Any


def signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def interval(ci: list[float] | None) -> str:
    return "[-]" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def comparison_lines(report: dict[str, Any]) -> list[str]:
    """One line per model and metric against the baseline: mean difference, 95 % interval, W/T/L, p."""
    comps = report.get("comparisons") or []
    if not comps:
        return []
    first = comps[0]
    unit = "expression" if report.get("kind") == "video" else "image"
    lines = [
        f"against the baseline {report.get('baseline')} (model - baseline per {unit}; 95 % paired bootstrap, "
        f"{first['resamples']} resamples, seed {first['seed']}; Wilcoxon signed-rank):"
    ]
    width = max(len(c["model"]) for c in comps)
    metric_width = max(len(c["metric"]) for c in comps)
    for c in comps:
        p = f"p={c['p_value']:.3g}" if c["p_value"] is not None else f"p=- ({c['p_value_note']})"
        against = f" vs {c['baseline']}" if c["baseline"] != report.get("baseline") else ""  # NAME[forced] pairs
        lower = " (lower is better)" if c.get("higher_is_better") is False else ""
        lines.append(
            f"  {(c['model'] + against).ljust(width)}  {c['metric']:<{metric_width}}  {signed(c['mean_difference'])} "
            f"{interval(c['ci95'])}  wins/ties/losses {c['wins']}/{c['ties']}/{c['losses']} of {c['n']}  {p}{lower}"
        )
    return lines


def outcome_lines(report: dict[str, Any], *, unit: str, key: str) -> list[str]:
    """The lines after the table, the same for images and video: the gate, what --resume kept, the
    failures (the first 10; ``key`` names an item: ``stem`` or ``key``) and the notes."""
    lines = []
    gate = report.get("gate")
    if gate:
        lines.append("gate: passed" if gate["passed"] else f"gate: {len(gate['failed'])} condition(s) failed")
        lines += [f"gate failed: {line}" for line in gate["failed"]]
    if report.get("resumed"):
        lines.append(f"resumed: {report['resumed']} {unit} result(s) kept from the earlier run")
    lines += [f"failed: {f['model']}/{f[key]}: {f['error']}" for f in (report.get("failures") or [])[:10]]
    lines += [f"note: {note}" for note in report.get("notes") or []]
    return lines


__all__ = ["comparison_lines", "interval", "outcome_lines", "signed"]
