"""What a model process reported, and the checks every mode holds it to.

The child records facts and judges nothing; here they become a :class:`ChildReport`, and the
contract every mode relies on is checked once: the folder loaded whole (no missing, unexpected or
mismatched keys, in the dtype written, with a ``[SEG]`` token) and ``predict_forward`` answered in
the shape its callers read (text, a list of bool masks of the input's size). The round trip,
``predict`` and ``eval`` apply the same checks, so a folder that passes one passes them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VerifyError
from .process import ChildRun

SEG_TOKEN = "[SEG]"


@dataclass
class ChildReport:
    """What the child saw: loading info, dtypes, each predict_forward run, timings, versions.

    The same fields in every mode (a round trip fills ``runs`` with its synthetic inputs, ``eval`` streams
    its per-image rows to a file instead)."""

    folder: str
    ok: bool
    python: str
    device: str | None = None
    dtype: str | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] = field(default_factory=dict)
    loading_info: dict[str, list[str]] = field(default_factory=dict)
    dtypes: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    seconds: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "raw"}
        d["flash_attn"] = self.raw.get("flash_attn")
        d["model_class"] = self.raw.get("model_class")
        d["parameters"] = self.raw.get("parameters")
        d["saved"] = self.raw.get("saved")
        d["cuda_mapped"] = self.raw.get("cuda_mapped")
        d["nested_imports"] = self.raw.get("nested_imports")
        d["max_new_tokens"] = self.raw.get("max_new_tokens")
        d["generation_cap"] = self.raw.get("generation_cap")
        d["loaded_as"] = self.raw.get("loaded_as")
        d["packages"] = self.raw.get("packages")
        d["memory"] = self.raw.get("memory")
        d["started_early"] = self.raw.get("started_early")  # a child that imported while the folder was written
        if d["error"]:
            d["error"] = {k: v for k, v in d["error"].items() if k != "traceback"}
        return d


def report_from(run: ChildRun, folder: Path, python: str) -> ChildReport:
    r = run.result or {}
    return ChildReport(
        folder=str(folder),
        ok=bool(r.get("ok")),
        python=python,
        device=r.get("device"),
        dtype=r.get("dtype"),
        versions=r.get("versions") or {},
        gpu=r.get("gpu") or {},
        loading_info=r.get("loading_info") or {},
        dtypes=r.get("dtypes") or {},
        tokenizer=r.get("tokenizer") or {},
        runs=r.get("runs") or [],
        timings=r.get("timings") or {},
        warnings=list(r.get("warnings") or []),
        error=r.get("error"),
        seconds=round(run.seconds, 3),
        raw=r,
    )


def masks_expected(run: dict[str, Any]) -> set[int]:
    """How many masks an answer's [SEG] tokens give: one each, but a [SEG] that ends the answer (the
    generation cap cut it) may give none, since upstream reads each [SEG]'s hidden state from the
    token fed back after it (``sequences[0][:-1]`` in modeling_sa2va_chat.py)."""
    n = int(run.get("seg_count") or 0)
    ends_with_seg = str(run.get("prediction") or "").rstrip().endswith(SEG_TOKEN)
    return {n, n - 1} if ends_with_seg and n else {n}


def judge_runs(report: ChildReport, folder: Path, *, expect_mask: bool = False) -> list[str]:
    """Contract checks on predict_forward's output (FORMATS.md §5); returns warnings, raises on breaches."""
    warnings: list[str] = []
    for run in report.runs:
        name = run.get("name", "image")
        if run.get("prediction_type") != "str":
            raise VerifyError(
                f"predict_forward ({name}) returned a {run.get('prediction_type')} prediction, not text",
                path=folder,
                hint="check the folder's remote code",
            )
        if run.get("masks_type") not in ("list", "tuple"):
            raise VerifyError(
                f"predict_forward ({name}) returned prediction_masks as {run.get('masks_type')}, not a list",
                path=folder,
                hint="check the folder's remote code",
            )
        w, h = run["input_size"]
        expected = [run["n_frames"], h, w]
        for i, m in enumerate(run.get("masks", [])):
            if m.get("shape") != expected or m.get("dtype") != "bool":
                raise VerifyError(
                    f"predict_forward ({name}) mask {i} is {m.get('dtype')} {m.get('shape')}; "
                    f"expected bool {expected} (n_frames, height, width) for a {w}x{h} input",
                    path=folder,
                    hint="check the folder's remote code and the SAM2 weights",
                )
        if run.get("forced") and run.get("n_masks") not in masks_expected(run):
            raise VerifyError(
                f"with [SEG] forced through generation, predict_forward returned {run.get('n_masks')} "
                f"mask(s) for {run.get('seg_count')} [SEG]: the mask path (text_hidden_fcs -> SAM2) "
                "does not work",
                path=folder,
                hint="check the SAM2 and text_hidden_fcs weights and the remote code",
            )
        if run.get("seg_count") is not None and run.get("n_masks") not in masks_expected(run):
            warnings.append(f"{name}: {run['seg_count']} [SEG] in the answer but {run.get('n_masks')} mask(s)")
    if expect_mask:
        own = next((r for r in report.runs if r.get("name") == "image"), None)
        if own is not None and not own.get("seg_count"):
            raise VerifyError(
                f"the model's own answer has no [SEG] ({own.get('prediction', '')[:60]!r}), so it "
                "produced no mask (--expect-mask)",
                path=folder,
                hint="a fine-tune that segments answers with [SEG]; check the checkpoint and base, or "
                "drop --expect-mask for an untrained model",
            )
    return warnings


def judge_loading(report: ChildReport, folder: Path) -> None:
    info = report.loading_info
    for key, label in (
        ("missing_keys", "missing"),
        ("unexpected_keys", "unexpected"),
        ("mismatched_keys", "shape-mismatched"),
        ("error_msgs", "error"),
    ):
        items = info.get(key) or []
        if items:
            hint = (
                "a missing tensor is left uninitialised by from_pretrained; re-run the conversion"
                if key == "missing_keys"
                else "the folder does not match its remote code; re-run the conversion with the right --base"
            )
            raise VerifyError(
                f"from_pretrained reports {len(items)} {label} key(s): {', '.join(items[:3])}"
                + (" ..." if len(items) > 3 else ""),
                path=folder,
                hint=hint,
            )
    dt = report.dtypes
    if dt.get("mismatch_count") and len(dt.get("file") or []) == 1:
        raise VerifyError(
            f"{dt['mismatch_count']} tensor(s) load in another dtype than written "
            f"(config {dt.get('config')}): {dt['mismatches'][0]}",
            path=folder,
            hint="make config.json torch_dtype match the shards (re-run the conversion)",
        )
    if not (report.tokenizer or {}).get("seg_token_id"):
        raise VerifyError(
            "the tokenizer has no [SEG] token, so the model can never produce a mask",
            path=folder,
            hint="re-run the conversion with the Sa2VA base folder's tokenizer",
        )


__all__ = ["ChildReport", "SEG_TOKEN", "judge_loading", "judge_runs", "masks_expected", "report_from"]
