"""Produce each planned output tensor: overlay, LoRA merge in fp32, one cast at the end.

This is the only stage that does arithmetic. It works on one tensor at a time
(what the writer asks for next), so its memory is bounded by the largest
tensor, not the model. It also watches the numbers: NaN/Inf in inputs or
results, fp16 overflow, and LoRA adapters whose B is all zero (an adapter that
never trained: the "converted model is just the base" report).
"""

from __future__ import annotations

import bisect
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

import torch

from .. import dtypes
from ..errors import PlanError
from ..machine import env_count, usable_cores
from ..plan.types import PlannedTensor
from ..read.tensor_source import BufferedLoad, TensorInfo, TensorSource

FP16_MAX = 65504.0
_CHUNK_ELEMS = 16 * 1024 * 1024  # exact NaN/Inf counts walk big tensors in slices to bound memory
_BLOCK_ELEMS = 1 << 19  # CPU LoRA merge: rows per block ~ 2 MiB of fp32, so the working set stays in cache
_STREAM_COPY_BYTES = 16 << 20  # a streamed tensor without a merge is read and written in blocks of this size
STREAM_BLOCK_BYTES = 3 * _STREAM_COPY_BYTES  # about what one streamed tensor holds at a time (estimates)
DEVICE_BLOCK_ELEMS = 16 << 20  # GPU merge of a streamed tensor: rows per block (fewer launches and syncs)


@dataclass
class DeltaStats:
    """Per-tensor size of the LoRA update relative to the weight it lands on."""

    name: str
    group: str
    rank: int
    base_norm: float
    delta_norm: float
    zero_b: bool

    @property
    def relative(self) -> float:
        return self.delta_norm / self.base_norm if self.base_norm > 0 else float("inf")


@dataclass
class TransformReport:
    """Delta statistics in plan order, whatever order parallel merge workers finish in (see ``add``)."""

    _entries: list[tuple[int, DeltaStats]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, order: int, stats: DeltaStats) -> None:
        """``order``: the tensor's position in the plan, so the report (and its float sums) never depend
        on which worker finished first."""
        with self._lock:
            bisect.insort(self._entries, (order, stats), key=lambda e: e[0])

    @property
    def deltas(self) -> list[DeltaStats]:
        with self._lock:
            return [d for _, d in self._entries]

    def groups(self) -> dict[str, dict]:
        """Aggregate per module kind (q_proj, wqkv, output, ...): mean/max relative delta, zero-B count."""
        out: dict[str, dict] = {}
        for d in self.deltas:
            g = out.setdefault(
                d.group, {"tensors": 0, "mean_relative_delta": 0.0, "max_relative_delta": 0.0, "zero_b": 0}
            )
            g["tensors"] += 1
            g["mean_relative_delta"] += d.relative
            g["max_relative_delta"] = max(g["max_relative_delta"], d.relative)
            g["zero_b"] += int(d.zero_b)
        for g in out.values():
            g["mean_relative_delta"] /= max(g["tensors"], 1)
        return dict(sorted(out.items()))

    @property
    def zero_b(self) -> list[str]:
        return [d.name for d in self.deltas if d.zero_b]

    def to_dict(self) -> dict:
        return {
            "lora_pairs": len(self.deltas),
            "zero_b_count": len(self.zero_b),
            "zero_b": self.zero_b[:20],
            "groups": self.groups(),
        }


def module_group(name: str) -> str:
    """``language_model.model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj``."""
    stem = re.sub(r"\.(weight|bias)$", "", name)
    parts = re.split(r"\.\d+\.", stem)
    return parts[-1] if len(parts) > 1 else stem.rsplit(".", 1)[-1]


def _finite_minmax(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a floating tensor in one vectorised pass; NaN/Inf anywhere shows in the result.

    ``aminmax`` propagates NaN, and +-Inf are extremes, so both are finite iff
    every element is: a single read of the tensor, no temporary, ~50x faster on
    CPU than ``isfinite(t).all()`` (which builds a bool tensor, and is not
    vectorised for bf16).
    """
    lo, hi = torch.aminmax(t)
    return float(lo), float(hi)


def _count_nonfinite(t: torch.Tensor) -> int:
    flat = t.reshape(-1)
    return sum(int((~torch.isfinite(flat[s : s + _CHUNK_ELEMS])).sum()) for s in range(0, flat.numel(), _CHUNK_ELEMS))


_CKPT_NAN_HINT = "the training diverged or the file is damaged; use an earlier checkpoint"
_BASE_NAN_HINT = "the base folder is damaged; download or copy it again"


def _check_finite(
    t: torch.Tensor, what: str, path: str, count: Callable[[], int] | None = None, hint: str = _CKPT_NAN_HINT
) -> None:
    """Raise if ``t`` holds NaN/Inf; ``count`` gives the exact number when ``t`` is one block of a larger tensor."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = _finite_minmax(t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = count() if count is not None else _count_nonfinite(t)
        raise PlanError(f"{what} contains {bad} NaN/Inf value(s)", path=path, hint=hint)


def _check_fp16_range(lo: float, hi: float, name: str, path: str) -> None:
    m = max(abs(lo), abs(hi))
    if m > FP16_MAX:
        raise PlanError(
            f"{name} has values up to {m:.4g}, beyond fp16's {FP16_MAX:g}",
            path=path,
            hint="use --dtype bf16 (the training dtype) or --dtype fp32",
        )


def _check_fp16(t: torch.Tensor, name: str, path: str) -> None:
    if t.numel() == 0:
        return
    _check_fp16_range(*_finite_minmax(t), name, path)


class _BufferPool:
    """Reusable CPU buffers for outputs (and inputs read with ``load(key, out=)``), keyed by byte size.

    A model repeats a handful of shapes, so after the first layers every tensor
    finds a buffer of its size. A buffer comes back only through
    :meth:`TensorProducer.recycle`: by the merge once an input is consumed, by
    the writer's pipeline once an output is written and no longer referenced.
    Free buffers are capped at ``max_bytes``.
    """

    MIN_BYTES = 1 << 20  # smaller tensors are cheap to allocate

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._free: dict[int, list[torch.Tensor]] = {}
        self._free_bytes = 0
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr -> buffer, for buffers handed out
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor | None:
        if nbytes < self.MIN_BYTES or nbytes > self.max_bytes:
            return None
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                buf = free.pop()
                self._free_bytes -= nbytes
            else:
                buf = None
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            self._lent[buf.data_ptr()] = buf
        return buf

    def give(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu":
            return
        with self._lock:
            buf = self._lent.pop(t.data_ptr(), None)
            if buf is None:
                return
            n = buf.numel()
            if self._free_bytes + n <= self.max_bytes:
                self._free.setdefault(n, []).append(buf)
                self._free_bytes += n


MAX_MERGE_WORKERS = 8  # beyond this the budget, not the workers, bounds how many tensors are in flight
MAX_MERGE_WORKERS_WITH_BLOCKS = 4  # when each merge's row blocks run on block threads (see merge_workers)


def merge_workers(merge_device: str = "cpu") -> tuple[int, int]:
    """(merge worker threads, torch threads each) for this machine.

    CPU merges: one worker per core (at most ``MAX_MERGE_WORKERS``), one torch thread each.
    Workers never wait for each other, so unlike torch's OpenMP threads (which stall at a
    barrier whenever the writer takes a core: elementwise ops 20-70x slower on the 2-core VM)
    they share the cores with the reader and the writer without losing them. GPU merges: two
    workers (one copies to or from the GPU while the other computes). ``SA2VA_MERGE_WORKERS``
    and ``SA2VA_MERGE_THREADS`` (torch threads per worker) override, for benchmarking.
    """
    cores = usable_cores()
    on_gpu = not str(merge_device).startswith("cpu")
    # with block threads (many cores) a worker only hands a merge's blocks out and waits: 4 keep them
    # busy (H100, 8B: 8 workers waited for reads 132-207 s of a 19-28 s write), and each worker fewer
    # is one allocator arena fewer in the peak RSS (PER_MERGE_THREAD_BYTES in write.peak_ram)
    most = MAX_MERGE_WORKERS if block_threads(merge_device) <= 1 else MAX_MERGE_WORKERS_WITH_BLOCKS
    workers = env_count("SA2VA_MERGE_WORKERS") or (2 if on_gpu else min(cores, most))
    threads = env_count("SA2VA_MERGE_THREADS") or 1
    return workers, threads


MAX_BLOCK_THREADS = 16  # threads that share the row blocks of one CPU merge


def block_threads(merge_device: str = "cpu") -> int:
    """Threads that merge the row blocks of one tensor at once (CPU merges; 1 = in the worker itself).

    Why more than the merge workers: the pipeline's memory budget holds only one or two of a big
    model's largest tensors at a time (an 8B MLP projection is 136 MB of output plus as much input),
    so with one thread per tensor the merge of the tensor the writer waits for ran on one core while
    the other workers had nothing admitted to work on (H100, 8B: the writer waited 15.9 s for
    tensors, the workers 213 s for reads). Splitting that tensor's rows over the cores finishes it
    ``cores`` times sooner. Each block's operations are those of the sequential loop, and the norm
    sums are added in block order, so bytes and report are identical. On two cores or fewer there is
    no idle core (the reader and the writer take them), so 1. ``SA2VA_BLOCK_THREADS`` overrides.
    """
    if not str(merge_device).startswith("cpu"):
        return 1
    cores = usable_cores()
    return env_count("SA2VA_BLOCK_THREADS") or (1 if cores <= 2 else min(cores, MAX_BLOCK_THREADS))


def block_thread_bytes(block_elems: int = _BLOCK_ELEMS) -> int:
    """What one block thread holds between tensors: its two fp32 working blocks (``_scratch_rows``)."""
    return 2 * block_elems * 4


def merge_threads(merge_device: str = "cpu") -> int:
    """All torch threads of the merge (workers x threads each): what the memory estimate counts."""
    workers, threads = merge_workers(merge_device)
    return workers * threads


def resolve_merge_device(name: str) -> str:
    """``auto`` is ``cuda`` when torch sees a GPU, else ``cpu``; any other name is returned as given."""
    if str(name).strip().lower() == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(name)


def warm_up(merge_device: str) -> threading.Thread | None:
    """Start the GPU's context and cuBLAS in a daemon thread, for a GPU merge; None for a CPU merge.

    Why: creating the CUDA context and the first cuBLAS handle costs ~1-2 s, which the first GPU
    merge paid on the critical path (H100 run 1: ``--merge-device auto`` no faster than the CPU
    merge at 4B for this fixed cost). Started before the inputs are opened and planned, it overlaps
    that work; torch's lazy initialisation is locked, so a merge that comes first simply waits.
    Errors are left to the merge itself, which reports them where they matter.
    """
    device = resolve_merge_device(merge_device)
    if device.startswith("cpu"):
        return None

    def start() -> None:
        try:
            dev = torch.device(device)
            x = torch.ones((8, 8), device=dev)
            torch.mm(x, x)  # the cuBLAS handle and its workspace
            torch.cuda.synchronize(dev)
        except Exception:  # noqa: BLE001, S110 - a warm-up only: the merge raises the real error
            pass

    thread = threading.Thread(target=start, name="sa2va-cuda-warm-up", daemon=True)
    thread.start()
    return thread


def streamable(pt: PlannedTensor, merge_device: str = "cpu") -> bool:
    """Whether :meth:`TensorProducer.stream` can produce ``pt``: 2-D, and a merge's factors fit its rows.

    Any merge device streams: on a GPU the host holds only one block of input
    rows and one of output (measured: the whole 8B head, input and output, held
    on the host put the cuda merge at 2.85 GiB).
    """
    if len(pt.shape) != 2 or 0 in pt.shape or tuple(pt.value.shape) != pt.shape:
        return False
    if pt.lora is None:
        return True
    return tuple(pt.lora.b.shape[:1]) == pt.shape[:1] and tuple(pt.lora.a.shape[-1:]) == pt.shape[1:]


@dataclass(frozen=True)
class _Factors:
    """One merge's LoRA factors on the merge device, and what every block of it needs to know."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    zero_b: bool
    path: str
    check_out: bool  # check the cast output (bf16/fp32) rather than the fp32 sum (fp16)


@dataclass
class Prepared:
    """The inputs of one output tensor, read and ready for :meth:`TensorProducer.finish`."""

    pt: PlannedTensor
    value: torch.Tensor | None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    rows_in_merge: bool = False  # value not read: the block threads read its rows (``reads_in_merge``)


class TensorProducer:
    """What the writer's pipeline drives (a ``write.pipeline.Producer``): PlannedTensor -> the exact tensor to store.

    ``producer(pt)`` is ``producer.finish(producer.prepare(pt))``: ``prepare``
    only reads (file IO, which releases the GIL), ``finish`` does the
    arithmetic, so a writer can run the two stages in different threads and
    overlap reading, merging and writing (``write.folder`` does). ``finish`` must
    be called in plan order for the delta report to be in plan order.

    The LoRA merge runs in row blocks of about ``block_elems`` elements on CPU:
    each block is upcast, gets ``scale * (B[rows] @ A)``, is checked and cast
    straight into the output, so the fp32 working set stays in cache and the
    extra memory is two small blocks instead of two full fp32 copies. The
    arithmetic is the same as the reference's ``W.float() + scale * (B @ A)``
    (same products, same roundings), element by element.
    """

    def __init__(
        self,
        sources: Mapping[str, TensorSource],
        *,
        merge_device: str = "cpu",
        check_finite: bool = True,
        block_elems: int | None = None,
        plan_order: Sequence[str] = (),
    ):
        self.sources = dict(sources)
        self.merge_device = torch.device(resolve_merge_device(merge_device))
        self.check_finite = check_finite
        # ``SA2VA_MERGE_BLOCK_ELEMS``: smaller blocks, so that tests on small fixtures take the block paths
        self.block_elems = max(1, int(block_elems or env_count("SA2VA_MERGE_BLOCK_ELEMS") or _BLOCK_ELEMS))
        self.report = TransformReport()
        self._pool: _BufferPool | None = None
        # each tensor's place in the report: its plan position when known (``plan_order``), so the report is
        # the same whatever order the writer asks for tensors in (shards side by side) or workers finish in
        self._order: dict[str, int] = {name: i for i, name in enumerate(plan_order)}
        self._order_lock = threading.Lock()
        self._block_threads = block_threads(self.merge_device.type)
        self._block_pool: ThreadPoolExecutor | None = None  # started at the first parallel merge
        self._block_pool_lock = threading.Lock()
        self._scratch = threading.local()  # each block thread's fp32 working rows

    def parallelism(self) -> tuple[int, int]:
        """(merge workers, torch threads each) for this merge device: :func:`merge_workers`.

        ``finish`` is safe in several threads at once: it touches only its own tensors, the
        locked buffer pool and the locked report."""
        return merge_workers(self.merge_device.type)

    def _note_order(self, name: str) -> None:
        """Without ``plan_order``, the order tensors start in: ``prepare`` runs in one reader thread, in the
        pipeline's order, and a streamed tensor starts only when nothing else is in flight."""
        with self._order_lock:
            self._order.setdefault(name, len(self._order))

    # ------------------------------------------------------------- buffer reuse (pipeline)

    def enable_pool(self, max_bytes: int) -> None:
        """Reuse buffers; only for a caller that calls :meth:`recycle` on every tensor it has written."""
        self._pool = _BufferPool(max_bytes) if max_bytes > 0 else None

    def disable_pool(self) -> None:
        self._pool = None
        with self._block_pool_lock:
            pool, self._block_pool = self._block_pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _blocks_executor(self) -> ThreadPoolExecutor:
        with self._block_pool_lock:
            if self._block_pool is None:
                self._block_pool = ThreadPoolExecutor(
                    self._block_threads,
                    thread_name_prefix="sa2va-block",
                    initializer=torch.set_num_threads,  # one torch thread each (thread-local setting)
                    initargs=(1,),
                )
            return self._block_pool

    def recycle(self, t: torch.Tensor) -> None:
        """``t`` (an output of this producer) is written and dropped by the caller: reuse its memory."""
        pool = self._pool
        if pool is not None:
            pool.give(t)

    def release_inputs(self, pt: PlannedTensor) -> None:
        """``pt`` is written: its sources may drop the memory its inputs held (mapped checkpoint pages)."""
        refs = [pt.value] if pt.lora is None else [pt.value, pt.lora.a, pt.lora.b]
        for ref in refs:
            self.sources[ref.layer].release_rows(ref.key)

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        pool = self._pool
        buf = pool.take(math.prod(shape) * dtype.itemsize) if pool is not None else None
        if buf is None:
            return torch.empty(shape, dtype=dtype)
        return buf.view(dtype).view(shape)

    def _load(self, layer: str, key: str) -> torch.Tensor:
        return self.sources[layer].load(key)

    def __call__(self, pt: PlannedTensor) -> torch.Tensor:
        return self.finish(self.prepare(pt))

    def _load_pooled(self, layer: str, key: str, nbytes: int) -> torch.Tensor:
        """Like ``_load``, into a reused buffer when the source can read into one (``load(key, out=)``).

        Fresh memory costs a page fault per 4 KiB on first touch (~1.2 GB/s on
        the 2-core VM, against ~12 GB/s for a copy into mapped pages), so with
        the pipeline's recycling a source that reads with ``readinto`` reads at
        memory speed. Sources without ``out=`` are read as usual.
        """
        src = self.sources[layer]
        pool = self._pool
        if pool is not None and src.abilities.reads_into:
            buf = pool.take(nbytes)
            if buf is not None:
                return cast(BufferedLoad, src).load(key, out=buf)
        return src.load(key)

    def _step(self, cols: int, rows: int) -> int:
        """Rows per CPU merge block: about ``block_elems`` elements (one row at least)."""
        return max(1, min(rows, self.block_elems // max(cols, 1)))

    def reads_in_merge(self, pt: PlannedTensor) -> bool:
        """Whether ``finish`` reads ``pt``'s value itself, each block thread its own rows from the file.

        Why: the reader thread read every merged tensor's value whole before its merge, so the memory
        budget held input and output of each (an 8B MLP projection: 136 MB of each; 512 MiB then admits
        one merge beside one tensor being written, and the shards written side by side starve; H100,
        8B: the writer waited for tensors 19-28 s of a 19-28 s write stage, the reader for room 8-13 s).
        Read block by block by the threads that merge them, the value costs no budget and is read by
        up to ``block_threads`` threads at once. Only base tensors (the checkpoint's are checked whole
        before a merge) of sources that read row ranges, for a CPU merge on several block threads.
        """
        if self._block_threads <= 1 or self.merge_device.type != "cpu" or pt.lora is None:
            return False
        if os.environ.get("SA2VA_READS_IN_MERGE", "").strip() == "0":  # benchmarking: the reader reads them
            return False
        if pt.value.layer != "base" or not self.sources[pt.value.layer].abilities.reads_rows:
            return False
        return streamable(pt, "cpu") and pt.shape[0] > self._step(pt.shape[1], pt.shape[0])

    def prepare(self, pt: PlannedTensor) -> Prepared:
        """Read the inputs of ``pt`` (value, and LoRA factors if any); no arithmetic."""
        self._note_order(pt.name)
        if self.reads_in_merge(pt):
            assert pt.lora is not None
            a = self._load(pt.lora.a.layer, pt.lora.a.key)
            b = self._load(pt.lora.b.layer, pt.lora.b.key)
            return Prepared(pt, None, a, b, rows_in_merge=True)
        value = self._load_pooled(pt.value.layer, pt.value.key, TensorInfo(pt.value.shape, pt.value.dtype).nbytes)
        if pt.lora is None:
            return Prepared(pt, value)
        a = self._load(pt.lora.a.layer, pt.lora.a.key)
        b = self._load(pt.lora.b.layer, pt.lora.b.key)
        return Prepared(pt, value, a, b)

    def finish(self, prep: Prepared) -> torch.Tensor:
        """The exact tensor to store for ``prep.pt``: checks, overlay or merge, one cast."""
        pt, value = prep.pt, prep.value
        if prep.rows_in_merge:  # the block threads read the rows (reads_in_merge)
            assert pt.lora is not None and prep.a is not None and prep.b is not None
            rows, cols = pt.shape
            out = self._empty((rows, cols), dtypes.to_torch(pt.dtype))
            src_rows = self.sources[pt.value.layer]
            key = pt.value.key
            self._merge_parallel(
                pt, lambda s, e: src_rows.load_rows(key, s, e), prep.a, prep.b, out, self._step(cols, rows)
            )
            prep.a = prep.b = None
            return out
        assert value is not None, "finish() called twice on one Prepared"
        src = self.sources[pt.value.layer]
        if self.check_finite and pt.value.layer != "base":
            _check_finite(value, f"{pt.value.layer} tensor {pt.value.key}", str(src.path))
        target = dtypes.to_torch(pt.dtype)
        if pt.lora is None:
            if value.dtype == target:
                out = value
            else:
                out = self._empty(tuple(value.shape), target)
                out.copy_(value)
            if pt.dtype == "fp16" and value.dtype != torch.float16:
                _check_fp16(value, pt.name, str(src.path))
            if self.check_finite and pt.value.layer == "base":
                # every value written is NaN/Inf-free: merged and checkpoint tensors are checked above
                # and in the merge; this covers what passes through from the base (once a job of the
                # read-back from disk, which is no longer the default)
                _check_finite(
                    out, f"written tensor {pt.name} (base tensor {pt.value.key})", str(src.path), hint=_BASE_NAN_HINT
                )
        else:
            out = self._merge(pt, value, prep.a, prep.b, target)
        if out is not value:  # the input buffer (if pooled) is free again
            prep.value = None
            self.recycle(value)
        if tuple(out.shape) != pt.shape:
            raise PlanError(
                f"{pt.name}: produced shape {list(out.shape)}, planned {list(pt.shape)}",
                path=str(src.path),
                hint="this is a bug; please report it",
            )
        return out

    def _merge(
        self,
        pt: PlannedTensor,
        value: torch.Tensor,
        a_in: torch.Tensor | None,
        b_in: torch.Tensor | None,
        target: torch.dtype,
    ) -> torch.Tensor:
        assert pt.lora is not None and a_in is not None and b_in is not None
        rows, cols = b_in.shape[0], a_in.shape[1]
        if value.numel() != rows * cols:
            raise PlanError(
                f"{pt.name}: LoRA B@A is {[rows, cols]}, the weight is {list(value.shape)}",
                path=str(self.sources[pt.lora.a.layer].path),
                hint="this is a bug; please report it",
            )
        dev = self.merge_device
        src2d = value.reshape(rows, cols)
        if dev.type == "cpu":
            step = self._step(cols, rows)
            out = self._empty((rows, cols), target)
            if self._block_threads > 1 and rows > step:
                self._merge_parallel(pt, lambda s, e: src2d[s:e], a_in, b_in, out, step)
                return out.reshape(pt.shape)
        else:  # one block: the device has the memory, and fewer launches and syncs
            step = max(rows, 1)
            src2d = src2d.to(dev)
            out = torch.empty((rows, cols), dtype=target, device=dev)
        for _ in self._merge_blocks(pt, lambda s, e: src2d[s:e], a_in, b_in, lambda s, e: out[s:e], step):
            pass
        if out.device.type != "cpu":
            host = self._empty((rows, cols), target)
            host.copy_(out)
            out = host
        return out.reshape(pt.shape)

    def _factors(self, pt: PlannedTensor, a_in: torch.Tensor, b_in: torch.Tensor) -> _Factors:
        """A and B in fp32 on the merge device, checked, with a power-of-two scale folded into B."""
        assert pt.lora is not None
        path = str(self.sources[pt.lora.a.layer].path)
        dev = self.merge_device
        a = a_in.to(dev, torch.float32)
        b = b_in.to(dev, torch.float32)
        b_lo = b_hi = 0.0
        if b.numel():
            b_lo, b_hi = _finite_minmax(b)
        if self.check_finite:
            _check_finite(a, f"LoRA tensor {pt.lora.a.key}", path)
            if not (math.isfinite(b_lo) and math.isfinite(b_hi)):
                _check_finite(b, f"LoRA tensor {pt.lora.b.key}", path)
        zero_b = b_lo == 0.0 and b_hi == 0.0  # min = max = 0 <=> every element is (+-)0
        scale = float(pt.lora.scale)
        if scale != 1.0 and math.frexp(scale)[0] == 0.5 and b.numel():
            # a power of two: scale*(B@A) == (scale*B)@A exactly (every product and partial sum is
            # scaled by 2^k, no rounding changes), so fold it into the small factor
            b = b * scale
            scale = 1.0
        target = dtypes.to_torch(pt.dtype)
        # bf16/fp32 outputs are checked after the cast (a cast keeps NaN/Inf, and an fp32 sum too
        # large for bf16 becomes Inf, so it is caught too); fp16 needs the fp32 sum for its range test
        check_out = target in (torch.bfloat16, torch.float32) and pt.dtype != "fp16"
        return _Factors(a, b, scale, zero_b, path, check_out)

    def _merge_rows(
        self,
        pt: PlannedTensor,
        f: _Factors,
        src_rows: torch.Tensor,
        start: int,
        w: torch.Tensor,
        d: torch.Tensor,
        o: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [start, start + len(w)) of the merge into ``o``: (their ||W||^2, their ||delta||^2) in fp64.

        The one place the merge's arithmetic is written, for the sequential loop, the parallel blocks
        and the streamed tensors alike, so their bytes are the same operation for operation."""
        stop = start + w.shape[0]
        w.copy_(src_rows)  # exact upcast
        base_sq = torch.linalg.vector_norm(w).double().square()
        torch.mm(f.b[start:stop], f.a, out=d)
        if f.scale != 1.0:
            d.mul_(f.scale)
        delta_sq = torch.linalg.vector_norm(d).double().square()
        w.add_(d)
        if not f.check_out and (self.check_finite or pt.dtype == "fp16"):
            self._check_block(w, pt, f.path, start)
        o.copy_(w)  # the one rounding to the output dtype
        if f.check_out and self.check_finite:
            self._check_block(o, pt, f.path, start)
        return base_sq, delta_sq

    def _record(self, pt: PlannedTensor, f: _Factors, base_sq: torch.Tensor, delta_sq: torch.Tensor) -> None:
        assert pt.lora is not None
        self.report.add(
            self._order.get(pt.name, len(self._order)),
            DeltaStats(
                pt.name,
                module_group(pt.name),
                pt.lora.rank,
                math.sqrt(float(base_sq)),
                math.sqrt(float(delta_sq)),
                f.zero_b,
            ),
        )

    def _scratch_rows(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This block thread's two fp32 (rows, cols) working buffers, reused from tensor to tensor."""
        need = rows * cols
        have = getattr(self._scratch, "buf", None)
        if have is None or have.numel() < 2 * need:
            have = torch.empty(2 * max(need, self.block_elems), dtype=torch.float32)
            self._scratch.buf = have
        return have[:need].view(rows, cols), have[need : 2 * need].view(rows, cols)

    def _merge_parallel(
        self,
        pt: PlannedTensor,
        rows_of: Callable[[int, int], torch.Tensor],
        a_in: torch.Tensor,
        b_in: torch.Tensor,
        out: torch.Tensor,
        step: int,
    ) -> None:
        """A CPU merge whose row blocks run on the block threads (``block_threads``); see ``_merge_rows``.

        The norm sums are added in block order and the first failing block (in row order) is the one
        raised, so the output, the report and the error are those of the sequential loop."""
        f = self._factors(pt, a_in, b_in)
        rows, cols = out.shape

        def job(start: int) -> tuple[torch.Tensor, torch.Tensor]:
            stop = min(rows, start + step)
            w, d = self._scratch_rows(stop - start, cols)
            return self._merge_rows(pt, f, rows_of(start, stop), start, w, d, out[start:stop])

        pool = self._blocks_executor()
        futures: list[Future] = [pool.submit(job, s) for s in range(0, rows, step)]
        base_sq = torch.zeros((), dtype=torch.float64)
        delta_sq = torch.zeros((), dtype=torch.float64)
        try:
            for fut in futures:
                b_part, d_part = fut.result()
                base_sq += b_part
                delta_sq += d_part
        finally:
            for fut in futures:  # after an error: no block still writes into ``out`` once we return
                fut.cancel()
            for fut in futures:
                if not fut.cancelled():
                    fut.exception()
        self._record(pt, f, base_sq, delta_sq)

    def _merge_blocks(
        self,
        pt: PlannedTensor,
        rows_of: Callable[[int, int], torch.Tensor],
        a_in: torch.Tensor,
        b_in: torch.Tensor,
        out_rows: Callable[[int, int], torch.Tensor],
        step: int,
    ) -> Iterator[tuple[int, int]]:
        """Merge block by block: rows [start, stop) of W go in via ``rows_of``, out via ``out_rows``.

        Yields each (start, stop) once its output rows are final; the delta
        statistics are recorded when the last block is done. Whole-tensor
        merges and streamed ones share this loop, so their arithmetic is the
        same operation for operation.
        """
        f = self._factors(pt, a_in, b_in)
        dev = self.merge_device
        rows, cols = f.b.shape[0], f.a.shape[1]
        # plain fp32 ops only: torch's mixed-dtype kernels (bf16 + fp32 -> bf16) are not vectorised
        # on CPU and run 20-100x slower than upcast + add_ + downcast, which are
        w_buf = torch.empty((step, cols), dtype=torch.float32, device=dev)
        d_buf = torch.empty((step, cols), dtype=torch.float32, device=dev)
        base_sq = torch.zeros((), dtype=torch.float64, device=dev)
        delta_sq = torch.zeros((), dtype=torch.float64, device=dev)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            n = stop - start
            b_part, d_part = self._merge_rows(
                pt, f, rows_of(start, stop), start, w_buf[:n], d_buf[:n], out_rows(start, stop)
            )
            base_sq += b_part
            delta_sq += d_part
            yield start, stop
        del d_buf, w_buf
        self._record(pt, f, base_sq, delta_sq)

    # ------------------------------------------------------------- row-block streaming (huge tensors)

    def can_stream(self, pt: PlannedTensor) -> bool:
        return streamable(pt, self.merge_device.type)

    def stream(self, pt: PlannedTensor) -> Iterator[torch.Tensor]:
        """``pt``'s output as consecutive row blocks; each block is valid until the next is asked for.

        For a tensor too big to sit in the writer's window with its inputs (the
        26B embedding and head are 1.1 GB each in bf16, plus as much again of
        input): its value is read a block of rows at a time and the output never
        exists whole, so memory is a few blocks whatever the tensor's size. The
        checks and the arithmetic are those of :meth:`finish`.
        """
        self._note_order(pt.name)
        rows, cols = pt.shape
        target = dtypes.to_torch(pt.dtype)
        src = self.sources[pt.value.layer]
        path = str(src.path)
        rows_of = self._row_reader(pt.value)
        check_input = self.check_finite and pt.value.layer != "base"
        what = f"{pt.value.layer} tensor {pt.value.key}"

        def count_all(step: int) -> Callable[[], int]:
            return lambda: sum(_count_nonfinite(rows_of(s, min(rows, s + step))) for s in range(0, rows, step))

        if pt.lora is not None:
            per_block = self.block_elems if self.merge_device.type == "cpu" else DEVICE_BLOCK_ELEMS
            step = max(1, min(rows, per_block // cols))

            def checked_rows(s: int, e: int) -> torch.Tensor:
                block = rows_of(s, e)
                if check_input:
                    _check_finite(block, what, path, count_all(step))
                return block

            out_buf = torch.empty((step, cols), dtype=target)
            a = self._load(pt.lora.a.layer, pt.lora.a.key)
            b = self._load(pt.lora.b.layer, pt.lora.b.key)
            for start, stop in self._merge_blocks(pt, checked_rows, a, b, lambda s, e: out_buf[: e - s], step):
                yield out_buf[: stop - start]
                self._rows_done(pt.value, start, stop)
            return
        step = max(1, min(rows, _STREAM_COPY_BYTES // max(1, cols * dtypes.itemsize(pt.value.dtype))))
        cast_buf: torch.Tensor | None = None
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            block = rows_of(start, stop)
            if check_input:
                _check_finite(block, what, path, count_all(step))
            if block.dtype == target:
                o = block
            else:
                if pt.dtype == "fp16" and block.dtype != torch.float16:
                    _check_fp16(block, pt.name, path)
                if cast_buf is None:
                    cast_buf = torch.empty((step, cols), dtype=target)
                o = cast_buf[: stop - start]
                o.copy_(block)
            if self.check_finite and not check_input:  # a base tensor: check what is written (see finish)
                _check_finite(
                    o,
                    f"written tensor {pt.name} (base tensor {pt.value.key})",
                    path,
                    count_all(step),
                    hint=_BASE_NAN_HINT,
                )
            yield o
            del o
            del block
            self._rows_done(pt.value, start, stop)

    def _row_reader(self, ref) -> Callable[[int, int], torch.Tensor]:
        """rows [start, stop) of a source tensor: read from disk (or the mapping) where the source can."""
        src = self.sources[ref.layer]
        if src.abilities.reads_rows:
            return lambda s, e: src.load_rows(ref.key, s, e)
        whole = src.load(ref.key)  # e.g. DeepSpeed: assembled once, then sliced
        return lambda s, e: whole[s:e]

    def _rows_done(self, ref, start: int, stop: int) -> None:
        """A streamed block's input rows are used: a mapped source may drop their pages now."""
        self.sources[ref.layer].release_rows(ref.key, start, stop)

    def _check_block(self, t: torch.Tensor, pt: PlannedTensor, path: str, first_row: int) -> None:
        """Checks on rows [first_row, first_row + len(t)) of a merge; the merge stops at the first bad block."""
        if t.numel() == 0:
            return
        lo, hi = _finite_minmax(t)
        if self.check_finite and not (math.isfinite(lo) and math.isfinite(hi)):
            rows = f"rows {first_row}-{first_row + t.shape[0] - 1}"
            raise PlanError(
                f"merged tensor {pt.name} contains NaN/Inf ({_count_nonfinite(t)} in {rows})",
                path=path,
                hint="the training diverged or the file is damaged; use an earlier checkpoint",
            )
        if pt.dtype == "fp16":
            _check_fp16_range(lo, hi, pt.name, path)
