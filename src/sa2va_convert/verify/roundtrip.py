"""Round trip: load the written folder with transformers and run ``predict_forward``, in another process.

Why a separate process: the folder's remote code (``trust_remote_code=True``) is arbitrary
Python; the converter reads untrusted checkpoints without executing them and must not then
import that code itself. The child (``_child.py``, a standalone script passed by path) may also
run under another interpreter (``python=``): a CUDA environment when this one has none, or one
with the transformers version the upstream code pins.

The child only reports facts as one JSON line; this module judges them and turns every failure
into a one-line :class:`~sa2va_convert.errors.VerifyError` (exit 7) whose hint says what to do,
in particular when the model's code needs a GPU that the child does not have.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError, VerifyEnvironmentError, VerifyError
from ..machine import available_ram
from .environment import diagnose

CHILD_SCRIPT = Path(__file__).with_name("_child.py")
DEFAULT_PROMPT = "<image>Please segment the object."
SEG_TOKEN = "[SEG]"
DEFAULT_TIMEOUT = 1800.0
DEVICES = ("auto", "cpu", "cuda")
STAGE_PREFIX = "@@stage "

_STAGE_WORDS = {
    "start": "starting",
    "import": "importing torch/transformers",
    "device": "choosing the device",
    "config": "building the config",
    "load": "loading the model",
    "dtypes": "checking dtypes",
    "tokenizer": "loading the tokenizer",
    "prepare": "calling preparing_for_generation",
    "predict_image": "running predict_forward on an image",
    "predict_video": "running predict_forward on a video",
    "predict": "running predict_forward",
    "save": "saving the masks",
    "image": "reading the image",
    "predict_forced": "running predict_forward with [SEG] forced",
}

# Upstream remote code that a given transformers breaks (FORMATS.md §5): message pattern -> hint.
_KNOWN_BREAKAGE = (
    (
        re.compile(r"has no attribute 'generate'"),
        "this remote code predates transformers 4.50 (PreTrainedModel lost generate); pass --python with an "
        "environment that has transformers 4.42-4.49 (upstream v1 pins 4.42.3)",
    ),
    (
        re.compile(r"KeyError: 'architectures'|^'architectures'$"),
        "this v1 config class breaks on transformers 4.53+; pass --python with an environment that has "
        "transformers<4.53 (upstream v1 pins 4.42.3)",
    ),
)
INSTALL_HINT = "pip install 'sa2va-convert[verify]'"
_CUDA_WORDS = re.compile(r"cuda|nvidia|gpu", re.I)
_CUDA_CALLS = re.compile(r"\.cuda\(|autocast\(\s*['\"]cuda|device_type\s*=\s*['\"]cuda|['\"]cuda['\"]")


@dataclass
class RoundTripReport:
    """What the child saw: loading info, dtypes, each predict_forward run, timings, versions."""

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
        if d["error"]:
            d["error"] = {k: v for k, v in d["error"].items() if k != "traceback"}
        return d


# ---------------------------------------------------------------- running the child


def resolve_python(python: str | os.PathLike | None) -> str:
    """The interpreter for the child: ours by default, else a path or a name on PATH that runs and
    is a Python 3. Checked before any work, so a typo costs a second, not a whole conversion."""
    if python is None:
        return sys.executable
    text = str(python)
    found = shutil.which(text) if os.sep not in text else (text if os.path.isfile(text) else None)
    if not found or not os.access(found, os.X_OK):
        raise UsageError(
            f"Python interpreter {text!r} not found or not executable",
            path=text,
            hint="pass --python with the path of a python that has torch and transformers",
        )
    try:
        probe = subprocess.run(
            [found, "-c", "import sys; print('sa2va-python', sys.version_info[0])"],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        out = probe.stdout.split()
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(
            f"{text!r} does not run ({type(e).__name__})",
            path=text,
            hint="pass --python with a working Python 3 interpreter",
        ) from None
    if probe.returncode != 0 or out[:1] != ["sa2va-python"] or out[1:2] != ["3"]:
        raise UsageError(
            f"{text!r} is not a Python 3 interpreter",
            path=text,
            hint="pass --python with the path of a python that has torch and transformers",
        )
    return found


def check_device(device: str) -> str:
    if device in DEVICES or re.fullmatch(r"cuda:\d+", device or ""):
        return device
    raise UsageError(f"unknown device {device!r}", hint="use --device auto, cpu, cuda or cuda:N")


def child_env(modules_cache: str) -> dict[str, str]:
    """The child's environment: ours, offline, with a private cache for the copied remote code.

    transformers copies remote code into HF_MODULES_CACHE under the folder's base name; a private
    one keeps two folders both called ``out`` from sharing (or racing on) one copy."""
    env = dict(os.environ)
    env.update(
        {
            "HF_MODULES_CACHE": modules_cache,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TQDM_DISABLE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    return env


@dataclass
class ChildRun:
    result: dict[str, Any] | None
    returncode: int | None
    stderr_tail: str
    last_stage: str
    seconds: float
    timed_out: bool = False


def run_child(
    args: dict[str, Any], *, python: str, timeout: float, on_stage: Callable[[str], None] | None = None
) -> ChildRun:
    """Run ``_child.py`` with ``args``; never raises for the child's own failures (see ChildRun)."""
    started = time.perf_counter()
    tail: deque[str] = deque(maxlen=60)
    state = {"stage": "start"}
    out_chunks: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sa2va-verify-") as tmp:
        cmd = [python, str(CHILD_SCRIPT), json.dumps(args)]
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                cwd=tmp,
                env=child_env(os.path.join(tmp, "modules")),
                text=True,
                encoding="utf-8",
                errors="replace",
                start_new_session=True,
            )
        except OSError as e:
            raise VerifyError(
                f"cannot start {python} ({e.strerror or e})",
                path=python,
                hint="pass --python with a working interpreter",
            ) from None

        stderr, stdout = proc.stderr, proc.stdout
        assert stderr is not None and stdout is not None  # both are PIPEs

        def read_err() -> None:
            for line in stderr:
                if line.startswith(STAGE_PREFIX):
                    state["stage"] = line[len(STAGE_PREFIX) :].strip()
                    if on_stage:
                        on_stage(_STAGE_WORDS.get(state["stage"], state["stage"]))
                else:
                    tail.append(line.rstrip("\n"))

        def read_out() -> None:
            out_chunks.append(stdout.read())

        readers = [threading.Thread(target=read_err, daemon=True), threading.Thread(target=read_out, daemon=True)]
        for r in readers:
            r.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
        except BaseException:  # Ctrl-C / SIGTERM: take the child down with us
            _kill(proc)
            raise
        for r in readers:
            r.join(timeout=10)
    result = None
    for line in reversed("".join(out_chunks).splitlines()):
        if line.strip().startswith("{"):
            try:
                result = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    return ChildRun(
        result=result,
        returncode=proc.returncode,
        stderr_tail="\n".join(tail),
        last_stage=(result or {}).get("stage") or state["stage"],
        seconds=time.perf_counter() - started,
        timed_out=timed_out,
    )


def _kill(proc: subprocess.Popen) -> None:
    """Kill the child's process group (it was started in a session of its own) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


# ---------------------------------------------------------------- judging the result


# What the child's CPU mapping (``_child.map_cuda_to_cpu``) cannot rewrite: calls into torch.cuda itself,
# CUDA generators, and kernels compiled for CUDA.
_UNMAPPED_CUDA = re.compile(
    r"torch\.cuda\.(?!is_available|amp\b|empty_cache|device_count)\w+\(|"
    r"Generator\([^)]*cuda|extra_cuda_cflags|load_inline\("
)


def cuda_calls(folder: Path, limit: int = 3, *, mapped: bool = False) -> list[str]:
    """``file:line`` of remote-code lines that put work on CUDA (read as text, never imported).

    With ``mapped`` (the child mapped ``.cuda()`` and autocast to the CPU) only the forms it
    cannot map are listed, so the message points at the line that really failed."""
    pattern = _UNMAPPED_CUDA if mapped else _CUDA_CALLS
    found: list[str] = []
    for path in sorted(Path(folder).glob("*.py")):
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for n, line in enumerate(lines, 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and "is_available" not in code:
                found.append(f"{path.name}:{n}")
                if len(found) >= limit:
                    return found
    return found


def child_failure(
    run: ChildRun, *, folder: Path, python: str, device: str, timeout: float, what: str = "round trip"
) -> VerifyError:
    """One VerifyError for a child that failed, timed out or died, with the most useful hint."""
    where = _STAGE_WORDS.get(run.last_stage, run.last_stage)
    if run.timed_out:
        return VerifyEnvironmentError(
            f"{what} did not finish within {timeout:g}s (it was {where})",
            path=folder,
            hint="raise --timeout, lower --max-new-tokens, or use a GPU (--device cuda)",
        )
    if run.result is None:
        rc = run.returncode
        died = f"was killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with code {rc}"
        oom = " (signal 9: often out of memory)" if rc == -9 else ""
        last = _last_line(run.stderr_tail)
        cls = VerifyEnvironmentError if rc == -9 else VerifyError
        return cls(
            f"the {what} process {died}{oom} while {where}, without a report" + (f": {last}" if last else ""),
            path=folder,
            hint="run with --debug to see its output; check memory and the interpreter",
        )
    err = run.result.get("error") or {}
    stage_name, etype, msg = err.get("stage", run.last_stage), err.get("type", "Error"), err.get("message", "")
    where = _STAGE_WORDS.get(stage_name, stage_name)
    gpu = run.result.get("gpu") or {}
    text = f"{etype}: {msg}"
    used = run.result.get("device") or device
    env = diagnose(
        run.result, folder=folder, python=python, what=what, sibling_modules={p.stem for p in Path(folder).glob("*.py")}
    )
    if env is not None:
        return env
    if stage_name == "import":
        return VerifyEnvironmentError(
            f"{python} cannot run the {what}: {text}",
            path=python,
            hint=f"{INSTALL_HINT}, or pass --python with an environment that has torch, transformers, numpy and pillow",
        )
    if stage_name == "device" and err.get("own"):
        n = int(gpu.get("count") or 0)
        hint = (
            ("use --device auto, cuda or " + ("cuda:0" if n == 1 else f"cuda:0..cuda:{n - 1}"))
            if n
            else _gpu_hint(python, what)
        )
        return VerifyEnvironmentError(msg, path=folder, hint=hint)
    if etype == "MemoryError" or "DefaultCPUAllocator: can't allocate memory" in msg or "out of memory" in msg.lower():
        return VerifyEnvironmentError(
            f"{what} ran out of memory while {where}: {text}", path=folder, hint=_memory_hint(what)
        )
    tb = err.get("traceback", "")
    if _CUDA_WORDS.search(text) or (not gpu.get("cuda_available") and ".cuda(" in tb):
        if str(used).startswith("cpu"):
            calls = cuda_calls(folder, mapped=bool(run.result.get("cuda_mapped")))
            where_code = f" (CUDA calls at {', '.join(calls)})" if calls else ""
            if gpu.get("cuda_available"):
                return VerifyEnvironmentError(
                    f"the model's remote code needs a GPU{where_code} but the {what} ran on CPU: {text}",
                    path=folder,
                    hint="use --device cuda (or auto)",
                )
            return VerifyEnvironmentError(
                f"the model's remote code needs a GPU{where_code}, and {python} sees none: {text}",
                path=folder,
                hint=_gpu_hint(python, what),
            )
    for pattern, hint in _KNOWN_BREAKAGE:
        if pattern.search(text) or pattern.search(tb):
            versions = run.result.get("versions") or {}
            return VerifyEnvironmentError(
                f"{what} failed while {where} under transformers {versions.get('transformers')}: {text}",
                path=folder,
                hint=hint,
            )
    return VerifyError(
        f"{what} failed while {where}: {text}",
        path=folder,
        hint="run with --debug for the traceback; --no-roundtrip checks the files only",
    )


def debug_details(run: ChildRun) -> str:
    """The child's traceback and the end of its stderr, for ``--debug``."""
    parts = []
    tb = ((run.result or {}).get("error") or {}).get("traceback")
    if tb:
        parts.append("child traceback:\n" + tb.rstrip())
    if run.stderr_tail.strip():
        parts.append("child stderr (last lines):\n" + run.stderr_tail.rstrip())
    return "\n".join(parts)


def _memory_hint(what: str) -> str:
    if what == "prediction":
        return "run `sa2va-convert predict ... --device cuda` on a machine with a GPU and enough memory"
    return (
        "run `sa2va-convert verify OUT --device cuda` on a machine with a GPU and enough memory, or convert with "
        "--no-verify"
    )


# ---------------------------------------------------------------- will it fit?

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_LOAD_OVERHEAD = 1.15  # loader bookkeeping, a shard's worth of mapped pages, activations
_PROCESS_BASE = 1 << 30  # torch + transformers + the remote code, imported


def estimate_roundtrip_ram(folder: Path, load_dtype: str | None = None) -> int:
    """Host RAM the child needs to load ``folder``: its tensors in the dtype they load in, plus
    the loader's overhead and the imported libraries. Read from the safetensors headers only."""
    from ..read.safetensors_header import read_safetensors_header

    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    load_bytes = _DTYPE_BYTES.get({"fp32": "F32", "fp16": "F16", "bf16": "BF16"}.get(load_dtype or "", ""), 0)
    total = 0
    for name in files:
        for key, entry in read_safetensors_header(folder / name).items():
            if key == "__metadata__":
                continue
            n = 1
            for d in entry["shape"]:
                n *= int(d)
            size = _DTYPE_BYTES.get(entry["dtype"], 4)
            total += n * (load_bytes if load_bytes and entry["dtype"] in ("F32", "F16", "BF16") else size)
    return int(total * _LOAD_OVERHEAD) + _PROCESS_BASE


def check_fits(folder: Path, device: str, what: str = "round trip") -> dict[str, Any]:
    """Refuse before loading when the model cannot fit in host RAM (the child loads on the CPU
    first, then moves to the GPU, unless several GPUs take it with device_map)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype = config.get("dtype") or config.get("torch_dtype")
    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(str(dtype))
    need = estimate_roundtrip_ram(folder, short)
    have, source = available_ram()
    info = {"estimated_bytes": need, "available_bytes": have, "available_from": source}
    if have is not None and need > have:
        gib = 1 << 30
        raise VerifyEnvironmentError(
            f"the {what} needs about {need / gib:.1f} GiB of RAM to load this model ({device}) but only "
            f"{have / gib:.1f} GiB is available ({source})",
            path=folder,
            hint=_memory_hint(what),
        )
    return info


def _gpu_hint(python: str, what: str) -> str:
    if what == "prediction":
        return (
            "run `sa2va-convert predict ... --device cuda` on a machine with a GPU, or pass --python with a "
            "CUDA-enabled environment"
        )
    return (
        "run `sa2va-convert verify --device cuda` on a machine with a GPU, or pass --python with a "
        "CUDA-enabled environment; --no-roundtrip checks the files only"
    )


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def masks_expected(run: dict[str, Any]) -> set[int]:
    """How many masks an answer's [SEG] tokens give: one each, but a [SEG] that ends the answer (the
    generation cap cut it) may give none, since upstream reads each [SEG]'s hidden state from the
    token fed back after it (``sequences[0][:-1]`` in modeling_sa2va_chat.py)."""
    n = int(run.get("seg_count") or 0)
    ends_with_seg = str(run.get("prediction") or "").rstrip().endswith(SEG_TOKEN)
    return {n, n - 1} if ends_with_seg and n else {n}


def judge_runs(report: RoundTripReport, folder: Path, *, expect_mask: bool = False) -> list[str]:
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


def judge_loading(report: RoundTripReport, folder: Path) -> None:
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


def report_from(run: ChildRun, folder: Path, python: str) -> RoundTripReport:
    r = run.result or {}
    return RoundTripReport(
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


def run_roundtrip(
    folder: str | os.PathLike,
    *,
    device: str = "auto",
    python: str | os.PathLike | None = None,
    max_new_tokens: int = 32,
    prompt: str = DEFAULT_PROMPT,
    timeout: float = DEFAULT_TIMEOUT,
    video: bool = True,
    expect_mask: bool = False,
    force_seg: bool = True,
    on_stage: Callable[[str], None] | None = None,
) -> RoundTripReport:
    """Load ``folder`` in a child process and run predict_forward on a synthetic image (and video).

    Raises VerifyError on any failure (the report is attached as ``error.report``); returns the
    report when the folder loads with no missing/unexpected keys, in the dtype written, and
    predict_forward honours its output contract.
    """
    folder = Path(folder).resolve()
    if not (folder / "config.json").is_file():
        raise VerifyError("not a model folder (no config.json)", path=folder, hint="pass the converted folder")
    exe = resolve_python(python)
    device = check_device(device)
    memory = check_fits(folder, device)
    args = {
        "mode": "roundtrip",
        "folder": str(folder),
        "device": device,
        "max_new_tokens": int(max_new_tokens),
        "prompt": prompt,
        "video": bool(video),
        "force_seg": bool(force_seg),
    }
    run = run_child(args, python=exe, timeout=timeout, on_stage=on_stage)
    report = report_from(run, folder, exe)
    report.raw["memory"] = memory
    if run.timed_out or not report.ok:
        err = child_failure(run, folder=folder, python=exe, device=device, timeout=timeout)
        err.report = report
        err.details = debug_details(run)
        raise err
    try:
        judge_loading(report, folder)
        report.warnings += judge_runs(report, folder, expect_mask=expect_mask)
    except VerifyError as e:
        report.ok = False
        e.report = report
        raise
    return report


# ---------------------------------------------------------------- one line for reports


def summary_line(rt: dict[str, Any]) -> str:
    """One line about a round trip: where it ran, whether the model said [SEG] itself, what the
    forced [SEG] gave, the video, and the time."""
    versions = rt.get("versions") or {}
    mapped = rt.get("cuda_mapped") or {}
    where = f"loaded on {rt.get('device')}"
    if mapped:
        kinds = ", ".join(f"{_MAPPED_WORDS.get(k, k)} {n}" for k, n in mapped.items() if n)
        where += f" (CUDA calls mapped to CPU: {sum(mapped.values())}" + (f": {kinds}" if kinds else "") + ")"
    nested = rt.get("nested_imports") or []
    if nested:
        where += (
            f" (remote code imports {len(nested)} file(s) deeper than transformers copies for a local folder: "
            f"{', '.join(nested[:3])}{' ...' if len(nested) > 3 else ''}; made importable)"
        )
    if rt.get("loaded_as"):  # a '.' in the folder's name, under transformers < 4.57
        where += (
            f" (through a link named {rt['loaded_as']}: this transformers cannot import remote code from a "
            "folder whose name has a '.')"
        )
    cap = rt.get("generation_cap") or ""
    if cap and cap != "preparing_for_generation":  # the code writes its length into the call (Qwen-VL)
        where += f" (no preparing_for_generation(): answers capped by wrapping {cap})"
    parts = [
        f"{where} in {rt.get('dtype')} (transformers {versions.get('transformers')}, torch {versions.get('torch')})"
    ]
    runs = {r.get("name"): r for r in rt.get("runs", [])}
    own = runs.get("image")
    if own is not None:
        said = "yes" if own.get("seg_count") else "no"
        parts.append(
            f"answered with [SEG]: {said}"
            + (f", {_masks(own)}" if own.get("seg_count") else f" ({own.get('prediction', '')[:40]!r})")
        )
    for r in rt.get("runs", []):
        if r.get("forced"):
            parts.append(f"forced [SEG]: {_masks(r)}")
        elif r.get("name") not in ("image",):
            parts.append(f"{r.get('name')}: {_masks(r)}")
    return "; ".join(parts) + f"; {rt.get('seconds', 0):.1f}s"


_MAPPED_WORDS = {
    "tensor.cuda": ".cuda()",
    "module.cuda": "module.cuda()",
    "to(cuda)": ".to('cuda')",
    "device=cuda": "device='cuda'",
    "autocast": "autocast('cuda')",
    "pin_memory": "pin_memory()",
}


def _masks(run: dict[str, Any]) -> str:
    n = run.get("n_masks") or 0
    shapes = sorted({"(" + ", ".join(map(str, m["shape"])) + ")" for m in run.get("masks", [])})
    return f"{n} mask{'s' if n != 1 else ''}" + (f" {' '.join(shapes)}" if shapes else "")


__all__ = [
    "RoundTripReport",
    "run_roundtrip",
    "summary_line",
    "run_child",
    "child_failure",
    "debug_details",
    "resolve_python",
    "check_device",
    "DEFAULT_PROMPT",
    "DEFAULT_TIMEOUT",
    "CHILD_SCRIPT",
]
