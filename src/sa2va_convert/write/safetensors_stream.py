"""Write a safetensors file one tensor at a time.

safetensors' own ``save_file`` wants every tensor in one dict, i.e. a whole
shard in memory. The format is simple enough to stream: a little-endian u64
header length, a JSON header (dtype, shape, data_offsets; ``__metadata__``)
padded with spaces to a multiple of 8, then the raw bytes in header order.
Because the plan knows every name, shape and dtype up front, the header is
written first and each tensor is produced, written and dropped in turn, so
peak memory is about one tensor whatever the shard size.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import torch

from .. import dtypes
from ..read.tensor_source import TensorInfo


@dataclass(frozen=True)
class StreamEntry:
    name: str
    info: TensorInfo


def build_header(entries: Sequence[StreamEntry], metadata: dict[str, str] | None = None) -> bytes:
    """The exact header bytes (length prefix included) for these entries, in this order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for e in entries:
        end = offset + e.info.nbytes
        header[e.name] = {
            "dtype": dtypes.to_safetensors(e.info.dtype),
            "shape": list(e.info.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def file_size(entries: Sequence[StreamEntry], metadata: dict[str, str] | None = None) -> int:
    return len(build_header(entries, metadata)) + sum(e.info.nbytes for e in entries)


def _write_tensor(f: BinaryIO, tensor: torch.Tensor, digest=None) -> None:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    if t.numel() == 0:
        return
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    f.write(view)
    if digest is not None:
        digest.update(view)


def write_streamed(
    path: Path,
    entries: Sequence[StreamEntry],
    produce: Callable[[StreamEntry], torch.Tensor],
    *,
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[StreamEntry], None] | None = None,
    mode: int = 0o644,
    digest=None,
) -> int:
    """Write ``entries`` to ``path``; ``produce`` returns each tensor exactly as planned.

    A tensor whose shape or dtype differs from its entry is a bug upstream of
    the writer, so it raises rather than writing a file whose header lies.
    Returns the number of bytes written. The file is fsync'ed before return.
    ``digest`` (a hashlib object) sees exactly the bytes written, so the
    checksum recorded for ``verify`` costs no second read of the file.
    """
    header = build_header(entries, metadata)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb", buffering=8 * 1024 * 1024) as f:
        f.write(header)
        if digest is not None:
            digest.update(header)
        written += len(header)
        for e in entries:
            t = produce(e)
            got = TensorInfo(tuple(t.shape), dtypes.from_torch(t.dtype))
            if got != e.info:
                raise RuntimeError(f"tensor {e.name}: planned {e.info}, produced {got}")
            _write_tensor(f, t, digest)
            written += e.info.nbytes
            del t
            if on_tensor is not None:
                on_tensor(e)
        f.flush()
        os.fsync(f.fileno())
    return written
