"""Write each open shard in its own thread, so that shards written side by side really run in parallel.

Why a thread per shard: a shard's bytes pass through one sha256 (one thread per file: a hash is
sequential) at ~1.2 GB/s on the H100 machine's Xeon, slower than that machine's disk. With one
writer thread for all open shards, the writer copied a whole tensor into shard A's two staging
buffers and then waited for A's hash before it could start on shard B, so the "side by side"
shards were hashed one after another (8B, H100: sha256 14.4 s of a 32.7 s write stage, the writer
waiting 10.7 s for it). A lane per shard lets every open shard copy, hash and write at once; the
dispatching thread only hands tensors over, in the pipeline's order.

A lane writes its shard's tensors in the order it receives them (the plan's order for that file),
so each file's bytes are what writing it alone gives. Errors are kept and raised by the
dispatcher (:meth:`ShardLane.raise_error`); a lane never removes anything itself.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .shard_writer import ShardSink

_CLOSE = object()  # the shard's last tensor was handed over: close the file
_STOP = object()  # give up (another lane or the pipeline failed, or an interrupt)


class ShardLane:
    """One open shard and the thread that writes it; ``on_written(name)`` runs in that thread after
    each tensor (the pipeline may then reuse its memory), ``on_error`` once if writing fails."""

    def __init__(
        self,
        name: str,
        sink: ShardSink,
        on_written: Callable[[str], None],
        on_error: Callable[[BaseException], None],
    ):
        self.sink = sink
        self.closed = False
        self.bytes = 0
        self.error: BaseException | None = None
        self._on_written = on_written
        self._on_error = on_error
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sa2va-write-{name}", daemon=True)
        self._thread.start()

    def put(self, name: str, tensor: torch.Tensor | Iterable[torch.Tensor]) -> None:
        self._jobs.put((name, tensor))

    def finish(self) -> None:
        """Every tensor of the shard is handed over: the lane closes (fsyncs) the file after the last."""
        self._jobs.put(_CLOSE)

    def cancel(self) -> None:
        """Stop after the tensor being written (the caller then aborts the sink)."""
        self._cancelled.set()
        self._jobs.put(_STOP)

    def join(self) -> None:
        self._thread.join()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while True:
                job = self._jobs.get()
                if job is _STOP or self._cancelled.is_set():
                    return
                if job is _CLOSE:
                    self.bytes = self.sink.close()
                    self.closed = True
                    return
                name, tensor = job
                del job
                self.sink.write(name, tensor)
                del tensor
                self._on_written(name)
        except BaseException as e:  # noqa: BLE001 - raised by the dispatcher (raise_error)
            self.error = e
            self._on_error(e)


def first_error(lanes: Iterable[ShardLane]) -> BaseException | None:
    return next((lane.error for lane in lanes if lane.error is not None), None)


__all__ = ["ShardLane", "first_error"]
