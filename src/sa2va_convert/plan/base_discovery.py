"""Find the base Sa2VA folder when the user did not pass ``--base``.

The embedded training config names ``path`` (the model training started from)
and, in v2, ``pretrained_pth``. Neither is reliably the right base: in a v2
fine-tune ``path`` is the raw InternVL3/Qwen-VL model while the LoRA was
trained on the full Sa2VA weights. So a candidate is used only if it passes the
same base check as an explicit ``--base``; otherwise the error says exactly
what was found and what to pass.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConvertError, InputError, PlanError
from ..read.hf_folder import open_hf_folder
from .keymap import Keymap
from .planner import check_base

# A Hub repo id, optionally pinned: ``org/name`` or ``org/name@revision``.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a Hub repo id, offline, as huggingface_hub itself resolves it.

    ``snapshot_download(..., local_files_only=True)`` honours ``HF_HUB_CACHE`` / ``HF_HOME`` and
    follows ``refs/<revision>`` (``refs/main`` by default) to the snapshot that revision names:
    the same folder ``from_pretrained(repo_id)`` would load, not merely the newest one on disk.
    ``org/name@rev`` picks a branch, tag or commit. Nothing is downloaded."""
    if not _REPO_ID.match(repo_id):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    repo, _, revision = repo_id.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None


def resolve_base(spec: str | Path) -> Path:
    """``--base``: a folder, or else a Hub repo id (``org/name[@rev]``) found in the offline HF cache."""
    text = str(spec)  # the CLI hands a Path: its repr would print PosixPath('org/name')
    path = Path(text).expanduser()
    if path.exists() or not _REPO_ID.match(text):
        return path  # open_hf_folder reports a missing or wrong folder with its own message
    snap = cached_snapshot(text)
    if snap is None:
        raise InputError(
            f"no folder '{text}' here, and the Hub repo '{text}' is not in the local Hugging Face cache",
            path=text,
            hint=f"download it first (`hf download {text.partition('@')[0]}`), "
            "or pass --base DIR with the base Sa2VA folder",
        )
    return snap


def candidates(config_path: str | None) -> list[Path]:
    out: list[Path] = []
    if config_path:
        p = Path(config_path).expanduser()
        if p.is_dir():
            out.append(p)
        snap = cached_snapshot(config_path.strip("./"))
        if snap is not None:
            out.append(snap)
    return out


def discover_base(keymap: Keymap, embedded, checkpoint_path: str) -> Path:
    path = getattr(embedded, "path", None)
    pretrained = getattr(embedded, "pretrained_pth", None)
    tried: list[str] = []
    for cand in candidates(path):
        try:
            hf = open_hf_folder(cand)
            check_base(list(hf.weights.keys()), hf.config, keymap, str(cand))
            return cand
        except ConvertError as e:
            tried.append(f"{cand} ({e.message.split(';')[0]})")
    found = f"the training config names path={path!r}" if path else "the checkpoint carries no training config path"
    if pretrained:
        found += f" and pretrained_pth={pretrained!r}"
    if tried:
        found += "; tried " + ", ".join(tried)
    elif path:
        found += " (not found locally or in the Hugging Face cache)"
    models = ", ".join(keymap.models) if keymap.models else keymap.family_label
    raise PlanError(
        f"no --base given and no usable base found: {found}",
        path=checkpoint_path,
        hint=f"pass --base DIR with the Sa2VA HF folder the fine-tune started from ({models})",
    )
