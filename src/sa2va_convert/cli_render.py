"""Terminal output for the CLI: rich on a terminal, plain lines in CI and pipes.

Kept apart from ``cli.py`` so the command definitions stay a thin layer of
argument parsing over the API.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress as RichBar,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from .verify.roundtrip import summary_line
from .write.stage_times import summarize as stage_summary

# Piped stdout (a file, `grep`, CI logs) gets whole lines: rich would otherwise wrap at 80 columns
# and cut paths and tensor names in two. A terminal keeps its width; tables fold long cells there
# (never "…"), so every identifier a user may paste back (keymap names, tensor names) stays whole.
_PIPE_WIDTH = 100_000
err_console = Console(stderr=True, highlight=False)
out_console = (
    Console(highlight=False) if sys.stdout.isatty() else Console(highlight=False, soft_wrap=True, width=_PIPE_WIDTH)
)


def interactive() -> bool:
    """Animated progress only for a person at a terminal; CI logs want one line per step."""
    if os.environ.get("CI") or os.environ.get("SA2VA_CONVERT_PLAIN"):
        return False
    return sys.stderr.isatty()


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class PlainProgress:
    """One line per stage and per 10% of bytes written, to stderr (with ``verbose``, one per tensor too)."""

    def __init__(self, quiet: bool = False, verbose: bool = False):
        self.quiet = quiet
        self.verbose = verbose and not quiet
        self.total = 0
        self.done = 0
        self.next_mark = 0.1
        self.t0 = time.perf_counter()

    def _say(self, text: str) -> None:
        if not self.quiet:
            # One write per line (print() writes the text and the newline separately): a Ctrl-C that
            # lands between them would glue the next "error:" line onto this one.
            sys.stderr.write(f"sa2va-convert: {text}\n")
            sys.stderr.flush()

    def stage(self, message: str) -> None:
        self._say(message)

    def start(self, total_bytes: int, total_tensors: int) -> None:
        self.total, self.done, self.next_mark = total_bytes, 0, 0.1
        self.t0 = time.perf_counter()
        self._say(f"{total_tensors} tensors, {human_bytes(total_bytes)}")

    def advance(self, name: str, nbytes: int) -> None:
        self.done += nbytes
        if self.verbose:
            self._say(f"wrote {name} ({human_bytes(nbytes)})")
        if self.total and self.done / self.total >= self.next_mark:
            pct = int(100 * self.done / self.total)
            self._say(f"written {pct}% ({human_bytes(self.done)}, {time.perf_counter() - self.t0:.1f}s)")
            while self.next_mark <= self.done / self.total:
                self.next_mark += 0.1

    def finish(self) -> None:
        pass


class BinarySpeedColumn(ProgressColumn):
    """Transfer speed in KiB/MiB/GiB per second: rich's own column counts kB, everything else here KiB."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{human_bytes(speed)}/s", style="progress.data.speed")


class RichProgress:
    def __init__(self, verbose: bool = False):
        self.bar: RichBar | None = None
        self.task: TaskID | None = None
        self.verbose = verbose

    def stage(self, message: str) -> None:
        err_console.print(f"[bold cyan]•[/] {message}")

    def start(self, total_bytes: int, total_tensors: int) -> None:
        self.bar = RichBar(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            BinarySpeedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task(f"{total_tensors} tensors", total=total_bytes)

    def advance(self, name: str, nbytes: int) -> None:
        if self.bar is not None and self.task is not None:  # both set by start()
            self.bar.update(self.task, advance=nbytes)
            if self.verbose:
                self.bar.console.print(f"wrote {name} ({human_bytes(nbytes)})", soft_wrap=True, markup=False)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def make_progress(json_mode: bool, quiet: bool, verbose: bool = False):
    """Rich bar for a person at a terminal, plain lines otherwise; ``quiet`` silences, ``verbose`` names tensors."""
    if interactive() and not quiet:
        return RichProgress(verbose=verbose)
    return PlainProgress(quiet=quiet, verbose=verbose)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A table that never truncates: long cells fold onto the next line instead of ending in "…"."""
    t = Table(title=title, title_justify="left", show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[Text(str(x)) for x in r])  # Text, not markup: regexes like [0-9] and [SEG] print as they are
    return t


def render_inspect(report: dict) -> None:
    c = out_console
    fam = report.get("family") or {}
    meta = report.get("meta") or {}
    c.print(f"[bold]{report['path']}[/]  ({report['kind']})")
    c.print(
        f"family: [bold]{fam.get('family') or 'unknown'}[/]  keymap: {fam.get('keymap') or '-'}  "
        f"iteration: {meta.get('iter', '-')}  epoch: {meta.get('epoch', '-')}"
    )
    if fam.get("note"):
        c.print(f"note: {fam['note']}")
    c.print(
        f"tensors: {report['tensor_count']}  size: {human_bytes(report['total_bytes'])}  dtypes: "
        + ", ".join(f"{k}×{v}" for k, v in sorted(report["dtypes"].items()))
    )
    c.print(
        table(
            "Parameter groups",
            ["group", "tensors", "size", "detail"],
            [[g["group"], g["tensors"], human_bytes(g["bytes"]), g["detail"]] for g in report["groups"]],
        )
    )
    lora = report.get("lora")
    if lora:
        c.print(
            table(
                "LoRA",
                ["setting", "value", "from"],
                [
                    ["pairs", lora["pairs"], "tensor names"],
                    ["rank", ", ".join(map(str, lora["ranks"])), lora["rank_source"]],
                    ["alpha", lora["alpha"] if lora["alpha"] is not None else "?", lora["alpha_source"]],
                    ["rsLoRA", lora["rslora"], lora["rslora_source"]],
                    [
                        "scale",
                        f"{lora['scale']:g}" if lora["scale"] is not None else "?",
                        "alpha / r" + (" (sqrt)" if lora["rslora"] else ""),
                    ],
                ],
            )
        )
    cfg = report.get("config")
    if cfg:
        rows = [
            ["path", cfg.get("path")],
            ["pretrained_pth", cfg.get("pretrained_pth")],
            ["template", cfg.get("template")],
            ["special_tokens", cfg.get("special_tokens")],
        ]
        if cfg.get("lora"):
            rows += [[f"llm_lora.{k}", v] for k, v in cfg["lora"].items()]
        if cfg.get("error"):
            rows.append(["parse error", cfg["error"]])
        c.print(table("Embedded training config (parsed, never executed)", ["key", "value"], rows))
    if fam.get("candidates"):
        rows = []
        for cand in fam["candidates"]:
            ev = "; ".join(f"{'✓' if v else '✗'} {v or p}" for p, v in cand["evidence"].items())
            if cand["excluded_by"]:
                ev += "; excluded by " + ", ".join(cand["excluded_by"].values())
            rows.append([cand["keymap"], "yes" if cand["matched"] else "no", ev])
        c.print(table("Family evidence", ["keymap", "fits", "evidence"], rows))
    if report.get("unrecognised"):
        c.print(
            f"[yellow]unrecognised keys ({len(report['unrecognised'])}):[/] " + ", ".join(report["unrecognised"][:10])
        )
    if report.get("placeholders"):
        c.print("inert objects met (not executed): " + ", ".join(f"{k}×{v}" for k, v in report["placeholders"].items()))


def render_plan(plan: dict, *, tensors: list[dict] | None = None) -> None:
    c = out_console
    c.print(f"[bold]plan[/]: {plan['checkpoint']} -> {plan['out']}")
    c.print(
        f"family: {plan['family']} ({plan['keymap']})  base: {plan['base']}  dtype: {plan['dtype']}  "
        f"template: {plan['template']}  vocab: {plan['vocab_rows']}"
    )
    if plan.get("lora"):
        lo = plan["lora"]
        c.print(
            f"LoRA: {lo['pairs']} pairs, rank {', '.join(map(str, lo['ranks']))}, alpha {lo['alpha']:g} "
            f"({lo['alpha_source']}), rsLoRA {lo['rslora']} ({lo['rslora_source']})"
        )
    c.print(
        "tensors: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(plan["counts"].items()))
        + f"  total {human_bytes(plan['tensor_bytes'])}"
    )
    c.print(
        table(
            "Shards",
            ["file", "tensors", "size"],
            [[s["file"], s["tensors"], human_bytes(s["bytes"])] for s in plan["shards"]],
        )
    )
    est = plan["estimates"]
    window = f"  (writer window {human_bytes(est['window_bytes'])})" if est.get("window_bytes") else ""
    c.print(f"estimated peak RAM: {human_bytes(est['peak_ram_bytes'])}{window}  disk: {human_bytes(est['disk_bytes'])}")
    if plan["tokenizer_additions"]:
        c.print("tokens to add: " + ", ".join(f"{t['token']}={t['id']}" for t in plan["tokenizer_additions"]))
    for w in plan["warnings"]:
        c.print(f"[yellow]note:[/] {w}")
    if tensors:
        c.print(
            table(
                "Tensors",
                ["name", "shape", "dtype", "from"],
                [[t["name"], "x".join(map(str, t["shape"])), t["dtype"], t["origin"]] for t in tensors],
            )
        )


def render_result(result: dict, verbose: bool = False) -> None:
    c = out_console
    plan = result["plan"]
    c.print(
        f"[bold green]converted[/] {plan['checkpoint']} -> [bold]{result['out']}[/] "
        f"({human_bytes(result['bytes_written'])} in {result['seconds']:.1f}s)"
    )
    deltas = result.get("lora_deltas")
    if deltas and deltas["groups"]:
        c.print(
            table(
                "LoRA update size |scale·B·A| / |W|",
                ["module", "tensors", "mean", "max", "zero B"],
                [
                    [g, s["tensors"], f"{s['mean_relative_delta']:.3g}", f"{s['max_relative_delta']:.3g}", s["zero_b"]]
                    for g, s in deltas["groups"].items()
                ],
            )
        )
        if deltas["zero_b_count"]:
            c.print(
                f"[bold yellow]warning:[/] {deltas['zero_b_count']} LoRA adapter(s) have an all-zero B (never "
                "trained); those layers are identical to the base"
            )
    for w in plan["warnings"]:
        c.print(f"[yellow]note:[/] {w}")
    rt = result.get("roundtrip")
    if rt:
        c.print(f"round-trip: {rt.get('summary', rt)}")
    if verbose and result.get("stage_seconds"):
        c.print(stage_summary(result["stage_seconds"]), soft_wrap=True, markup=False)


def render_batch(result: dict) -> None:
    c = out_console
    c.print(
        table(
            f"Batch: {result['work_dir']} -> {result['out_root']}",
            ["checkpoint", "status", "seconds", "detail"],
            [
                [Path(i["checkpoint"]).name, i["status"], f"{i['seconds']:.1f}", _batch_detail(i)]
                for i in result["items"]
            ],
        )
    )
    if any(i.get("plan") for i in result["items"]):
        c.print("dry run: nothing was written")


def _batch_detail(item: dict) -> str:
    if item.get("error"):
        return item["error"].get("message", "")
    plan = item.get("plan")
    if plan:
        return (
            f"{item['out']} would get {plan.get('tensor_count', len(plan.get('tensors') or []) or '?')} tensors, "
            f"{plan.get('keymap')}"
        )
    return item["out"]


def render_verify(report: dict[str, Any], echo: Callable[[str], None] = print) -> None:
    """Plain lines (the CLI passes rich's console.print or click.echo)."""
    s = report.get("structural") or {}
    source = report.get("keymap_source") or ""
    how = "" if source == "conversion_report.json" else ", a guess: no conversion report" if source else ""
    echo(f"verified {report['folder']}" + (f" ({report['keymap']}{how})" if report.get("keymap") else ""))
    echo(
        f"  files: {s.get('tensors')} tensors in {s.get('shards')} shard(s), vocabulary {s.get('vocab_rows')}, "
        f"tokenizer {s.get('tokenizer_length')}, values read back: {s.get('checked_values')}"
    )
    echo(f"  remote code: {', '.join(report.get('code_files') or []) or '-'}")
    cs = report.get("checksums") or {}
    echo(f"  checksums: {cs.get('status')}" + (f" ({cs['checked']} shard(s))" if cs.get("checked") else ""))
    if report.get("roundtrip"):
        echo(f"  round trip: {summary_line(report['roundtrip'])}")
    for note in report.get("notes") or []:
        echo(f"  note: {note}")


def render_predict(report: dict[str, Any], echo: Callable[[str], None] = print) -> None:
    """Plain lines about one prediction and the files it saved."""
    echo(f"prediction: {report['prediction']}")
    echo(f"masks: {report['n_masks']}" + (f" {report['mask_shapes']}" if report.get("mask_shapes") else ""))
    for path in report.get("mask_files") or []:
        echo(f"  saved {path}")
    if report.get("overlay_file"):
        echo(f"  overlay {report['overlay_file']}")
    for note in report.get("notes") or []:
        echo(f"note: {note}")
