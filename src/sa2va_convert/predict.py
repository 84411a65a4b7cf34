"""Segment a user's image with a converted folder: the model's own predict_forward, saved as PNGs.

The point is to let a user see what the converted model predicts before shipping it, with the
model's real code path, so it runs like the round trip: in a separate process (the folder's
remote code never runs inside the converter), optionally under another interpreter (``python=``)
such as a CUDA environment when the upstream code needs a GPU. The child writes the masks
(white on black, one PNG per ``[SEG]``: ``mask.png``, ``mask_1.png``, ...) and an overlay (the
masks tinted over the image).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, OutputError
from .read.adapter_folder import is_model_folder
from .runner.failure import child_failure, debug_details
from .runner.process import DEFAULT_TIMEOUT, check_device, resolve_python, run_child
from .runner.report import judge_runs, report_from

IMAGE_TOKEN = "<image>"


#: upstream's referring-segmentation prompt for an image: the shape of the template built in
#: projects/sa2va/evaluation/dataset/RES.py line 186 (bytedance/Sa2VA 9832e1a), the words the released
#: models were scored with on RefCOCO; its video counterpart is refVOS.py line 13
PROMPT_TEMPLATE = IMAGE_TOKEN + "\n Please segment {} in this image."


def wrap_prompt(prompt: str) -> str:
    """``"the red car"`` -> ``"<image>\\n Please segment the red car in this image."`` (``PROMPT_TEMPLATE``),
    the referring expression kept as written, as upstream inserts its RefCOCO sentences: a fine-tune
    evaluated with the words upstream evaluates with is scored on the task it was trained for, and
    ``predict`` wraps the same way so that what a user sees there is what ``eval`` scores. A prompt
    that already holds ``<image>`` is the user's whole request, used as it is (the image goes where
    the token stands)."""
    text = prompt.strip()
    if IMAGE_TOKEN in text:
        return text
    if not text:
        raise InputError("the prompt is empty", hint='say what to segment, e.g. "the red car"')
    return PROMPT_TEMPLATE.format(text.rstrip(". "))


def mask_file_names(path: str | os.PathLike, count: int) -> list[Path]:
    """The files ``count`` masks are saved to: ``mask.png``, ``mask_1.png``, ... (as the child names them)."""
    p = Path(path)
    return [p if i == 0 else p.with_name(f"{p.stem}_{i}{p.suffix or '.png'}") for i in range(count)]


@dataclass
class PredictReport:
    folder: str
    image: str
    prompt: str
    prediction: str
    n_masks: int
    mask_shapes: list[list[int]] = field(default_factory=list)
    mask_files: list[str] = field(default_factory=list)
    overlay_file: str | None = None
    device: str | None = None
    dtype: str | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, **self.__dict__}


def predict(
    folder: str | os.PathLike,
    image_path: str | os.PathLike,
    prompt: str,
    *,
    device: str = "auto",
    python: str | os.PathLike | None = None,
    save: str | os.PathLike | None = None,
    overlay: str | os.PathLike | None = None,
    max_new_tokens: int = 128,
    timeout: float = DEFAULT_TIMEOUT,
    on_stage: Callable[[str], None] | None = None,
) -> PredictReport:
    """Run the folder's predict_forward on ``image_path`` with ``prompt``; save masks to ``save``
    (``mask.png`` -> ``mask.png``, ``mask_1.png``, ...) and the overlay to ``overlay`` when given.

    Raises InputError for a missing/unreadable image, VerifyError when the model fails (with a
    hint naming the fix when its code needs a GPU that the child does not have).
    """
    folder = Path(folder).resolve()
    image = Path(image_path).resolve()
    if not is_model_folder(folder):
        raise InputError("not a model folder (no config.json)", path=folder, hint="pass the converted folder")
    if not image.is_file():
        raise InputError("image not found", path=image, hint="pass the path of a PNG or JPEG file")
    text = wrap_prompt(prompt)
    exe = resolve_python(python)
    device = check_device(device)
    paths = {}
    for key, value in (("mask_path", save), ("overlay_path", overlay)):
        if value is not None:
            p = Path(value).resolve()
            p.parent.mkdir(parents=True, exist_ok=True)
            paths[key] = str(p)
    args = {
        "mode": "predict",
        "folder": str(folder),
        "device": device,
        "max_new_tokens": int(max_new_tokens),
        "prompt": text,
        "image": str(image),
        "mask_path": paths.get("mask_path"),
        "overlay_path": paths.get("overlay_path"),
    }
    run = run_child(args, python=exe, timeout=timeout, on_stage=on_stage)
    report = report_from(run, folder, exe)
    if run.timed_out or not report.ok:
        err = run.result and (run.result.get("error") or {})
        if err and err.get("stage") == "image":
            raise InputError(f"cannot read the image ({err['message']})", path=image, hint="pass a PNG or JPEG file")
        if err and err.get("stage") == "save":
            raise OutputError(
                f"cannot save the masks ({err['type']}: {err['message']})",
                path=save or overlay,
                hint="choose writable --save/--overlay paths",
            )
        failure = child_failure(run, folder=folder, python=exe, device=device, timeout=timeout, what="prediction")
        failure.details = debug_details(run)
        raise failure
    notes = judge_runs(report, folder)
    run0 = report.runs[0]
    saved = report.raw.get("saved") or {}
    if run0["n_masks"] == 0:
        notes.append("the model answered without [SEG]: no mask" + (" file written" if save else ""))
    return PredictReport(
        folder=str(folder),
        image=str(image),
        prompt=text,
        prediction=run0["prediction"],
        n_masks=run0["n_masks"],
        mask_shapes=[m["shape"] for m in run0["masks"]],
        mask_files=list(saved.get("masks") or []),
        overlay_file=saved.get("overlay"),
        device=report.device,
        dtype=report.dtype,
        seconds=report.seconds,
        timings=report.timings,
        versions=report.versions,
        notes=notes + report.warnings,
    )


__all__ = ["PredictReport", "predict", "wrap_prompt", "mask_file_names", "PROMPT_TEMPLATE"]
