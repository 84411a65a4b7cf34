"""The ``sa2va-convert eval`` command (click), registered from ``cli.py`` by ``register_eval``.

Kept in its own module, like ``verify``/``predict`` (``cli_verify.py``), so the command stays a
thin layer over ``evaluate.run.evaluate`` and ``cli.py`` only gains one registration line. The
group is passed in, so this module never imports ``cli``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .cli_common import EXIT_HELP, emit_json, handle_errors, verbosity_options
from .cli_compare import comparison_lines, interval, outcome_lines, signed
from .errors import ConvertError, EvalFailuresError, EvalGateError, Interrupted
from .evaluate.defaults import DEFAULT_IMAGE_TIMEOUT  # not .evaluate.run: registering `eval` imports no numpy

COLUMNS = [
    "model",
    "images",
    "mean Dice",
    "gIoU",
    "cIoU",
    "precision",
    "recall",
    "no [SEG]",
    "failed",
    "img/s",
    "empty GT",
    "Dice w/ object",
    "clDice",
    "boundary F",
    "HD95 px",
]


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in report["models"]:
        name = m["model"] + (" *" if m["model"] == report.get("best") else "")
        rows.append(
            [
                name,
                str(m["images"]),
                _f(m["mean_dice"]),
                _f(m["giou"]),
                _f(m["ciou"]),
                _f(m["mean_precision"]),
                _f(m["mean_recall"]),
                f"{m['no_seg']} ({_f(m['no_seg_rate'], 2)})" if m["no_seg_rate"] is not None else "-",
                str(m["failures"]),
                _f(m["images_per_s"], 2),
                f"{m.get('n_empty_gt', 0)}/{m.get('n_images', m['images'])}",
                _f(m.get("mean_dice_with_object")),
                _f(m.get("mean_cldice")),
                _f(m.get("mean_boundary_f")),
                _hd95(m),
            ]
        )
    return rows


def _hd95(m: dict[str, Any]) -> str:
    """The mean HD95 with the images it is over when that is not all of them: an image with one
    empty mask has no HD95, and a mean over fewer images must not pass for one over all."""
    value = _f(m.get("mean_hd95"), 2)
    n, of = m.get("n_hd95", 0), m.get("n_in_means", 0)
    return value if n == of else f"{value} ({n}/{of})"


def render_eval(report: dict[str, Any], *, rich: bool, echo: Callable[[str], None]) -> None:
    """A comparison table (rich at a terminal, aligned plain text in a pipe), the best model, the files."""
    rows = table_rows(report)
    if rich:
        from .cli_render import out_console, table

        out_console.print(table(f"eval on {report['images']} image(s) of {report['data']}", COLUMNS, rows))
    else:
        echo(f"eval on {report['images']} image(s) of {report['data']}")
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
        for r in [COLUMNS, *rows]:
            echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    for line in comparison_lines(report):
        echo(line)
    bi = report.get("best_interval")
    if report.get("best") and bi:
        best = next(m for m in report["models"] if m["model"] == report["best"])
        echo(
            f"best: {report['best']} (mean Dice {_f(best['mean_dice'])}, cIoU {_f(best['ciou'])}; Dice "
            f"{signed(bi['mean_difference'])} {interval(bi['ci95'])} against {bi['against']}"
            + (", interval covers 0)" if bi["covers_zero"] else ")")
        )
    for caution in report.get("cautions") or []:
        echo(f"caution: {caution}")
    for line in outcome_lines(report, unit="image", key="stem"):
        echo(line)
    files = report.get("files") or {}
    if files:
        echo(
            f"report: {files.get('html')}, {files.get('summary')}, {files.get('metrics')}, {files.get('plot')}; "
            f"masks under "
            f"{files.get('predictions')}"
        )


def register_eval(main: click.Group) -> None:
    """Add ``eval`` to the ``sa2va-convert`` click group (called at the bottom of ``cli.py``)."""
    from .cli_render import make_progress

    @main.command("eval", epilog=EXIT_HELP)
    @click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path, readable=False))
    @click.option(
        "--data",
        required=True,
        type=click.Path(path_type=Path, readable=False),
        help="A folder with images/ and masks/ (paired by file stem), a .jsonl/.csv manifest "
        "(image, mask, optional prompt; paths relative to it), or a COCO instance .json (one row per image "
        "and category; the category's name is the prompt). Video (J&F): a folder with frames/<clip>/ and "
        "masks/<clip>/, a manifest with frames/masks/prompt columns, or MeViS/ReVOS meta_expressions.json.",
    )
    @click.option(
        "--images",
        "images_dir",
        type=click.Path(path_type=Path, readable=False),
        help="COCO --data only: the folder of the images (default: the JSON's folder).",
    )
    @click.option(
        "--prompt-map",
        type=click.Path(path_type=Path, readable=False),
        help="A JSON object of prompts. COCO --data: category name or id -> prompt, e.g. "
        '{"person": "pedestrian"}. Folder or manifest of class-index masks: mask value -> prompt, e.g. '
        '{"1": "liver", "2": "kidney"}: one row per image and class (<stem>-c<k>), truth = pixels of that value.',
    )
    @click.option(
        "--prompt",
        help='What to segment, e.g. "the blood vessel" -> "<image>\\n Please segment the blood vessel in this '
        "image.\" (upstream's template); a prompt with <image> is sent as it is (a manifest row's prompt wins).",
    )
    @click.option(
        "--out",
        type=click.Path(path_type=Path, readable=False),
        default=Path("eval_report"),
        show_default=True,
        help="Report folder: predictions/, metrics.csv, summary.json, report.png, report.html.",
    )
    @click.option(
        "--device",
        default="auto",
        show_default=True,
        metavar="auto|cpu|cuda|cuda:N",
        help="Where the models run (under torchrun: each rank's own GPU).",
    )
    @click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Load dtype (default: the folder's).")
    @click.option("--python", "python", metavar="PATH", help="Interpreter that loads the models (default: this one).")
    @click.option("--limit", type=int, help="Evaluate only the first N images.")
    @click.option(
        "--overlays", is_flag=True, help="Also write overlays/<model>/<stem>.png (mask tinted over the image)."
    )
    @click.option("--resume", is_flag=True, help="Keep the images an earlier run in --out finished; do the rest.")
    @click.option("--force", is_flag=True, help="Replace the report already in --out.")
    @click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Cap on generated tokens.")
    @click.option(
        "--timeout",
        type=float,
        default=DEFAULT_IMAGE_TIMEOUT,
        show_default=True,
        help="Seconds allowed per image (and as much again for loading) before the model process is killed.",
    )
    @click.option(
        "--baseline",
        metavar="NAME",
        help="The model every other one is compared with, image by image (default: the first).",
    )
    @click.option(
        "--empty-gt",
        type=click.Choice(["score", "skip"]),
        default="score",
        show_default=True,
        help="Images whose ground truth is empty: scored (an empty prediction scores 1) or left out of the means.",
    )
    @click.option(
        "--fail-under",
        "fail_under",
        multiple=True,
        metavar="METRIC=NUMBER",
        help="Exit 11 after the report when a model's METRIC is below NUMBER (every model but the baseline; "
        "repeatable), e.g. dice=0.80; METRIC: dice, iou, precision, recall, cldice, boundary_f or a summary.json "
        "name (ciou, ...); on video: j, f, jf or r.",
    )
    @click.option(
        "--fail-above",
        "fail_above",
        multiple=True,
        metavar="METRIC=NUMBER",
        help="Exit 11 after the report when a model's METRIC, one where lower is better, is above NUMBER "
        "(every model but the baseline; repeatable): hd95=10 fails a mean HD95 above 10 px, and a mean that "
        "leaves out images where one mask is empty.",
    )
    @click.option(
        "--force-seg",
        is_flag=True,
        help="Also score each model's masks with [SEG] forced, as the pseudo-model NAME[forced] "
        "(predictions/NAME/forced/): mask quality apart from the [SEG] decision. An image whose answer has "
        "[SEG] is not run twice.",
    )
    @click.option(
        "--process-per-adapter",
        is_flag=True,
        help="Evaluate each adapter folder (convert --format adapter) in a model process of its own, loading its "
        "base each time. By default adapters on the same base share one process that loads the base once (image sets; "
        "a video set gives each model its own process either way).",
    )
    @click.option(
        "--require-better",
        is_flag=True,
        help="Exit 11 after the report unless every model's Dice (video: J&F) interval against the baseline lies "
        "above 0.",
    )
    @click.option(
        "--name",
        "names",
        multiple=True,
        metavar="NAME",
        help="Report name of each MODEL, in order (one per MODEL; default: the folder's name, made unique with "
        "-2, -3, ...; a folder of iter_N folders gives NAME-iter_N).",
    )
    @click.option(
        "--mask-threshold",
        type=float,
        metavar="T",
        help="Read JPEG (lossy) ground-truth masks, which are refused without it: grey values above T are "
        "foreground. PNG and .npy masks keep the non-zero rule.",
    )
    @click.option(
        "--ignore-index",
        type=int,
        metavar="V",
        help="Ground-truth value that marks void pixels (e.g. 255, VOC): left out of every count, the "
        "prediction's pixels there too.",
    )
    @click.option("--json", "json_out", is_flag=True, help="Print the summary as JSON on stdout.")
    @verbosity_options
    @handle_errors
    def eval_cmd(
        models: tuple[Path, ...],
        data: Path,
        images_dir: Path | None,
        prompt_map: Path | None,
        prompt: str | None,
        out: Path,
        device: str,
        dtype: str | None,
        python: str | None,
        limit: int | None,
        overlays: bool,
        resume: bool,
        force: bool,
        max_new_tokens: int,
        timeout: float,
        baseline: str | None,
        empty_gt: str,
        fail_under: tuple[str, ...],
        fail_above: tuple[str, ...],
        force_seg: bool,
        process_per_adapter: bool,
        require_better: bool,
        names: tuple[str, ...],
        mask_threshold: float | None,
        ignore_index: int | None,
        quiet: bool,
        verbose: bool,
        json_out: bool,
        debug: bool,
    ) -> None:
        """Score converted MODEL folders on your own images: Dice, IoU, cIoU, per image and per model.

        Each MODEL is a converted folder, or a folder of iter_N folders (convert --all), evaluated
        in iteration order. Every number comes from the model's own predict_forward (an answer
        without [SEG] is an empty prediction, never forced; --force-seg adds each model's masks with
        [SEG] forced as a separate NAME[forced]), and every predicted mask is saved as
        OUT/predictions/<model>/<stem>.png. Under `torchrun --nproc_per_node N` the images are split
        over the ranks and rank 0 writes the report.
        """
        from .evaluate.run import Dist
        from .evaluate.video_data import is_video_data

        rank0 = Dist.from_env().rank == 0
        progress = make_progress(json_out, quiet or json_out or not rank0)
        if is_video_data(data):  # frames folders, a clip manifest, meta_expressions.json: cli_eval_video.py
            from .cli_eval_video import refuse_image_options, run_video_eval
            from .evaluate.run import parse_fail_under

            refuse_image_options(
                **{
                    "--prompt-map": prompt_map,
                    "--overlays": overlays,
                    "--mask-threshold": mask_threshold is not None,
                    "--ignore-index": ignore_index is not None,
                    "--empty-gt skip": empty_gt != "score",
                }
            )
            try:
                run_video_eval(
                    json_out=json_out,
                    rank0=rank0,
                    on_stage=progress.stage,
                    models=list(models),
                    data=data,
                    out=out,
                    prompt=prompt,
                    device=device,
                    dtype=dtype,
                    python=python,
                    limit=limit,
                    resume=resume,
                    force=force,
                    max_new_tokens=max_new_tokens,
                    timeout_per_item=timeout,
                    baseline=baseline,
                    names=list(names) or None,
                    images=images_dir,
                    fail_under=parse_fail_under(fail_under),
                    require_better=require_better,
                )
            except KeyboardInterrupt:
                raise Interrupted(
                    "interrupted; no summary.json was written, the expressions finished so far are kept",
                    path=out,
                    hint="run the same command with --resume to continue",
                ) from None
            return
        try:
            from .evaluate.run import check_failures, check_gate, evaluate, parse_fail_under

            report = evaluate(
                list(models),
                data,
                out=out,
                prompt=prompt,
                device=device,
                dtype=dtype,
                python=python,
                limit=limit,
                overlays=overlays,
                resume=resume,
                force=force,
                max_new_tokens=max_new_tokens,
                image_timeout=timeout,
                baseline=baseline,
                empty_gt=empty_gt,
                fail_under=parse_fail_under(fail_under),
                fail_above=parse_fail_under(fail_above, "--fail-above"),
                force_seg=force_seg,
                require_better=require_better,
                names=list(names) or None,
                mask_threshold=mask_threshold,
                ignore_index=ignore_index,
                images=images_dir,
                prompt_map=prompt_map,
                share_base=not process_per_adapter,
                on_stage=progress.stage,
            )
        except ConvertError as e:
            if (debug or verbose) and e.details:
                click.echo(e.details, err=True)  # the model process's traceback
            raise
        except KeyboardInterrupt:
            # the same command again would stop at "already holds an eval report" (exit 6): say the flag that continues
            raise Interrupted(
                "interrupted; no summary.json was written, the images finished so far are kept in the report folder",
                path=out,
                hint="run the same command with --resume to continue (finished images are not predicted again)",
            ) from None
        if not rank0:  # rank 0 reports for everyone
            return
        d = report.to_dict()
        if json_out:
            emit_json(d)  # ok: false and the failures when some images failed; one JSON document
        else:
            render_eval(d, rich=sys.stdout.isatty(), echo=click.echo)
        try:
            check_failures(report)  # failed images first: a gate judged on part of the images says little
            check_gate(report)
        except (EvalFailuresError, EvalGateError) as e:  # the report is out already: only the error line and the code
            click.echo(f"error: {e.one_line()}", err=True)
            sys.exit(e.exit_code)


__all__ = ["register_eval", "render_eval", "table_rows", "comparison_lines"]
