"""Produce output tensors ahead of the writer, in plan order, within a memory budget.

Writing a shard is three kinds of work: reading inputs (file IO), merging (torch
arithmetic) and writing (file IO). All three release the GIL, so running them in
three threads overlaps them: while the writer writes tensor i, tensor i+1 is
merged and tensor i+2 is read. Two rules keep this safe:

* **order**: one reader thread and one merging thread each walk the plan in
  order, and the writer takes tensors in that same order, so files, reports and
  the delta statistics are identical to a sequential run;
* **memory**: a tensor is admitted only while the bytes of everything in flight
  (inputs read, outputs not yet written) stay under the budget:
  ``min(budget_bytes, AHEAD x the largest tensor's inputs + output)``; a tensor
  larger than the budget runs alone. The pipeline's memory is therefore about
  ``max(budget, largest tensor's inputs + output)`` plus up to one budget of
  free recycled buffers, whatever the model size (512 MiB budget: ~1 GiB).

Threads: the merging thread gets all cores but one for torch (thread-local
setting), the reader and the writer share the remaining one; see
:func:`default_merge_threads` for why this beats letting torch use every core.

``produce`` may be any ``PlannedTensor -> tensor`` callable; when it also has
``prepare`` (read) and ``finish`` (compute) methods, as
:class:`~sa2va_convert.transform.produce.TensorProducer` does, reading and
merging run in separate threads; otherwise one thread calls it.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, Sequence

import torch

from .. import dtypes
from ..plan.planner import PlannedTensor

DEFAULT_BUDGET_BYTES = 512 << 20  # cap on the bytes of tensors in flight (inputs + outputs)
AHEAD = 4  # ... and at most about this many of the model's largest tensors
_JOIN_SECONDS = 60.0


def _ref_bytes(ref) -> int:
    n = 1
    for s in ref.shape:
        n *= s
    return n * dtypes.itemsize(ref.dtype)


def inflight_bytes(pt: PlannedTensor) -> tuple[int, int]:
    """(inputs, new output) bytes of one tensor; inputs are freed once merged, the output once written.

    A tensor stored as read (no merge, no cast) has no new output: its input is
    what the writer writes, so it is held until then.
    """
    inputs = _ref_bytes(pt.value)
    if pt.lora is not None:
        return inputs + _ref_bytes(pt.lora.a) + _ref_bytes(pt.lora.b), pt.nbytes
    if pt.value.dtype != pt.dtype:
        return inputs, pt.nbytes
    return inputs, 0


def default_merge_threads() -> int:
    """torch threads for the merging thread: all but one core, which is left to reading and writing.

    On a small machine this matters more than it seems: with torch's two OpenMP
    threads on two cores, every time the writer takes a core the merge kernels
    stall at their barriers (measured: elementwise ops 20-70x slower), so one
    compute thread beside one IO thread beats two compute threads fighting it.
    ``SA2VA_MERGE_THREADS`` overrides (benchmarking).
    """
    env = os.environ.get("SA2VA_MERGE_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, torch.get_num_threads() - 1)


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


class _Streamed:
    """Marks a tensor the writer produces itself, block by block (``produce.stream``)."""

    def __init__(self, pt: PlannedTensor):
        self.pt = pt


class TensorPipeline:
    """``get(name)`` returns the next planned tensor; ``done(name)`` after it is written frees its budget.

    If ``produce`` has ``enable_pool(max_bytes)`` / ``recycle(tensor)`` /
    ``disable_pool()`` (TensorProducer does), output buffers are recycled: each
    written tensor's memory is handed back for a later tensor of the same size,
    so the merge writes into pages already mapped instead of faulting in fresh
    ones (on the 2-core VM fresh pages cost ~1.3 GB/s, a reused buffer ~12 GB/s).
    """

    def __init__(self, produce: Callable[[PlannedTensor], Any], tensors: Sequence[PlannedTensor], *,
                 budget_bytes: int = DEFAULT_BUDGET_BYTES, merge_threads: int | None = None):
        self._merge_threads = merge_threads if merge_threads is not None else default_merge_threads()
        self._produce = produce
        self._tensors = list(tensors)
        self._cost = {pt.name: inflight_bytes(pt) for pt in self._tensors}
        largest = max((i + o for i, o in self._cost.values()), default=0)
        # a small model gets a small window: memory stays ~ a few tensors, never the model
        self._budget = min(max(0, int(budget_bytes)), AHEAD * largest)
        # a tensor that cannot fit the window with its inputs is streamed in row blocks by the writer,
        # alone: it holds the whole budget (+1) while written, so nothing is read or merged beside it
        # and reports stay in plan order
        stream, can_stream = getattr(produce, "stream", None), getattr(produce, "can_stream", None)
        self._stream = stream if callable(stream) and callable(can_stream) else None
        self._streamed: set[str] = set()
        if self._stream is not None:
            for pt in self._tensors:
                if sum(self._cost[pt.name]) > self._budget and can_stream(pt):
                    self._streamed.add(pt.name)
                    self._cost[pt.name] = (self._budget + 1, 0)
        self._inflight = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._read_q: queue.Queue = queue.Queue()
        self._out_q: queue.Queue = queue.Queue()
        self._handed: dict[str, Any] = {}
        self._next = 0
        prepare = getattr(produce, "prepare", None)
        finish = getattr(produce, "finish", None)
        if callable(prepare) and callable(finish):
            self._prepare, self._finish = prepare, finish
        else:
            self._prepare, self._finish = (lambda pt: pt), produce
        self._recycle = getattr(produce, "recycle", None)
        self._release_inputs = getattr(produce, "release_inputs", None)
        self._by_name = {pt.name: pt for pt in self._tensors}
        enable = getattr(produce, "enable_pool", None)
        if callable(enable) and callable(self._recycle):
            enable(self._budget)  # free buffers kept; in flight + free stays ~ the budget in steady state
        else:
            self._recycle = None
        self._threads = [
            threading.Thread(target=self._read_loop, name="sa2va-read", daemon=True),
            threading.Thread(target=self._merge_loop, name="sa2va-merge", daemon=True),
        ]
        try:
            for t in self._threads:
                t.start()
        except BaseException:  # e.g. Ctrl-C between two starts: stop the one running before re-raising
            self.close()
            raise

    # ---------------------------------------------------------------- background threads

    def _admit(self, cost: int) -> bool:
        with self._cond:
            while not self._stop.is_set() and self._inflight > 0 and self._inflight + cost > self._budget:
                self._cond.wait()
            if self._stop.is_set():
                return False
            self._inflight += cost
            return True

    def _release(self, nbytes: int) -> None:
        if nbytes:
            with self._cond:
                self._inflight -= nbytes
                self._cond.notify_all()

    def _read_loop(self) -> None:
        try:
            for pt in self._tensors:
                if not self._admit(sum(self._cost[pt.name])):
                    break
                if pt.name in self._streamed:
                    self._read_q.put((pt.name, _Streamed(pt)))  # read block by block by the writer
                else:
                    self._read_q.put((pt.name, self._prepare(pt)))
        except BaseException as e:  # noqa: BLE001 - handed to the writer thread, which raises it
            self._read_q.put(_Failed(e))
            return
        self._read_q.put(_END)

    def _merge_loop(self) -> None:
        # thread-local in torch's OpenMP/MKL builds: the writer's and the caller's threads keep theirs
        torch.set_num_threads(self._merge_threads)
        while True:
            item = self._read_q.get()
            if item is _END or isinstance(item, _Failed):
                self._out_q.put(item)
                return
            if self._stop.is_set():
                self._out_q.put(_END)
                return
            name, prepared = item
            del item
            try:
                out = self._stream(prepared.pt) if isinstance(prepared, _Streamed) else self._finish(prepared)
            except BaseException as e:  # noqa: BLE001 - handed to the writer thread, which raises it
                self._out_q.put(_Failed(e))
                return
            del prepared
            inputs, new_output = self._cost[name]
            if new_output:  # the inputs are garbage now; the output is held until written
                self._release(inputs)
            self._out_q.put(out)
            del out

    # ---------------------------------------------------------------- writer side

    def get(self, name: str) -> Any:
        """The tensor for ``name``, which must be the next one in plan order."""
        expected = self._tensors[self._next].name if self._next < len(self._tensors) else None
        if name != expected:
            raise RuntimeError(f"writer asked for {name}, the pipeline's next tensor is {expected}")
        item = self._out_q.get()
        if isinstance(item, _Failed):
            self._stop.set()
            raise item.exc
        if item is _END:
            raise RuntimeError(f"pipeline ended before {name}")
        self._next += 1
        if self._recycle is not None and isinstance(item, torch.Tensor):
            self._handed[name] = item
        return item

    def done(self, name: str) -> None:
        """The writer has written ``name`` and holds it no more: its memory may be reused."""
        t = self._handed.pop(name, None)
        if t is not None:
            self._recycle(t)
            del t
        if callable(self._release_inputs) and name in self._by_name:
            self._release_inputs(self._by_name[name])
        inputs, new_output = self._cost.get(name, (0, 0))
        self._release(new_output if new_output else inputs)

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._read_q.put(_END)  # unblock a merge thread waiting for input
        for t in self._threads:
            if t.is_alive():
                t.join(_JOIN_SECONDS)
        for q in (self._read_q, self._out_q):
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
        self._handed.clear()
        disable = getattr(self._produce, "disable_pool", None)
        if callable(disable):
            disable()

    def __enter__(self) -> TensorPipeline:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()
