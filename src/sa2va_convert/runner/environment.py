"""Why a model process failed because of where it ran, not because of the folder (exit 9, not 7).

The round trip, ``predict`` and ``eval`` run the folder's own remote code in a child process
(``child.py``), which reports facts: the installed versions of the packages that matter (read from
their metadata, nothing imported), the ``transformers_version`` in ``config.json``, whether the
model class calls ``post_init()``, whether its language model can generate, and the exception chain.
This module reads those facts and names the environment problems Sa2VA users hit (FORMATS.md §9):

- a torchvision built for another torch ("operator torchvision::nms does not exist");
- transformers 5 and remote code that never calls ``post_init()`` (upstream's, all families);
- transformers 4.50+ and an InternLM2-style language model whose ``GenerationMixin`` comes only
  through its ``...PreTrainedModel`` base (upstream's Sa2VA-8B / 26B code);
- a package the code imports that is not installed; a transformers too old for the code.

Each becomes one :class:`VerifyEnvironmentError` naming the component, the versions and the fix.
Anything else is left to the caller (a failure of the folder or of its code: exit 7).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import VerifyEnvironmentError
from ..read.remote_code import KNOWN_PACKAGES, install_hint, pip_name

_NO_MODULE = re.compile(r"No module named '([\w.]+)'")
_CANNOT_IMPORT = re.compile(r"cannot import name '(\w+)' from '(transformers[\w.]*)'")
_MISSING_PACKAGES = re.compile(r"requires the following packages that were not found in your environment: ([^.]+)")
_GENERATE_FAILS = re.compile(
    r"transformers_version|generation_config|has no attribute 'generate'|"
    r"GenerationMixin|can_generate"
)
LEGACY_TRANSFORMERS = "4.49.0"  # upstream Sa2VA's `legacy` install (pyproject.toml of bytedance/Sa2VA)


def _major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except (TypeError, ValueError):
        return None


def _torchvision_fix(torch_version: str, torch_dist_version: str) -> str:
    """How to get the torchvision built for this torch. A torch whose installed *package* version has a
    local label (``2.13.0+cpu``; the registry's wheels carry none, only their ``__version__`` does) came
    from PyTorch's own index or a local file: the registry has no torchvision for it, so pinning the
    torch, the fix for a registry torch, would pick the same mismatched build again (bench/compat.py,
    row "mixed"). torchvision 0.N pairs with torch 2.(N-15) (0.21 with 2.6, 0.29 with 2.14)."""
    base, _, label = torch_dist_version.partition("+")
    other = " or pass --python with an environment where torch and torchvision match"
    if label:
        parts = base.split(".")
        minor = int(parts[1]) if len(parts) > 1 and parts[0] == "2" and parts[1].isdigit() else None
        pin = f"'torchvision==0.{minor + 15}.*'" if minor is not None else "torchvision"
        return (
            f"torch {torch_dist_version} is not the package registry's build, so the registry has no torchvision "
            f"for it: install its torchvision from the same source, e.g. pip install {pin} --index-url "
            f"https://download.pytorch.org/whl/{label} (or a local file built for it);{other}"
        )
    return (
        f"install the torchvision made for torch {torch_version}: pip install "
        f"'sa2va-convert[verify]' torch=={torch_version.split('+')[0]} lets pip pick it;{other}"
    )


def _texts(result: dict[str, Any]) -> list[str]:
    err = result.get("error") or {}
    return [f"{err.get('type')}: {err.get('message')}", *(err.get("chain") or []), err.get("traceback") or ""]


def _search(pattern: re.Pattern[str], texts: list[str]) -> re.Match[str] | None:
    for text in texts:
        m = pattern.search(text)
        if m:
            return m
    return None


def diagnose(
    result: dict[str, Any],
    *,
    folder: Path,
    python: str,
    what: str = "round trip",
    sibling_modules: set[str] | None = None,
) -> VerifyEnvironmentError | None:
    """The environment problem behind a failed child, or None when the failure is not one we can name."""
    err = result.get("error") or {}
    stage = str(err.get("stage") or result.get("stage") or "")
    texts = _texts(result)
    packages = result.get("packages") or {}
    versions = result.get("versions") or {}
    torch_v = versions.get("torch") or packages.get("torch")
    tf_v = versions.get("transformers") or packages.get("transformers")
    written_for = result.get("config_transformers_version")
    written = f"config.json: transformers_version {written_for}" if written_for else "config.json names no version"
    model = result.get("model_class") or "the model"

    if _search(re.compile(r"torchvision::"), texts):
        tv = packages.get("torchvision")
        via = " (timm imports it)" if any("timm" in t for t in texts) else ""
        return VerifyEnvironmentError(
            f"torchvision {tv} in {python} was built for another torch than the installed torch {torch_v}{via}: "
            "it fails on import ('operator torchvision::nms does not exist'), and the model's code imports it",
            path=python,
            hint=_torchvision_fix(str(torch_v), str(packages.get("torch") or "")),
        )

    if (
        (major := _major(tf_v)) is not None
        and major >= 5
        and stage in ("config", "load")
        and (result.get("model_calls_post_init") is False or _search(re.compile(r"all_tied_weights_keys"), texts))
    ):
        return VerifyEnvironmentError(
            f"the model's remote code ({model}) was written for transformers 4.x ({written}) and cannot load under "
            f"the installed transformers {tf_v}: its __init__ never calls post_init(), which transformers 5 needs "
            f"({err.get('type')}: {err.get('message')})",
            path=folder,
            hint="run it with transformers 4.x: pip install 'transformers>=4.49,<5' (what pip install "
            "'sa2va-convert[verify]' installs), or pass --python with your Sa2VA environment",
        )

    stuck = [g for g in result.get("generation") or [] if g.get("can_generate") is False and g.get("mixin_via")]
    if stuck and stage.startswith("predict") and _search(_GENERATE_FAILS, texts):
        g = stuck[0]
        return VerifyEnvironmentError(
            f"the model's language model ({g['class']}) cannot generate under the installed transformers {tf_v}: it "
            f"gets GenerationMixin only through {g['mixin_via']}, which transformers 4.50 and later do not count "
            f"(can_generate() is False, so it has no generation_config); this code needs transformers "
            f"{LEGACY_TRANSFORMERS} or older ({written}; error: {err.get('type')}: {err.get('message')})",
            path=folder,
            hint=f"pass --python with an environment that has transformers=={LEGACY_TRANSFORMERS} "
            f"(upstream Sa2VA's `legacy` install: pip install transformers=={LEGACY_TRANSFORMERS} "
            "peft==0.11.1)",
        )

    m = _search(_MISSING_PACKAGES, texts)
    if m:
        names = [p.strip() for p in m.group(1).split(",") if p.strip()]
        reqs = sorted({pip_name(n) for n in names})
        return VerifyEnvironmentError(
            f"the folder's remote code imports {', '.join(names)}, not installed in {python}",
            path=folder,
            hint=f"{install_hint(reqs)} into that environment, or pass --python with one that has them",
        )

    m = _search(_NO_MODULE, texts)
    if m:
        top = m.group(1).split(".")[0]
        if top in KNOWN_PACKAGES and top not in (sibling_modules or set()):
            return VerifyEnvironmentError(
                f"the {what} needs {pip_name(top)}, not installed in {python} ({m.group(0)})",
                path=folder,
                hint=f"{install_hint([pip_name(top)])} into that environment, or pass --python with one that has it",
            )
        return None  # a module that exists nowhere: the folder's code is not self-contained (exit 7)

    m = _search(_CANNOT_IMPORT, texts)
    if m:
        return VerifyEnvironmentError(
            f"the model's remote code needs {m.group(1)} from {m.group(2)}, which the installed transformers {tf_v} "
            f"does not have ({written})",
            path=folder,
            hint=(
                f"install the transformers the folder was written with: pip install 'transformers=={written_for}'"
                if written_for
                else "install a newer transformers 4.x"
            )
            + ", or pass --python with such an environment",
        )
    return None


__all__ = ["diagnose", "LEGACY_TRANSFORMERS"]
