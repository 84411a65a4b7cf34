"""What a converted folder was made from, and how: recorded in its report, compared when ``--all`` runs again.

``--all`` used to skip a finished ``OUT/iter_N`` whenever the checkpoint's sha256 matched, even when the
rerun asked for another ``--dtype``, ``--base``, keymap or shard size: exit 0 with the old folders.
The recipe is everything that decides the bytes of the output:

* the checkpoint's sha256;
* the base folder (its real path, and the size and modification time of each of its files), the
  ``--pretrained`` and ``--sam2`` files and the ``--code-from`` folder (the same, where given);
* the keymap (its name and the sha256 of its YAML, so edited rules count too);
* the options that change the output: dtype, shard size, LoRA alpha and rsLoRA (and whether they
  override the training config), allowed-unused patterns, template, merge device (a GPU merge may
  round a few elements differently).

It is written into ``conversion_report.json`` under ``recipe``. A rerun skips a folder only when the
recipe it would record is the one recorded; otherwise ``--force`` reconverts it, and without ``--force``
the folder is reported with what differs. Options that cannot change a byte of the output (``--verify``,
``--device``, ``--read-back``, ``--allow-global``, ...) are not part of it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .read.folder_files import list_model_files

RECIPE_KEY = "recipe"
RECIPE_VERSION = 1

__all__ = [
    "RECIPE_KEY",
    "RECIPE_VERSION",
    "build_recipe",
    "file_identity",
    "folder_identity",
    "keymap_identity",
    "differences",
]


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _stat(path: Path) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def file_identity(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """A file by real path, size and modification time (hashing a multi-GB ``--pretrained`` would cost a pass)."""
    if path is None:
        return None
    return {"path": _real(path), "stat": _stat(Path(path))}


def folder_identity(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """A model folder by real path and each file's size and modification time (shards are not hashed)."""
    if path is None:
        return None
    root = Path(path)
    return {"path": _real(root), "files": {f: _stat(root / f) for f in list_model_files(root)}}


def keymap_identity(name: str, source: str | os.PathLike) -> dict[str, Any]:
    try:
        digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    except OSError:
        digest = None
    return {"name": name, "sha256": digest}


def build_recipe(
    options: Any, *, checkpoint_sha256: str | None, base: str | os.PathLike, keymap: Mapping[str, Any]
) -> dict[str, Any]:
    """The recipe of one conversion: ``options`` is a ``ConvertOptions``; ``base`` the base folder used
    (for the raw-InternVL recipe, the raw folder); ``keymap`` a ``keymap_identity``.

    ``format`` is recorded only for an adapter, so folders converted before it existed keep their recipe."""
    fmt = getattr(options, "output_format", "folder")
    recipe: dict[str, Any] = {
        "version": RECIPE_VERSION,
        "checkpoint_sha256": checkpoint_sha256,
        "base": folder_identity(base),
        "pretrained": file_identity(options.pretrained),
        "sam2": file_identity(options.sam2),
        "code_from": folder_identity(options.code_from),
        "keymap": dict(keymap),
        "options": {
            "dtype": options.dtype,
            "max_shard_bytes": int(options.max_shard_bytes),
            "lora_alpha": None if options.lora_alpha is None else float(options.lora_alpha),
            "rslora": options.rslora,
            "override_lora_config": bool(options.override_lora_config),
            "allow_unused": list(options.allow_unused),
            "template": options.template,
            # as resolved (``auto``, the default, is cuda where torch sees a GPU): the device, not the
            # spelling, decides the merge's arithmetic, and CPU-only runs record "cpu" as before
            "merge_device": _resolved_merge_device(options.merge_device),
        },
    }
    if fmt != "folder":
        recipe["options"]["format"] = fmt
    return recipe


def _resolved_merge_device(name: str) -> str:
    from .transform.produce import resolve_merge_device  # torch: only when a recipe is built

    return resolve_merge_device(name)


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."
    return "none" if value is None else str(value)


def _folder_changes(what: str, old: Any, new: Any) -> list[str]:
    if old == new:
        return []
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [
            f"{what} {_short((old or {}).get('path') if isinstance(old, dict) else old)} -> "
            f"{_short((new or {}).get('path') if isinstance(new, dict) else new)}"
        ]
    if old.get("path") != new.get("path"):
        return [f"{what} {old.get('path')} -> {new.get('path')}"]
    if "files" in old or "files" in new:
        before, after = old.get("files") or {}, new.get("files") or {}
        changed = sorted(f for f in set(before) | set(after) if before.get(f) != after.get(f))
        more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
        return [f"{what} files changed since (size or modification time): {', '.join(changed[:3])}{more}"]
    return [f"{what} {old.get('path')} changed since (size or modification time)"]


def differences(recorded: Any, current: Mapping[str, Any]) -> list[str]:
    """What differs between a folder's recorded recipe and this run's, one phrase each ([] = the same)."""
    if not isinstance(recorded, dict) or recorded.get("version") != RECIPE_VERSION:
        return ["its inputs and options were not recorded (converted by an older sa2va-convert)"]
    out: list[str] = []
    if recorded.get("checkpoint_sha256") != current.get("checkpoint_sha256"):
        out.append(
            f"checkpoint bytes changed (sha256 {_short(recorded.get('checkpoint_sha256'))} -> "
            f"{_short(current.get('checkpoint_sha256'))})"
        )
    for key, what in (
        ("base", "base"),
        ("code_from", "--code-from"),
        ("pretrained", "--pretrained"),
        ("sam2", "--sam2"),
    ):
        out += _folder_changes(what, recorded.get(key), current.get(key))
    old_km, new_km = recorded.get("keymap") or {}, current.get("keymap") or {}
    if old_km.get("name") != new_km.get("name"):
        out.append(f"keymap {old_km.get('name')} -> {new_km.get('name')}")
    elif old_km.get("sha256") != new_km.get("sha256"):
        out.append(
            f"keymap {new_km.get('name')}'s rules changed since (sha256 {_short(old_km.get('sha256'))} -> "
            f"{_short(new_km.get('sha256'))})"
        )
    old_opt, new_opt = recorded.get("options") or {}, current.get("options") or {}
    for key in sorted(set(old_opt) | set(new_opt)):
        if old_opt.get(key) != new_opt.get(key):
            out.append(f"{key} {_short(old_opt.get(key))} -> {_short(new_opt.get(key))}")
    return out
