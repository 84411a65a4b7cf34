"""A folder's remote code, read as text: which files load, what they import, and where each import resolves.

Nothing here imports the code. The base folder's ``*.py`` files are copied into every output and
run by whoever loads it (``trust_remote_code=True``), so before any work the converter checks that
the code is self-contained: every import resolves to the standard library, an installed package,
or a file beside it. Upstream's SAM3 code at one revision imports ``third_parts.sam3`` and
``projects.sa2va...`` (``docs/FAMILIES.md``), which exist only inside a Sa2VA checkout: a folder
made from it loads nowhere else, so it is refused (exit 3) unless the user says they know.

The rules mirror what transformers itself does when it loads remote code
(``transformers.dynamic_module_utils``): the files that load are the ``auto_map`` modules of
``config.json`` and ``tokenizer_config.json`` and every file they import relatively (we follow
those imports to any depth; transformers copies only one level, see ``runner/child.py``); an
import inside a ``try`` block, or under ``if is_..._available()``, is optional; every other
import, at any depth in the file, must resolve or transformers refuses to load the file.
"""

from __future__ import annotations

import ast
import importlib.machinery
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

# Import names of the packages that Sa2VA-family remote code is known to import, with the pip
# requirement that provides each. A missing one is an environment problem (install it), not a
# folder problem; an import that is none of these, not installed and not a file beside the code
# looks like code that exists only in a source checkout.
KNOWN_PACKAGES: dict[str, str] = {
    "torch": "torch",
    "torchvision": "torchvision",
    "transformers": "transformers",
    "timm": "timm",
    "einops": "einops",
    "peft": "peft",
    "numpy": "numpy",
    "PIL": "pillow",
    "flash_attn": "flash-attn",
    "qwen_vl_utils": "qwen-vl-utils",
    "sentencepiece": "sentencepiece",
    "accelerate": "accelerate",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface_hub",
    "tokenizers": "tokenizers",
    "tqdm": "tqdm",
    "packaging": "packaging",
    "cv2": "opencv-python",
    "decord": "decord",
    "regex": "regex",
    "scipy": "scipy",
    "pycocotools": "pycocotools",
    "mmengine": "mmengine",
    "xtuner": "xtuner",
    "deepspeed": "deepspeed",
    "iopath": "iopath",
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "av": "av",
    "requests": "requests",
    "yaml": "pyyaml",
    "triton": "triton",
    "google": "protobuf",
}
# Imports the round trip's child works round itself (flash_attn: filtered out of transformers'
# import check, and use_flash_attn=False passed; the code falls back without it): never missing.
WORKED_AROUND = frozenset({"flash_attn"})


# What `pip install 'sa2va-convert[verify]'` adds (pyproject.toml): a hint can point there.
VERIFY_EXTRA = frozenset({"torchvision", "timm", "qwen-vl-utils"})


def pip_name(module: str) -> str:
    """The pip requirement for a top-level import name (the name itself when unknown)."""
    return KNOWN_PACKAGES.get(module, module)


def install_hint(requirements: list[str]) -> str:
    """How to install these pip requirements: the verify extra when it has them all."""
    if requirements and set(requirements) <= VERIFY_EXTRA:
        return "pip install 'sa2va-convert[verify]' with your torch pinned (e.g. torch==<yours>)"
    return "pip install " + " ".join(sorted(requirements))


@dataclass(frozen=True)
class ImportRef:
    """One import statement of a remote-code file."""

    file: str  # file name inside the folder
    line: int
    module: str  # top-level module name; for a relative import, the sibling module's dotted path
    relative: bool
    optional: bool  # inside a try block or an ``if is_..._available()`` block: may fail


def _optional_if(node: ast.If) -> bool:
    return any(
        isinstance(n, ast.Call) and (getattr(n.func, "id", "") or getattr(n.func, "attr", "")).endswith("_available")
        for n in ast.walk(node.test)
    )


def scan_imports(path: Path) -> list[ImportRef]:
    """Every import of one file, with its line, whether it is relative and whether it is optional.

    Raises InputError for a file that is not valid Python (the folder's code would not load)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise InputError(
            f"remote-code file is not valid Python (line {e.lineno}: {e.msg})",
            path=path,
            hint="copy it again from the original Sa2VA folder",
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(
            f"remote-code file cannot be read ({e})", path=path, hint="copy it again from the original Sa2VA folder"
        ) from None
    refs: list[ImportRef] = []

    def visit(node: ast.AST, optional: bool) -> None:
        if isinstance(node, ast.Try):
            optional = True
        elif isinstance(node, ast.If) and _optional_if(node):
            optional = True
        elif isinstance(node, ast.Import):
            for alias in node.names:
                refs.append(ImportRef(path.name, node.lineno, alias.name.split(".")[0], False, optional))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                refs.append(ImportRef(path.name, node.lineno, node.module.split(".")[0], False, optional))
            elif node.level == 1 and node.module:
                refs.append(ImportRef(path.name, node.lineno, node.module, True, optional))
            elif node.level == 1:  # from . import sibling
                refs.extend(ImportRef(path.name, node.lineno, a.name, True, optional) for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, optional)

    visit(tree, False)
    return refs


def entry_modules(folder: Path, config: dict) -> list[tuple[str, str]]:
    """(file, named by) for the modules the auto_map entries of config.json and tokenizer_config.json name."""
    entries: list[tuple[str, str]] = []
    for cls, ref in (config.get("auto_map") or {}).items():
        entries.append((str(ref).split("--")[-1].split(".")[0] + ".py", f"config.json auto_map.{cls}"))
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file():
        try:
            amap = json.loads(tok_cfg.read_text(encoding="utf-8")).get("auto_map") or {}
        except (OSError, json.JSONDecodeError, AttributeError):
            amap = {}
        for cls, refs in amap.items():
            for ref in refs if isinstance(refs, list) else [refs]:
                if ref:
                    entries.append(
                        (str(ref).split("--")[-1].split(".")[0] + ".py", f"tokenizer_config.json auto_map.{cls}")
                    )
    return entries


@dataclass
class RemoteCode:
    """The files that load (file -> what needs it) and their imports."""

    folder: Path
    files: dict[str, str]
    missing: list[tuple[str, str]]  # (file, needed by): named by auto_map or imported, not in the folder
    imports: list[ImportRef]

    def nested(self) -> list[str]:
        """Files more than one import away from an auto_map module: plain transformers does not copy
        them into its module cache when it loads a local folder (``runner/child.py`` makes them load)."""
        entries = {f for f, by in self.files.items() if not by.endswith(".py")}
        return sorted(f for f, by in self.files.items() if by.endswith(".py") and by not in entries)

    def absolute_imports(self) -> list[ImportRef]:
        """Required (non-optional) absolute imports, the first place each module is imported."""
        first: dict[str, ImportRef] = {}
        for ref in self.imports:
            if not ref.relative and not ref.optional and ref.module not in first:
                first[ref.module] = ref
        return list(first.values())


def read_remote_code(folder: str | Path, config: dict | None = None) -> RemoteCode:
    """Follow the auto_map modules and their relative imports, to any depth.

    A file reached only through optional imports (``try: from .flash_attention import ...``) may
    fail to import without harm, so its own imports count as optional too."""
    folder = Path(folder)
    if config is None:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    todo: list[tuple[str, str, bool]] = [(f, by, True) for f, by in entry_modules(folder, config)]
    files: dict[str, str] = {}
    required: dict[str, bool] = {}
    scanned: dict[str, list[ImportRef]] = {}
    missing: list[tuple[str, str]] = []
    while todo:
        fname, by, needed = todo.pop(0)
        if fname in files and (required[fname] or not needed):
            continue
        path = folder / fname
        if not path.is_file():
            if all(m != fname for m, _ in missing):
                missing.append((fname, by))
            continue
        files.setdefault(fname, by)
        required[fname] = required.get(fname, False) or needed
        if fname not in scanned:
            scanned[fname] = scan_imports(path)
        todo.extend(
            (r.module.replace(".", "/") + ".py", fname, needed and not r.optional) for r in scanned[fname] if r.relative
        )
    imports = [
        r if required[f] else ImportRef(r.file, r.line, r.module, r.relative, True) for f in files for r in scanned[f]
    ]
    return RemoteCode(folder=folder, files=files, missing=missing, imports=imports)


# ---------------------------------------------------------------- where does an import resolve?

_PROBE = (
    "import importlib.util, json, sys\n"
    "names = json.loads(sys.argv[1])\n"
    "std = getattr(sys, 'stdlib_module_names', ())\n"
    "sys.path[:] = [p for p in sys.path if p not in ('', '.')]\n"
    "print(json.dumps({n: n in std or n in sys.builtin_module_names or "
    "importlib.util.find_spec(n) is not None for n in names}))\n"
)


def resolvable(names: list[str], python: str | None = None) -> dict[str, bool]:
    """{top-level module: found} in ``python`` (default: this interpreter), without importing any of them.

    Only top-level names are looked up (a dotted lookup would import the parent package), and the
    current directory does not count: the model is loaded from anywhere, not from where the
    command happened to run."""
    names = sorted(set(names))
    if not names:
        return {}
    if python is None or os.path.realpath(python) == os.path.realpath(sys.executable):
        std = set(getattr(sys, "stdlib_module_names", ())) | set(sys.builtin_module_names)
        path = [p for p in sys.path if p not in ("", ".", os.getcwd())]
        return {n: n in std or importlib.machinery.PathFinder.find_spec(n, path) is not None for n in names}
    try:
        out = subprocess.run(
            [python, "-c", _PROBE, json.dumps(names)],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            cwd=os.path.dirname(os.path.abspath(python)) or None,
        )
        found = json.loads(out.stdout.strip().splitlines()[-1])
        return {n: bool(found.get(n)) for n in names}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}  # the interpreter could not answer: the round trip will say what is wrong


@dataclass
class ImportCheck:
    """What does not resolve: code that exists nowhere, and known packages missing from the interpreter."""

    code: RemoteCode
    nowhere: list[ImportRef]
    missing_packages: list[ImportRef]

    def to_dict(self) -> dict:
        return {
            "files": sorted(self.code.files),
            "nested": self.code.nested(),
            "unresolved": [f"{r.file}:{r.line}: {r.module}" for r in self.nowhere],
            "missing_packages": sorted({pip_name(r.module) for r in self.missing_packages}),
        }


def check_imports(folder: str | Path, config: dict | None = None, *, python: str | None = None) -> ImportCheck:
    """Read the folder's remote code and sort every import that does not resolve (nothing raised)."""
    code = read_remote_code(folder, config)
    absolute = [r for r in code.absolute_imports() if r.module not in WORKED_AROUND]
    found = resolvable([r.module for r in absolute], python)
    unresolved = [r for r in absolute if not found.get(r.module, True)]
    return ImportCheck(
        code=code,
        nowhere=[r for r in unresolved if r.module not in KNOWN_PACKAGES],
        missing_packages=[r for r in unresolved if r.module in KNOWN_PACKAGES],
    )


def require_self_contained(check: ImportCheck, *, python_label: str, allow: bool = False) -> None:
    """Refuse (InputError, exit 3) code that imports a file the folder lacks or a module that exists nowhere."""
    for fname, by in check.code.missing:
        raise InputError(
            f"remote-code file {fname} is missing (needed by {by})",
            path=check.code.folder / fname,
            hint="use the complete Sa2VA folder (every .py file of the release)",
        )
    if check.nowhere and not allow:
        r = check.nowhere[0]
        more = f" (and {len(check.nowhere) - 1} more)" if len(check.nowhere) > 1 else ""
        raise InputError(
            f"remote code line {r.line} imports {r.module!r}, which is not the standard library, not installed in "
            f"{python_label} and not a file beside it{more}: the converted folder would fail to load wherever "
            f"{r.module!r} does not exist (code like this usually needs a source checkout, e.g. the Sa2VA repository)",
            path=check.code.folder / r.file,
            hint=f"use a self-contained Sa2VA folder; if {r.module!r} is a package, install it; "
            "--allow-unresolved-imports converts anyway",
        )


__all__ = [
    "KNOWN_PACKAGES",
    "VERIFY_EXTRA",
    "WORKED_AROUND",
    "pip_name",
    "install_hint",
    "ImportRef",
    "scan_imports",
    "entry_modules",
    "RemoteCode",
    "read_remote_code",
    "resolvable",
    "ImportCheck",
    "check_imports",
    "require_self_contained",
]
