"""Round trip: load the written folder with transformers and run ``predict_forward``, and judge it.

The model runs in a child process started by ``runner/`` (the folder's remote code never runs in
the converter's process); this module asks it for the round trip's runs (the model's own answer
on a synthetic image and video, and, when that answer has no ``[SEG]``, one with ``[SEG]`` forced
so the mask path runs either way), holds the report to the contract (``runner/report.py``), and
says in one line what happened. Every failure is one :class:`~sa2va_convert.errors.VerifyError`
(exit 7, or 9 when the environment is at fault) whose hint says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import VerifyError
from ..read.adapter_folder import is_model_folder
from ..runner.failure import child_failure, debug_details
from ..runner.memory import check_fits
from ..runner.process import DEFAULT_TIMEOUT, StartedChild, check_device, resolve_python, run_child
from ..runner.report import ChildReport, judge_loading, judge_runs, report_from

DEFAULT_PROMPT = "<image>Please segment the object."


def run_roundtrip(
    folder: str | os.PathLike,
    *,
    device: str = "auto",
    python: str | os.PathLike | None = None,
    max_new_tokens: int = 32,
    prompt: str = DEFAULT_PROMPT,
    timeout: float = DEFAULT_TIMEOUT,
    video: bool = True,
    expect_mask: bool = False,
    force_seg: bool = True,
    on_stage: Callable[[str], None] | None = None,
    started: StartedChild | None = None,
) -> ChildReport:
    """Load ``folder`` in a child process and run predict_forward on a synthetic image (and video).

    ``started``: a child already started (and importing) while the folder was written, by the
    conversion (``StartedChild``); it must have been started with the same ``python`` and ``device``.

    Raises VerifyError on any failure (the report is attached as ``error.report``); returns the
    report when the folder loads with no missing/unexpected keys, in the dtype written, and
    predict_forward honours its output contract.
    """
    folder = Path(folder).resolve()
    if not is_model_folder(folder):
        raise VerifyError("not a model folder (no config.json)", path=folder, hint="pass the converted folder")
    exe = resolve_python(python)
    device = check_device(device)
    memory = check_fits(folder, device)
    args = {
        "mode": "roundtrip",
        "folder": str(folder),
        "device": device,
        "max_new_tokens": int(max_new_tokens),
        "prompt": prompt,
        "video": bool(video),
        "force_seg": bool(force_seg),
    }
    if started is not None:
        run = started.run(args, timeout=timeout, on_stage=on_stage)
    else:
        run = run_child(args, python=exe, timeout=timeout, on_stage=on_stage)
    report = report_from(run, folder, exe)
    report.raw["memory"] = memory
    if run.waited is not None:  # started during the conversion: its imports were done while it waited
        report.raw["started_early"] = {"waited_s": run.waited}
    if run.timed_out or not report.ok:
        err = child_failure(run, folder=folder, python=exe, device=device, timeout=timeout)
        err.report = report
        err.details = debug_details(run)
        raise err
    try:
        judge_loading(report, folder)
        report.warnings += judge_runs(report, folder, expect_mask=expect_mask)
    except VerifyError as e:
        report.ok = False
        e.report = report
        raise
    return report


# ---------------------------------------------------------------- one line for reports


def summary_line(rt: dict[str, Any]) -> str:
    """One line about a round trip: where it ran, whether the model said [SEG] itself, what the
    forced [SEG] gave, the video, and the time."""
    versions = rt.get("versions") or {}
    mapped = rt.get("cuda_mapped") or {}
    where = f"loaded on {rt.get('device')}"
    if mapped:
        kinds = ", ".join(f"{_MAPPED_WORDS.get(k, k)} {n}" for k, n in mapped.items() if n)
        where += f" (CUDA calls mapped to CPU: {sum(mapped.values())}" + (f": {kinds}" if kinds else "") + ")"
    nested = rt.get("nested_imports") or []
    if nested:
        where += (
            f" (remote code imports {len(nested)} file(s) deeper than transformers copies for a local folder: "
            f"{', '.join(nested[:3])}{' ...' if len(nested) > 3 else ''}; made importable)"
        )
    if rt.get("loaded_as"):  # a '.' in the folder's name, under transformers < 4.57
        where += (
            f" (through a link named {rt['loaded_as']}: this transformers cannot import remote code from a "
            "folder whose name has a '.')"
        )
    cap = rt.get("generation_cap") or ""
    if cap and cap != "preparing_for_generation":  # the code writes its length into the call (Qwen-VL)
        where += f" (no preparing_for_generation(): answers capped by wrapping {cap})"
    parts = [
        f"{where} in {rt.get('dtype')} (transformers {versions.get('transformers')}, torch {versions.get('torch')})"
    ]
    runs = {r.get("name"): r for r in rt.get("runs", [])}
    own = runs.get("image")
    if own is not None:
        said = "yes" if own.get("seg_count") else "no"
        parts.append(
            f"answered with [SEG]: {said}"
            + (f", {_masks(own)}" if own.get("seg_count") else f" ({own.get('prediction', '')[:40]!r})")
        )
    for r in rt.get("runs", []):
        if r.get("forced"):
            parts.append(f"forced [SEG]: {_masks(r)}")
        elif r.get("name") not in ("image",):
            parts.append(f"{r.get('name')}: {_masks(r)}")
    return "; ".join(parts) + f"; {rt.get('seconds', 0):.1f}s"


_MAPPED_WORDS = {
    "tensor.cuda": ".cuda()",
    "module.cuda": "module.cuda()",
    "to(cuda)": ".to('cuda')",
    "device=cuda": "device='cuda'",
    "autocast": "autocast('cuda')",
    "pin_memory": "pin_memory()",
}


def _masks(run: dict[str, Any]) -> str:
    n = run.get("n_masks") or 0
    shapes = sorted({"(" + ", ".join(map(str, m["shape"])) + ")" for m in run.get("masks", [])})
    return f"{n} mask{'s' if n != 1 else ''}" + (f" {' '.join(shapes)}" if shapes else "")


__all__ = ["DEFAULT_PROMPT", "run_roundtrip", "summary_line"]
