"""The ``verify`` and ``predict`` commands: argument parsing over ``verify.folder`` and ``predict``.

Only parsing and rendering live here; what is checked, and how, is the verify stage's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .cli_common import EXIT_HELP, emit_json, handle_errors
from .errors import VerifyError
from .runner.process import DEFAULT_TIMEOUT
from .verify.roundtrip import DEFAULT_PROMPT


def register_verify_commands(main: click.Group) -> None:
    """Add ``verify`` and ``predict`` to the ``sa2va-convert`` click group.

    The group is passed in (``cli.py`` calls this once it exists), so this module never imports
    ``cli``. The commands share its error handling: one ``error:`` line and exit 7 on failure,
    ``--json``, ``--debug`` (which also prints the child process's traceback).
    """
    from .cli_render import make_progress, render_predict, render_verify
    from .predict import predict as run_predict
    from .verify.folder import verify_folder

    def run_and_show(run: Callable[[], Any], render: Callable[..., None], *, json_out: bool, debug: bool) -> None:
        """Run the check; on failure show the model process's traceback with --debug; print the report."""
        try:
            report = run()
        except VerifyError as e:
            if debug and e.details:
                click.echo(e.details, err=True)
            raise
        if json_out:
            emit_json(report.to_dict())
        else:
            render(report.to_dict(), echo=click.echo)

    common = [
        click.option(
            "--device",
            default="auto",
            show_default=True,
            metavar="auto|cpu|cuda|cuda:N",
            help="Where the model runs. The upstream Sa2VA code calls .cuda(): it needs a GPU.",
        ),
        click.option(
            "--python",
            "python",
            metavar="PATH",
            help="Interpreter that loads the model (default: this one), e.g. a CUDA environment or one with "
            "the transformers version the remote code needs.",
        ),
        click.option(
            "--timeout",
            type=float,
            default=DEFAULT_TIMEOUT,
            show_default=True,
            help="Seconds before the model process is killed.",
        ),
        click.option("--quiet", "-q", is_flag=True, help="No progress or notes on stderr; errors still print."),
        click.option(
            "--verbose",
            "-v",
            is_flag=True,
            help="More detail on stderr; on failure, the model process's traceback (as --debug).",
        ),
        click.option("--json", "json_out", is_flag=True, help="Print a JSON report on stdout."),
        click.option("--debug", is_flag=True, help="On failure, show the model process's traceback."),
    ]

    def with_common(fn: Callable) -> Callable:
        for opt in reversed(common):
            fn = opt(fn)
        return fn

    @main.command("verify", epilog=EXIT_HELP)
    @click.argument("folder", type=click.Path(path_type=Path, readable=False))
    @click.option("--no-roundtrip", is_flag=True, help="Only check the files; do not load the model.")
    @click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Cap on generated tokens.")
    @click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="Prompt of the round trip.")
    @click.option("--no-video", is_flag=True, help="Skip the 2-frame video run.")
    @click.option(
        "--expect-mask",
        is_flag=True,
        help="Fail when the model's own answer has no [SEG] (for CI on a real fine-tune).",
    )
    @with_common
    @handle_errors
    def verify_cmd(
        folder: Path,
        no_roundtrip: bool,
        max_new_tokens: int,
        prompt: str,
        no_video: bool,
        expect_mask: bool,
        device: str,
        python: str | None,
        timeout: float,
        quiet: bool,
        verbose: bool,
        json_out: bool,
        debug: bool,
    ) -> None:
        """Check a converted FOLDER: files (shards, index, vocab, tokenizer, remote code, checksums), then load
        it with transformers and run predict_forward on a test image and video, in a separate process."""
        progress = make_progress(json_out, quiet or json_out, verbose)
        run_and_show(
            lambda: verify_folder(
                folder,
                roundtrip=not no_roundtrip,
                device=device,
                python=python,
                max_new_tokens=max_new_tokens,
                prompt=prompt,
                timeout=timeout,
                video=not no_video,
                expect_mask=expect_mask,
                on_stage=progress.stage,
            ),
            render_verify,
            json_out=json_out,
            debug=debug or verbose,
        )

    @main.command("predict", epilog=EXIT_HELP)
    @click.argument("folder", type=click.Path(path_type=Path, readable=False))
    @click.argument("image", type=click.Path(path_type=Path, readable=False))
    @click.argument("prompt")
    @click.option(
        "--save",
        type=click.Path(path_type=Path, readable=False),
        default=Path("mask.png"),
        show_default=True,
        help="Mask PNG (white on black); more [SEG] give mask_1.png, mask_2.png, ... For a clip (frames folder or "
        "video file): a folder of one mask per frame (default masks/).",
    )
    @click.option(
        "--overlay",
        type=click.Path(path_type=Path, readable=False),
        default=Path("overlay.png"),
        show_default=True,
        help="The image with the masks tinted over it (for a clip: an animated GIF, default overlay.gif).",
    )
    @click.option("--no-save", is_flag=True, help="Write no files; only print the prediction.")
    @click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Cap on generated tokens.")
    @with_common
    @handle_errors
    def predict_cmd(
        folder: Path,
        image: Path,
        prompt: str,
        save: Path,
        overlay: Path,
        no_save: bool,
        max_new_tokens: int,
        device: str,
        python: str | None,
        timeout: float,
        quiet: bool,
        verbose: bool,
        json_out: bool,
        debug: bool,
    ) -> None:
        """Segment IMAGE with the converted FOLDER's own predict_forward. PROMPT names the object
        ("the red car" becomes "<image>\\n Please segment the red car in this image.", upstream's
        referring-segmentation template); a PROMPT with <image> is sent as it is."""
        progress = make_progress(json_out, quiet or json_out, verbose)
        from .predict_video import is_clip

        if is_clip(image):  # a frames folder or a video file: predict_video.py (masks per frame, a GIF)
            from .predict_video import predict_video

            run_and_show(
                lambda: predict_video(
                    folder,
                    image,
                    prompt,
                    device=device,
                    python=python,
                    save_dir=None if no_save else (Path("masks") if save == Path("mask.png") else save),
                    overlay=None if no_save else (Path("overlay.gif") if overlay == Path("overlay.png") else overlay),
                    max_new_tokens=max_new_tokens,
                    timeout=timeout,
                    on_stage=progress.stage,
                ),
                render_predict,
                json_out=json_out,
                debug=debug or verbose,
            )
            return
        run_and_show(
            lambda: run_predict(
                folder,
                image,
                prompt,
                device=device,
                python=python,
                save=None if no_save else save,
                overlay=None if no_save else overlay,
                max_new_tokens=max_new_tokens,
                timeout=timeout,
                on_stage=progress.stage,
            ),
            render_predict,
            json_out=json_out,
            debug=debug or verbose,
        )


__all__ = ["register_verify_commands"]
