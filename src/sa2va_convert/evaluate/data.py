"""The user's evaluation set: pairs of image and ground-truth mask, with a prompt each.

Two ways to give it, because that is how segmentation data is usually kept:

- a folder with ``images/`` and ``masks/``, paired by file stem (``images/0007.jpg`` with
  ``masks/0007.png``);
- a manifest, JSONL or CSV, with ``image``, ``mask`` and an optional ``prompt`` per row, paths
  relative to the manifest (a per-row prompt overrides ``--prompt``).

Everything is checked before any model is loaded, reading only file headers (PIL opens images
lazily; ``.npy`` headers are read without the data), so a typo or a mask of the wrong size costs
a second, not a model load, and fails as one line naming the file and the fix (``InputError``,
exit 3). Only paths are kept in memory, never pixels: the set streams through the model.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import InputError, UsageError
from ..predict import wrap_prompt

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: ``.gif`` because older segmentation sets ship their label maps as GIF: palette images whose
#: indices are the labels, read as indices (not colours), like a palette PNG
MASK_EXTS = (".png", ".gif", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy")
MANIFEST_EXTS = (".jsonl", ".csv")
#: formats whose compression moves pixel values: an edge saved as 255 on 0 comes back as a ramp of
#: greys, so "any non-zero pixel" would count a halo of noise as foreground
LOSSY_MASK_EXTS = (".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class MaskRule:
    """How a ground-truth mask's values become foreground, background and void, for the whole set.

    ``threshold`` is only for lossy masks (JPEG): their greys are compression noise around a
    binary mask, so the user must say where the cut lies; lossless masks (PNG, ``.npy``) keep the
    rule "non-zero is foreground", so a 0/1 PNG stays readable whatever the threshold."""

    threshold: float | None = None
    ignore_index: int | None = None
    #: a multi-class mask's class of this row (``--prompt-map`` on a folder or manifest): only
    #: pixels of this value are foreground; set per sample, never for the whole set
    label: int | None = None

    def describe(self) -> str:
        parts = []
        if self.threshold is not None:
            parts.append(f"JPEG masks: grey > {self.threshold:g} is foreground")
        if self.ignore_index is not None:
            parts.append(f"value {self.ignore_index} is void (left out of every count)")
        return "; ".join(parts)


#: the default rule: non-zero is foreground, no void value, lossy masks refused
PLAIN = MaskRule()


@dataclass(frozen=True)
class Sample:
    """One image of the set: ``stem`` names its prediction file, so it must be unique."""

    stem: str
    image: Path
    mask: Path
    prompt: str  # already wrapped: "<image>Please segment the X."
    rule: MaskRule = PLAIN
    #: where ``mask`` comes from when it is not the user's file (a COCO JSON's instances): the mask
    #: is then written by ``write_truth`` into the report folder before any image is scored
    truth: CocoTruth | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, str]:
        return {"stem": self.stem, "image": str(self.image), "mask": str(self.mask), "prompt": self.prompt}


@dataclass(frozen=True)
class CocoTruth:
    """The instances of one category in one COCO image: their union is the ground truth."""

    height: int
    width: int
    segmentations: tuple[Any, ...]


def _class_map(path: Path) -> dict[int, str]:
    """``--prompt-map`` for multi-class masks: class index (a mask value) -> prompt, in index order."""
    out: dict[int, str] = {}
    for k, v in read_prompt_map(path).items():
        if not k.isdigit():
            raise InputError(
                f"--prompt-map key {k!r} is not a class index (a mask value, 0 or more)",
                path=path,
                hint='for class-index masks key the map by value: {"1": "liver", "2": "kidney"}',
            )
        out[int(k)] = v
    return dict(sorted(out.items()))


def _pycocotools_mask() -> Any:
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        raise UsageError(
            "a COCO annotation file is read with pycocotools, which is not installed",
            hint="pip install 'sa2va-convert[eval]' (or pip install pycocotools)",
        ) from None
    return coco_mask


def _read_json(path: Path, what: str, hint: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"the {what} is not UTF-8 text", path=path, hint=hint) from None
    except json.JSONDecodeError as e:
        raise InputError(f"the {what} is not JSON ({e.msg}, line {e.lineno})", path=path, hint=hint) from None
    except OSError as e:
        raise InputError(f"cannot read the {what} ({e.strerror or e})", path=path, hint=hint) from None


def read_prompt_map(path: str | os.PathLike) -> dict[str, str]:
    """``--prompt-map``: a JSON object from a category (name or id) or class index to its prompt."""
    p = Path(path)
    hint = '--prompt-map takes a JSON object such as {"1": "liver", "2": "kidney"}'
    d = _read_json(p, "prompt map", hint)
    if not isinstance(d, dict) or not d:
        raise InputError("the prompt map is not a non-empty JSON object", path=p, hint=hint)
    out: dict[str, str] = {}
    for k, v in d.items():
        if not isinstance(v, str) or not v.strip():
            raise InputError(f"the prompt for {k!r} is not non-empty text", path=p, hint=hint)
        out[str(k).strip()] = v
    return out


def _from_coco(path: Path, images_dir: Path | None, prompt_map: dict[str, str] | None, truth_dir: Path) -> list[Sample]:
    """One sample per image x category present in a COCO instance file: the union of that
    category's instances is the truth, the category's name (or its ``--prompt-map`` entry) the
    prompt. Keyed ``<image stem>-c<category id>``; the masks are decoded only by ``write_truth``."""
    hint = "--data takes a COCO instance file: images, annotations (segmentation: polygons or RLE), categories"
    d = _read_json(path, "annotation file", hint)
    if not isinstance(d, dict) or not all(isinstance(d.get(k), list) for k in ("images", "annotations", "categories")):
        raise InputError(
            "not a COCO instance file (needs images, annotations and categories lists)", path=path, hint=hint
        )
    root = images_dir if images_dir is not None else path.parent
    if not root.is_dir():
        raise InputError(
            "the images folder does not exist", path=root, hint="--images names the folder of the COCO images"
        )
    try:
        cats = {int(c["id"]): str(c["name"]) for c in d["categories"]}
        imgs = {int(i["id"]): (str(i["file_name"]), int(i["height"]), int(i["width"])) for i in d["images"]}
        anns = [(int(a["image_id"]), int(a["category_id"]), a["segmentation"]) for a in d["annotations"]]
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(
            f"a COCO entry lacks a field or has a wrong type ({type(e).__name__}: {e})", path=path, hint=hint
        ) from None
    prompts = dict(cats)
    if prompt_map:
        by_name = {name: cid for cid, name in cats.items()}
        for k, v in prompt_map.items():
            cid = by_name.get(k)
            if cid is None and k.lstrip("-").isdigit() and int(k) in cats:
                cid = int(k)
            if cid is None:
                raise InputError(
                    f"--prompt-map names {k!r}, which is no category of the file",
                    path=path,
                    hint="key the map by category name or id: "
                    + ", ".join(f"{i} {n!r}" for i, n in sorted(cats.items())),
                )
            prompts[cid] = v
    groups: dict[tuple[int, int], list[Any]] = {}
    for n, (iid, cid, seg) in enumerate(anns):
        if iid not in imgs or cid not in cats:
            raise InputError(
                f"annotation {n} names image {iid} or category {cid}, which the file does not list",
                path=path,
                hint=hint,
            )
        if not isinstance(seg, (list, dict)) or (isinstance(seg, dict) and not {"counts", "size"} <= set(seg)):
            raise InputError(
                f"annotation {n} has no polygon or RLE segmentation",
                path=path,
                hint="a box-only annotation has no mask",
            )
        groups.setdefault((iid, cid), []).append(seg)
    samples: list[Sample] = []
    owners: dict[str, str] = {}
    for (iid, cid), segs in sorted(groups.items()):
        name, h, w = imgs[iid]
        image = root / name
        if not image.is_file():
            raise InputError(
                f"image not found: {image}",
                path=path,
                hint="file_name is relative to the JSON's folder, or to --images DIR",
            )
        key = f"{Path(name).stem}-c{cid}"
        if owners.setdefault(key, name) != name:
            raise InputError(
                f"two images are named {Path(name).stem!r} ({owners[key]}, {name})",
                path=path,
                hint="give the images distinct file names: predictions are saved as <stem>-c<category>.png",
            )
        iw, ih = image_size(image)
        if (iw, ih) != (w, h):
            raise InputError(
                f"image is {iw}x{ih} but the annotation file says {w}x{h} (W x H)",
                path=image,
                hint="fix the image's width/height in the JSON, or the image",
            )
        text = _wrapped(prompts[cid], where=path, row=f"category {cid}")
        samples.append(Sample(key, image.resolve(), truth_dir / f"{key}.png", text, truth=CocoTruth(h, w, tuple(segs))))
    if not samples:
        raise InputError("the annotation file has no segmentations", path=path, hint=hint)
    return samples


def coco_union(t: CocoTruth) -> Any:
    """The union of a category's instances as a bool (H, W) array: polygons, and RLE compressed
    (counts a string) or not (counts a list), decoded by pycocotools."""
    import numpy as np

    cm = _pycocotools_mask()
    out = np.zeros((t.height, t.width), dtype=bool)
    for seg in t.segmentations:
        if isinstance(seg, list):
            rle = cm.merge(cm.frPyObjects(seg, t.height, t.width))
        elif isinstance(seg["counts"], list):
            rle = cm.frPyObjects(seg, t.height, t.width)
        else:
            rle = dict(seg)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
        m = cm.decode(rle)
        out |= (m[..., 0] if m.ndim == 3 else m).astype(bool)
    return out


def write_truth(samples: list[Sample]) -> None:
    """Write each sample's decoded truth (COCO) as a 0/255 PNG at its ``mask`` path, in the
    report folder, never the user's: rewritten on ``--resume`` (the same file gives the same PNG)."""
    from PIL import Image

    for s in samples:
        if s.truth is None:
            continue
        s.mask.parent.mkdir(parents=True, exist_ok=True)
        # under a temporary name, then renamed: a reader (another rank of a torchrun job on a shared
        # filesystem, a run interrupted mid-write and resumed) sees the old file or the new, never half
        tmp = s.mask.with_name(f".{s.mask.name}.tmp{os.getpid()}")
        Image.fromarray(coco_union(s.truth).astype("uint8") * 255, "L").save(tmp, format="PNG")
        os.replace(tmp, s.mask)


def _files(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in exts:
            continue
        if p.stem in out:
            raise InputError(
                f"two files share the stem {p.stem!r} ({out[p.stem].name}, {p.name})",
                path=p,
                hint="keep one file per stem: images and masks are paired by stem",
            )
        out[p.stem] = p
    return out


def _from_folder(root: Path, prompt: str | None) -> list[Sample]:
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise InputError(
                f"no {d.name}/ folder",
                path=root,
                hint="--data takes a folder with images/ and masks/ (paired by file stem), or a .jsonl/.csv manifest",
            )
    images, masks = _files(images_dir, IMAGE_EXTS), _files(masks_dir, MASK_EXTS)
    if not images:
        raise InputError(
            f"no images in {images_dir.name}/ (looked for {', '.join(IMAGE_EXTS)})",
            path=images_dir,
            hint="put the evaluation images there",
        )
    for stem, img in images.items():
        if stem not in masks:
            raise InputError(
                f"image has no mask (expected masks/{stem}.png or .npy)",
                path=img,
                hint="add its ground-truth mask, or move the image out of images/",
            )
    for stem, m in masks.items():
        if stem not in images:
            raise InputError(
                f"mask has no image (expected images/{stem}.png, .jpg, ...)",
                path=m,
                hint="add the image, or move the mask out of masks/",
            )
    text = _wrapped(prompt, where=root)
    return [Sample(stem, images[stem].resolve(), masks[stem].resolve(), text) for stem in sorted(images)]


def _wrapped(prompt: str | None, *, where: Path | str, row: str | None = None) -> str:
    if prompt is None:
        raise InputError(
            f"no prompt for {row}" if row else "no prompt",
            path=where,
            hint="pass --prompt 'blood vessel' (what to segment), or give each manifest row a prompt",
        )
    try:
        return wrap_prompt(prompt)
    except InputError:
        raise InputError(
            "the prompt is empty" + (f" ({row})" if row else ""),
            path=where,
            hint='say what to segment, e.g. --prompt "blood vessel"',
        ) from None


def manifest_rows(
    path: Path, required: tuple[str, ...] = ("image", "mask"), optional: tuple[str, ...] = ("prompt",)
) -> list[tuple[str, dict]]:
    """(where, row) for each row of a JSONL or CSV manifest: ``file:line`` so an error points at the
    line. ``required`` columns are checked in a CSV's header (a JSONL row is checked by its reader);
    the image and the video manifest share this reader."""
    example = "{" + ", ".join(f'"{c}": ...' for c in (*required, *optional)) + "}"
    rows: list[tuple[str, dict]] = []
    try:
        if path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(
                            f"line {n} is not JSON ({e.msg})",
                            path=f"{path}:{n}",
                            hint=f"one object per line: {example}",
                        ) from None
                    if not isinstance(row, dict):
                        raise InputError(
                            f"line {n} is not a JSON object", path=f"{path}:{n}", hint=f"one object per line: {example}"
                        )
                    rows.append((f"{path}:{n}", row))
        else:
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                missing = set(required) - set(reader.fieldnames or [])
                if missing:
                    raise InputError(
                        f"the CSV header lacks {', '.join(sorted(missing))}",
                        path=path,
                        hint=f"first line: {','.join((*required, *optional))} ({', '.join(optional)} optional)",
                    )
                for n, row in enumerate(reader, 2):
                    rows.append((f"{path}:{n}", dict(row)))
    except UnicodeDecodeError:
        raise InputError("the manifest is not UTF-8 text", path=path, hint="save it as UTF-8 JSONL or CSV") from None
    except OSError as e:
        raise InputError(f"cannot read the manifest ({e.strerror or e})", path=path, hint="check the path") from None
    return rows


def _from_manifest(path: Path, prompt: str | None) -> list[Sample]:
    """One sample per row. An image may be named on several rows (RefCOCO style: one image, several
    referring expressions, each with its own mask): each such row is keyed ``<stem>-p<k>`` (k = 1, 2, ...
    in row order), so its prediction PNG, its metrics.csv row, ``--resume`` and the paired comparison
    stay per image and prompt; an image on one row keeps its plain stem."""
    rows: list[tuple[str, Path, Path, str]] = []
    for where, row in manifest_rows(path):
        for key in ("image", "mask"):
            if not str(row.get(key) or "").strip():
                raise InputError(f"row has no {key!r}", path=where, hint="every row needs image and mask paths")
        image, mask = (path.parent / str(row["image"]).strip()), (path.parent / str(row["mask"]).strip())
        if not image.is_file():
            raise InputError(
                f"image not found: {image}",
                path=where,
                hint="paths in a manifest are relative to the manifest's folder",
            )
        if not mask.is_file():
            raise InputError(
                f"mask not found: {mask}", path=where, hint="paths in a manifest are relative to the manifest's folder"
            )
        own = row.get("prompt")
        if own is not None and not isinstance(own, str):
            raise InputError(
                f"prompt is a {type(own).__name__}, not text", path=where, hint="write the prompt as a string"
            )
        if own is not None and not own.strip() and path.suffix.lower() == ".csv":
            own = None  # an empty CSV cell is an absent prompt: --prompt applies
        text = _wrapped(prompt if own is None else own, where=where, row=image.name)
        rows.append((where, image.resolve(), mask.resolve(), text))
    if not rows:
        raise InputError("the manifest has no rows", path=path, hint="one row per image: image, mask, prompt")
    per_image: dict[Path, int] = {}
    for _, image, _, _ in rows:
        per_image[image] = per_image.get(image, 0) + 1
    samples: list[Sample] = []
    owners: dict[str, tuple[Path, str]] = {}  # key -> (image, first row): two images may not share a key
    seen: dict[Path, int] = {}
    for where, image, mask, text in rows:
        seen[image] = seen.get(image, 0) + 1
        key = f"{image.stem}-p{seen[image]}" if per_image[image] > 1 else image.stem
        if key in owners and owners[key][0] != image:
            raise InputError(
                f"two rows have images named {image.stem!r} (also {owners[key][1]})"
                if key == image.stem
                else f"row key {key!r} is taken by another image's file name (also {owners[key][1]})",
                path=where,
                hint="give the images distinct file names: predictions are saved as <stem>.png "
                "(<stem>-p<k>.png for an image on several rows)",
            )
        owners.setdefault(key, (image, where))
        samples.append(Sample(key, image, mask, text))
    return samples


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header; InputError when it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(
            f"cannot read the image ({type(e).__name__}: {e})",
            path=path,
            hint="replace it with a readable PNG/JPEG, or remove it from the set",
        ) from None


def mask_size(path: Path) -> tuple[int, int]:
    """(width, height) of a mask: an image header, or the ``.npy`` header (bool/integer, (H, W))."""
    if path.suffix.lower() != ".npy":
        try:
            return image_size(path)
        except InputError as e:
            raise InputError(
                e.message.replace("the image", "the mask"),
                path=path,
                hint="replace it with a readable PNG (any non-zero pixel is foreground) or .npy",
            ) from None
    import numpy as np

    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(
            f"cannot read the mask ({type(e).__name__}: {e})",
            path=path,
            hint="save it with numpy.save as a bool or uint8 (H, W) array",
        ) from None
    if arr.dtype.kind not in "biu":
        raise InputError(
            f"mask dtype is {arr.dtype}, not bool or integer",
            path=path,
            hint="save it as bool or uint8 (non-zero = foreground)",
        )
    shape = arr.shape[1:] if arr.ndim == 3 and arr.shape[0] == 1 else arr.shape
    if len(shape) != 2:
        raise InputError(
            f"mask has shape {list(arr.shape)}, not (H, W)", path=path, hint="save one (H, W) mask per image"
        )
    return int(shape[1]), int(shape[0])


def _mask_values(path: Path):
    """A mask file's raw values: (H, W) or (H, W, C) for an image (a palette image, GIF or PNG,
    gives its indices), (H, W) for ``.npy``."""
    import numpy as np
    from PIL import Image

    if Path(path).suffix.lower() == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2:
            raise ValueError(f"mask {path} has shape {list(arr.shape)}, not (H, W)")
        return arr
    with Image.open(path) as im:
        return np.asarray(im)


def read_mask(path: Path):
    """A mask's pixels as a bool (H, W) array, by the rule ``mask_size`` checked the header for:
    an image (any non-zero pixel, in any channel, is foreground) or ``.npy`` (bool or integer,
    (H, W) or (1, H, W); non-zero is foreground). Read one at a time, when an image is scored."""
    arr = _mask_values(path)
    return (arr != 0).any(axis=-1) if arr.ndim == 3 else arr != 0


def read_truth(path: Path, rule: MaskRule = PLAIN):
    """A ground-truth mask as (foreground, valid): both bool (H, W); ``valid`` is None when the
    rule names no void value. Void pixels are neither foreground nor background, so the scorer
    must drop the prediction's pixels there too: an annotator's "don't know" band must not
    count for or against a model."""
    arr = _mask_values(path)
    valid = None
    if rule.ignore_index is not None:
        void = arr == rule.ignore_index
        valid = ~(void.all(axis=-1) if arr.ndim == 3 else void)
    if rule.label is not None:
        fg = arr == rule.label
        fg = fg.all(axis=-1) if fg.ndim == 3 else fg  # a class is one value in every channel
    elif rule.threshold is not None and Path(path).suffix.lower() in LOSSY_MASK_EXTS:
        fg = arr > rule.threshold
    else:
        fg = arr != 0
    fg = fg.any(axis=-1) if fg.ndim == 3 else fg
    if valid is not None:
        fg = fg & valid
    return fg, valid


def check_sample(s: Sample) -> None:
    """Header-only check of one pair: both readable, the same size, and a lossy mask only with a
    threshold (its compression noise would otherwise be foreground). A COCO sample's image was
    checked against the JSON's size when it was read; its mask is not written yet."""
    if s.truth is not None:
        return
    if s.mask.suffix.lower() in LOSSY_MASK_EXTS and s.rule.threshold is None:
        raise InputError(
            f"mask is {s.mask.suffix.lstrip('.').upper()}, a lossy format: its edges are grey noise, "
            "not a clean 0/non-zero mask",
            path=s.mask,
            hint="save masks as PNG or .npy, or pass --mask-threshold 127 (grey values above it are foreground)",
        )
    iw, ih = image_size(s.image)
    mw, mh = mask_size(s.mask)
    if (iw, ih) != (mw, mh):
        raise InputError(
            f"mask is {mw}x{mh} but its image {s.image.name} is {iw}x{ih} (W x H)",
            path=s.mask,
            hint="masks must have their image's size: resize with nearest-neighbour, or fix the pairing",
        )


def load_dataset(
    data: str | os.PathLike,
    prompt: str | None = None,
    *,
    limit: int | None = None,
    check: bool = True,
    rule: MaskRule = PLAIN,
    images: str | os.PathLike | None = None,
    prompt_map: str | os.PathLike | None = None,
    truth_dir: str | os.PathLike | None = None,
) -> list[Sample]:
    """The samples of ``data`` (folder, manifest or COCO ``.json``) in a stable order (sorted by
    stem for a folder, file order for a manifest, image then category id for COCO), the first
    ``limit`` of them, each checked (headers only). A COCO file's truth masks go to ``truth_dir``
    (written by ``write_truth``)."""
    path = Path(data)
    is_coco = path.suffix.lower() == ".json"
    if images is not None and not is_coco:
        raise UsageError("--images is only for a COCO annotation file (--data annotations.json)", hint="drop --images")
    classes: dict[int, str] | None = None
    if prompt_map is not None and not is_coco:
        if prompt is not None:
            raise UsageError(
                "--prompt does not apply with --prompt-map: each class's prompt is its map entry",
                hint="drop --prompt, or drop --prompt-map to segment one thing in every mask",
            )
        classes = _class_map(Path(prompt_map))
        if rule.ignore_index is not None and rule.ignore_index in classes:
            raise UsageError(
                f"--prompt-map names class {rule.ignore_index}, which --ignore-index {rule.ignore_index} makes void: "
                "its pixels would be left out of every count, so its rows could never score",
                hint="drop that class from the prompt map, or pass the void value your masks use to --ignore-index",
            )
        prompt = "_"  # a placeholder: every row's prompt is replaced by its class's
    if rule.threshold is not None and not 0 <= rule.threshold < 255:
        raise UsageError(
            f"--mask-threshold must lie in [0, 255), not {rule.threshold:g}",
            hint="JPEG masks are 8-bit: e.g. --mask-threshold 127",
        )
    if rule.ignore_index is not None and rule.ignore_index < 0:
        raise UsageError(
            f"--ignore-index must be a mask value (0 or more), not {rule.ignore_index}",
            hint="e.g. --ignore-index 255 (the VOC void label)",
        )
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, not {limit}", hint="--limit N evaluates the first N images")
    if prompt is not None and not prompt.strip():
        raise InputError("the prompt is empty", path=path, hint='say what to segment, e.g. --prompt "blood vessel"')
    if not path.exists():
        raise InputError(
            "data not found", path=path, hint="--data takes a folder with images/ and masks/, or a .jsonl/.csv manifest"
        )
    if path.is_dir():
        samples = _from_folder(path, prompt)
    elif path.suffix.lower() in MANIFEST_EXTS:
        samples = _from_manifest(path, prompt)
    elif is_coco:
        if prompt is not None:
            raise UsageError(
                "--prompt does not apply to a COCO file: each row's prompt is its category's name",
                hint="drop --prompt, or pass --prompt-map map.json to word a category's prompt",
            )
        _pycocotools_mask()
        if truth_dir is None:
            raise UsageError(
                "a COCO file's truth masks need a folder to be written to",
                hint="pass truth_dir (eval uses OUT/truth/)",
            )
        samples = _from_coco(
            path,
            None if images is None else Path(images),
            None if prompt_map is None else read_prompt_map(prompt_map),
            Path(truth_dir).resolve(),
        )
    else:
        raise InputError(
            f"not a data folder or manifest ({path.suffix or 'no extension'})",
            path=path,
            hint="--data takes a folder with images/ and masks/, a .jsonl/.csv manifest, or a COCO .json",
        )
    if rule != PLAIN:
        samples = [replace(s, rule=rule) for s in samples]
    if classes is not None:
        samples = [
            replace(
                s,
                stem=f"{s.stem}-c{k}",
                prompt=_wrapped(text, where=Path(prompt_map or ""), row=f"class {k}"),
                rule=replace(s.rule, label=k),
            )
            for s in samples
            for k, text in classes.items()
        ]
    if limit is not None:
        samples = samples[:limit]
    if check:
        for s in samples:
            check_sample(s)
    return samples


__all__ = [
    "CocoTruth",
    "MaskRule",
    "coco_union",
    "read_prompt_map",
    "write_truth",
    "PLAIN",
    "Sample",
    "load_dataset",
    "check_sample",
    "image_size",
    "mask_size",
    "read_mask",
    "read_truth",
]
