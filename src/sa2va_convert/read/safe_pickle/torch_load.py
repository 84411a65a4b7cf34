"""Loading files: what kind of file this is (sniffing), then ``torch.load`` under the policy.

Legacy tar files and TorchScript zips are refused before torch sees them; every way a file can
be unreadable becomes one InputError line naming it.
"""

from __future__ import annotations

import contextlib
import mmap as _mmap
import os
import pickle
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import ConvertError, InputError
from ..safetensors_header import looks_like_safetensors
from ..zip_records import RecordCheck
from .policy import SafeUnpicklerPolicy, printable


@dataclass
class SafeLoad:
    obj: Any
    placeholders: dict[str, int]
    mmapped: bool  # tensors are views of a private read-only file mapping
    format: str  # "zip" (torch>=1.6 default) | "legacy" (_use_new_zipfile_serialization=False)
    records: RecordCheck | None = None  # zip files: the CRC-32 check of each tensor record, run as it is read


def loads(data: bytes, *, allow_globals: Iterable[str] = (), source: str | None = None) -> tuple[Any, dict[str, int]]:
    """Unpickle plain pickle bytes (no torch storages) under the same policy.

    Useful for pickles outside torch containers and for testing the policy itself.
    """
    import io

    policy = SafeUnpicklerPolicy(allow_globals=allow_globals, source=source)
    with _converting_errors(source or "<bytes>"):
        obj = policy.pickle_module().Unpickler(io.BytesIO(data), encoding="utf-8").load()
    return obj, dict(policy.placeholders)


def sniff_file(path: Path) -> str:
    """Classify a file by its first bytes: empty, zip, safetensors, tar, pickle or unknown."""
    size = path.stat().st_size
    if size == 0:
        return "empty"
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if looks_like_safetensors(head, size):
        return "safetensors"
    if _is_tar(path):
        return "tar"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    return "unknown"


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError, ValueError):
        return False


def safe_torch_load(path: str | os.PathLike, *, allow_globals: Iterable[str] = ()) -> SafeLoad:
    """``torch.load`` of one file under the restricted policy, memory-mapped when possible.

    Raises InputError (one line, naming the file) for anything that is not a
    readable ``torch.save`` file, UnsafeInputError for refused globals.
    """
    path = Path(path)
    _check_readable_file(path)
    kind = sniff_file(path)
    if kind != "zip" and kind != "pickle":
        raise _wrong_kind(path, kind)
    records = None
    if kind == "zip":
        _check_torch_zip(path)
        records = _record_check(path)
        records.verify_metadata()  # data.pkl & co. before the pickle is read: a damaged one can lie about shapes
    if os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        raise InputError(
            "TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, which makes torch refuse sa2va-convert's restricted loader",
            path=path,
            hint="unset TORCH_FORCE_WEIGHTS_ONLY_LOAD for this command (the restricted loader never runs code "
            "from the file)",
        )
    policy = SafeUnpicklerPolicy(allow_globals=allow_globals, source=path)
    use_mmap = kind == "zip"
    with _converting_errors(path), _private_mmap():
        obj = torch.load(
            os.fspath(path),
            map_location="cpu",
            pickle_module=policy.pickle_module(),
            weights_only=False,
            mmap=use_mmap,
        )
    return SafeLoad(
        obj, dict(policy.placeholders), mmapped=use_mmap, format="zip" if use_mmap else "legacy", records=records
    )


def _record_check(path: Path) -> RecordCheck:
    try:
        return RecordCheck(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise InputError(
            f"is a damaged zip archive ({_first_line(e)})",
            path=path,
            hint="copy it again, or use an earlier checkpoint",
        ) from None


def _check_readable_file(path: Path) -> None:
    if not os.path.lexists(path):
        raise InputError("no such file or directory", path=path, hint="check the path")
    if not path.exists():
        raise InputError("is a broken symbolic link", path=path, hint="point it at the checkpoint file")
    if path.is_dir():
        raise InputError("is a directory, expected a file", path=path, hint="pass the checkpoint file inside it")
    if not path.is_file():
        raise InputError("is not a regular file", path=path, hint="pass a checkpoint file written by torch.save")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise InputError(
            "permission denied", path=path, hint="make the file readable (chmod +r) or run as its owner"
        ) from None
    except OSError as e:
        raise InputError(f"cannot open: {e.strerror or e}", path=path, hint="check the file and its folder") from None


def _wrong_kind(path: Path, kind: str) -> InputError:
    messages = {
        "empty": ("is empty (0 bytes)", "the save was probably interrupted; use an earlier checkpoint"),
        "safetensors": (
            "is a safetensors file, not a training checkpoint written by torch.save",
            "pass the iter_N.pth from the training work_dir; safetensors files belong to HuggingFace folders "
            "(pass the folder, not the file, where a base model is expected)",
        ),
        "tar": (
            "is a tar archive (PyTorch's pre-1.6 legacy tar format or not a checkpoint at all); it is not supported",
            "load and re-save it with a current torch in a trusted environment",
        ),
        "unknown": (
            "is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)",
            "pass the iter_N.pth from the training work_dir",
        ),
    }
    message, hint = messages[kind]
    return InputError(message, path=path, hint=hint)


def _check_torch_zip(path: Path) -> None:
    """Check with torch's own zip reader (the one torch.load uses) before unpickling."""
    try:
        with open(path, "rb") as f:
            records = set(torch._C.PyTorchFileReader(f).get_all_records())
    except Exception as e:  # torch raises RuntimeError with miniz messages
        if not _python_sees_zip(path):
            raise InputError(
                "is truncated or corrupt (its zip directory cannot be read)",
                path=path,
                hint="the copy or the save was probably interrupted; copy it again or use an earlier checkpoint",
            ) from None
        raise InputError(
            f"is a damaged zip archive or one not written by torch.save ({_first_line(e)})",
            path=path,
            hint="copy it again, or pass the iter_N.pth from the training work_dir",
        ) from None
    if "constants.pkl" in records or any(r.startswith("code/") for r in records):
        raise InputError(
            "is a TorchScript archive (it contains code), not a training checkpoint; it is not loaded",
            path=path,
            hint="pass the iter_N.pth from the training work_dir",
        )
    if "data.pkl" not in records:
        raise InputError(
            "is a zip archive but not one written by torch.save (no data.pkl inside)",
            path=path,
            hint="pass the iter_N.pth from the training work_dir",
        )
    if _has_compressed_entries(path):
        # torch.load(mmap=True) slices raw bytes at the entry offsets: compressed entries
        # would load as garbage numbers without any error.
        raise InputError(
            "is a zip archive with compressed entries; torch.save never compresses, so it was re-packed "
            "by another tool and its tensors cannot be memory-mapped",
            path=path,
            hint="use the original file written by training (unzip/zip tools change the layout)",
        )


def _has_compressed_entries(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(info.compress_type != zipfile.ZIP_STORED for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return False  # torch's reader accepted it; this check is only about compression


def _python_sees_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


@contextlib.contextmanager
def _private_mmap() -> Iterator[None]:
    """Force MAP_PRIVATE so that writes to loaded tensors can never reach the input file."""
    setter = getattr(torch.serialization, "set_default_mmap_options", None)
    if setter is None or os.name == "nt":
        yield
        return
    with setter(_mmap.MAP_PRIVATE):
        yield


@contextlib.contextmanager
def _converting_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn whatever a damaged file makes torch/pickle raise into one InputError line."""
    try:
        yield
    except ConvertError as e:
        if e.path is None:
            e.path = str(path)
        raise
    except (EOFError, pickle.UnpicklingError) as e:
        text = _first_line(e)
        if isinstance(e, EOFError) or "truncated" in text:
            raise InputError(
                "is truncated or corrupt (the pickle ends early)",
                path=path,
                hint="the copy or the save was probably interrupted; copy it again or use an earlier checkpoint",
            ) from None
        raise _corrupt(path, e) from None
    except RecursionError:
        raise InputError("is corrupt (nesting too deep to read)", path=path, hint="use another checkpoint") from None
    except MemoryError:
        raise InputError(
            "cannot be read: out of memory while unpickling",
            path=path,
            hint="the file may be corrupt; check it or use another checkpoint",
        ) from None
    except Exception as e:
        text = _first_line(e)
        if "Invalid magic number" in text:
            raise InputError(
                "is a pickle but not a PyTorch checkpoint (no torch.save header)",
                path=path,
                hint="pass the iter_N.pth from the training work_dir",
            ) from None
        raise _corrupt(path, e) from None


def _corrupt(path: str | os.PathLike, e: BaseException) -> InputError:
    return InputError(
        f"is corrupt or not a PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})",
        path=path,
        hint="copy it again or use an earlier checkpoint",
    )


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return printable(lines[0] if lines else type(e).__name__)
