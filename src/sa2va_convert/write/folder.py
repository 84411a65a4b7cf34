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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..plan.types import ConversionPlan
from ..progress import Progress, Silent
from . import atomic, guard
from .pipeline import DEFAULT_BUDGET_BYTES, Producer, TensorPipeline
from .safetensors_writer import SAFETENSORS
from .shard_writer import ShardWriter
from .stage_times import StageTimes
from .tokenizer import apply_additions

PIPELINE_BUDGET_BYTES = DEFAULT_BUDGET_BYTES  # tensors read/merged ahead of the writer (bytes in flight)


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


def write_shards(plan: ConversionPlan, produce: Producer, folder: Path, progress: Progress,
                 checksums: dict[str, str] | None = None, writer: ShardWriter = SAFETENSORS,
                 times: StageTimes | None = None) -> int:
    """Write every shard in ``writer``'s format; ``checksums`` (if given) receives each file's sha256,
    computed while writing; ``times`` each thread's busy and waiting seconds."""
    by_name = plan.by_name()
    total = 0
    order = [by_name[n] for shard in plan.shards for n in shard.tensors]
    times = times if times is not None else StageTimes()
    started = time.perf_counter()
    # reading, merging and writing overlap in three threads, in plan order, memory-bounded (see pipeline)
    with TensorPipeline(produce, order, budget_bytes=PIPELINE_BUDGET_BYTES, times=times) as pipe:
        for shard in plan.shards:
            def written(name: str) -> None:
                pipe.done(name)
                progress.advance(name, by_name[name].info.nbytes)

            digest = hashlib.sha256() if checksums is not None else None
            total += writer.write_shard(folder / shard.filename, [(n, by_name[n].info) for n in shard.tensors],
                                        pipe.get, on_tensor=written, digest=digest, times=times)
            if checksums is not None:
                checksums[shard.filename] = digest.hexdigest()
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
    writer: ShardWriter = SAFETENSORS,
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
    with atomic.output_lock(out):
        atomic.clear_stale_partials(out)
        tmp = atomic.make_partial(out)
        try:
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
            if out.exists():  # it may have appeared, or changed, while we were writing
                guard.check_out(out, protected)
                guard.check_replaceable(out, force=force, replace_foreign=replace_foreign)
            atomic.publish(tmp, out, force or replace_foreign)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return WriteResult(out, files, written, time.perf_counter() - started, checksums, times.to_dict())
