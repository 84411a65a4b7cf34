"""The files of a model folder, each one checked to be something we may read and copy.

Whatever a base folder holds besides its shards (config, tokenizer, remote code, ...) is copied into
OUT, a folder users push to the Hub. Listing it with ``rglob`` + ``is_file`` skipped what is not a
regular file (a dangling symlink, a FIFO) silently, so OUT was published without, e.g., ``templates.py``,
and followed a symlink to any file on the machine, copying its content into OUT. Here the folder is
listed with ``lstat`` before anything in it is opened (opening a FIFO would block) and refused, naming
the entry, when it holds:

* anything that is not a regular file or a directory (FIFO, socket, device);
* a symbolic link that leads nowhere (dangling, a loop) or to a directory;
* a symbolic link to a file outside the folder, with one exception: the Hugging Face cache layout,
  ``models--ORG--NAME/snapshots/<rev>/file`` -> ``models--ORG--NAME/blobs/<hash>`` (that repo's blobs).

``.cache/`` (``hf download --local-dir`` metadata) is not part of the model and is not looked at.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import InputError

__all__ = ["list_model_files", "hf_cache_blobs"]

_SKIPPED_DIRS = {".cache"}
_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def hf_cache_blobs(real_root: Path) -> Path | None:
    """``models--ORG--NAME/blobs`` when ``real_root`` is one of that repo's snapshots (or a folder in one)."""
    for folder in (real_root, *real_root.parents):
        if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
            return folder.parent.parent / "blobs"
    return None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def list_model_files(root: Path, *, role: str = "base folder") -> list[str]:
    """Every file under ``root`` as a relative name (``/``-separated), each a regular file or an allowed link.

    Raises InputError naming the first entry that is not (see the module docstring)."""
    root = Path(root)
    real_root = Path(os.path.realpath(root))
    blobs = hf_cache_blobs(real_root)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not (d in _SKIPPED_DIRS and not (here / d).is_symlink()))
        # os.walk lists a symlink to a directory among dirnames and does not enter it: check it as an entry
        entries = sorted(filenames) + [d for d in dirnames if (here / d).is_symlink()]
        for name in entries:
            path = here / name
            rel = (rel_dir / name).as_posix()
            _check_entry(path, rel, root, real_root, blobs, role)
            found.append(rel)
    return sorted(found)


def _check_entry(path: Path, rel: str, root: Path, real_root: Path, blobs: Path | None, role: str) -> None:
    try:
        st = os.lstat(path)
    except OSError as e:
        raise InputError(f"cannot be examined ({e.strerror or e})", path=path, hint=f"check the {role}") from None
    if stat.S_ISREG(st.st_mode):
        return
    if not stat.S_ISLNK(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise InputError(
            f"is {kind}, not a regular file; the {role} would be published without it",
            path=path,
            hint=f"replace it with the regular file from the original model, or remove it from the {role}",
        )
    target = Path(os.path.realpath(path))
    try:
        tst = os.stat(path)
    except OSError as e:
        what = "part of a symbolic link loop" if e.errno == errno.ELOOP else "a dangling symbolic link"
        raise InputError(
            f"is {what} (to {os.readlink(path)}); the {role} would be published without it",
            path=path,
            hint="restore the file it points to, or replace the link by the file itself",
        ) from None
    if stat.S_ISDIR(tst.st_mode):
        raise InputError(
            f"is a symbolic link to a directory ({target}); only files and real folders are read",
            path=path,
            hint=f"replace the link by a copy of the folder inside the {role}",
        )
    if not stat.S_ISREG(tst.st_mode):
        kind = _KINDS.get(stat.S_IFMT(tst.st_mode), "not a regular file")
        raise InputError(
            f"is a symbolic link to {kind} ({target}), not to a regular file",
            path=path,
            hint="replace it with the regular file from the original model",
        )
    if _inside(target, real_root) or (blobs is not None and target.parent == blobs):
        return
    raise InputError(
        f"is a symbolic link to a file outside the {role} ({target}); its content would be copied into OUT",
        path=path,
        hint=f"copy the file into the {role} (cp --remove-destination {target} {path}) if it belongs "
        "to the model, or remove the link",
    )
