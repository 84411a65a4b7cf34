"""The peak-RAM estimate of a conversion, beside what it estimates: the writer's pipeline window.

``--dry-run`` prints it and the plan carries it (``ConversionPlan.peak_ram_bytes``), but the
figures it adds up belong to the stages that spend the memory: the pipeline's budget and
look-ahead (``write.pipeline``), the transform's streamed blocks (``transform.produce``), and
the read-back's buffers (``verify.structural``, passed in by the caller). The plan owns none of
them; the conversion fills the estimate in once the plan is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .. import dtypes
from ..machine import env_count, process_rss
from ..plan.types import PlannedTensor, ShardPlan
from ..read.tensor_source import TensorInfo, TensorSource
from ..transform.produce import (
    DEVICE_BLOCK_ELEMS,
    STREAM_BLOCK_BYTES,
    block_thread_bytes,
    block_threads,
    merge_threads,
    resolve_merge_device,
    streamable,
)
from . import pipeline

# Bytes the converter holds before any tensor is touched: interpreter, torch, tokenizers, the plan
# (measured: ~290 MiB after imports, ~330 MiB once the tokenizer and plan are loaded).
INTERPRETER_BASELINE_BYTES = 330 * 1024 * 1024
CUDA_CONTEXT_BYTES = 330 * 1024 * 1024  # host RSS of torch's CUDA runtime + cuBLAS once a GPU merge ran
# The peak this tool aims to stay under (README, "Performance"). The writer's window is sized so that the
# estimate stays under 90 % of it (choose_window). Why 90 %: with a 512 MiB window the GPU-merge peaks
# measured 1.68-1.74 GiB at 4B (H100 and H200 machines) and 1.86-2.07 GiB at 8B (H100), against estimates
# of 1.6-1.8 GiB, and 90 % keeps both sizes at 512 MiB there: a lower share (80 %)
# cut 4B to 424 MiB, where a ~416 MiB window cost 0.5-1.6 s of its write stage (H200 machine) for a peak
# already under 2 GiB, and 8B to 380 MiB, unmeasured. The window shrinks where the rest of the process is
# larger than these runs' (more merge threads, a DeepSpeed partition set's mapped pages). Raising
# CUDA_CONTEXT_BYTES instead (650 MiB) put the 4B estimate 32 % over its measured peak (1.90 against
# 1.44 GiB), outside the 25 % the estimate promises.
PEAK_RAM_TARGET_BYTES = 2 << 30
TARGET_SHARE = 0.9
MIN_WINDOW_BYTES = 128 << 20
PER_MERGE_THREAD_BYTES = 40 * 1024 * 1024  # per torch thread of the merge beyond the first (see estimate_peak_ram)

__all__ = [
    "choose_window",
    "estimate_peak_ram",
    "MIN_WINDOW_BYTES",
    "PEAK_RAM_TARGET_BYTES",
    "TARGET_SHARE",
    "process_baseline",
    "resident_layers",
    "INTERPRETER_BASELINE_BYTES",
    "CUDA_CONTEXT_BYTES",
    "PER_MERGE_THREAD_BYTES",
]


def process_baseline() -> int:
    """This process's resident bytes now (interpreter, torch, tokenizer, plan), or the VM-measured
    constant where that cannot be read or is smaller."""
    return max(INTERPRETER_BASELINE_BYTES, process_rss() or 0)


def resident_layers(checkpoint: TensorSource, pretrained: TensorSource | None) -> frozenset[str]:
    """Layers whose mapped pages stay in RSS: sources that do not declare ``releases_pages`` (see read.mapped_pages)."""
    layers = {"checkpoint": checkpoint, "pretrained": pretrained}
    return frozenset(name for name, src in layers.items() if src is not None and not src.abilities.releases_pages)


def estimate_peak_ram(
    tensors: Sequence[PlannedTensor],
    shards: Sequence[ShardPlan] = (),
    *,
    read_back_bytes: int | None = None,
    resident_layers: frozenset[str] = frozenset(),
    merge_device: str = "cpu",
    baseline_bytes: int = INTERPRETER_BASELINE_BYTES,
    window_bytes: int = pipeline.DEFAULT_BUDGET_BYTES,
) -> int:
    """Peak RSS of a conversion (what ``ru_maxrss``/``top`` show, mapped file pages included).

    ``window_bytes``: the writer pipeline's budget of bytes in flight (``choose_window`` picks it).

    ``baseline_bytes``: what the process holds before any tensor is touched; a conversion passes
    :func:`process_baseline` (this process's own RSS, measured), because it differs by machine: a
    CUDA build of torch maps several hundred MiB more than the CPU build.

    Two phases, the larger wins (calibrated on Sa2VA-1B/4B/8B-shaped runs, bench/bench_convert.py):

    * writing: interpreter + the writer pipeline's window (``write.pipeline``: up
      to its byte budget of tensors in flight, plus its pool of reusable buffers;
      a tensor bigger than the budget is streamed in row blocks, or, where it
      cannot be, held alone) + the tensors of ``resident_layers``: sources that
      cannot give back the pages of a memory-mapped file once a tensor is
      written (a DeepSpeed partition set), whose pages, once read, stay in RSS;
      + ~40 MiB per merge thread beyond the first (allocator arenas, MKL buffers:
      0 on 2 cores, ~0.55 GiB with 15 threads) + the CUDA runtime's host memory
      for a GPU merge (``auto`` resolved as the conversion will) + each block thread's two fp32
      blocks (``transform.produce.block_threads``) + 32 MiB of staging buffers per
      shard written beside the first (``pipeline.parallel_shards``);
    * reading back (``read_back_bytes``, the buffers of ``verify.structural``'s read-back,
      ``READ_BACK_CHUNK_BYTES``; None without ``--read-back``): interpreter + those pages + that
      chunk (it streams values; nothing maps a shard).
    """
    merge_device = resolve_merge_device(merge_device)
    on_gpu = merge_device != "cpu"

    resident: dict[tuple[str, str], int] = {}
    costs: list[tuple[PlannedTensor, int]] = []
    for t in tensors:
        refs = [t.value] + ([t.lora.a, t.lora.b] if t.lora is not None else [])
        for r in refs:
            if r.layer in resident_layers:
                resident[(r.layer, r.key)] = TensorInfo(r.shape, r.dtype).nbytes
        costs.append((t, sum(pipeline.inflight_bytes(t))))
    largest_item = max((c for _, c in costs), default=0)
    budget = min(window_bytes, pipeline.AHEAD * largest_item)
    held = max((c for t, c in costs if c <= budget or not streamable(t, merge_device)), default=0)
    streams = any(c > budget and streamable(t, merge_device) for t, c in costs)
    stream_block = STREAM_BLOCK_BYTES
    if streams and on_gpu:  # host side of a GPU-merged streamed tensor: a block of input rows and one of output
        stream_block = max(
            stream_block,
            max(
                min(t.nbytes, 2 * DEVICE_BLOCK_ELEMS * dtypes.itemsize(t.dtype))
                for t, c in costs
                if c > budget and streamable(t, merge_device)
            ),
        )
    window = max(budget, held, stream_block if streams else 0) + pipeline.pool_bytes(budget)  # + free pooled buffers
    mapped = sum(resident.values())
    # a GPU merge maps the CUDA runtime and cuBLAS into the process: +0.32 GiB at 4B on the H100 machine
    # (2.03 against 1.71 GiB, measured)
    # each torch thread of the merge adds its own allocator arena and MKL packing buffers: on the 16-core H100
    # machine (15 merge threads) the same 4B/8B runs peaked 0.37-0.64 GiB above this 2-core VM's
    threads = PER_MERGE_THREAD_BYTES * max(0, merge_threads(merge_device) - 1)
    # threads that share one tensor's row blocks (transform.produce.block_threads): two fp32 blocks each
    blocks = block_thread_bytes() * block_threads(merge_device) if block_threads(merge_device) > 1 else 0
    # every shard open beside the first has its own staging buffers (write.folder writes shards side by side)
    open_shards = pipeline.SHARD_STAGE_BYTES * max(0, pipeline.parallel_shards(len(shards)) - 1)
    writing = baseline_bytes + mapped + window + threads + blocks + open_shards + (CUDA_CONTEXT_BYTES if on_gpu else 0)
    if read_back_bytes is None or not shards:
        return writing
    checking = baseline_bytes + mapped + read_back_bytes + (CUDA_CONTEXT_BYTES if on_gpu else 0)
    return max(writing, checking)


def choose_window(estimate: Callable[..., int], target: int = PEAK_RAM_TARGET_BYTES) -> int:
    """The writer's window: the default (512 MiB), or the largest smaller one (in MiB) whose estimate
    stays under 90 % of the target (``TARGET_SHARE``), never below ``MIN_WINDOW_BYTES``.

    Why: the window was a fixed 512 MiB, and where the rest of the process is larger (a GPU merge
    maps CUDA's libraries: 2.07 GiB peak at 8B on the H100 machine, warm) that went over the 2 GiB
    target. ``estimate(window_bytes=W)`` is the peak estimate with window ``W`` (it grows with W: the
    window and its pool of free buffers). Below ``MIN_WINDOW_BYTES`` the writer would starve; a
    machine that cannot spare that much is the memory check's to refuse, not this to slow to a crawl.
    ``SA2VA_WINDOW_MIB`` sets the window (benchmarking).
    """
    forced = env_count("SA2VA_WINDOW_MIB")
    if forced:
        return forced << 20
    limit = int(target * TARGET_SHARE)
    default = pipeline.DEFAULT_BUDGET_BYTES
    if estimate(window_bytes=default) <= limit:
        return default
    lo, hi = MIN_WINDOW_BYTES >> 20, (default >> 20) - 1  # the answer lies in [lo, hi] MiB, or is lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(window_bytes=mid << 20) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo << 20
