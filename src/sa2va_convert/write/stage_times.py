"""Where the write stage's wall time went: seconds each of its threads spent working or waiting.

The write stage runs several kinds of thread (reader, merge workers and block threads, a
dispatcher, per open shard a writer, a disk-IO and a sha256 thread; see ``pipeline``,
``shard_lanes`` and ``safetensors_stream``), so a profile of one thread says little about the wall time. Each thread
adds up its own busy and waiting seconds here; the thread that never waits is the one that bounds
the run (e.g. ``write.wait_tensor`` near zero and ``io.write`` near the wall: the disk). The figures
go into ``--json`` (``stage_seconds``) and the ``-v`` output, so a user on any machine can see
whether their conversion is bound by the disk, the merge or the reads, without a profiler.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

# what each key means, for the README and ``-v``; every key a thread adds must be listed here
STAGE_KEYS: dict[str, str] = {
    "read.busy": "reader thread: reading inputs (checkpoint, base) into memory",
    "read.wait_budget": "reader thread: waiting for room in the in-flight memory budget (downstream is slower)",
    "merge.busy": "merge workers (summed): LoRA merges, casts and NaN/Inf checks",
    "merge.wait_input": "merge workers (summed): waiting for the reader",
    "write.wait_tensor": "dispatching thread: waiting for the next tensor (upstream is slower)",
    "write.stream": "shard writers (summed): producing row blocks of tensors too big for the window (read + merge)",
    "write.copy": "shard writers (summed): copying bytes into the direct-IO staging buffers",
    "write.wait_io": "shard writers (summed): waiting for the disk or the checksum to free a staging buffer",
    "write.fsync": "shard writers (summed): fsync at the end of each shard",
    "io.write": "IO threads (summed over shards written side by side): os.write of staged chunks (the disk)",
    "sha256.busy": "hash threads (summed over shards written side by side): sha256 of the bytes written",
    "total": "the whole write of the shards (wall)",
}


class StageTimes:
    """Thread-safe sums of seconds per key (``STAGE_KEYS``)."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def add(self, key: str, seconds: float) -> None:
        with self._lock:
            self._seconds[key] += seconds

    @contextmanager
    def span(self, key: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(key, time.perf_counter() - start)

    def to_dict(self) -> dict[str, float]:
        """Every known key, rounded to microseconds.

        Exactly 0.0 means the thread never did that; microseconds (not milliseconds) so that a thread
        that did run on a small model (a few kB hashed) never reads as 0.0 and "never ran".
        """
        with self._lock:
            return {k: round(self._seconds.get(k, 0.0), 6) for k in STAGE_KEYS}


def summarize(s: dict[str, float]) -> str:
    """One line for ``-v`` from ``StageTimes.to_dict()``: what each thread did, and what it waited for."""
    return (
        f"write stage {s['total']:.1f} s: read {s['read.busy']:.1f} s (waited for room "
        f"{s['read.wait_budget']:.1f} s), merge {s['merge.busy']:.1f} s (waited for reads "
        f"{s['merge.wait_input']:.1f} s), writer waited for tensors {s['write.wait_tensor']:.1f} s "
        f"and for the disk {s['write.wait_io']:.1f} s, streamed {s['write.stream']:.1f} s, disk writes "
        f"{s['io.write']:.1f} s, sha256 {s['sha256.busy']:.1f} s, fsync {s['write.fsync']:.1f} s"
    )


__all__ = ["STAGE_KEYS", "StageTimes", "summarize"]
