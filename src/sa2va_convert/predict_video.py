"""Segment a clip with a converted folder: a frames folder or a video file, masks per frame and a GIF.

The image ``predict``'s design for video: the child process (``runner/child.py``, mode
``predict_video``) gives the model every frame, in order, as ``predict_forward(video=...)`` (as
upstream's video evaluation does), decoding each frame only when the model asks for it, and saves
the first ``[SEG]``'s mask of each frame as ``<frame>.png`` in the mask folder, plus the masks
tinted over the frames as an animated GIF.

A video file is decoded with **PyAV** (FFmpeg's libraries; the ``video`` extra): it is the
well-kept binding that reads every container FFmpeg reads without a separate ffmpeg binary. Its
frames are written one at a time as PNGs into a temporary folder that the child reads the same way
as a frames folder, so memory does not grow with the video's length (disk does, while it runs).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import InputError, UsageError
from .evaluate.data import IMAGE_EXTS, image_size
from .evaluate.video_data import natural_key, video_prompt
from .predict import PredictReport
from .read.adapter_folder import is_model_folder
from .runner.failure import child_failure, debug_details
from .runner.process import DEFAULT_TIMEOUT, check_device, resolve_python, run_child
from .runner.report import report_from

VIDEO_FILE_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def is_clip(path: str | os.PathLike) -> bool:
    """A frames folder or a video file (by its extension), rather than one image."""
    p = Path(path)
    return p.is_dir() or p.suffix.lower() in VIDEO_FILE_EXTS


def clip_frames(folder: Path) -> list[Path]:
    frames = sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS),
        key=lambda p: natural_key(p.name),
    )
    if not frames:
        raise InputError("no frames in the folder", path=folder, hint="pass a folder of images (00000.jpg, ...)")
    first = image_size(frames[0])
    for f in frames[1:]:  # headers only, before any model loads: the model gets the frames as one video
        if image_size(f) != first:
            raise InputError(
                f"frame {f.name} is {image_size(f)[0]}x{image_size(f)[1]}, the first frame {first[0]}x{first[1]}",
                path=f,
                hint="all frames of a clip must have one size",
            )
    return frames


def decode_video(video: Path, into: Path, *, max_frames: int | None = None) -> list[Path]:
    """The video's frames as PNG files ``00000.png``, ... in ``into``, one frame in memory at a time."""
    try:
        import av
    except ImportError:
        raise UsageError(
            "a video file is read with PyAV, which is not installed",
            hint="pip install 'sa2va-convert[video]' (or pip install av), or pass a folder of frames",
        ) from None
    paths: list[Path] = []
    try:
        with av.open(str(video)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if max_frames is not None and i >= max_frames:
                    break
                p = into / f"{i:05d}.png"
                frame.to_image().save(p)
                paths.append(p)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise InputError(
            f"cannot decode the video ({type(e).__name__}: {e})",
            path=video,
            hint="pass an MP4/AVI/MOV file FFmpeg reads, or a frames folder",
        ) from None
    if not paths:
        raise InputError("the video has no frames", path=video, hint="pass a video with a video stream")
    return paths


def predict_video(
    folder: str | os.PathLike,
    clip: str | os.PathLike,
    prompt: str,
    *,
    device: str = "auto",
    python: str | os.PathLike | None = None,
    save_dir: str | os.PathLike | None = None,
    overlay: str | os.PathLike | None = None,
    max_new_tokens: int = 128,
    max_frames: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    on_stage: Callable[[str], None] | None = None,
) -> PredictReport:
    """Run the folder's predict_forward on every frame of ``clip``; one mask PNG per frame in
    ``save_dir`` (named after the frame), the overlay GIF at ``overlay``."""
    folder = Path(folder).resolve()
    source = Path(clip).resolve()
    if not is_model_folder(folder):  # an adapter folder too, as predict takes it
        raise InputError("not a model folder (no config.json)", path=folder, hint="pass the converted folder")
    if not source.exists():
        raise InputError("clip not found", path=source, hint="pass a folder of frames or a video file")
    if not prompt.strip():
        raise InputError("the prompt is empty", hint='say what to segment, e.g. "the red car"')
    text = video_prompt(prompt)
    exe = resolve_python(python)
    device = check_device(device)
    say = on_stage or (lambda _m: None)
    with tempfile.TemporaryDirectory(prefix="sa2va-frames-") as tmp:
        if source.is_dir():
            frames = clip_frames(source)[:max_frames] if max_frames else clip_frames(source)
        else:
            say("decoding the video")
            frames = decode_video(source, Path(tmp), max_frames=max_frames)
        mask_dir = Path(save_dir).resolve() if save_dir is not None else Path(tmp) / "masks"
        mask_dir.mkdir(parents=True, exist_ok=True)
        overlay_path = Path(overlay).resolve() if overlay is not None else None
        if overlay_path is not None:
            overlay_path.parent.mkdir(parents=True, exist_ok=True)
        args = {
            "mode": "predict_video",
            "folder": str(folder),
            "device": device,
            "max_new_tokens": int(max_new_tokens),
            "prompt": text,
            "frames": [str(p) for p in frames],
            "mask_dir": str(mask_dir),
            "overlay_path": None if overlay_path is None else str(overlay_path),
        }
        run = run_child(args, python=exe, timeout=timeout, on_stage=on_stage)
        report = report_from(run, folder, exe)
        if run.timed_out or not report.ok:
            failure = child_failure(run, folder=folder, python=exe, device=device, timeout=timeout, what="prediction")
            failure.details = debug_details(run)
            raise failure
    run0 = report.runs[0]
    notes = [
        f"{run0['n_frames']} frame(s) of {run0['width']}x{run0['height']}, all given to predict_forward(video=...)"
    ]
    if save_dir is not None:
        notes.append(f"one mask per frame in {mask_dir} (the first [SEG]'s masks, as upstream's video evaluation)")
    if run0["n_masks"] == 0:
        notes.append("the model answered without [SEG]: every frame's mask is empty")
    return PredictReport(
        folder=str(folder),
        image=str(source),
        prompt=text,
        prediction=run0["prediction"],
        n_masks=run0["n_masks"],
        mask_shapes=[[run0["n_frames"], run0["height"], run0["width"]]] if run0["n_masks"] else [],
        mask_files=[str(mask_dir)] if save_dir is not None else [],
        overlay_file=None if overlay_path is None else str(overlay_path),
        device=report.device,
        dtype=report.dtype,
        seconds=report.seconds,
        timings=report.timings,
        versions=report.versions,
        notes=notes + report.warnings,
    )


__all__ = ["VIDEO_FILE_EXTS", "decode_video", "is_clip", "predict_video"]
