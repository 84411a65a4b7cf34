"""Check the CRC-32 of a ``torch.save`` zip's records as the checkpoint is read.

A ``torch.save`` file is a zip archive: ``data.pkl`` (the pickle), a few small records and one
``data/N`` record per tensor storage, each with the CRC-32 of its bytes in the zip directory. Nothing
checked those CRCs: ``torch.load`` does not (with ``mmap=True`` it slices the mapped file at the records'
offsets), so one flipped byte inside a storage converted with exit 0 (an embedding value went from 0.028
to 464.0 in the output). Here:

* the small records (``data.pkl``, ``version``, ``byteorder``, ...) are checked before the pickle is
  read (a damaged pickle can name wrong shapes or offsets, not only wrong values);
* a ``data/N`` record is checked the first time a tensor stored in it is read (``verify_tensor``, from
  the sources' ``load``): on the reader thread, so its cost overlaps the merge and write instead of adding
  a pass; its bytes come through plain file reads (the page cache the mapped reads then hit), never
  through the mapping, so no page is counted in RSS for it. Records no tensor of the conversion uses
  (optimizer moments, say) are never read, as before.

Which record a tensor lives in: ``torch.load(mmap=True)`` maps the whole file and makes each storage a
slice at its record's data offset, so the storage's address minus the mapping's start (from
``/proc/self/maps``) is that offset. The CRC is computed and compared by ``zipfile`` itself (it raises
``BadZipFile`` on a mismatch). Where a storage cannot be located (no ``/proc``), every tensor record of the
file is checked at the first read instead.
"""

from __future__ import annotations

import bisect
import re
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from .mapped_pages import file_mappings

__all__ = ["RecordCheck", "ZipRecord", "CHUNK_BYTES"]

CHUNK_BYTES = 16 * 1024 * 1024
_DATA = re.compile(r"^[^/]+/data/\d+$")  # torch.save: "<archive>/data/<storage key>"
_LOCAL_HEADER = 30  # fixed part of a zip local file header; then the name and the extra field


@dataclass(frozen=True)
class ZipRecord:
    name: str
    header_offset: int
    size: int
    crc: int


def _hint() -> str:
    return (
        "a copy, download or disk changed the file after training saved it: copy it again from where it was "
        "saved, or use an earlier checkpoint"
    )


class RecordCheck:
    """The CRC-32 checks of one ``torch.save`` zip, each record checked at most once (thread-safe)."""

    def __init__(self, path: str | Path, *, label: str = "checkpoint"):
        self.path = Path(path)
        self.label = label
        self._zip = zipfile.ZipFile(self.path)  # kept open: the central directory is parsed once
        infos = self._zip.infolist()
        self._records = sorted(
            (ZipRecord(i.filename, i.header_offset, i.file_size, i.CRC) for i in infos), key=lambda r: r.header_offset
        )
        self._starts = [r.header_offset for r in self._records]
        self._by_name = {r.name: r for r in self._records}
        self._data_offset: dict[str, int] = {}
        self._checked: set[str] = set()
        self._all_checked = False
        self._maps: list[tuple[int, int, int]] | None = None
        self._lock = threading.Lock()
        self.checked_bytes = 0

    @property
    def records(self) -> list[ZipRecord]:
        return list(self._records)

    # ------------------------------------------------------------------ checks

    def verify_metadata(self) -> None:
        """Every record that is not a tensor storage (``data.pkl`` above all), before it is unpickled."""
        for r in self._records:
            if not _DATA.match(r.name):
                self._verify(r, None)

    def verify_tensor(self, key: str, tensor: torch.Tensor, *, what: str = "tensor") -> None:
        """The record holding ``tensor``'s storage, the first time any tensor of that record is read."""
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0 or tensor.device.type != "cpu":
            return
        record = self._locate(storage.data_ptr(), nbytes)
        if record is None:
            self._verify_all_data(f"{what} {key!r}")
            return
        if record.name not in self._checked:
            self._verify(record, f"{what} {key!r}")

    def close(self) -> None:
        self._zip.close()

    # ------------------------------------------------------------------ internals

    def _verify(self, record: ZipRecord, owner: str | None) -> None:
        with self._lock:
            if record.name in self._checked:
                return
            try:
                with self._zip.open(record.name) as f:
                    while f.read(CHUNK_BYTES):  # zipfile compares the CRC-32 when the record's end is read
                        pass
            except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as e:  # ValueError: bad names
                whose = (
                    f", which holds {owner}," if owner else ", the pickle," if record.name.endswith("/data.pkl") else ""
                )
                why = (
                    "fails its CRC-32 check"
                    if "CRC" in str(e)
                    else "is cut short (the file is truncated)"
                    if isinstance(e, EOFError)
                    else f"is damaged ({type(e).__name__}: {str(e)[:200]})"
                )
                raise InputError(
                    f"zip record {record.name}{whose} {why}: its bytes are not those torch.save wrote",
                    path=self.path,
                    hint=_hint(),
                ) from None
            except OSError as e:
                raise InputError(
                    f"cannot read zip record {record.name} ({e.strerror or e})",
                    path=self.path,
                    hint="check the file and its disk",
                ) from None
            self._checked.add(record.name)
            self.checked_bytes += record.size

    def _verify_all_data(self, owner: str) -> None:
        if self._all_checked:
            return
        for r in self._records:
            if _DATA.match(r.name):
                self._verify(r, f"one of the tensors read with {owner}")
        self._all_checked = True

    def _locate(self, ptr: int, nbytes: int) -> ZipRecord | None:
        """The data record whose bytes the mapped storage at ``ptr`` is, or None if it is not in a mapping."""
        offset = self._file_offset(ptr)
        if offset is None:
            return None
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0:
            return None
        record = self._records[i]
        if not _DATA.match(record.name) or record.size != nbytes or self._data_start(record) != offset:
            return None
        return record

    def _file_offset(self, ptr: int) -> int | None:
        for attempt in range(2):
            if self._maps is None or attempt:
                self._maps = file_mappings(self.path)
            for lo, hi, file_offset in self._maps:
                if lo <= ptr < hi:
                    return ptr - lo + file_offset
        return None

    def _data_start(self, record: ZipRecord) -> int:
        """Where the record's bytes begin: after its local header's fixed part, name and extra field."""
        start = self._data_offset.get(record.name)
        if start is None:
            with open(self.path, "rb") as f:
                f.seek(record.header_offset)
                head = f.read(_LOCAL_HEADER)
            if len(head) < _LOCAL_HEADER or head[:4] != b"PK\x03\x04":
                return -1
            name_len = int.from_bytes(head[26:28], "little")
            extra_len = int.from_bytes(head[28:30], "little")
            start = record.header_offset + _LOCAL_HEADER + name_len + extra_len
            self._data_offset[record.name] = start
        return start
