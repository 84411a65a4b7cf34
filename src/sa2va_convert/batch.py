"""Work directories: convert the newest checkpoint, or every checkpoint, of a training run.

``work_dirs/exp/`` holds ``iter_N.pth`` files (or DeepSpeed ``iter_N.pth/``
folders) and ``last_checkpoint``, a text file with the ABSOLUTE path of the
newest one, which is stale once the folder has moved; its basename beside the
file is the fallback. Batch mode opens the base model once, skips checkpoints
already converted from the same inputs with the same options (the recipe recorded
in each output's ``conversion_report.json``, see ``recipe.py``), reconverts those
that differ only with ``--force`` (otherwise each is a failure that says what
differs), carries on past a failure and reports them all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import run_state
from .errors import BatchError, ConvertError, InputError, Interrupted, OutputError
from .progress import Progress, Silent
from .read.work_dir import (  # noqa: F401  (re-exported: batch mode's vocabulary)
    is_deepspeed_dir,
    is_work_dir,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
)
from .recipe import RECIPE_KEY, differences
from .write.guard import read_report


@dataclass
class BatchItem:
    checkpoint: str
    out: str
    status: str  # converted | reconverted | skipped | reverified | planned (dry run) | failed
    seconds: float = 0.0
    error: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    differences: list[str] | None = None  # how an existing folder's recipe differs from this run's

    def to_dict(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        for key in ("plan", "differences"):
            if d[key] is None:
                del d[key]
        return d


@dataclass
class BatchResult:
    work_dir: str
    out_root: str
    items: list[BatchItem] = field(default_factory=list)

    @property
    def failed(self) -> list[BatchItem]:
        return [i for i in self.items if i.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for i in self.items:
            counts[i.status] = counts.get(i.status, 0) + 1
        return {
            "ok": not self.failed,
            "work_dir": self.work_dir,
            "out_root": self.out_root,
            "counts": counts,
            "items": [i.to_dict() for i in self.items],
        }


def current_recipe(options, digest: str, report: dict, base_folder) -> dict[str, Any]:
    """The recipe this run would record for a checkpoint of sha256 ``digest``, computed without opening it.

    Base and keymap are the ones this run uses when the user named them; otherwise they are found from
    the checkpoint (the same bytes give the same discovery and detection), so the folder's recorded base
    path and keymap name are taken, with their files as they are now."""
    from .plan.keymap import load_builtin, resolve_keymap
    from .recipe import build_recipe, keymap_identity

    recorded = report.get(RECIPE_KEY)
    if not isinstance(recorded, dict):
        recorded = {}
    base = (
        base_folder.path
        if base_folder is not None
        else (recorded.get("base") or {}).get("path") or (report.get("source") or {}).get("base")
    )
    if options.keymap:
        km = resolve_keymap(options.keymap)
        keymap = keymap_identity(km.name, km.source)
    else:
        name = (recorded.get("keymap") or {}).get("name") or (report.get("keymap") or {}).get("name")
        try:
            km = load_builtin(str(name))
            keymap = keymap_identity(km.name, km.source)
        except ConvertError:
            keymap = {"name": name, "sha256": None}
    return build_recipe(options, checkpoint_sha256=digest, base=base, keymap=keymap) if base else {"version": None}


def convert_all(work_dir: Path, out_root: Path, options, *, progress: Progress | None = None) -> BatchResult:
    """Convert every iter_N of ``work_dir`` into ``out_root/iter_N``; raise BatchError at the end if any failed.

    A folder already converted from the same inputs with the same options (its recorded recipe) is
    skipped — unless its round trip is asked for and did not pass last time: then only the round trip
    runs again (status ``reverified``). A folder made from other inputs or options is reconverted with
    ``options.force`` (status ``reconverted``), else it fails, saying what differs. With
    ``options.dry_run`` every checkpoint is planned and nothing at all is written.
    """
    from . import conversion
    from .plan.base_discovery import resolve_base
    from .read.hf_folder import open_hf_folder
    from .write import guard

    progress = progress or Silent()
    work_dir, out_root = Path(work_dir), Path(out_root)
    options.validate()
    if not work_dir.is_dir():
        raise InputError("work_dir does not exist", path=work_dir, hint="pass the training run's work_dir")
    ckpts = list_checkpoints(work_dir)
    if not ckpts:
        raise InputError(
            "work_dir holds no iter_N.pth checkpoint", path=work_dir, hint="pass the training run's work_dir"
        )
    guard.check_out(out_root, [guard.NamedInput("work_dir", work_dir)] + options.named_inputs())
    result = BatchResult(str(work_dir), str(out_root))
    if options.dry_run:
        for ckpt in ckpts:
            out = out_root / ckpt.name.removesuffix(".pth")
            plan = conversion.plan_conversion(ckpt, out, options)
            result.items.append(BatchItem(str(ckpt), str(out), "planned", plan=plan.to_dict(tensors=False)))
        return result
    out_root.mkdir(parents=True, exist_ok=True)
    base_folder = open_hf_folder(resolve_base(options.base)) if options.base else None
    for ckpt in ckpts:
        name = ckpt.name.removesuffix(".pth")
        out = out_root / name
        started = time.perf_counter()
        diffs: list[str] | None = None
        try:
            digest = conversion.sha256_path(ckpt)
            report = read_report(out) if out.exists() else None
            if report is not None and report.get("tool") == guard.TOOL_NAME:
                diffs = differences(report.get(RECIPE_KEY), current_recipe(options, digest, report, base_folder))
                if not diffs:
                    previous = conversion.recorded_roundtrip(out)
                    if not options.roundtrip or (previous or {}).get("ok"):
                        progress.stage(f"{ckpt.name}: already converted from the same inputs and options, skipped")
                        result.items.append(BatchItem(str(ckpt), str(out), "skipped"))
                        continue
                    progress.stage(f"{ckpt.name}: converted earlier but its round trip did not pass; verifying again")
                    reverify(out, options, progress)
                    result.items.append(BatchItem(str(ckpt), str(out), "reverified", time.perf_counter() - started))
                    continue
                if not options.force:
                    raise OutputError(
                        f"was converted from other inputs or with other options: {'; '.join(diffs)}",
                        path=out,
                        hint="pass --force to reconvert it with this run's inputs and options "
                        "(the old folder is kept until the new one is complete), or "
                        "choose another OUT",
                    )
                progress.stage(f"{ckpt.name}: {'; '.join(diffs)}: reconverting (--force)")
            else:
                progress.stage(f"{ckpt.name}: converting")
            res = conversion.convert(ckpt, out, options, progress=progress, base_folder=base_folder)
            if base_folder is None:  # discovered from the first checkpoint's config; reuse it
                base_folder = open_hf_folder(res.plan.base)
            result.items.append(
                BatchItem(
                    str(ckpt),
                    str(out),
                    "reconverted" if diffs else "converted",
                    time.perf_counter() - started,
                    differences=diffs,
                )
            )
        except ConvertError as e:
            if isinstance(e, Interrupted):
                raise Interrupted(
                    f"{ckpt.name}: {e.message}; {_done(result, out)}", path=e.path, hint=_RERUN_HINT
                ) from None
            progress.stage(f"{ckpt.name}: failed: {e.one_line()}")
            result.items.append(
                BatchItem(str(ckpt), str(out), "failed", time.perf_counter() - started, e.to_dict(), differences=diffs)
            )
        except KeyboardInterrupt:  # the message says what is on disk for this checkpoint's folder
            intr = run_state.interrupted(out, during=f"at {ckpt.name}", otherwise=f"nothing of {ckpt.name} was written")
            raise Interrupted(
                f"{ckpt.name}: {intr.message}; {_done(result, out)}", path=intr.path or out, hint=_RERUN_HINT
            ) from None
    if result.failed:
        err = BatchError(
            f"{len(result.failed)} of {len(result.items)} checkpoint(s) failed: "
            + ", ".join(Path(i.checkpoint).name for i in result.failed),
            path=work_dir,
            hint="see the per-checkpoint errors above; fix them and re-run (converted ones are skipped)",
        )
        err.result = result
        raise err
    return result


_RERUN_HINT = "run the same command again (finished folders are skipped)"


def _done(result: BatchResult, current: Path) -> str:
    finished = ("converted", "reconverted", "skipped", "reverified")
    done = [Path(i.out).name for i in result.items if i.status in finished]
    root = current.resolve().parent
    done += [
        t.out.name
        for t in run_state.published()  # published, then interrupted before it was listed
        if t.out.resolve().parent == root and t.out.name not in done and t.out.name != current.name
    ]
    return f"finished before it: {', '.join(done)}" if done else "none finished before it"


def reverify(out: Path, options, progress: Progress) -> None:
    """Run only the round trip on an existing, already converted folder, and record the outcome."""
    from . import conversion
    from .verify.roundtrip import run_roundtrip, summary_line

    try:
        rt = run_roundtrip(
            out,
            device=options.verify_device,
            python=options.verify_python,
            max_new_tokens=16,
            expect_mask=options.expect_mask,
            on_stage=progress.stage,
        )
    except ConvertError as e:
        conversion.record_roundtrip(out, {"ok": False, "error": e.one_line(), "exit_code": e.exit_code})
        raise
    conversion.record_roundtrip(out, {"ok": True, "summary": summary_line(rt.to_dict())})
