"""Execute a ConversionPlan: shards, index, config, tokenizer, code, card, report.

The writer does no deciding: names, shapes, dtypes, shard membership and the
config all come from the plan, so a dry run and a real run can never disagree.
It writes into a hidden partial folder (see ``atomic``) and publishes it only
after the structural check of the written files passed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..plan.types import ConversionPlan
from ..progress import Progress, Silent
from . import atomic, guard
from .pipeline import DEFAULT_BUDGET_BYTES, Producer, TensorPipeline, parallel_shards
from .safetensors_writer import SAFETENSORS
from .shard_lanes import ShardLane, first_error
from .shard_writer import ShardWriter
from .stage_times import StageTimes
from .tokenizer import apply_additions

PIPELINE_BUDGET_BYTES = DEFAULT_BUDGET_BYTES  # tensors read/merged ahead of the writer (bytes in flight)

# The format a conversion writes: the planner names the shards with its ``naming`` and write_folder
# writes them with it, so choosing another output format is this one line (see DESIGN.md).
OUTPUT_FORMAT: ShardWriter = SAFETENSORS


@dataclass
class WriteResult:
    out: Path
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0
    shard_sha256: dict[str, str] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # see stage_times.STAGE_KEYS


def dump_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def interleave(shards: Sequence[Sequence[tuple[str, int]]]) -> list[tuple[int, str]]:
    """(shard index, tensor) in the order to write shards side by side: always the shard least far
    along (bytes written / its bytes; ties to the lower index), so they advance together and end
    together, and their checksums run in parallel for the whole write. Each shard's own order is
    kept, so every file's bytes are what writing it alone gives."""
    totals = [max(1, sum(n for _, n in shard)) for shard in shards]
    done = [0] * len(shards)
    pos = [0] * len(shards)
    order: list[tuple[int, str]] = []
    while True:
        open_ = [i for i, shard in enumerate(shards) if pos[i] < len(shard)]
        if not open_:
            return order
        i = min(open_, key=lambda k: (done[k] / totals[k], k))
        name, nbytes = shards[i][pos[i]]
        order.append((i, name))
        pos[i] += 1
        done[i] += nbytes


def write_shards(
    plan: ConversionPlan,
    produce: Producer,
    folder: Path,
    progress: Progress,
    checksums: dict[str, str] | None = None,
    writer: ShardWriter = OUTPUT_FORMAT,
    times: StageTimes | None = None,
) -> int:
    """Write every shard in ``writer``'s format; ``checksums`` (if given) receives each file's sha256,
    computed while writing; ``times`` each thread's busy and waiting seconds.

    Shards are written ``parallel_shards`` at a time, side by side (see :func:`interleave`); the
    pipeline reads and merges in that same order, so memory stays one window whatever the count."""
    by_name = plan.by_name()
    shards = list(plan.shards)
    width = parallel_shards(len(shards))
    groups = [shards[i : i + width] for i in range(0, len(shards), width)]
    schedule = [
        [(group[i], name) for i, name in interleave([[(n, by_name[n].info.nbytes) for n in s.tensors] for s in group])]
        for group in groups
    ]
    times = times if times is not None else StageTimes()
    started = time.perf_counter()
    total = 0
    order = [by_name[name] for steps in schedule for _, name in steps]
    progress_lock = threading.Lock()
    # reading, merging and writing overlap in threads, in this order, memory-bounded (see pipeline); each
    # open shard is written by its own lane thread, so their checksums and disk writes run in parallel
    # chosen with the peak-RAM estimate (write.peak_ram), never above this module's cap
    window = min(plan.window_bytes or PIPELINE_BUDGET_BYTES, PIPELINE_BUDGET_BYTES)
    with TensorPipeline(produce, order, budget_bytes=window, times=times) as pipe:

        def written(name: str) -> None:
            pipe.done(name)
            with progress_lock:
                progress.advance(name, by_name[name].info.nbytes)

        for group, steps in zip(groups, schedule, strict=True):
            digests = {s.filename: hashlib.sha256() for s in group} if checksums is not None else {}
            lanes: dict[str, ShardLane] = {}
            try:
                for s in group:
                    sink = writer.open_shard(
                        folder / s.filename,
                        [(n, by_name[n].info) for n in s.tensors],
                        digest=digests.get(s.filename),
                        times=times,
                    )
                    try:
                        lanes[s.filename] = ShardLane(s.filename, sink, written, pipe.abort)
                    except BaseException:
                        sink.abort()
                        raise
                left = {s.filename: len(s.tensors) for s in group}
                for filename, n in left.items():
                    if not n:  # a shard planned with no tensors
                        lanes[filename].finish()
                for shard, name in steps:
                    try:
                        item = pipe.get(name)
                    except BaseException:
                        err = first_error(lanes.values())  # the pipeline stopped because a lane failed
                        if err is not None:
                            raise err from None
                        raise
                    lanes[shard.filename].put(name, item)
                    del item
                    left[shard.filename] -= 1
                    if not left[shard.filename]:
                        lanes[shard.filename].finish()
                for lane in lanes.values():
                    lane.join()
                    lane.raise_error()
                    total += lane.bytes
            finally:
                for lane in lanes.values():
                    lane.cancel()
                for lane in lanes.values():
                    lane.join()
                    if not lane.closed:
                        lane.sink.abort()
            if checksums is not None:  # digests is empty otherwise
                for filename, digest in digests.items():
                    checksums[filename] = digest.hexdigest()
    times.add("total", time.perf_counter() - started)
    return total


def copy_base_files(plan: ConversionPlan, base_dir: Path, folder: Path) -> list[str]:
    copied = []
    for rel, source in plan.copy_files:
        src, dst = Path(source), folder / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o644)
        copied.append(rel)
    return copied


def write_folder(
    plan: ConversionPlan,
    produce: Producer,
    *,
    base_dir: Path,
    force: bool = False,
    progress: Progress | None = None,
    extra_files: Callable[[Path, dict[str, str]], dict[str, str]] | None = None,
    check: Callable[[Path], None] | None = None,
    replace_foreign: bool = False,
    protected: Sequence[guard.NamedInput] = (),
    writer: ShardWriter = OUTPUT_FORMAT,
) -> WriteResult:
    """Write the planned folder atomically. ``check(tmp)`` runs before publishing; it raises to abort.

    ``protected`` are the run's inputs: OUT may never be, contain or lie inside one of them,
    checked here again (whoever calls) and right before an existing OUT is replaced. ``writer`` is the
    output format; the plan's shard names must be its ``naming``'s."""
    progress = progress or Silent()
    out = Path(plan.out)
    guard.check_out(out, protected)
    guard.check_replaceable(out, force=force, replace_foreign=replace_foreign)
    atomic.check_destination(out, force or replace_foreign)
    started = time.perf_counter()
    times = StageTimes()
    written, checksums = _write_locked(
        plan,
        produce,
        out,
        base_dir=base_dir,
        force=force,
        progress=progress,
        extra_files=extra_files,
        check=check,
        replace_foreign=replace_foreign,
        protected=protected,
        writer=writer,
        times=times,
    )
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return WriteResult(out, files, written, time.perf_counter() - started, checksums, times.to_dict())


def _write_locked(
    plan: ConversionPlan,
    produce: Producer,
    out: Path,
    *,
    base_dir: Path,
    force: bool,
    progress: Progress,
    extra_files,
    check,
    replace_foreign: bool,
    protected: Sequence[guard.NamedInput],
    writer: ShardWriter,
    times: StageTimes,
) -> tuple[int, dict[str, str]]:
    """Everything under OUT's lock (``atomic.staged_output``): (bytes written, {shard: sha256}), published."""
    with atomic.staged_output(out, progress.stage) as staging:
        tmp = staging.tmp
        progress.stage(f"writing {len(plan.shards)} shard(s) to {out}")
        progress.start(plan.tensor_bytes, len(plan.tensors))
        try:
            checksums: dict[str, str] = {}
            written = write_shards(plan, produce, tmp, progress, checksums, writer, times)
            progress.finish()
            dump_json(tmp / writer.naming.index_file, writer.index_document(plan.shards, plan.tensor_bytes))
            dump_json(tmp / "config.json", plan.config)
            copy_base_files(plan, base_dir, tmp)
            apply_additions(base_dir, tmp, plan.tokenizer_additions)
            if extra_files is not None:
                for name, text in extra_files(tmp, checksums).items():
                    (tmp / name).write_text(text, encoding="utf-8")
        except OSError as e:
            raise atomic.describe_os_error(e, out) from None
        if check is not None:
            progress.stage("checking the written files")
            check(tmp)
        staging.publish(force=force, replace_foreign=replace_foreign, protected=protected)
    return written, checksums
