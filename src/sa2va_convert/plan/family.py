"""Which Sa2VA family a checkpoint belongs to, decided from its keys, with the evidence.

Detection is driven by each keymap's ``detect`` section, so a user keymap for a
new variant is detected the same way as the built-in ones. The evidence (the
first key that satisfied each pattern) is reported, because "why did it pick
this family" is the first question when a conversion looks wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import PlanError
from .keymap import Keymap, first_match

#: Projects built on the Sa2VA code with model classes of their own (docs/FAMILIES.md). Their
#: checkpoints can carry exactly the keys of a Sa2VA family (SaSaSa2VA subclasses Sa2VAModel and
#: trains the same tensors), so only the embedded config tells them apart; a near-miss keymap
#: would convert them into a folder whose code is not theirs. (name, evidence in the config text)
#: Patterns are tried in order, so the message names a model class when the config has one.
UNSUPPORTED_PROJECTS: tuple[tuple[str, tuple[re.Pattern, ...]], ...] = (
    (
        "SaSaSa2VA (HF class SaSaSa2VAChatModel)",
        (re.compile(r"\bSaSaSa2VA\w*"), re.compile(r"\bprojects\.sasasa2va\.[\w.]*")),
    ),
    ("VRT, Visual Reasoning Tracer", (re.compile(r"\bprojects\.vrt_sa2va\.[\w.]*"),)),
    ("SAMTok", (re.compile(r"(?i)\bsamtok\w*"),)),
)


def unsupported_project(config_text: str | None) -> str | None:
    """'NAME: the embedded config names X' when the training config is one of those projects'."""
    for name, patterns in UNSUPPORTED_PROJECTS if config_text else ():
        for pattern in patterns:
            m = pattern.search(config_text)
            if m:
                return f"{name}: the embedded config names {m.group(0)!r}"
    return None


@dataclass(frozen=True)
class FamilyMatch:
    keymap: str
    family: str
    codebase: str
    matched: bool
    evidence: dict[str, str | None]  # pattern -> first matching key (None: missing)
    excluded_by: dict[str, str]  # 'none' pattern -> offending key
    config_evidence: dict[str, bool] = field(default_factory=dict)

    @property
    def config_agrees(self) -> bool | None:
        if not self.config_evidence:
            return None
        return any(self.config_evidence.values())

    def to_dict(self) -> dict:
        return {
            "keymap": self.keymap,
            "family": self.family,
            "codebase": self.codebase,
            "matched": self.matched,
            "evidence": self.evidence,
            "excluded_by": self.excluded_by,
            "config_evidence": self.config_evidence,
        }


@dataclass(frozen=True)
class Detection:
    chosen: Keymap | None
    matches: tuple[FamilyMatch, ...]
    unmatched_sample: tuple[str, ...]  # a few keys that explain an unknown layout
    note: str | None = None

    def to_dict(self) -> dict:
        return {
            "keymap": self.chosen.name if self.chosen else None,
            "family": self.chosen.family_label if self.chosen else None,
            "codebase": self.chosen.codebase if self.chosen else None,
            "candidates": [m.to_dict() for m in self.matches],
            "unmatched_sample": list(self.unmatched_sample),
            "note": self.note,
        }


def match_family(km: Keymap, keys: Sequence[str], config_text: str | None) -> FamilyMatch:
    evidence = first_match(km.detect_all, keys)
    excluded = {p: k for p, k in first_match(km.detect_none, keys).items() if k is not None}
    cfg = {p.pattern: bool(p.search(config_text)) for p in km.detect_config} if config_text else {}
    if config_text and any(p.search(config_text) for p in km.detect_config_none):
        # the config names something this family never has: no pattern of it may count as agreeing
        cfg = {p: False for p in cfg} or {p.pattern: False for p in km.detect_config_none}
    ok = all(v is not None for v in evidence.values()) and not excluded
    return FamilyMatch(km.name, km.family_label, km.codebase, ok, evidence, excluded, cfg)


def detect_family(keys: Iterable[str], keymaps: Sequence[Keymap], config_text: str | None = None) -> Detection:
    """Pick the one keymap whose patterns fit; ties are broken by the embedded config."""
    keys = sorted(keys)
    matches = tuple(match_family(km, keys, config_text) for km in keymaps)
    foreign = unsupported_project(config_text)
    if foreign is not None:  # whatever keymap the keys fit, it is a near miss
        return Detection(None, matches, (), "unsupported: " + foreign)
    fitting = [(km, m) for km, m in zip(keymaps, matches, strict=True) if m.matched]
    note = None
    if len(fitting) > 1:
        agreeing = [(km, m) for km, m in fitting if m.config_agrees]
        if len(agreeing) == 1:
            fitting = agreeing
            note = "several families fit the keys; the embedded config decided"
    chosen = fitting[0][0] if len(fitting) == 1 else None
    if chosen is not None and note is None:
        m = fitting[0][1]
        if m.config_agrees is False:
            others = [km.name for km, mm in zip(keymaps, matches, strict=True) if mm.config_agrees]
            if others:
                note = (
                    f"the keys say {chosen.name}, but the embedded config looks like {', '.join(others)}; "
                    "going by the keys"
                )
    unmatched: tuple[str, ...] = ()
    if chosen is None:
        unmatched = tuple(k for k in keys if "lora_" in k or k.startswith("mllm."))[:8] or tuple(keys[:8])
    if len(fitting) > 1:
        note = "ambiguous: " + ", ".join(km.name for km, _ in fitting) + " all fit; pass --keymap"
    return Detection(chosen, matches, unmatched, note)


def require_family(detection: Detection, *, path: str) -> Keymap:
    """The chosen keymap, or a PlanError that shows the keys that did not fit any family."""
    if detection.chosen is not None:
        return detection.chosen
    if detection.note and detection.note.startswith("unsupported: "):
        raise PlanError(
            f"not a Sa2VA checkpoint this tool converts: {detection.note[len('unsupported: ') :]}",
            path=path,
            hint="its HF code differs from Sa2VA's; write a keymap for it and pass --keymap FILE",
        )
    if detection.note and detection.note.startswith("ambiguous"):
        raise PlanError(
            detection.note + " (the keys are the same; the embedded config, absent or silent here, would tell)",
            path=path,
            hint="pass --keymap NAME (see `sa2va-convert keymaps list`) or --keymap FILE",
        )
    sample = ", ".join(detection.unmatched_sample[:4]) or "(no keys)"
    raise PlanError(
        f"not a recognised Sa2VA training checkpoint: its keys fit no known family (e.g. {sample})",
        path=path,
        hint="check this is an iter_N.pth from Sa2VA training, "
        "or write a keymap for this layout and pass --keymap FILE",
    )
