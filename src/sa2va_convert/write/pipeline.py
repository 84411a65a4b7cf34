"""Produce output tensors ahead of the writer, in plan order, within a memory budget.

Writing a shard is three kinds of work: reading inputs (file IO), merging (torch
arithmetic) and writing (file IO). All three release the GIL, so running them in
threads overlaps them: while the writer writes tensor i, tensors i+1.. are merged
and the next one is read. Two rules keep this safe:

* **order**: one reader thread walks the tensors in the order given, merge workers
  take them as they come, and the writer receives them strictly in that order
  (a worker's result waits until its turn), so files and reports are identical to
  a sequential run;
* **memory**: a tensor is admitted only while the bytes of everything in flight
  (inputs read, outputs not yet written) stay under the budget:
  ``min(budget_bytes, AHEAD x the largest tensor's inputs + output)``; a tensor
  larger than the budget is streamed in row blocks (and counts those), or, where it cannot
  be, runs alone. The pipeline's memory is therefore about
  ``max(budget, largest tensor's inputs + output)`` plus up to half a budget of
  free recycled buffers (:func:`pool_bytes`), whatever the model size (512 MiB budget: ~0.75 GiB).

Merging runs in several worker threads (``Producer.parallelism``: for the transform stage's
producer, ``transform.produce.merge_workers``), each on its own tensors with
few torch threads, rather than one thread whose every operation is split over all cores: a
model's tensors are many and mid-sized, and one torch op on a 2 MiB block split 15 ways spends
more in OpenMP barriers than in arithmetic (measured: 554 CPU-s for the 8B merge on 32 cores,
and the merge bound the 2-core VM's wall). Results are handed to the writer strictly in plan
order, and a worker's failure is raised when the writer reaches that tensor, as before.

What the pipeline drives is declared by :class:`Producer` (the transform stage's
``TensorProducer`` is one): ``prepare`` reads in the reader thread, ``finish`` computes in
a merge worker (several may run at once, on different tensors), and the streaming and
buffer-pool methods say what it can do. A plain ``PlannedTensor -> tensor`` function becomes
one through :class:`FunctionProducer`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from .. import dtypes
from ..machine import env_count, usable_cores
from ..plan.types import PlannedTensor
from .stage_times import StageTimes

DEFAULT_BUDGET_BYTES = 512 << 20  # cap on the bytes of tensors in flight (inputs + outputs)
STREAMED_BYTES = 3 * (16 << 20)  # what a streamed tensor holds at a time (transform.produce.STREAM_BLOCK_BYTES)
AHEAD = 4  # ... and at most about this many of the model's largest tensors
_JOIN_SECONDS = 60.0


def _ref_bytes(ref) -> int:
    n = 1
    for s in ref.shape:
        n *= s
    return n * dtypes.itemsize(ref.dtype)


def inflight_bytes(pt: PlannedTensor, *, value_read_in_merge: bool = False) -> tuple[int, int]:
    """(inputs, new output) bytes of one tensor; inputs are freed once merged, the output once written.

    A tensor stored as read (no merge, no cast) has no new output: its input is
    what the writer writes, so it is held until then. A merge that reads its value's rows itself
    (``Producer.reads_in_merge``) holds only the LoRA factors as inputs.
    """
    inputs = 0 if value_read_in_merge and pt.lora is not None else _ref_bytes(pt.value)
    if pt.lora is not None:
        return inputs + _ref_bytes(pt.lora.a) + _ref_bytes(pt.lora.b), pt.nbytes
    if pt.value.dtype != pt.dtype:
        return inputs, pt.nbytes
    return inputs, 0


def pool_bytes(budget: int) -> int:
    """The free recycled buffers the pipeline keeps (the producer's pool cap): half its budget.

    Why half: the pool was capped at the whole budget while the peak estimate counted half of it
    (in flight and free together stay near the budget in steady state). Where a model's tensors
    come in few large sizes the pool does fill beside a full window: Sa2VA-8B, GPU merge, warm, on
    the H100 machine peaked at 2.07 GiB with a 512 MiB window against an estimate of 1.69 GiB, and
    0.31 GiB fell per 128 MiB of window (1.76 GiB at 384 MiB), 2.5 bytes per byte where the
    estimate assumed 1.5. Half a budget keeps the reuse (a buffer of a size seen again comes back
    from the pool) and makes the estimate's figure the real cap. ``SA2VA_POOL_MIB`` sets it
    (benchmarking).
    """
    forced = env_count("SA2VA_POOL_MIB")
    return forced << 20 if forced else max(0, budget) // 2


MAX_PARALLEL_SHARDS = 4  # shards written side by side at most (each: two 16 MiB stages, an IO and a hash thread)
SHARD_STAGE_BYTES = 2 * (16 << 20)  # the staging buffers of one open shard (safetensors_stream._DirectFile)


def parallel_shards(count: int) -> int:
    """How many of ``count`` shards the writer keeps open at once.

    One shard's sha256 runs in one thread (~1.2 GB/s on the H100 machine's Xeon), slower than
    that machine's disk: with one shard at a time the hash bounded the 4B write (6.3 s of
    hashing against 5.1 s of disk writes). Shards written side by side hash in
    parallel. On two cores or fewer there is no idle core to hash on, so one at a time.
    ``SA2VA_PARALLEL_SHARDS`` overrides (benchmarking).
    """
    if count <= 1:
        return max(0, count)
    wanted = env_count("SA2VA_PARALLEL_SHARDS") or (1 if usable_cores() <= 2 else MAX_PARALLEL_SHARDS)
    return max(1, min(count, wanted))


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


class _Streamed:
    """Marks a tensor the writer produces itself, block by block (``produce.stream``)."""

    def __init__(self, pt: PlannedTensor):
        self.pt = pt


class Producer(Protocol):
    """What :class:`TensorPipeline` drives: every method is required (a producer without an ability
    answers ``False``/does nothing, as :class:`FunctionProducer` does); nothing is probed."""

    def prepare(self, pt: PlannedTensor) -> Any:
        """Read ``pt``'s inputs (file IO, in the reader thread); no arithmetic."""
        ...

    def finish(self, prepared: Any) -> torch.Tensor:
        """The exact tensor to store, from what ``prepare`` returned (in a merge worker; see ``parallelism``)."""
        ...

    def can_stream(self, pt: PlannedTensor) -> bool:
        """Whether ``stream`` can produce ``pt`` in row blocks (for a tensor too big for the window)."""
        ...

    def stream(self, pt: PlannedTensor) -> Iterator[torch.Tensor]:
        """``pt``'s output as consecutive row blocks; each valid until the next is asked for."""
        ...

    def parallelism(self) -> tuple[int, int]:
        """(merge workers, torch threads each) that suit this producer on this machine; ``finish`` must
        then be safe to call from that many threads at once, on different tensors."""
        ...

    def reads_in_merge(self, pt: PlannedTensor) -> bool:
        """Whether ``finish`` reads ``pt``'s value itself (``prepare`` then reads only the LoRA factors):
        the value's bytes are then no input held in the budget."""
        ...

    def enable_pool(self, max_bytes: int) -> None:
        """Reuse output buffers handed back with ``recycle`` (up to ``max_bytes`` kept free)."""
        ...

    def recycle(self, t: torch.Tensor) -> None:
        """``t`` is written and dropped by the writer: its memory may serve a later tensor."""
        ...

    def disable_pool(self) -> None: ...

    def release_inputs(self, pt: PlannedTensor) -> None:
        """``pt`` is written: its sources may drop the memory its inputs held."""
        ...


class FunctionProducer:
    """A plain ``PlannedTensor -> tensor`` function as a :class:`Producer`: computed in the merging
    thread, never streamed, no buffers reused (tests and tools)."""

    def __init__(self, fn: Callable[[PlannedTensor], torch.Tensor]):
        self._fn = fn

    def prepare(self, pt: PlannedTensor) -> PlannedTensor:
        return pt

    def finish(self, prepared: PlannedTensor) -> torch.Tensor:
        return self._fn(prepared)

    def can_stream(self, pt: PlannedTensor) -> bool:
        return False

    def stream(self, pt: PlannedTensor) -> Iterator[torch.Tensor]:
        raise NotImplementedError("a FunctionProducer produces tensors whole")

    def parallelism(self) -> tuple[int, int]:
        return 1, max(1, torch.get_num_threads())  # one worker: the function need not be thread-safe

    def reads_in_merge(self, pt: PlannedTensor) -> bool:
        return False

    def enable_pool(self, max_bytes: int) -> None:
        return None

    def recycle(self, t: torch.Tensor) -> None:
        return None

    def disable_pool(self) -> None:
        return None

    def release_inputs(self, pt: PlannedTensor) -> None:
        return None


def _timed_blocks(blocks: Iterator[torch.Tensor], times: StageTimes) -> Iterator[torch.Tensor]:
    """A streamed tensor's blocks are read and merged lazily, in the writer's thread: time that as such."""
    while True:
        start = time.perf_counter()
        try:
            block = next(blocks)
        except StopIteration:
            times.add("write.stream", time.perf_counter() - start)
            return
        times.add("write.stream", time.perf_counter() - start)
        yield block
        del block


class TensorPipeline:
    """``get(name)`` returns the next planned tensor; ``done(name)`` after it is written frees its budget.

    Output buffers are recycled through the producer's pool: each written tensor's memory is
    handed back for a later tensor of the same size, so the merge writes into pages already
    mapped instead of faulting in fresh ones (on the 2-core VM fresh pages cost ~1.3 GB/s, a
    reused buffer ~12 GB/s).
    """

    def __init__(
        self,
        produce: Producer,
        tensors: Sequence[PlannedTensor],
        *,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        workers: tuple[int, int] | None = None,
        times: StageTimes | None = None,
    ):
        self.times = times if times is not None else StageTimes()
        self._workers, self._worker_threads = workers if workers is not None else produce.parallelism()
        self._produce = produce
        self._tensors = list(tensors)
        self._cost = {
            pt.name: inflight_bytes(pt, value_read_in_merge=produce.reads_in_merge(pt)) for pt in self._tensors
        }
        largest = max((i + o for i, o in self._cost.values()), default=0)
        # a small model gets a small window: memory stays ~ a few tensors, never the model
        self._budget = min(max(0, int(budget_bytes)), AHEAD * largest)
        # a tensor that cannot fit the window with its inputs is streamed in row blocks by its shard's
        # writer, and costs what it holds at a time (a few blocks, STREAMED_BYTES). It used to hold the
        # whole budget, so that nothing was read, merged or written beside it: on the H100 the 8B
        # embedding and head then took 3-4 s of a 16-19 s write stage on one core (issue 26). Reports
        # stay in plan order (the producer orders them by plan position), files in each file's order.
        self._streamed: set[str] = set()
        for pt in self._tensors:
            if sum(self._cost[pt.name]) > self._budget and produce.can_stream(pt):
                self._streamed.add(pt.name)
                self._cost[pt.name] = (min(self._budget, STREAMED_BYTES), 0)
        self._inflight = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._read_q: queue.Queue = queue.Queue()
        # merged results by plan position; the writer takes them in order (workers finish in any order)
        self._results: dict[int, Any] = {}
        self._results_cond = threading.Condition()
        self._handed: dict[str, Any] = {}
        self._handed_lock = threading.Lock()
        self._next = 0
        self._by_name = {pt.name: pt for pt in self._tensors}
        produce.enable_pool(pool_bytes(self._budget))  # free buffers beside the window (write.peak_ram counts them)
        self._threads = [threading.Thread(target=self._read_loop, name="sa2va-read", daemon=True)]
        self._threads += [
            threading.Thread(target=self._merge_loop, name=f"sa2va-merge-{i}", daemon=True)
            for i in range(max(1, self._workers))
        ]
        self._running = len(self._threads) - 1  # merge workers still running (to tell "not yet" from "never")
        try:
            for t in self._threads:
                t.start()
        except BaseException:  # e.g. Ctrl-C between two starts: stop the one running before re-raising
            self.close()
            raise

    # ---------------------------------------------------------------- background threads

    def _admit(self, cost: int) -> bool:
        start = time.perf_counter()
        with self._cond:
            while not self._stop.is_set() and self._inflight > 0 and self._inflight + cost > self._budget:
                self._cond.wait()
            self.times.add("read.wait_budget", time.perf_counter() - start)
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
        for seq, pt in enumerate(self._tensors):
            try:
                if not self._admit(sum(self._cost[pt.name])):
                    break
                if pt.name in self._streamed:
                    self._read_q.put((seq, pt.name, _Streamed(pt)))  # read block by block by the writer
                else:
                    with self.times.span("read.busy"):
                        prepared = self._produce.prepare(pt)
                    self._read_q.put((seq, pt.name, prepared))
                    del prepared
            except BaseException as e:  # noqa: BLE001 - raised by the writer when it reaches this tensor
                self._deliver(seq, _Failed(e))
                break
        for _ in range(max(1, self._workers)):
            self._read_q.put(_END)

    def _deliver(self, seq: int, item: Any) -> None:
        with self._results_cond:
            self._results[seq] = item
            self._results_cond.notify_all()

    def _merge_loop(self) -> None:
        # thread-local in torch's OpenMP/MKL builds: the writer's and the caller's threads keep theirs
        torch.set_num_threads(self._worker_threads)
        try:
            while True:
                with self.times.span("merge.wait_input"):
                    item = self._read_q.get()
                if item is _END or self._stop.is_set():
                    return
                seq, name, prepared = item
                del item
                try:
                    with self.times.span("merge.busy"):
                        out = (
                            _timed_blocks(self._produce.stream(prepared.pt), self.times)
                            if isinstance(prepared, _Streamed)
                            else self._produce.finish(prepared)
                        )
                except BaseException as e:  # noqa: BLE001 - raised by the writer when it reaches this tensor
                    self._deliver(seq, _Failed(e))
                    continue
                del prepared
                inputs, new_output = self._cost[name]
                if new_output:  # the inputs are garbage now; the output is held until written
                    self._release(inputs)
                self._deliver(seq, out)
                del out
        finally:
            with self._results_cond:
                self._running -= 1
                self._results_cond.notify_all()

    # ---------------------------------------------------------------- writer side

    def get(self, name: str) -> Any:
        """The tensor for ``name``, which must be the next one in plan order."""
        expected = self._tensors[self._next].name if self._next < len(self._tensors) else None
        if name != expected:
            raise RuntimeError(f"writer asked for {name}, the pipeline's next tensor is {expected}")
        seq = self._next
        with self.times.span("write.wait_tensor"), self._results_cond:
            while seq not in self._results and self._running > 0 and not self._stop.is_set():
                self._results_cond.wait()
            item = self._results.pop(seq, _END)
        if isinstance(item, _Failed):
            self._stop.set()
            raise item.exc
        if item is _END:
            raise RuntimeError(f"pipeline ended before {name}")
        self._next += 1
        if isinstance(item, torch.Tensor):
            with self._handed_lock:
                self._handed[name] = item
        return item

    def abort(self, _reason: BaseException | None = None) -> None:
        """Stop reading and merging, and wake a ``get`` that waits (a shard's writer failed: the
        tensors handed to it will never be ``done``, so the budget would never free up)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        with self._results_cond:
            self._results_cond.notify_all()

    def done(self, name: str) -> None:
        """The writer has written ``name`` and holds it no more: its memory may be reused.

        Called from the shard writers' threads (``write.shard_lanes``), several at once."""
        with self._handed_lock:
            t = self._handed.pop(name, None)
        if t is not None:
            self._produce.recycle(t)
            del t
        if name in self._by_name:
            self._produce.release_inputs(self._by_name[name])
        inputs, new_output = self._cost.get(name, (0, 0))
        self._release(new_output if new_output else inputs)

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for _ in range(max(1, self._workers)):
            self._read_q.put(_END)  # unblock merge workers waiting for input
        for t in self._threads:
            if t.is_alive():
                t.join(_JOIN_SECONDS)
        while True:
            try:
                self._read_q.get_nowait()
            except queue.Empty:
                break
        with self._results_cond:
            self._results.clear()
        with self._handed_lock:
            self._handed.clear()
        self._produce.disable_pool()

    def __enter__(self) -> TensorPipeline:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()
