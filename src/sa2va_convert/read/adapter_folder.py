"""An adapter folder (``--format adapter``) and the base it was made for.

An adapter folder holds PEFT's two files (``adapter_config.json``, ``adapter_model.safetensors``) and
our record of the base (``sa2va_adapter.json``): the base's path as it was used, the Hub repo id when
``--base`` named one, and the sha256 of each of the base's weight files. The adapter's LoRA factors
were trained against exactly those weights and its saved modules replace parts of exactly that model,
so loading it on any other base would give a different model without any error from PEFT or
transformers. ``resolve_adapter`` therefore finds the base from the record and refuses one whose
weight files hash differently (exit 5, inputs that do not add up), before any model is loaded.

Read-only and import-light (no torch): ``verify``, ``predict`` and ``eval`` call it for every folder
they are given, and ``runner/process.py`` uses it to hand the child the base and the adapter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checksums import sha256_file
from ..errors import InputError, PlanError
from ..formats import ADAPTER_CONFIG, ADAPTER_RECORD, ADAPTER_WEIGHTS, weight_files

RECORD_SCHEMA = 1
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class AdapterBase:
    """An adapter folder and the base folder it loads on (found and checked)."""

    adapter: Path
    base: Path
    dtype: str  # the conversion's --dtype: the merged model is cast to it, as a merged folder is
    record: dict[str, Any]


def is_adapter_folder(folder: str | Path) -> bool:
    """A folder this tool wrote with ``--format adapter`` (it has our record beside PEFT's config)."""
    p = Path(folder)
    return (p / ADAPTER_RECORD).is_file() and (p / ADAPTER_CONFIG).is_file()


def is_model_folder(folder: str | Path) -> bool:
    """What ``verify``, ``predict`` (image and video) and ``eval`` take as a model: a folder with a
    ``config.json``, or an adapter folder (its base found from the record when it is loaded)."""
    return (Path(folder) / "config.json").is_file() or is_adapter_folder(folder)


def base_weight_digests(base: Path) -> dict[str, str]:
    """{weight file: sha256} of a base folder: what an adapter records and what loading it compares.

    Each file's digest is kept for this process by real path, size and mtime: ``--all --format adapter``
    hashes the base once for the whole run, not once per checkpoint (at Sa2VA-4B, 7.35 GiB each time)."""
    out = {}
    for name in weight_files(Path(base)):
        path = Path(base) / name
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _DIGESTS:
            _DIGESTS[key] = sha256_file(path)
        out[name] = _DIGESTS[key]
    return out


_DIGESTS: dict[tuple[str, int, int], str] = {}


def read_record(folder: Path) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the adapter's base record ({e})", path=path, hint="convert again") from None
    base = record.get("base") if isinstance(record, dict) else None
    if not isinstance(base, dict) or not isinstance(base.get("weight_files"), dict) or not base.get("path"):
        raise InputError(
            "the adapter's base record names no base (base.path and base.weight_files)",
            path=path,
            hint="convert again with --format adapter",
        )
    if not (Path(folder) / ADAPTER_WEIGHTS).is_file():
        raise InputError(f"{ADAPTER_WEIGHTS} is missing", path=folder, hint="convert again with --format adapter")
    return record


def _cached_snapshot(repo_id: str) -> Path | None:
    """The offline HF-cache snapshot of ``org/name[@rev]`` (as ``plan/base_discovery.cached_snapshot``;
    repeated here because ``read/`` sits below ``plan/``)."""
    if not _REPO_ID.match(repo_id):
        return None
    from huggingface_hub import snapshot_download

    repo, _, revision = repo_id.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache, or not a valid id: the caller says so
        return None


def find_base(folder: Path, record: dict[str, Any]) -> Path:
    """The recorded base path, else the recorded Hub repo id in the offline cache; InputError when neither is here."""
    base = record["base"]
    path = Path(str(base["path"]))
    if path.is_dir():
        return path
    repo = base.get("repo_id")
    snap = _cached_snapshot(str(repo)) if repo else None
    if snap is not None:
        return snap
    where = f"{path}" + (f" or the Hub repo {repo} in the local cache" if repo else "")
    raise InputError(
        f"the base this adapter was made for is not here ({where})",
        path=Path(folder) / ADAPTER_RECORD,
        hint="put the base folder back at that path"
        + (f" or download it (`hf download {str(repo).partition('@')[0]}`)" if repo else "")
        + ", or use a merged folder (convert with --format folder)",
    )


def check_base(folder: Path, base: Path, record: dict[str, Any]) -> None:
    """The base's weight files hash as recorded; else PlanError (exit 5) naming the first that differs."""
    expected: dict[str, str] = {str(k): str(v) for k, v in record["base"]["weight_files"].items()}
    try:
        present = set(weight_files(base))
    except InputError as e:
        raise PlanError(
            f"the base at {base} is not the one this adapter was made for ({e.message})",
            path=base,
            hint="restore the original base there, or convert the checkpoint again against this base",
        ) from None
    if present != set(expected):
        raise PlanError(
            f"the base at {base} is not the one this adapter was made for: its weight files are "
            f"{', '.join(sorted(present)[:3])}, the adapter was made on {', '.join(sorted(expected)[:3])}",
            path=base,
            hint="restore the original base there, or convert the checkpoint again against this base",
        )
    key = _stat_key(base, expected)
    if key in _CHECKED:
        return
    for name in sorted(expected):
        got = sha256_file(base / name)
        if got != expected[name]:
            raise PlanError(
                f"the base at {base} is not the one this adapter was made for: {name} has sha256 "
                f"{got[:12]}..., the adapter was made on {expected[name][:12]}...",
                path=base / name,
                hint="restore the original base there, or convert the checkpoint again against this base",
            )
    _CHECKED.add(key)


# Bases already hashed in this process, by path, expected digests and each file's size and mtime: verify
# checks the files and then starts the round trip, and eval runs one child per adapter on the same base;
# a base is hashed once (a file changed since, by size or mtime, is hashed again).
_CHECKED: set[tuple] = set()


def _stat_key(base: Path, expected: dict[str, str]) -> tuple:
    stats = []
    for name in sorted(expected):
        st = (base / name).stat()
        stats.append((name, expected[name], st.st_size, st.st_mtime_ns))
    return (str(base.resolve()), tuple(stats))


def resolve_adapter(folder: str | Path) -> AdapterBase | None:
    """For an adapter folder, its base found from the record and checked; None for any other folder."""
    folder = Path(folder)
    if not is_adapter_folder(folder):
        return None
    record = read_record(folder)
    base = find_base(folder, record)
    check_base(folder, base, record)
    return AdapterBase(adapter=folder, base=base, dtype=str(record.get("dtype") or "auto"), record=record)


__all__ = [
    "AdapterBase",
    "RECORD_SCHEMA",
    "base_weight_digests",
    "check_base",
    "find_base",
    "is_adapter_folder",
    "read_record",
    "resolve_adapter",
    "is_model_folder",
]
