"""Open a HuggingFace model folder (the base Sa2VA model) lazily.

Only headers are read here: ``safe_open`` maps each shard and hands out one
tensor on request, so planning a 26B conversion costs kilobytes. Remote-code
``.py`` files are listed, never imported: running the base's code belongs to
the verify stage, in a separate process.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch

from .. import dtypes
from ..errors import InputError
from ..formats import SAFETENSORS_INDEX as INDEX_NAME, SAFETENSORS_SINGLE as SINGLE_NAME
from .folder_files import list_model_files
from .safetensors_header import header_length, library_check, read_safetensors_header
from .tensor_source import SourceAbilities, SourceDefaults, TensorInfo, TensorSource


def read_range(fpath: Path, begin: int, view: memoryview, key: str) -> None:
    """Fill ``view`` from ``fpath`` at ``begin``; a short file is a damaged input, named as such."""
    try:
        with open(fpath, "rb", buffering=0) as f:
            f.seek(begin)
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise InputError(
                        f"file ended while reading tensor {key!r}", path=fpath, hint="re-copy or re-download this shard"
                    )
                got += n
    except PermissionError:
        raise InputError("permission denied", path=fpath, hint="make the file readable") from None


class SafetensorsSource(SourceDefaults):
    """A TensorSource over one or more safetensors files (a sharded HF folder).

    Reads with plain file reads (never a mapping), into a caller's buffer if given, and a row range
    alone; nothing stays in RSS, so there are no pages to release."""

    abilities = SourceAbilities(reads_into=True, reads_rows=True)

    def __init__(self, files: dict[str, Path], *, label: str, path: Path):
        self.label = label
        self.path = Path(path)
        self._key_file: dict[str, Path] = {}
        self._info: dict[str, TensorInfo] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        for fpath in files.values():
            header = read_safetensors_header(fpath)  # every rule of the safetensors library, ours to name
            library_check(fpath, (k for k in header if k != "__metadata__"))  # and the library's own verdict
            data_start = 8 + header_length(fpath)
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                if key in self._key_file:
                    raise InputError(
                        f"tensor {key!r} is stored in two shards",
                        path=fpath,
                        hint="the folder is inconsistent; re-download it",
                    )
                try:
                    info = TensorInfo(tuple(entry["shape"]), dtypes.from_safetensors(entry["dtype"]))
                except ValueError as e:
                    raise InputError(str(e), path=fpath, hint="convert this folder to a supported dtype") from None
                self._key_file[key] = fpath
                self._info[key] = info
                self._offsets[key] = (data_start + entry["data_offsets"][0], data_start + entry["data_offsets"][1])

    def keys(self) -> Iterable[str]:
        return self._key_file.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._key_file

    def __len__(self) -> int:
        return len(self._key_file)

    def info(self, key: str) -> TensorInfo:
        return self._info[key]

    def file_of(self, key: str) -> Path:
        return self._key_file[key]

    def load_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (along its first dimension), read from disk alone.

        Lets the converter stream a tensor bigger than its memory window (see
        ``TensorProducer.stream``): the bytes of a row range are contiguous.
        """
        info = self._info[key]
        rows = info.shape[0] if info.shape else 1
        start = max(0, start)
        stop = max(start, min(rows, stop))
        row_bytes = info.nbytes // rows if rows else 0
        return self._read(key, start * row_bytes, (stop - start, *info.shape[1:]))

    def byte_range(self, key: str) -> tuple[Path, int, int]:
        """(file, first byte, end byte) of a tensor's data, for readers that stream it in pieces."""
        begin, end = self._offsets[key]
        return self._key_file[key], begin, end

    def load(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor with plain file reads, into fresh memory or into ``out``.

        Not ``safe_open``/mmap: pages of a mapped file that were touched count
        in the process's RSS until unmapped, so mapping a 15 GB base would
        make the converter look (and, under cgroup limits, be) 15 GB big. A
        ``readinto`` leaves only the page cache, which the kernel reclaims.
        ``out`` (a contiguous CPU uint8 tensor of at least the tensor's bytes)
        lets the converter read into recycled memory: fresh memory costs a page
        fault per 4 KiB, a reused buffer none. The result is then a view of it.
        """
        return self._read(key, 0, self._info[key].shape, out)

    def _read(self, key: str, skip: int, shape: tuple[int, ...], out: torch.Tensor | None = None) -> torch.Tensor:
        """``shape``'s worth of ``key``'s bytes, starting ``skip`` bytes into its data."""
        info = self._info[key]
        dtype = dtypes.to_torch(info.dtype)
        n = TensorInfo(tuple(shape), info.dtype).nbytes
        if out is not None:
            if out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() < n:
                raise ValueError("out must be a contiguous CPU uint8 tensor of at least the tensor's bytes")
            buf = out[:n]
            # numpy's stubs declare ndarray's buffer protocol only for Python >= 3.12 (hence the ignore below)
            view = memoryview(buf.numpy())  # type: ignore[arg-type]
        else:
            if n == 0:
                return torch.empty(shape, dtype=dtype)
            raw = bytearray(n)
            buf, view = None, memoryview(raw)
        read_range(self._key_file[key], self._offsets[key][0] + skip, view, key)
        if buf is not None:
            return buf.view(dtype).view(shape)
        return torch.frombuffer(raw, dtype=dtype).reshape(shape)

    def close(self) -> None:
        pass


W = TypeVar("W", bound=TensorSource)


@dataclass
class HFFolder(Generic[W]):
    """A model folder: config, weights and the other files. ``weights`` is a ``SafetensorsSource`` for a
    folder on disk (``open_hf_folder``); the original recipe's base (a raw MLLM plus SAM2) joins two sources."""

    path: Path
    config: dict
    weights: W
    weight_files: list[str]
    other_files: list[str] = field(default_factory=list)


def _load_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{what} is missing", path=path, hint="pass the complete base model folder") from None
    except PermissionError:
        raise InputError("permission denied", path=path, hint="make the file readable") from None
    except IsADirectoryError:
        raise InputError(
            f"{what} is a directory, expected a file", path=path, hint="restore the file from the original model"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(
            f"{what} is not valid JSON ({e})", path=path, hint="restore the file from the original model"
        ) from None
    except (OSError, RecursionError, ValueError) as e:  # symlink loop, I/O error, absurdly nested JSON
        raise InputError(
            f"cannot read {what} ({type(e).__name__}: {e})".replace("\n", " "),
            path=path,
            hint="restore the file from the original model",
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"{what} is not a JSON object", path=path, hint="restore the file from the original model")
    return data


def open_hf_folder(path: str | Path, *, label: str = "base") -> HFFolder[SafetensorsSource]:
    """Open a HF model folder holding ``model.safetensors`` or an index plus shards."""
    root = Path(path)
    if not root.exists():
        raise InputError(
            "base model folder does not exist",
            path=root,
            hint="pass --base with the Sa2VA HF folder the fine-tune started from",
        )
    if not root.is_dir():
        raise InputError(
            "expected a HuggingFace model folder, got a file", path=root, hint="pass the folder that holds config.json"
        )
    listed = list_model_files(root, role=f"{label} folder")  # before anything is opened: a FIFO would block
    config = _load_json(root / "config.json", "config.json")
    index_path = root / INDEX_NAME
    files: dict[str, Path] = {}
    if index_path.exists():
        index = _load_json(index_path, INDEX_NAME)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(
                "index has no weight_map", path=index_path, hint="restore the index from the original model"
            )
        for fname in sorted(set(weight_map.values())):
            fpath = root / fname
            if not fpath.is_file():
                raise InputError(
                    f"shard {fname} named in the index is missing",
                    path=fpath,
                    hint="copy the missing shard from the original model folder",
                )
            files[fname] = fpath
    elif (root / SINGLE_NAME).is_file():
        files[SINGLE_NAME] = root / SINGLE_NAME
    else:
        bins = sorted(p.name for p in root.glob("*.bin"))
        hint = (
            "convert the folder to safetensors first "
            "(load it with transformers and save_pretrained(..., safe_serialization=True))"
            if bins
            else "pass the complete base model folder"
        )
        raise InputError(f"no {SINGLE_NAME} or {INDEX_NAME} found", path=root, hint=hint)
    weights = SafetensorsSource(files, label=label, path=root)
    if index_path.exists():
        index = _load_json(index_path, INDEX_NAME)
        for key, fname in index["weight_map"].items():
            if key not in weights:
                raise InputError(
                    f"index names tensor {key!r} in {fname}, but the shard does not hold it",
                    path=index_path,
                    hint="restore the folder from the original model",
                )
    # list_model_files skips only a ".cache" inside the folder (huggingface_hub's download metadata): the
    # folder itself may well lie under one (the Hugging Face cache: ~/.cache/huggingface/hub/...)
    other = [f for f in listed if f not in files and f != INDEX_NAME]
    return HFFolder(path=root, config=config, weights=weights, weight_files=sorted(files), other_files=other)
