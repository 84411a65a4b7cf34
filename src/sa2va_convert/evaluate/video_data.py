"""The user's video evaluation set: clips of frames, referring expressions, ground truth per frame.

Three layouts, because that is how referring-video data is kept:

- a **frames folder**: ``DATA/frames/<clip>/<frame>.jpg`` and ``DATA/masks/<clip>/<frame>.png`` (one
  expression per clip, prompt ``--prompt``) or ``DATA/masks/<clip>/<expression>/<frame>.png`` (several;
  a ``prompt.txt`` in the expression's folder gives its prompt, else ``--prompt``);
- a **manifest** (JSONL or CSV) with ``frames`` (a clip's frame folder), ``masks`` (its mask folder)
  and ``prompt`` per row, optional ``clip`` and ``expression`` ids; paths relative to the manifest;
- the **MeViS / ReVOS layout** upstream evaluates: ``meta_expressions.json`` (``{"videos": {video:
  {"frames": [...], "expressions": {id: {"exp": ..., "anno_id": [...]}}}}}``) with ``mask_dict.json``
  beside it (``{anno_id: [COCO RLE or null per frame]}``, decoded with pycocotools) and, for ReVOS,
  ``mask_dict_foreground.json`` (its robustness score R); frames under ``JPEGImages/<video>/`` beside
  the JSON (or ``--images``), as ``<frame>.jpg`` (upstream ``evaluation/dataset/refVOS.py``).

Every expression of a clip gets every frame of the clip, in order, as upstream's evaluation feeds
them (``refVOS.py`` builds the whole clip; ``sa2va_eval_ref_vos.py`` passes it as ``video=``); the
model decides which frames its language model sees. Only paths (and, for the MeViS layout, the RLE
dictionary) are held: frames and masks are decoded one at a time when they are needed, so memory
does not grow with a clip's length. Everything is checked (file headers only) before a model loads.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UsageError
from .data import IMAGE_EXTS, MANIFEST_EXTS, image_size, manifest_rows, mask_size, read_mask

VIDEO_MASK_EXTS = (".png", ".gif", ".npy")
#: upstream's video prompts (bytedance/Sa2VA projects/sa2va/evaluation/dataset/refVOS.py lines 13-14):
#: an expression with a question mark is asked as a question
SEG_PROMPT = "<image>\nPlease segment {}."
SEG_PROMPT_QUESTION = "<image>\n {} Please respond with a segmentation mask."
IMAGE_TOKEN = "<image>"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$")


def video_prompt(expression: str) -> str:
    """The text upstream's video evaluation sends for an expression; one holding ``<image>`` is kept."""
    text = expression.strip()
    if IMAGE_TOKEN in text:
        return text
    return SEG_PROMPT_QUESTION.format(text) if "?" in text else SEG_PROMPT.format(text)


def natural_key(name: str) -> list[Any]:
    """``frame2`` before ``frame10``: frame numbers are not always zero-padded."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class RleStore:
    """A MeViS/ReVOS mask dictionary (and the foreground one), loaded once, decoded a frame at a time."""

    def __init__(self, masks: dict[str, Any], foreground: dict[str, Any] | None, source: Path) -> None:
        self.masks, self.foreground, self.source = masks, foreground, source

    def frame(self, anno_ids: tuple[str, ...], index: int, height: int, width: int) -> np.ndarray:
        from pycocotools import mask as coco_mask

        out = np.zeros((height, width), dtype=bool)
        for a in anno_ids:
            rle = self.masks[a][index]
            if rle:
                out |= coco_mask.decode(rle).astype(bool)
        return out

    def foreground_frame(self, video: str, index: int) -> np.ndarray | None:
        if self.foreground is None or video not in self.foreground:
            return None
        from pycocotools import mask as coco_mask

        m = coco_mask.decode(self.foreground[video]["masks_rle"][index])
        return (m.sum(axis=2) if m.ndim == 3 else m) > 0


@dataclass(frozen=True)
class VideoSample:
    """One expression of one clip: its frames in order, its prompt and its ground truth per frame."""

    clip: str
    expression: str
    text: str  # the expression as written in the data
    prompt: str  # what the model gets (upstream's template)
    frames: tuple[Path, ...]
    width: int
    height: int
    masks: tuple[Path, ...] = ()  # frames-folder / manifest truth, one file per frame
    anno_ids: tuple[str, ...] = ()  # MeViS-layout truth: the union of these annotations' RLEs
    store: RleStore | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        return f"{self.clip}/{self.expression}"

    @property
    def frame_names(self) -> list[str]:
        return [p.stem for p in self.frames]

    def truth(self, index: int) -> np.ndarray:
        """Frame ``index``'s ground truth as a bool (H, W) array (any non-zero pixel is foreground)."""
        if self.store is not None:
            return self.store.frame(self.anno_ids, index, self.height, self.width)
        return np.asarray(read_mask(self.masks[index]), dtype=bool)

    def foreground(self, index: int) -> np.ndarray | None:
        return None if self.store is None else self.store.foreground_frame(self.clip, index)

    @property
    def has_foreground(self) -> bool:
        return self.store is not None and self.store.foreground is not None and self.clip in self.store.foreground

    def to_item(self) -> dict[str, Any]:
        """What the model process needs (paths and text only)."""
        return {
            "key": self.key,
            "clip": self.clip,
            "expression": self.expression,
            "prompt": self.prompt,
            "frames": [str(p) for p in self.frames],
        }


def is_video_data(data: str | os.PathLike) -> bool:
    """Whether ``--data`` is one of the video layouts (decided without reading more than a header)."""
    path = Path(data)
    if path.is_dir():
        return (path / "frames").is_dir() and not (path / "images").is_dir()
    suffix = path.suffix.lower()
    if suffix in MANIFEST_EXTS and path.is_file():
        try:
            with open(path, encoding="utf-8", newline="") as f:
                if suffix == ".csv":
                    return "frames" in (csv.DictReader(f).fieldnames or [])
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        return isinstance(row, dict) and "frames" in row and "image" not in row
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
    if suffix == ".json" and path.is_file():
        if "meta_expressions" in path.name:
            return True
        try:
            with open(path, "rb") as f:
                head = re.sub(rb"\s", b"", f.read(64))
            return head.startswith(b'{"videos"')
        except OSError:
            return False
    return False


def _safe_id(value: str, what: str, where: Path | str) -> str:
    """Clip and expression ids become folder names under predictions/: plain names only."""
    if not _SAFE.match(value) or value in (".", ".."):
        raise InputError(
            f"{what} {value!r} cannot name a folder",
            path=where,
            hint=f"use a plain {what} name (letters, digits, _ - . and spaces)",
        )
    return value


def _frames_of(folder: Path, where: Path | str) -> list[Path]:
    if not folder.is_dir():
        raise InputError("frame folder not found", path=folder if where == folder else where, hint="check the path")
    frames = sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS),
        key=lambda p: natural_key(p.name),
    )
    if not frames:
        raise InputError(
            f"no frames in {folder.name}/ (looked for {', '.join(IMAGE_EXTS)})",
            path=folder,
            hint="put the clip's frames there, one image per frame (00000.jpg, 00001.jpg, ...)",
        )
    stems = [p.stem for p in frames]
    if len(set(stems)) != len(stems):
        twice = next(s for s in stems if stems.count(s) > 1)
        raise InputError(f"two frames share the stem {twice!r}", path=folder, hint="keep one file per frame")
    return frames


def _masks_for(frames: list[Path], folder: Path) -> tuple[Path, ...]:
    """One mask per frame, paired by stem; a frame without a mask, or a mask without a frame, is an error."""
    if not folder.is_dir():
        raise InputError("mask folder not found", path=folder, hint="one mask folder per clip and expression")
    masks: dict[str, Path] = {}
    for p in folder.iterdir():
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in VIDEO_MASK_EXTS:
            masks[p.stem] = p
    out = []
    for f in frames:
        if f.stem not in masks:
            raise InputError(
                f"frame {f.name} has no mask (expected {f.stem}.png in {folder})",
                path=folder,
                hint="give every frame a mask (an all-black PNG where the object is absent)",
            )
        out.append(masks.pop(f.stem).resolve())
    if masks:
        extra = sorted(masks)[0]
        raise InputError(f"mask {masks[extra].name} has no frame", path=masks[extra], hint="remove it or add the frame")
    return tuple(out)


def _check_sizes(frames: list[Path], masks: tuple[Path, ...], where: Path) -> tuple[int, int]:
    """Every frame of a clip the same size (the model gets them as one video) and every mask its frame's."""
    w, h = image_size(frames[0])
    for i, f in enumerate(frames):
        fw, fh = (w, h) if i == 0 else image_size(f)
        if (fw, fh) != (w, h):
            raise InputError(
                f"frame {f.name} is {fw}x{fh}, the clip's first frame is {w}x{h} (W x H)",
                path=f,
                hint="all frames of a clip must have one size",
            )
        if masks:
            mw, mh = mask_size(masks[i])
            if (mw, mh) != (w, h):
                raise InputError(
                    f"mask is {mw}x{mh} but its frame {f.name} is {w}x{h} (W x H)",
                    path=masks[i],
                    hint="masks must have their frame's size",
                )
    return w, h


def _prompt_for(own: str | None, prompt: str | None, where: Path | str) -> tuple[str, str]:
    text = own if own is not None and own.strip() else prompt
    if text is None or not text.strip():
        raise InputError(
            "no prompt",
            path=where,
            hint="pass --prompt 'the red car', or give the expression a prompt (prompt.txt, a manifest's prompt)",
        )
    return text.strip(), video_prompt(text)


def _from_folder(root: Path, prompt: str | None) -> list[VideoSample]:
    frames_root, masks_root = root / "frames", root / "masks"
    if not masks_root.is_dir():
        raise InputError(
            "no masks/ folder beside frames/",
            path=root,
            hint="put each clip's masks in masks/<clip>/ (or masks/<clip>/<expression>/), one per frame",
        )
    clips = sorted(
        (d for d in frames_root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name
    )
    if not clips:
        raise InputError("no clip folders in frames/", path=frames_root, hint="one folder of frames per clip")
    out: list[VideoSample] = []
    for clip_dir in clips:
        clip = _safe_id(clip_dir.name, "clip", clip_dir)
        frames = _frames_of(clip_dir, clip_dir)
        mask_dir = masks_root / clip
        if not mask_dir.is_dir():
            raise InputError("clip has no mask folder", path=clip_dir, hint=f"add masks/{clip}/ with a mask per frame")
        subdirs = sorted(
            (d for d in mask_dir.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name
        )
        expressions = [(d.name, d) for d in subdirs] if subdirs else [("0", mask_dir)]
        for exp_id, exp_dir in expressions:
            own = (exp_dir / "prompt.txt").read_text(encoding="utf-8") if (exp_dir / "prompt.txt").is_file() else None
            text, wrapped = _prompt_for(own, prompt, exp_dir)
            masks = _masks_for(frames, exp_dir)
            w, h = _check_sizes(frames, masks, exp_dir)
            out.append(
                VideoSample(
                    clip,
                    _safe_id(exp_id, "expression", exp_dir),
                    text,
                    wrapped,
                    tuple(f.resolve() for f in frames),
                    w,
                    h,
                    masks,
                )
            )
    return out


def _manifest_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = manifest_rows(path, required=("frames", "masks"), optional=("prompt", "clip", "expression"))
    if not rows:
        raise InputError(
            "the manifest has no rows", path=path, hint="one row per clip and expression: frames, masks, prompt"
        )
    return rows


def _from_manifest(path: Path, prompt: str | None) -> list[VideoSample]:
    out: list[VideoSample] = []
    seen: dict[str, int] = {}
    keys: set[str] = set()
    for where, row in _manifest_rows(path):
        for col in ("frames", "masks"):
            if not str(row.get(col) or "").strip():
                raise InputError(f"row has no {col!r}", path=where, hint="every row needs frames and masks folders")
        frames_dir = (path.parent / str(row["frames"]).strip()).resolve()
        frames = _frames_of(frames_dir, where)
        masks = _masks_for(frames, (path.parent / str(row["masks"]).strip()).resolve())
        clip = _safe_id(str(row.get("clip") or frames_dir.name).strip(), "clip", where)
        exp_id = str(row.get("expression") or "").strip() or str(seen.get(clip, 0))
        seen[clip] = seen.get(clip, 0) + 1
        exp_id = _safe_id(exp_id, "expression", where)
        if f"{clip}/{exp_id}" in keys:
            raise InputError(
                f"clip {clip!r} has expression {exp_id!r} twice", path=where, hint="give each row its own expression id"
            )
        keys.add(f"{clip}/{exp_id}")
        own = row.get("prompt")
        text, wrapped = _prompt_for(str(own) if own is not None else None, prompt, where)
        w, h = _check_sizes(frames, masks, frames_dir)
        out.append(VideoSample(clip, exp_id, text, wrapped, tuple(frames), w, h, masks))
    return out


def _load_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{what} not found", path=path, hint="check the path") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(
            f"the {what} is not JSON ({e})", path=path, hint="pass the file upstream's layout names"
        ) from None


def _from_meta(path: Path, images: Path | None, mask_dict: Path | None) -> list[VideoSample]:
    try:
        from pycocotools import mask as _  # noqa: F401
    except ImportError:
        raise UsageError(
            "the MeViS/ReVOS layout's masks are COCO RLEs, read with pycocotools, which is not installed",
            hint="pip install 'sa2va-convert[eval]' (or pip install pycocotools)",
        ) from None
    meta = _load_json(path, "expression file")
    videos = meta.get("videos") if isinstance(meta, dict) else None
    if not isinstance(videos, dict) or not videos:
        raise InputError('no "videos" object', path=path, hint="pass MeViS/ReVOS meta_expressions.json")
    mask_path = mask_dict or path.parent / "mask_dict.json"
    if not mask_path.is_file():
        raise InputError(
            "no mask dictionary beside the expression file (mask_dict.json)",
            path=mask_path,
            hint="put mask_dict.json ({anno_id: [RLE per frame]}) beside it: without ground truth nothing is scored",
        )
    masks = _load_json(mask_path, "mask dictionary")
    fg_path = mask_path.parent / "mask_dict_foreground.json"
    foreground = _load_json(fg_path, "foreground mask dictionary") if fg_path.is_file() else None
    store = RleStore(masks, foreground, mask_path)
    image_root = (
        images
        if images is not None
        else (path.parent / "JPEGImages" if (path.parent / "JPEGImages").is_dir() else path.parent)
    )
    out: list[VideoSample] = []
    for video in videos:
        v = videos[video]
        clip = _safe_id(str(video), "video", path)
        names = [str(n) for n in v.get("frames") or []]
        if not names:
            raise InputError(f"video {video!r} lists no frames", path=path, hint="each video needs its frame names")
        frames = [image_root / clip / f"{n}.jpg" for n in names]
        for fpath in frames:
            if not fpath.is_file():
                raise InputError(
                    f"frame of video {video!r} not found: {fpath}",
                    path=path,
                    hint="frames are <images>/<video>/<frame>.jpg; pass --images to say where <images> is",
                )
        w, h = _check_sizes(frames, (), image_root / clip)
        for exp_id in sorted(v.get("expressions") or {}):  # upstream's order (refVOS.py sorts the ids)
            e = v["expressions"][exp_id]
            anno = tuple(str(a) for a in (e.get("anno_id") or []))
            for a in anno:
                rles = masks.get(a)
                if not isinstance(rles, list) or len(rles) != len(frames):
                    raise InputError(
                        f"annotation {a} of {video}/{exp_id} has "
                        + ("no entry" if not isinstance(rles, list) else f"{len(rles)} masks for {len(frames)} frames"),
                        path=mask_path,
                        hint="the mask dictionary must hold one RLE (or null) per frame for every anno_id",
                    )
                first = next((r for r in rles if r), None)
                if first is not None and list(first.get("size", [])) != [h, w]:
                    raise InputError(
                        f"annotation {a}'s masks are {first.get('size')} (H, W), the frames of {video} {h}x{w}",
                        path=mask_path,
                        hint="the masks must have the frames' size",
                    )
            text, wrapped = _prompt_for(str(e.get("exp") or ""), None, f"{path} ({video}/{exp_id})")
            out.append(
                VideoSample(
                    clip, _safe_id(str(exp_id), "expression", path), text, wrapped, tuple(frames), w, h, (), anno, store
                )
            )
    return out


def load_video_dataset(
    data: str | os.PathLike,
    prompt: str | None = None,
    *,
    limit: int | None = None,
    images: str | os.PathLike | None = None,
    mask_dict: str | os.PathLike | None = None,
) -> list[VideoSample]:
    """The expressions of ``data`` in a stable order (clip, then expression), the first ``limit``."""
    path = Path(data)
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, not {limit}", hint="--limit N evaluates the first N expressions")
    if not path.exists():
        raise InputError(
            "data not found",
            path=path,
            hint="--data takes a folder with frames/ and masks/, a manifest or meta_expressions.json",
        )
    is_meta = path.suffix.lower() == ".json"
    if images is not None and not is_meta:
        raise UsageError("--images is only for an expression file (--data meta_expressions.json)", hint="drop --images")
    if is_meta:
        if prompt is not None:
            raise UsageError(
                "--prompt does not apply to meta_expressions.json: each expression is its own prompt",
                hint="drop --prompt",
            )
        samples = _from_meta(
            path.resolve(),
            None if images is None else Path(images).resolve(),
            None if mask_dict is None else Path(mask_dict),
        )
    elif path.is_dir():
        samples = _from_folder(path.resolve(), prompt)
    else:
        samples = _from_manifest(path.resolve(), prompt)
    if not samples:
        raise InputError("no expressions to evaluate", path=path, hint="add clips with expressions")
    return samples[:limit] if limit is not None else samples


__all__ = [
    "RleStore",
    "VideoSample",
    "is_video_data",
    "load_video_dataset",
    "natural_key",
    "video_prompt",
]
