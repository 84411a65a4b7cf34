"""Load a converted Sa2VA folder with transformers and run ``predict_forward``, in its own process.

Run by ``sa2va_convert.runner.process`` as ``PYTHON child.py '<json args>'``, or, started while
the conversion still writes the folder (``StartedChild``), as ``PYTHON child.py - '{"device": ...}'``:
it then imports (``prewarm``) and reads the same JSON arguments as one line on stdin. It is a
standalone script on purpose:

- the folder's remote code (``trust_remote_code=True``) runs here and never inside the
  converter's process, which reads untrusted files and must stay free of their side effects;
- ``--python`` may name another interpreter (a CUDA environment, an older transformers pinned by
  the upstream code) where ``sa2va_convert`` is not installed, so this file imports only the
  standard library, torch, transformers, numpy and PIL (and peft for an adapter folder, which
  upstream's remote code imports too), and is passed by path.

It prints exactly ONE JSON line on stdout (the report below); everything libraries print
(the upstream config class prints debug lines on every build, transformers prints progress
bars) is sent to stderr, where lines starting with ``@@stage`` tell the parent how far it got.
The parent judges the report: this script only records facts and catches exceptions.

Arguments (a JSON object): ``mode`` ("roundtrip" | "predict" | "eval"), ``folder``,
``weight_files`` (the folder's weight files by name, listed by the parent), ``device``
("auto" | "cpu" | "cuda" | "cuda:N"), ``max_new_tokens``, ``prompt``, ``video`` (bool),
and for predict: ``image`` (path), ``mask_path``, ``overlay_path`` (absolute paths or null); for
eval: ``items`` and ``results`` (JSONL files, see ``run_eval``). With ``adapter`` (a ``--format adapter``
folder; ``folder`` is then its checked base) and ``adapter_dtype``, the adapter is merged onto the base
(``apply_adapter``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import os
import struct
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

# This file's folder is sys.path[0] when run by path; the converter's own modules sit there and
# must not shadow anything the model's code imports.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

SEG_TOKEN = "[SEG]"
SHORT_DTYPES = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float64": "fp64",
    "int64": "int64",
    "int32": "int32",
    "int16": "int16",
    "int8": "int8",
    "uint8": "uint8",
    "bool": "bool",
}
SAFETENSORS_DTYPES = {
    "F32": "fp32",
    "F16": "fp16",
    "BF16": "bf16",
    "F64": "fp64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
FLOATING = {"fp32", "fp16", "bf16", "fp64"}
PALETTE = [(255, 64, 64), (64, 160, 255), (80, 220, 100), (255, 200, 40), (200, 90, 255), (0, 220, 220)]


class StageError(Exception):
    """A failure this script recognised itself (not an exception from the model's code)."""


def stage(result: dict, name: str) -> None:
    result["stage"] = name
    print(f"@@stage {name}", file=sys.stderr, flush=True)


def short_dtype(dtype) -> str:
    return SHORT_DTYPES.get(str(dtype).replace("torch.", ""), str(dtype).replace("torch.", ""))


def first_line(text: object, limit: int = 400) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def version_tuple(text: str) -> tuple:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


# ---------------------------------------------------------------- the folder, read as files


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shard_dtypes(folder: str, files: list) -> dict:
    """{tensor name: short dtype} from the safetensors headers of ``files`` (no tensor bytes read).

    The parent names the files (``args["weight_files"]``: the package's ``formats.weight_files``),
    and this is a standalone copy of the header read (the package's one parser is
    ``read/safetensors_header.py``): this script runs under the user's interpreter, which may
    not have sa2va_convert installed, so it imports nothing from the package."""
    out = {}
    for fname in files:
        with open(os.path.join(folder, fname), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, entry in header.items():
            if key != "__metadata__":
                out[key] = SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"])
    return out


def config_dtype_name(config: dict, file_dtypes: dict) -> str:
    """The dtype the folder asks to be loaded in: config ``torch_dtype``/``dtype``, else the shards' majority."""
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if isinstance(value, str) and short_dtype(value) in FLOATING:
            return short_dtype(value)
    counts: dict[str, int] = {}
    for d in file_dtypes.values():
        if d in FLOATING:
            counts[d] = counts.get(d, 0) + 1
    return max(counts, key=lambda d: counts[d]) if counts else "fp32"


def is_qwen_family(config: dict) -> bool:
    archs = " ".join(config.get("architectures") or [])
    return "Qwen" in archs or "qwen" in str(config.get("model_type", ""))


# ---------------------------------------------------------------- loader pitfalls


def filter_flash_attn(result: dict) -> None:
    """transformers refuses remote code whose (relatively imported) files import flash_attn when it
    is not installed, even though the code falls back without it: hide it from the import check."""
    installed = importlib.util.find_spec("flash_attn") is not None
    result["flash_attn"] = {"installed": installed, "filtered": False, "use_flash_attn_passed": False}
    if installed:
        return
    import transformers.dynamic_module_utils as dmu

    original = dmu.get_imports

    def get_imports(filename):
        return [name for name in original(filename) if name.split(".")[0] != "flash_attn"]

    dmu.get_imports = get_imports
    result["flash_attn"]["filtered"] = True


def relative_modules(path: str) -> list:
    """Sibling modules a remote-code file imports relatively: ``from .x import y`` and ``from . import x``
    (read with ``ast``, never imported). A standalone twin of ``read/remote_code.py``'s scan."""
    import ast

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.append(node.module.split(".")[0])
            else:
                out.extend(alias.name for alias in node.names)
    return out


def make_nested_code_importable(folder: str, result: dict):
    """Let transformers copy every file the folder's remote code imports, however deep.

    For a local folder transformers copies into its module cache only the files the config or
    modeling file imports directly (``check_imports`` returns the direct relative imports), not
    the files those import in turn. Upstream's SAM3 code is laid out that way (the modeling file
    imports ``sam3.py``, which imports sibling ``sam3pkg_*.py`` files: FORMATS.md §9), so a correct
    folder fails with ``FileNotFoundError`` — upstream's own ``from_pretrained`` included. Here
    ``check_imports`` returns the whole closure of sibling files, which transformers then copies
    (and checks for missing packages) like direct imports; the extra files are reported. Returns a
    function that puts transformers back."""
    import transformers.dynamic_module_utils as dmu

    original = dmu.check_imports
    here = os.path.realpath(folder)
    copied: set = set()  # what transformers copies anyway: each module file and its direct relative imports
    extra: set = set()

    def check_imports(filename):
        direct = list(original(filename))
        if os.path.dirname(os.path.realpath(filename)) != here:
            return direct
        copied.update(direct + [os.path.splitext(os.path.basename(filename))[0]])
        seen, todo = set(direct), list(direct)
        while todo:
            path = os.path.join(here, todo.pop() + ".py")
            if not os.path.isfile(path):
                continue  # transformers names the missing file itself
            for dep in relative_modules(path):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
                    if os.path.isfile(os.path.join(here, dep + ".py")):
                        original(os.path.join(here, dep + ".py"))  # its packages are checked too
                    extra.add(dep)
        result["nested_imports"] = sorted(f + ".py" for f in extra - copied)
        return direct + [d for d in sorted(seen) if d not in direct]

    dmu.check_imports = check_imports

    def restore() -> None:
        dmu.check_imports = original

    return restore


@contextlib.contextmanager
def nested_code_importable(folder: str | os.PathLike[str]):
    """``make_nested_code_importable`` for a block of code in this process (tests, the fixture
    generator); yields the list of files it had to add, and puts transformers back afterwards."""
    result: dict = {"nested_imports": []}
    restore = make_nested_code_importable(str(folder), result)
    try:
        yield result
    finally:
        restore()


def disable_flash_attn_in_config(config) -> None:
    """Switch off flash attention wherever the (remote) config offers a switch."""
    for cfg in (
        config,
        getattr(config, "vision_config", None),
        getattr(config, "llm_config", None),
        getattr(config, "text_config", None),
    ):
        if cfg is None:
            continue
        if hasattr(cfg, "use_flash_attn"):
            try:
                cfg.use_flash_attn = False
            except Exception:  # a read-only property: the model kwarg below still applies
                pass
        if getattr(cfg, "_attn_implementation", None) == "flash_attention_2":
            try:
                cfg._attn_implementation = "eager"
            except Exception:
                pass


def importable_folder_name(folder: str, result: dict) -> str:
    """The path to load ``folder`` from, under a name its remote code can be imported by.

    transformers imports a local folder's remote code as the package ``transformers_modules.<folder
    name>``; before 4.57 the name is used as it is (later ones replace ``.`` and ``-``:
    ``_sanitize_module_name`` in dynamic_module_utils.py), so a folder named ``sa2va-1.5`` fails with
    ``ModuleNotFoundError: No module named 'transformers_modules.sa2va-1'`` as soon as one of its files
    imports another. There the folder is loaded through a link whose name has ``_`` for each ``.``, in a
    directory of its own that this process removes at exit; the folder itself is not touched."""
    import transformers.dynamic_module_utils as dmu

    name = os.path.basename(os.path.normpath(folder))
    if "." not in name or hasattr(dmu, "_sanitize_module_name"):
        return folder
    import atexit
    import shutil
    import tempfile

    holder = tempfile.mkdtemp(prefix="sa2va-load-")
    atexit.register(shutil.rmtree, holder, True)
    link = os.path.join(holder, name.replace(".", "_"))
    os.symlink(os.path.realpath(folder), link)
    result["loaded_as"] = os.path.basename(link)
    return link


def load_config(folder: str, result: dict):
    """AutoConfig with its debug prints swallowed (the upstream config class prints on every build)."""
    from transformers import AutoConfig

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    result["config_printed_lines"] = len(sink.getvalue().splitlines())
    return config


def model_class(folder: str, raw_config: dict):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    ref = (raw_config.get("auto_map") or {}).get("AutoModel")
    if not ref:
        return None
    return get_class_from_dynamic_module(ref, folder)


# ---------------------------------------------------------------- facts for the parent's diagnosis

PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "peft",
    "accelerate",
    "tokenizers",
    "sentencepiece",
    "einops",
    "qwen-vl-utils",
    "flash-attn",
    "numpy",
    "pillow",
    "safetensors",
)


def package_versions() -> dict:
    """Installed versions from the packages' metadata (nothing imported: a torchvision built for
    another torch fails on import, and its version is exactly what the parent must name)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
        except Exception:  # a broken install: the import will tell
            out[name] = None
    return out


def calls_post_init(cls) -> bool | None:
    """Whether the model class's own ``__init__`` calls ``self.post_init()`` (read from its source).

    transformers 5 sets attributes ``from_pretrained`` needs in ``post_init``; upstream
    ``Sa2VAChatModel.__init__`` never calls it (FORMATS.md §9), so its code loads on 4.x only."""
    import ast
    import textwrap

    for klass in getattr(cls, "__mro__", ()):
        init = klass.__dict__.get("__init__")
        if init is None or klass.__module__.startswith(("transformers.", "torch.")):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
        except (OSError, TypeError, SyntaxError):
            return None
        return any(
            isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "post_init"
            for n in ast.walk(tree)
        )
    return None


def generation_facts(model) -> list:
    """For each sub-model that has ``generate``: does transformers think it can generate?

    transformers >= 4.50 asks ``can_generate()``, which looks for ``GenerationMixin`` among a
    class's direct bases or in bases whose name does not contain "PreTrainedModel"; upstream's
    ``InternLM2ForCausalLM`` gets it only through ``InternLM2PreTrainedModel`` (FORMATS.md §9), so
    it is left without a ``generation_config`` and ``generate`` fails."""
    facts = []
    for name, module in [("", model)] + list(model.named_children()):
        if not hasattr(module, "generate") or not hasattr(module, "can_generate"):
            continue
        try:
            can = bool(module.can_generate())
        except Exception:
            can = None
        mro = [k.__name__ for k in type(module).__mro__]
        facts.append(
            {
                "module": name or "(model)",
                "class": type(module).__name__,
                "can_generate": can,
                "generation_config": getattr(module, "generation_config", None) is not None,
                "mixin_via": next(
                    (
                        k.__name__
                        for k in type(module).__mro__[1:]
                        if "GenerationMixin" in [b.__name__ for b in k.__bases__]
                    ),
                    None,
                ),
                "mro": mro[:6],
            }
        )
    return facts


def error_chain(e: BaseException | None) -> list[str]:
    """ "Type: first line" of the exception and every cause/context under it, outermost first: the
    cause of a transformers lazy-import error (e.g. ``operator torchvision::nms does not exist``)
    sits at the start of a long traceback, where a cut tail would lose it."""
    chain: list[str] = []
    seen: set[int] = set()
    while e is not None and id(e) not in seen and len(chain) < 8:
        seen.add(id(e))
        chain.append(f"{type(e).__name__}: {first_line(e)}")
        e = e.__cause__ or e.__context__
    return chain


# ---------------------------------------------------------------- device


def resolve_device(requested: str, result: dict):
    import torch

    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    result["gpu"] = {
        "cuda_available": cuda,
        "count": count,
        "names": [torch.cuda.get_device_name(i) for i in range(count)],
        "torch_cuda": getattr(torch.version, "cuda", None),
    }
    if requested == "auto":
        return "cuda" if cuda else "cpu"
    if requested.startswith("cuda"):
        if not cuda:
            built = getattr(torch.version, "cuda", None)
            why = "this torch is built without CUDA" if not built else f"torch (CUDA {built}) sees no GPU"
            raise StageError(f"--device {requested} asked for, but {why}")
        if ":" in requested and int(requested.split(":", 1)[1]) >= count:
            raise StageError(f"--device {requested} asked for, but only {count} GPU(s) are visible")
        return requested
    if requested != "cpu":
        raise StageError(f"unknown device {requested!r} (use auto, cpu, cuda or cuda:N)")
    return "cpu"


def _is_cuda_device(value, *, ints: bool = False) -> bool:
    """A ``device`` argument that names a GPU: ``"cuda"``, ``"cuda:0"``, ``torch.device("cuda")`` (and,
    as ``.to(0)`` means, an int where only a device can stand)."""
    import torch

    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return ints and isinstance(value, int) and not isinstance(value, bool)


def map_cuda_to_cpu(result: dict):
    """Let the model's own CUDA uses run on the CPU, and count them.

    The upstream Sa2VA code reaches CUDA on the way to a mask in several ways (FORMATS.md §8, §9):
    ``.cuda()`` on input ids and pixel values, ``torch.autocast('cuda')`` around SAM2, and in
    SAM2's video-state init (``sam2.py`` ``init_state``) ``torch.device("cuda")`` as the state's
    device, which later reaches ``torch.zeros(..., device=...)`` and ``.to(device, non_blocking=True)``
    (and ``.cuda(non_blocking=True)`` on memory features). A ``TorchFunctionMode`` sees every
    torch call with its arguments, so each of those forms is rewritten at the call (a ``device``
    argument naming a GPU becomes the CPU; ``.cuda()`` becomes ``.to("cpu")``; ``pin_memory()``,
    which needs an accelerator, is a no-op), and ``torch.autocast``, which is no torch call, is
    replaced by a class that maps its device type. Installed before the remote code is imported
    (``from torch import autocast`` in it then gets the mapped one), only in this child and only
    when it runs on the CPU; every mapping is counted and reported, so nobody mistakes a CPU run
    for a GPU run. Returns a function that puts torch back.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    counts = {"tensor.cuda": 0, "module.cuda": 0, "to(cuda)": 0, "device=cuda": 0, "autocast": 0, "pin_memory": 0}
    result["cuda_mapped"] = counts

    class CpuForCuda(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            name = getattr(func, "__name__", "")
            if name == "cuda" and args and isinstance(args[0], torch.Tensor):
                counts["tensor.cuda"] += 1
                return args[0].to("cpu", non_blocking=bool(kwargs.get("non_blocking", False)))
            if name == "pin_memory" and args and isinstance(args[0], torch.Tensor):
                counts["pin_memory"] += 1
                return args[0]
            if "device" in kwargs and _is_cuda_device(kwargs["device"], ints=name == "to"):
                counts["to(cuda)" if name == "to" else "device=cuda"] += 1
                kwargs["device"] = "cpu"
            if name == "to" and len(args) > 1 and _is_cuda_device(args[1], ints=True):
                counts["to(cuda)"] += 1
                args = (args[0], "cpu", *args[2:])
            return func(*args, **kwargs)

    def module_cuda(self, device=None):
        counts["module.cuda"] += 1
        return self.to("cpu")

    class autocast(torch.autocast):  # noqa: N801 - replaces torch.autocast under its own name
        def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
            if str(device_type).startswith("cuda"):
                counts["autocast"] += 1
                device_type = "cpu"
            super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    def cuda_amp_autocast(enabled=True, dtype=torch.float16, cache_enabled=True):
        return autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    patches: list[tuple[Any, str, Any]] = [
        (torch.nn.Module, "cuda", module_cuda),
        (torch, "autocast", autocast),
        (torch.amp, "autocast", autocast),
    ]
    if hasattr(torch.cuda, "amp"):
        patches.append((torch.cuda.amp, "autocast", cuda_amp_autocast))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    mode = CpuForCuda()
    mode.__enter__()

    def restore() -> None:
        mode.__exit__(None, None, None)
        for owner, name, value in saved:
            setattr(owner, name, value)

    return restore


@contextlib.contextmanager
def cuda_on_cpu() -> Iterator[dict]:
    """``map_cuda_to_cpu`` for a block of code in this process (tests, the fixture generator);
    yields the call counts and puts torch back afterwards."""
    result: dict = {}
    restore = map_cuda_to_cpu(result)
    try:
        yield result["cuda_mapped"]
    finally:
        restore()


def output_head(model):
    """The module that turns the LLM's hidden states into vocabulary logits (lm_head / output)."""
    for owner in (getattr(model, "language_model", None), model):
        getter = getattr(owner, "get_output_embeddings", None) if owner is not None else None
        head = getter() if callable(getter) else None
        if head is not None:
            return head
    for name, module in model.named_modules():
        if name.endswith(("lm_head", "language_model.output")):
            return module
    return None


@contextlib.contextmanager
def forced_tokens(model, token_ids: list):
    """Make generation emit ``token_ids`` in order (then keep emitting the last one).

    A forward hook on the output head rewrites the logits of the newest position only: the first
    call of the head (the prompt) picks ``token_ids[0]``, the next call ``token_ids[1]``, ... The
    forced token then goes back through the model like any generated token, so its hidden
    state, ``text_hidden_fcs`` and the mask decoder all run for real. Works with HF ``generate``
    (upstream) and with hand-written greedy loops (our test models), with or without a KV cache.
    """
    head = output_head(model)
    if head is None:
        raise StageError("cannot find the model's output head (lm_head/output) to force [SEG]")
    step = {"n": 0}

    def hook(module, inputs, output):
        logits = output[0] if isinstance(output, tuple) else output
        target = token_ids[min(step["n"], len(token_ids) - 1)]
        step["n"] += 1
        last = logits[..., -1, :]
        last.fill_(float(torch_finfo_min(last.dtype)))
        last[..., target] = 0.0
        return output

    handle = head.register_forward_hook(hook)
    try:
        yield step
    finally:
        handle.remove()


def torch_finfo_min(dtype):
    import torch

    return torch.finfo(dtype).min if dtype.is_floating_point else 0


# ---------------------------------------------------------------- synthetic inputs and outputs


def synthetic_frame(width: int = 80, height: int = 60, shift: int = 0):
    """A deterministic test picture: colour gradients, a checkerboard and a red ellipse.

    Not square on purpose, so masks with height and width swapped are caught."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    img = np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), ((x // 8 + y // 8) % 2) * 90], axis=-1
    ).astype(np.uint8)
    inside = ((x - (0.4 * width + shift)) / (0.2 * width)) ** 2 + ((y - 0.5 * height) / (0.25 * height)) ** 2 <= 1
    img[inside] = (230, 40, 40)
    return Image.fromarray(img, "RGB")


def as_numpy(mask):
    import numpy as np

    if hasattr(mask, "detach"):
        mask = mask.detach().float().cpu().numpy() if mask.dtype.is_floating_point else mask.detach().cpu().numpy()
    return np.asarray(mask)


def describe_mask(mask) -> dict:
    arr = as_numpy(mask)
    info: dict[str, Any] = {"type": type(mask).__name__, "dtype": str(arr.dtype), "shape": list(arr.shape)}
    if arr.size:
        info["true_fraction"] = round(float((arr > 0).mean()), 4)
    return info


def mask_frame(mask):
    """The first frame of a mask as a bool (H, W) array."""
    arr = as_numpy(mask)
    while arr.ndim > 2:
        arr = arr[0]
    return arr > 0 if arr.dtype != bool else arr


def numbered(path: str, i: int) -> str:
    """mask.png, mask_1.png, mask_2.png, ..."""
    if i == 0:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}_{i}{ext or '.png'}"


def save_masks(masks, image, mask_path, overlay_path) -> dict:
    import numpy as np
    from PIL import Image

    saved: dict[str, Any] = {"masks": [], "overlay": None}
    frames = [mask_frame(m) for m in masks]
    if mask_path:
        for i, m in enumerate(frames):
            path = numbered(mask_path, i)
            Image.fromarray(m.astype(np.uint8) * 255, "L").save(path)
            saved["masks"].append(path)
    if overlay_path and frames:
        out = np.asarray(image.convert("RGB")).astype(np.float32)
        for i, m in enumerate(frames):
            if m.shape != out.shape[:2]:
                continue  # reported by the parent as a shape error
            colour = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
            out[m] = 0.45 * out[m] + 0.55 * colour
        Image.fromarray(out.clip(0, 255).astype(np.uint8), "RGB").save(overlay_path)
        saved["overlay"] = overlay_path
    return saved


# ---------------------------------------------------------------- the run


def call_predict(model, tokenizer, processor, *, image=None, video=None, text: str) -> dict:
    import torch

    kwargs = {"text": text, "tokenizer": tokenizer}
    params = inspect.signature(model.predict_forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if processor is not None and ("processor" in params or takes_kwargs):
        kwargs["processor"] = processor
    if video is not None:
        kwargs["video"] = video
    else:
        kwargs["image"] = image
    started = time.perf_counter()
    with torch.no_grad():
        out = model.predict_forward(**kwargs)
    seconds = time.perf_counter() - started
    if not isinstance(out, dict):
        raise StageError(f"predict_forward returned {type(out).__name__}, not a dict")
    prediction = out.get("prediction")
    masks = out.get("prediction_masks")
    frames = video if video is not None else [image]
    return {
        "input_size": list(frames[0].size),
        "n_frames": len(frames),
        "prompt": text,
        "keys": sorted(str(k) for k in out.keys()),
        "prediction": prediction if isinstance(prediction, str) else repr(prediction)[:2000],
        "prediction_type": type(prediction).__name__,
        "masks_type": type(masks).__name__,
        "n_masks": len(masks) if isinstance(masks, (list, tuple)) else None,
        "masks": [describe_mask(m) for m in masks] if isinstance(masks, (list, tuple)) else [],
        "seg_count": prediction.count(SEG_TOKEN) if isinstance(prediction, str) else None,
        "seconds": round(seconds, 3),
        "_masks": list(masks) if isinstance(masks, (list, tuple)) else [],
    }


class Loaded:
    """The model and what ``predict_forward`` needs beside it, loaded once per process."""

    def __init__(self, model, tokenizer, processor, device: str, torch_dtype, seg_id):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.device, self.torch_dtype, self.seg_id = device, torch_dtype, seg_id


def load_model(args: dict, result: dict) -> Loaded:
    """Import, pick the device, load config, weights, tokenizer (and processor), cap generation.

    Shared by every mode (round trip, predict, eval) so they all load a folder the same way.
    """
    timings = result["timings"]
    t0 = time.perf_counter()
    stage(result, "import")
    # torch and transformers first: where several are missing, the error names torch (what --python is for)
    import torch
    import transformers

    # isort: split
    import numpy  # fail early, at a clear stage, if missing
    import PIL

    result["versions"].update(
        torch=torch.__version__, transformers=transformers.__version__, numpy=numpy.__version__, pillow=PIL.__version__
    )
    timings["import"] = round(time.perf_counter() - t0, 3)
    folder = importable_folder_name(args["folder"], result)

    stage(result, "device")
    device = resolve_device(args.get("device") or "auto", result)
    n_gpus = result["gpu"]["count"]
    multi = device == "cuda" and n_gpus > 1 and importlib.util.find_spec("accelerate") is not None
    result["device"] = f"cuda (device_map=auto over {n_gpus} GPUs)" if multi else device
    if device == "cpu" and args.get("map_cuda", True):
        map_cuda_to_cpu(result)

    stage(result, "config")
    t = time.perf_counter()
    raw_config = read_json(os.path.join(folder, "config.json"))
    file_dtypes = shard_dtypes(folder, args["weight_files"])
    dtype_name = args.get("dtype") or config_dtype_name(raw_config, file_dtypes)
    result["dtype"] = dtype_name
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}[
        dtype_name
    ]
    result["config_transformers_version"] = raw_config.get("transformers_version")
    filter_flash_attn(result)
    make_nested_code_importable(folder, result)
    config = load_config(folder, result)
    if not result["flash_attn"]["installed"]:
        disable_flash_attn_in_config(config)
    cls = model_class(folder, raw_config)
    result["model_class"] = cls.__name__ if cls is not None else None
    result["model_calls_post_init"] = calls_post_init(cls) if cls is not None else None
    timings["config"] = round(time.perf_counter() - t, 3)

    stage(result, "load")
    t = time.perf_counter()
    dtype_kw = "dtype" if version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    kwargs = {"trust_remote_code": True, "output_loading_info": True, "config": config, dtype_kw: torch_dtype}
    if cls is not None and "use_flash_attn" in inspect.signature(cls.__init__).parameters:
        kwargs["use_flash_attn"] = result["flash_attn"]["installed"]
        result["flash_attn"]["use_flash_attn_passed"] = True
    if multi:
        kwargs["device_map"] = "auto"
    from transformers import AutoModel

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):  # model code that builds sub-configs prints too
        model, info = AutoModel.from_pretrained(folder, **kwargs)
    if not multi:
        model = model.to(device)
    model.eval()
    result["generation"] = generation_facts(model)
    result["loading_info"] = {k: sorted(str(x) for x in (v or ())) for k, v in dict(info).items()}
    timings["load"] = round(time.perf_counter() - t, 3)

    stage(result, "dtypes")
    loaded = {name: short_dtype(p.dtype) for name, p in model.state_dict().items()}
    counts: dict = {}
    for d in loaded.values():
        counts[d] = counts.get(d, 0) + 1
    file_float = sorted({d for d in file_dtypes.values() if d in FLOATING})
    mismatches = [
        f"{k}: written {file_dtypes[k]}, loaded {loaded[k]}"
        for k in sorted(file_dtypes)
        if k in loaded and file_dtypes[k] in FLOATING and loaded[k] != file_dtypes[k]
    ]
    result["dtypes"] = {
        "config": dtype_name,
        "file": file_float,
        "loaded": counts,
        "compared": sum(1 for k in file_dtypes if k in loaded),
        "mismatches": mismatches[:10],
        "mismatch_count": len(mismatches),
    }
    result["parameters"] = int(sum(p.numel() for p in model.parameters()))
    if args.get("adapter"):
        model, torch_dtype = apply_adapter(model, args, result, torch_dtype)

    stage(result, "tokenizer")
    t = time.perf_counter()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    unk = getattr(tokenizer, "unk_token_id", None)
    seg_id = None if seg_id is None or (unk is not None and seg_id == unk) else int(seg_id)
    result["tokenizer"] = {
        "class": type(tokenizer).__name__,
        "length": len(tokenizer),
        "seg_token_id": seg_id,
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
    }
    processor = None
    if is_qwen_family(raw_config) and any(
        os.path.isfile(os.path.join(folder, f)) for f in ("preprocessor_config.json", "processor_config.json")
    ):
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            result["processor"] = type(processor).__name__
        except Exception as e:  # the model may not need it; predict_forward will tell
            result["warnings"].append(f"AutoProcessor failed: {type(e).__name__}: {first_line(e)}")
    timings["tokenizer"] = round(time.perf_counter() - t, 3)

    stage(result, "prepare")
    max_new = int(args.get("max_new_tokens") or 32)
    how = cap_generation(model, tokenizer, max_new, torch_dtype)
    if how:
        result["max_new_tokens"] = max_new
        result["generation_cap"] = how
    else:
        result["warnings"].append(
            "model has no preparing_for_generation() and no generate() of its own to cap: "
            "generation length is not capped"
        )
    return Loaded(model, tokenizer, processor, device, torch_dtype, seg_id)


def apply_adapter(model, args: dict, result: dict, torch_dtype):
    """``--format adapter``: the base just loaded, plus the adapter, merged by PEFT's own code.

    ``PeftModel.from_pretrained`` then ``merge_and_unload()`` leaves the model class the base loads as,
    so ``predict_forward`` runs as on a merged folder. The merge runs in the base's dtype and the model
    is then cast to the conversion's ``--dtype`` (``adapter_dtype``), the cast a merged folder gets; an
    explicit ``dtype`` argument (eval's --dtype) keeps the dtype it loaded in."""
    import torch

    stage(result, "adapter")
    t = time.perf_counter()
    import peft
    from peft import PeftModel

    result["versions"]["peft"] = peft.__version__
    with contextlib.redirect_stdout(io.StringIO()):
        wrapped = PeftModel.from_pretrained(model, args["adapter"], is_trainable=False)
        model = wrapped.merge_and_unload()
    target = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(str(args.get("adapter_dtype")))
    if target is not None and not args.get("dtype") and target != torch_dtype:
        model = model.to(target)
        torch_dtype = target
        result["dtype"] = args["adapter_dtype"]
    model.eval()
    result["adapter"] = {"folder": args["adapter"], "base": args["folder"], "cast_to": result["dtype"]}
    result["timings"]["adapter"] = round(time.perf_counter() - t, 3)
    return model, torch_dtype


def cap_generation(model, tokenizer, max_new: int, torch_dtype=None) -> str:
    """Cap the answer at ``max_new`` tokens, the way the model's code allows; returns how (empty: no way).

    Upstream's InternVL class offers ``preparing_for_generation(tokenizer, max_new_tokens)``. Its Qwen-VL
    classes have none and call ``self.model.generate(**inputs, max_new_tokens=2048, ...)`` with the number
    written into ``predict_forward`` (projects/sa2va/hf/models_qwen2_5_vl/modeling_sa2va_qwen.py lines
    214-220, bytedance/Sa2VA 9832e1a): on a CPU 2048 tokens of a real model take hours, so the round trip
    would time out. There the sub-model's ``generate`` is wrapped (on this instance only) to lower a larger
    ``max_new_tokens`` to the cap."""
    if hasattr(model, "preparing_for_generation"):
        params = inspect.signature(model.preparing_for_generation).parameters
        extra = {"torch_dtype": torch_dtype} if "torch_dtype" in params and torch_dtype is not None else {}
        with contextlib.redirect_stdout(io.StringIO()):
            model.preparing_for_generation(tokenizer, max_new_tokens=max_new, **extra)
        return "preparing_for_generation"
    wrapped = []
    for name in ("model", "language_model"):
        sub = getattr(model, name, None)
        generate = getattr(sub, "generate", None)
        if sub is not None and callable(generate):
            generate = getattr(generate, "uncapped", generate)  # capped again: replace the earlier cap
            sub.generate = _capped(generate, max_new)
            wrapped.append(f"{name}.generate")
    return " and ".join(f"{w}(max_new_tokens<={max_new})" for w in wrapped)


def _capped(generate, max_new: int):
    def capped_generate(*args, **kwargs):
        asked = kwargs.get("max_new_tokens")
        if asked is None or asked > max_new:
            kwargs["max_new_tokens"] = max_new
        return generate(*args, **kwargs)

    setattr(capped_generate, "uncapped", generate)  # noqa: B010 - read back by cap_generation to re-cap
    return capped_generate


def run_predict(args: dict, result: dict) -> None:
    """``sa2va-convert predict``: the user's image and prompt, masks and overlay saved as PNG."""
    stage(result, "image")  # before the (slow) load: a bad image fails at once
    image = load_rgb(args["image"])
    m = load_model(args, result)
    prompt = args.get("prompt") or "<image>Please segment the object."
    stage(result, "predict")
    run_ = call_predict(m.model, m.tokenizer, m.processor, image=image, text=prompt)
    masks = run_.pop("_masks")
    run_["name"] = "image"
    result["runs"].append(run_)
    result["timings"]["predict"] = run_["seconds"]
    stage(result, "save")
    result["saved"] = save_masks(masks, image, args.get("mask_path"), args.get("overlay_path"))


def run_roundtrip(args: dict, result: dict) -> None:
    """The conversion's round trip: the model's own answer on an image and a video, and, when
    that answer has no [SEG], a second image run with [SEG] forced through generation so the
    mask path (text_hidden_fcs -> SAM2 -> masks) runs for real either way."""
    m = load_model(args, result)
    timings = result["timings"]
    prompt = args.get("prompt") or "<image>Please segment the object."
    stage(result, "predict_image")
    run_ = call_predict(m.model, m.tokenizer, m.processor, image=synthetic_frame(), text=prompt)
    run_.pop("_masks")
    run_["name"] = "image"
    result["runs"].append(run_)
    timings["predict_image"] = run_["seconds"]
    if not run_.get("seg_count") and args.get("force_seg", True):
        stage(result, "predict_forced")
        if m.seg_id is None:
            raise StageError("the tokenizer has no [SEG] token: cannot force one")
        stop = result["tokenizer"].get("eos_token_id")
        with forced_tokens(m.model, [m.seg_id] + ([int(stop)] if stop is not None else [])):
            forced = call_predict(m.model, m.tokenizer, m.processor, image=synthetic_frame(), text=prompt)
        forced.pop("_masks")
        forced["name"] = "image, [SEG] forced"
        forced["forced"] = True
        result["runs"].append(forced)
        timings["predict_forced"] = forced["seconds"]
    if args.get("video", True):
        if "video" in inspect.signature(m.model.predict_forward).parameters:
            stage(result, "predict_video")
            run_ = call_predict(
                m.model,
                m.tokenizer,
                m.processor,
                video=[synthetic_frame(shift=0), synthetic_frame(shift=6)],
                text=prompt,
            )
            run_.pop("_masks")
            run_["name"] = "video"
            result["runs"].append(run_)
            timings["predict_video"] = run_["seconds"]
        else:
            result["warnings"].append("predict_forward takes no video=: video not checked")


MODES = {"roundtrip": run_roundtrip, "predict": run_predict}


# ---------------------------------------------------------------- eval (sa2va-convert eval)


def load_rgb(path: str):
    """The image as 8-bit RGB, as the model's processor expects. PIL's own conversion of a 16-bit
    or float image (mode I;16, I, F: microscopy, medical and depth scans) clips every value above
    255, so such an image reached the model nearly all white; it is windowed instead to its own
    minimum..maximum, per image, so the model sees its full contrast (a constant image is black).
    Absolute intensities are not comparable across images after this: each is stretched alone."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I", "F") or im.mode.startswith("I;"):
            arr = np.asarray(im).astype(np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
            return Image.fromarray(np.round(scaled).astype(np.uint8), "L").convert("RGB")
        return im.convert("RGB")


def save_png_atomic(array, path: str, mode: str) -> None:
    """Write a PNG under a temporary name, then rename: a crash never leaves a half-written mask."""
    from PIL import Image

    tmp = f"{path}.tmp{os.getpid()}"
    Image.fromarray(array, mode).save(tmp, format="PNG")
    os.replace(tmp, path)


def _mask_union(masks: list, h: int, w: int):
    """The union of an answer's masks as one bool (H, W) frame: what eval scores for an answer."""
    import numpy as np

    union = np.zeros((h, w), dtype=bool)
    for i, mask in enumerate(masks):
        frame = mask_frame(mask)
        if frame.shape != (h, w):
            raise StageError(f"mask {i} of the model is {list(frame.shape)}, the image is {h}x{w} (H x W)")
        union |= frame
    return union


def eval_one(m: Loaded, item: dict, args: dict, forced_ids: list | None = None) -> dict:
    """One image: the model's own predict_forward and the union of its masks saved as PNG. An
    answer without [SEG] is an empty prediction: saved as an all-black PNG. Nothing is scored here:
    the parent counts the saved PNG against the ground truth (``evaluate/metrics.py``), so every
    score has one rule, and a resumed run scores what lies on disk.

    With ``item["forced_path"]`` (``eval --force-seg``) the image also gets a mask with [SEG]
    forced, saved there: when the free answer has a [SEG], that answer's mask is the forced one
    (forcing would make the same choice the model made), so it is saved again and not predicted
    twice; otherwise the image runs once more with ``forced_ids`` ([SEG], then the end token)
    imposed on generation, as the round trip forces it (``run_roundtrip``). ``item["save_free"]``
    false (a resumed run that has the free row already and lacks the forced one) still runs the
    free answer, to know whether forcing is needed, but does not overwrite the scored free PNG."""
    import numpy as np

    image = load_rgb(item["image"])
    run_ = call_predict(m.model, m.tokenizer, m.processor, image=image, text=item["prompt"])
    masks = run_.pop("_masks")
    w, h = image.size
    union = _mask_union(masks, h, w)
    save_free = item.get("save_free", True)
    if save_free:
        save_png_atomic(union.astype(np.uint8) * 255, item["pred_path"], "L")
    if save_free and item.get("overlay_path"):
        out = np.asarray(image).astype(np.float32)
        out[union] = 0.45 * out[union] + 0.55 * np.array(PALETTE[0], dtype=np.float32)
        save_png_atomic(out.clip(0, 255).astype(np.uint8), item["overlay_path"], "RGB")
    row = {
        "seg_count": run_["seg_count"] or 0,
        "n_masks": len(masks),
        "prediction": run_["prediction"][:500],
        "height": h,
        "width": w,
        "seconds": run_["seconds"],
        "free_saved": bool(save_free),
    }
    if item.get("forced_path"):
        if run_["seg_count"]:
            forced = {**{k: row[k] for k in ("seg_count", "n_masks", "prediction", "seconds")}, "forced": "reused"}
            forced_union = union
        else:
            if forced_ids is None:
                raise StageError("the tokenizer has no [SEG] token: cannot force one")
            with forced_tokens(m.model, forced_ids):
                f = call_predict(m.model, m.tokenizer, m.processor, image=image, text=item["prompt"])
            forced_masks = f.pop("_masks")
            forced_union = _mask_union(forced_masks, h, w)
            forced = {
                "seg_count": f["seg_count"] or 0,
                "n_masks": len(forced_masks),
                "prediction": f["prediction"][:500],
                "seconds": f["seconds"],
                "forced": "forced",
            }
        save_png_atomic(forced_union.astype(np.uint8) * 255, item["forced_path"], "L")
        row["forced_row"] = forced
    return row


def _select_device(args: dict) -> None:
    """``cuda:N``: the model's own ``.cuda()`` calls go to that GPU."""
    device = args.get("device") or "auto"
    if device.startswith("cuda:"):
        import torch

        if torch.cuda.is_available() and int(device.split(":", 1)[1]) < torch.cuda.device_count():
            torch.cuda.set_device(int(device.split(":", 1)[1]))


def run_eval(args: dict, result: dict) -> None:
    """``sa2va-convert eval``: the model loaded once, then every item of ``args["items"]`` (a JSONL
    file: stem, image, prompt, pred_path, overlay_path), one JSON line per image appended
    to ``args["results"]`` and flushed, so an interrupted run keeps what it finished. A failing
    image is a line with its error; the loop goes on."""
    _select_device(args)
    m = load_model(args, result)
    eval_items(m, args["items"], args["results"], result)


def eval_items(m: Loaded, items_path: str, results_path: str, result: dict) -> None:
    """The per-image loop of ``run_eval`` (and of each adapter of ``run_eval_adapters``)."""
    import torch

    on_cuda = str(m.device).startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    with open(items_path, encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    forced_ids = None
    if any(item.get("forced_path") for item in items):
        stage(result, "force_seg")
        if m.seg_id is None:  # before any image: every forced mask would fail the same way
            raise StageError("the tokenizer has no [SEG] token: --force-seg cannot force one")
        stop = result["tokenizer"].get("eos_token_id")
        forced_ids = [m.seg_id] + ([int(stop)] if stop is not None else [])
    done = failed = 0
    started = time.perf_counter()
    with open(results_path, "a", encoding="utf-8") as out:
        for n, item in enumerate(items, 1):
            stage(result, f"evaluating image {n}/{len(items)}")
            # the question asked is echoed: a resumed run keeps a line only for the same question
            row = {"stem": item["stem"], "prompt": item["prompt"], "forced_asked": bool(item.get("forced_path"))}
            row["free_saved"] = item.get("save_free", True)
            try:
                row.update(eval_one(m, item, {}, forced_ids), status="ok")
                done += 1
            except Exception as e:  # the image is a recorded failure; the others still run
                row.update(status="failed", error=f"{type(e).__name__}: {first_line(e) or type(e).__name__}")
                failed += 1
            out.write(json.dumps(row) + "\n")
            out.flush()
    result["eval"] = {"images": done, "failed": failed, "seconds": round(time.perf_counter() - started, 3)}
    if on_cuda:
        result["cuda_memory"] = {"max_allocated_bytes": int(torch.cuda.max_memory_allocated())}
    stage(result, "done")


# ---------------------------------------------------------------- eval over adapters: the base loaded once


class BaseKeeper:
    """CPU copies of the base tensors the adapters change, to put the base back exactly between adapters.

    A tensor is copied the first time an adapter's PEFT wrapping reaches its module (a LoRA layer's base
    layer, a saved module's original), after ``PeftModel.from_pretrained`` has wrapped the model and
    before ``merge_and_unload`` changes any value: at that moment it still holds the base's own bytes
    (an earlier adapter either never touched it or had it restored). The copies are taken in the
    tensors' own dtype, and restoring copies them back by name, so the base is bit-exact again; PEFT's
    ``unmerge`` (subtracting the delta again) is not used, as it does not give the same bits back in
    bf16. Only PEFT's LoRA layers and ``modules_to_save`` wrappers are known; anything else PEFT wraps
    makes the base unrestorable (StageError), and the parent evaluates the rest one process each."""

    def __init__(self) -> None:
        self.saved: dict[str, Any] = {}
        self.broken = False

    def keep_touched(self, wrapped, names: dict) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

        for module in wrapped.modules():
            if isinstance(module, ModulesToSaveWrapper):
                base = module.original_module
            elif isinstance(module, BaseTunerLayer):
                base = module.get_base_layer()
            elif isinstance(module, AuxiliaryTrainingWrapper):
                raise StageError(f"PEFT wraps a module as {type(module).__name__}: the base cannot be restored")
            else:
                continue
            name = names.get(id(base))
            if name is None:
                raise StageError("an adapter changes a module the base model does not name: cannot restore it")
            for key, tensor in base.state_dict().items():
                full = f"{name}.{key}" if name else key
                if full not in self.saved:
                    self.saved[full] = tensor.detach().to("cpu", copy=True)

    def restore(self, model) -> None:
        import torch

        if self.broken:
            raise StageError("PEFT failed part way through wrapping the base")
        current = model.state_dict()
        with torch.no_grad():
            for name, kept in self.saved.items():
                target = current.get(name)
                if target is None or target.shape != kept.shape or target.dtype != kept.dtype:
                    raise StageError(f"{name} is not the base's tensor any more: cannot restore the base")
                target.copy_(kept)

    @property
    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.saved.values()))


def swap_adapter(m: Loaded, spec: dict, args: dict, result: dict, keeper: BaseKeeper) -> None:
    """``apply_adapter`` on the already loaded base, the base's changed tensors kept first. The merge and
    the model it leaves are PEFT's ``merge_and_unload``, as in ``apply_adapter``; its cast is refused here
    (the parent groups only adapters whose cast keeps the loaded dtype: a whole-model cast cannot be
    undone bit for bit without a second copy of the model)."""
    import torch

    stage(result, "adapter")
    t = time.perf_counter()
    import peft
    from peft import PeftModel

    result["versions"]["peft"] = peft.__version__
    target = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(str(spec.get("adapter_dtype")))
    if target is not None and not args.get("dtype") and target != m.torch_dtype:
        raise StageError("the adapter's cast changes the model's dtype: it needs a process of its own")
    read_adapter_files(spec["adapter"])  # a broken adapter fails here, before PEFT touches the base
    names = {id(module): name for name, module in m.model.named_modules()}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            wrapped = PeftModel.from_pretrained(m.model, spec["adapter"], is_trainable=False)
            keeper.keep_touched(wrapped, names)
            m.model = wrapped.merge_and_unload()
    except BaseException:
        keeper.broken = True  # PEFT may have wrapped part of the base: it is not the base any more
        raise
    m.model.eval()
    result["adapter"] = {"folder": spec["adapter"], "base": args["folder"], "cast_to": result["dtype"]}
    result["timings"]["adapter"] = round(time.perf_counter() - t, 3)


def read_adapter_files(folder: str) -> None:
    """PEFT's two files, read whole (config as JSON, every tensor of the weights): what PEFT would
    fail on after it has started to wrap the base."""
    from safetensors import safe_open

    read_json(os.path.join(folder, "adapter_config.json"))
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            f.get_tensor(key)


def run_eval_adapters(args: dict, result: dict) -> None:
    """``sa2va-convert eval`` over adapters of one base: the base loaded once, then per adapter
    (``args["adapters"]``: adapter, adapter_dtype, items, results, report) the adapter merged as
    ``apply_adapter`` merges it, that adapter's images evaluated as ``run_eval`` does, and the base put
    back exactly (``BaseKeeper``). Each adapter's own report (this process's report with that adapter's
    stage, timings and error) is written to its ``report`` file when it is done, so a failing adapter fails
    alone and a crash loses only the adapter it was on. After a failure the base may not be the base any
    more (PEFT may have wrapped part of it): the remaining adapters are then left to the parent."""
    _select_device(args)
    m = load_model(args, result)
    result["base_loads"] = 1
    loaded = json.loads(json.dumps(result, default=str))  # the base's loading facts, shared by every adapter
    keeper = BaseKeeper()
    restorable = True
    done = []
    for k, spec in enumerate(args["adapters"], 1):
        if not restorable:
            break
        own = json.loads(json.dumps(loaded))
        own.update(ok=False, error=None, adapter_index=k, adapters_in_process=len(args["adapters"]))
        own["timings"] = {k_: v for k_, v in loaded["timings"].items() if k_ != "total"}
        started = time.perf_counter()
        try:
            swap_adapter(m, spec, args, own, keeper)
            stage(own, "prepare")
            cap_generation(m.model, m.tokenizer, int(args.get("max_new_tokens") or 32), m.torch_dtype)
            eval_items(m, spec["items"], spec["results"], own)
            own["ok"] = True
        except Exception as e:  # this adapter's failure, reported as its own process would report it
            own["error"] = error_record(e, own)
        try:
            keeper.restore(m.model)
        except Exception as e:  # noqa: BLE001 - the base is not the base: nothing more runs on it
            restorable = False
            own["warnings"].append(f"the base could not be restored after this adapter ({first_line(e)})")
        own["timings"]["total"] = round(time.perf_counter() - started, 3)
        own["kept_bytes"] = keeper.nbytes
        write_json_atomic(spec["report"], own)
        done.append(k)
    result["adapters_done"] = done
    result["kept_bytes"] = keeper.nbytes
    stage(result, "done")


def error_record(e: BaseException, result: dict) -> dict:
    """The ``error`` field of a report, as ``main`` writes it."""
    return {
        "stage": result["stage"],
        "type": type(e).__name__,
        "message": first_line(e) or type(e).__name__,
        "own": isinstance(e, StageError),
        "traceback": traceback.format_exc()[-6000:],
        "chain": error_chain(e),
    }


def write_json_atomic(path: str, value: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(value, default=str) + "\n")
    os.replace(tmp, path)


MODES["eval_adapters"] = run_eval_adapters


MODES["eval"] = run_eval


# ---------------------------------------------------------------- video eval (sa2va-convert eval on clips)


class LazyFrames:
    """A clip's frames as the sequence ``predict_forward(video=...)`` takes (indexing, ``len``,
    iteration), each frame decoded from its file when the model asks for it and not kept: this
    process holds no decoded frame of its own, so its memory does not grow with the clip (what the
    model's code keeps while it runs is the model's)."""

    def __init__(self, paths: list) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return LazyFrames(self.paths[index])
        return load_rgb(self.paths[index])

    def __iter__(self):
        for p in self.paths:
            yield load_rgb(p)


def eval_video_one(m: Loaded, item: dict) -> dict:
    """One expression of one clip: every frame to the model's own predict_forward (as upstream's
    sa2va_eval_ref_vos.py does), and the masks of the answer's FIRST [SEG] saved as one PNG per frame
    (upstream takes ``prediction_masks[0]``, sa2va_eval_ref_vos.py lines 195-198; an answer without
    [SEG] is all-empty frames). Nothing is scored here."""
    import numpy as np

    frames = LazyFrames(item["frames"])
    run_ = call_predict(m.model, m.tokenizer, m.processor, video=frames, text=item["prompt"])
    masks = run_.pop("_masks")
    w, h = run_["input_size"]
    n = len(frames)
    first = None
    if masks:
        first = as_numpy(masks[0])
        if first.ndim == 2:
            first = first[None]
        if tuple(first.shape) != (n, h, w):
            raise StageError(f"the model's mask is {list(first.shape)}, the clip is {n} frames of {h}x{w} (H x W)")
    os.makedirs(item["pred_dir"], exist_ok=True)
    empty = np.zeros((h, w), dtype=np.uint8)
    for i, path in enumerate(item["frames"]):
        frame = empty if first is None else (first[i] > 0).astype(np.uint8) * 255
        stem = os.path.splitext(os.path.basename(path))[0]
        save_png_atomic(frame, os.path.join(item["pred_dir"], f"{stem}.png"), "L")
    return {
        "seg_count": run_["seg_count"] or 0,
        "n_masks": len(masks),
        "prediction": run_["prediction"][:500],
        "n_frames": n,
        "height": h,
        "width": w,
        "seconds": run_["seconds"],
    }


def run_eval_video(args: dict, result: dict) -> None:
    """``sa2va-convert eval`` on video: as ``run_eval``, one item (an expression of a clip: key,
    frames, prompt, pred_dir) per line, one result line per item, flushed."""
    m = load_model(args, result)
    with open(args["items"], encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    done = failed = frames = 0
    started = time.perf_counter()
    with open(args["results"], "a", encoding="utf-8") as out:
        for n, item in enumerate(items, 1):
            stage(result, f"evaluating expression {n}/{len(items)}")
            row = {"key": item["key"]}
            try:
                row.update(eval_video_one(m, item), status="ok")
                done += 1
                frames += row["n_frames"]
            except Exception as e:  # the expression is a recorded failure; the others still run
                row.update(status="failed", error=f"{type(e).__name__}: {first_line(e) or type(e).__name__}")
                failed += 1
            out.write(json.dumps(row) + "\n")
            out.flush()
    result["eval"] = {
        "expressions": done,
        "failed": failed,
        "frames": frames,
        "seconds": round(time.perf_counter() - started, 3),
    }
    stage(result, "done")


def run_predict_video(args: dict, result: dict) -> None:
    """``sa2va-convert predict`` on a clip: ``args["frames"]`` (paths, in order) to predict_forward,
    one PNG per frame under ``args["mask_dir"]`` (the first [SEG]'s masks) and, with
    ``args["overlay_path"]``, the masks tinted over the frames as an animated GIF."""
    import numpy as np
    from PIL import Image

    m = load_model(args, result)
    stage(result, "predict")
    item = {"frames": args["frames"], "prompt": args["prompt"], "pred_dir": args["mask_dir"]}
    row = eval_video_one(m, item)
    result["runs"].append({"name": "video", **row})
    result["timings"]["predict"] = row["seconds"]
    overlay = args.get("overlay_path")
    if overlay:
        stage(result, "overlay")
        colour = np.array(PALETTE[0], dtype=np.float32)
        pictures = []
        for path in args["frames"]:  # a GIF's frames: small (palette) images, kept until the file is written
            stem = os.path.splitext(os.path.basename(path))[0]
            rgb = np.asarray(load_rgb(path)).astype(np.float32)
            with Image.open(os.path.join(args["mask_dir"], f"{stem}.png")) as im:
                mask = np.asarray(im) > 0
            rgb[mask] = 0.45 * rgb[mask] + 0.55 * colour
            pictures.append(Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").quantize(colors=128))
        tmp = f"{overlay}.tmp{os.getpid()}"
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=100, loop=0)
        os.replace(tmp, overlay)
    result["saved"] = {"mask_dir": args["mask_dir"], "overlay": overlay, "n_frames": row["n_frames"]}


MODES["eval_video"] = run_eval_video
MODES["predict_video"] = run_predict_video


def prewarm(warm: dict, result: dict) -> None:
    """What a child started before its folder exists does while it waits: import torch, transformers,
    numpy and PIL (and the Auto classes' modules), and start the GPU unless the device is ``cpu``.

    Only what ``load_model`` would do first anyway, with no folder and no remote code involved, so
    the run that follows behaves exactly as in a child started then; a failure here is ignored and
    met again, at its own stage and with its own message, in ``load_model``.
    """
    t0 = time.perf_counter()
    try:
        import numpy  # noqa: F401
        import PIL  # noqa: F401
        import torch
        import transformers  # noqa: F401
        from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: F401  (lazy: their modules now)

        device = str(warm.get("device") or "auto")
        if device != "cpu" and torch.cuda.is_available():
            torch.zeros(1, device=device if device.startswith("cuda:") else "cuda")
    except Exception:  # noqa: BLE001, S110 - met again in load_model, where it is reported
        pass
    result["timings"]["prewarm"] = round(time.perf_counter() - t0, 3)


def run(args: dict, result: dict) -> None:
    mode = MODES.get(args.get("mode", ""))  # a missing mode is an unknown one
    if mode is None:
        raise StageError(f"unknown mode {args.get('mode')!r}")
    mode(args, result)


def main(argv: list) -> int:
    result: dict[str, Any] = {
        "ok": False,
        "mode": None,
        "stage": "start",
        "device": None,
        "dtype": None,
        "versions": {"python": sys.version.split()[0], "executable": sys.executable},
        "timings": {},
        "runs": [],
        "warnings": [],
        "error": None,
    }
    # Keep stdout for the one JSON line: anything else printed (by C code too) goes to stderr.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    started = time.perf_counter()
    try:
        result["packages"] = package_versions()
        if argv[1:2] == ["-"]:  # started before its folder was written (runner.process.StartedChild)
            prewarm(json.loads(argv[2]) if len(argv) > 2 else {}, result)
            line = sys.stdin.readline()
            if not line.strip():  # stdin closed with no folder: the conversion failed or was stopped
                return 0
            started = time.perf_counter()  # the run's own time counts from here, as for a child started now
            args = json.loads(line)
        else:
            args = json.loads(argv[1])
        result["mode"] = args.get("mode")
        run(args, result)
        result["ok"] = True
    except BaseException as e:  # report everything, KeyboardInterrupt included, as data
        result["error"] = error_record(e, result)
    result["timings"]["total"] = round(time.perf_counter() - started, 3)
    sys.stdout.flush()
    out.write(json.dumps(result, default=str) + "\n")
    out.flush()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
