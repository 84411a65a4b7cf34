"""Find the base Sa2VA folder when the user did not pass ``--base``.

The embedded training config names ``path`` (the model training started from)
and, in v2, ``pretrained_pth``. Neither is reliably the right base: in a v2
fine-tune ``path`` is the raw InternVL3/Qwen-VL model while the LoRA was
trained on the full Sa2VA weights. So a candidate is used only if it passes the
same base check as an explicit ``--base``; otherwise the error says exactly
what was found and what to pass.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConvertError, PlanError
from ..read.hf_folder import open_hf_folder
from .keymap import Keymap
from .planner import check_base


def hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def cached_snapshot(repo_id: str) -> Path | None:
    """The newest local snapshot of a hub repo id, looked up offline (no network)."""
    if repo_id.count("/") != 1:
        return None
    folder = "models--" + repo_id.replace("/", "--")
    for cache in hf_cache_dirs():
        snaps = cache / folder / "snapshots"
        if snaps.is_dir():
            found = sorted((p for p in snaps.iterdir() if (p / "config.json").exists()),
                           key=lambda p: p.stat().st_mtime, reverse=True)
            if found:
                return found[0]
    return None


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
