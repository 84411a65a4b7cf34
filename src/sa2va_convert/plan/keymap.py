"""Declarative key maps: how a family's training names become HuggingFace names.

A keymap is data (YAML under ``keymaps/``), not code, so a user with a variant
training setup can write one without touching the tool, and so the rules can be
read, reviewed and linted. Applying a keymap is two steps:

1. **roles**: the first role rule whose ``match`` regex matches a checkpoint key
   classifies it as ``lora_a`` / ``lora_b`` / ``full`` / ``drop`` and rewrites it
   to its *logical* name (PEFT decorations such as ``.lora_A.default`` or
   ``.modules_to_save.default`` removed). Keys matching no role are ``full``.
2. **rename**: ordered regex substitutions applied in sequence (like ``sed``)
   turn the logical name into the HF name.

Every error names ``file:line`` so a broken user keymap is fixed in one edit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError, KeymapError, UsageError

ROLES = ("lora_a", "lora_b", "full", "drop")
SCHEMA_VERSION = 1

_TOP_FIELDS = {
    "schema": False,
    "name": True,
    "description": True,
    "family": True,
    "detect": True,
    "roles": True,
    "rename": True,
    "require": True,
    "vocab": True,
    "hf": True,
    "examples": True,
    "raw_base": False,
}
_RAW_FIELDS = {"architectures": True, "from_checkpoint": True, "sam2_rename": True}
_FAMILY_FIELDS = {"label": True, "codebase": True, "layout": True, "lora_base": True, "models": False}
_DETECT_FIELDS = {"all": True, "none": False, "config": False, "config_none": False}
_ROLE_FIELDS = {"match": True, "role": True, "name": False}
_RENAME_FIELDS = {"from": True, "to": True}
_VOCAB_FIELDS = {"embedding": True, "head": True, "config_field": True}
_HF_FIELDS = {
    "architectures": True,
    "auto_map": True,
    "template_default": True,
    "remote_code": True,
    "untie_fields": True,
    "config_class": False,
}
_EXAMPLE_FIELDS = {"key": True, "role": True, "hf": False}


@dataclass(frozen=True)
class RoleRule:
    pattern: re.Pattern
    role: str
    name: str | None  # substitution template for the logical name; None keeps the key
    line: int


@dataclass(frozen=True)
class RenameRule:
    pattern: re.Pattern
    to: str
    line: int


@dataclass(frozen=True)
class Example:
    key: str
    role: str
    hf: str | None
    line: int


@dataclass(frozen=True)
class Keymap:
    name: str
    description: str
    source: str  # file the keymap came from (for messages)
    family_label: str
    codebase: str  # "v1" | "v2"
    layout: str  # "internvl" | "qwen-vl" | "llava"
    lora_base: str  # what the LoRA was trained on top of: "sa2va" | "mllm"
    detect_all: tuple[re.Pattern, ...]
    detect_none: tuple[re.Pattern, ...]
    detect_config: tuple[re.Pattern, ...]
    roles: tuple[RoleRule, ...]
    rename: tuple[RenameRule, ...]
    require: tuple[re.Pattern, ...]
    vocab_embedding: str
    vocab_head: str
    vocab_config_field: str
    architectures: tuple[str, ...]
    auto_map: dict[str, str]
    template_default: str
    remote_code: tuple[str, ...]
    untie_fields: tuple[str, ...]
    examples: tuple[Example, ...] = field(default=())
    models: tuple[str, ...] = field(default=())
    # The original recipe: a raw MLLM folder + SAM2's release file (+ trained parts from the checkpoint).
    raw_base_architectures: tuple[str, ...] = field(default=())
    raw_base_from_checkpoint: tuple[re.Pattern, ...] = field(default=())
    sam2_rename: tuple[RenameRule, ...] = field(default=())
    # Config evidence AGAINST this family (e.g. another grounding encoder with the same trained keys).
    detect_config_none: tuple[re.Pattern, ...] = field(default=())

    @property
    def supports_raw_base(self) -> bool:
        return bool(self.raw_base_architectures)

    def sam2_name(self, key: str) -> str:
        for rule in self.sam2_rename:
            key = rule.pattern.sub(rule.to, key)
        return key

    def classify(self, key: str) -> tuple[str, str]:
        """Return (role, logical name) for a checkpoint key."""
        for rule in self.roles:
            m = rule.pattern.search(key)
            if m:
                logical = m.expand(rule.name) if rule.name is not None else key
                return rule.role, logical
        return "full", key

    def to_hf(self, logical: str) -> str:
        name = logical
        for rule in self.rename:
            name = rule.pattern.sub(rule.to, name)
        return name

    def map_key(self, key: str) -> tuple[str, str]:
        """(role, HF name) for a checkpoint key; HF name is meaningless for role 'drop'."""
        role, logical = self.classify(key)
        return role, self.to_hf(logical)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family_label,
            "codebase": self.codebase,
            "layout": self.layout,
            "lora_base": self.lora_base,
            "models": list(self.models),
            "source": self.source,
            "detect": {
                "all": [p.pattern for p in self.detect_all],
                "none": [p.pattern for p in self.detect_none],
                "config": [p.pattern for p in self.detect_config],
                "config_none": [p.pattern for p in self.detect_config_none],
            },
            "roles": [{"match": r.pattern.pattern, "role": r.role, "name": r.name} for r in self.roles],
            "rename": [{"from": r.pattern.pattern, "to": r.to} for r in self.rename],
            "require": [p.pattern for p in self.require],
            "vocab": {
                "embedding": self.vocab_embedding,
                "head": self.vocab_head,
                "config_field": self.vocab_config_field,
            },
            "hf": {
                "architectures": list(self.architectures),
                "auto_map": dict(self.auto_map),
                "template_default": self.template_default,
                "remote_code": list(self.remote_code),
                "untie_fields": list(self.untie_fields),
            },
        }


# ---------------------------------------------------------------- YAML with line numbers


@dataclass
class _Node:
    value: Any
    line: int


def _to_located(node: yaml.Node, seen: set[int] | None = None) -> _Node:
    """Plain values with line numbers; refuses YAML aliases (a keymap needs none, and a recursive
    or exponentially fanned-out alias graph would recurse forever or blow up)."""
    seen = set() if seen is None else seen
    line = node.start_mark.line + 1
    if id(node) in seen:
        raise _LocatedError("YAML anchors and aliases (&name / *name) are not supported in keymaps", line)
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        out: dict[str, _Node] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise _LocatedError("mapping keys must be plain strings", k.start_mark.line + 1)
            if key in out:
                raise _LocatedError(f"duplicate field {key!r}", k.start_mark.line + 1)
            out[key] = _to_located(v, seen)
        return _Node(out, line)
    if isinstance(node, yaml.SequenceNode):
        return _Node([_to_located(v, seen) for v in node.value], line)
    # scalars: let PyYAML resolve the tag (int, float, bool, null, str)
    return _Node(_scalar(node), line)


# libyaml's parser where PyYAML has it (its wheels do): the six built-in keymaps, read for every conversion
# to detect the family, took 0.09 s of the VM's 0.11 s of keymap loading in the pure-Python composer.
# Scalars are still resolved by the pure-Python SafeLoader (_scalar), so values and errors are the same.
_COMPOSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _scalar(node: yaml.ScalarNode) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, OverflowError) as e:  # python/* or unknown tags, 2001-13-45, 10**5000
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise _LocatedError(f"unsupported YAML value ({problem})", node.start_mark.line + 1) from None
    finally:
        loader.dispose()


class _LocatedError(Exception):
    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.message = message
        self.line = line


class _Reader:
    """Typed access to located YAML values; every failure carries the source line."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, message: str, line: int, hint: str | None = None) -> KeymapError:
        return KeymapError(
            message,
            path=f"{self.source}:{line}",
            hint=hint or "fix the keymap (see `sa2va-convert keymaps show` for a working example)",
        )

    def mapping(self, node: _Node, fields: dict[str, bool], where: str) -> dict[str, _Node]:
        if not isinstance(node.value, dict):
            raise self.fail(f"{where} must be a mapping", node.line)
        for key, val in node.value.items():
            if key not in fields:
                raise self.fail(f"unknown field {key!r} in {where} (known: {', '.join(fields)})", val.line)
        for key, required in fields.items():
            if required and key not in node.value:
                raise self.fail(f"{where} lacks required field {key!r}", node.line)
        return node.value

    def string(self, node: _Node, where: str) -> str:
        if not isinstance(node.value, str) or not node.value:
            raise self.fail(f"{where} must be a non-empty string", node.line)
        return node.value

    def strings(self, node: _Node, where: str) -> list[tuple[str, int]]:
        if not isinstance(node.value, list):
            raise self.fail(f"{where} must be a list", node.line)
        return [(self.string(item, where), item.line) for item in node.value]

    def regex(self, text: str, line: int, where: str) -> re.Pattern:
        try:
            return re.compile(text)
        except re.error as e:
            raise self.fail(f"bad regex in {where}: {text!r}: {e}", line) from None

    def sequence(self, node: _Node, where: str) -> list[_Node]:
        if not isinstance(node.value, list):
            raise self.fail(f"{where} must be a list", node.line)
        return node.value


def load_keymap(path: str | Path, *, text: str | None = None) -> Keymap:
    """Load and fully validate a keymap file (structure, regexes, examples)."""
    source = str(path)
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:  # a missing input is exit 3 like every other missing input
            raise InputError(
                "keymap file does not exist",
                path=source,
                hint="run `sa2va-convert keymaps list` for the built-in names",
            ) from None
        except OSError as e:
            raise InputError(f"cannot read keymap: {e}", path=source, hint="pass a readable UTF-8 YAML file") from None
        except UnicodeDecodeError as e:
            raise KeymapError(f"cannot read keymap: {e}", path=source, hint="pass a readable UTF-8 YAML file") from None
    try:
        root_node = yaml.compose(text, Loader=_COMPOSER)
    except RecursionError:
        raise KeymapError("invalid YAML: nested too deeply", path=source, hint="fix the YAML syntax") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise KeymapError(f"invalid YAML: {problem}", path=f"{source}:{line}", hint="fix the YAML syntax") from None
    if root_node is None:
        raise KeymapError("keymap file is empty", path=source, hint="start from `sa2va-convert keymaps show NAME`")
    r = _Reader(source)
    try:
        root = _to_located(root_node)
    except _LocatedError as e:
        raise r.fail(e.message, e.line) from None
    except RecursionError:
        raise r.fail("the YAML is nested too deeply", 1) from None
    return _build(r, root)


def _build(r: _Reader, root: _Node) -> Keymap:
    top = r.mapping(root, _TOP_FIELDS, "keymap")
    if "schema" in top and top["schema"].value != SCHEMA_VERSION:
        raise r.fail(
            f"unsupported keymap schema {top['schema'].value!r} (this tool reads schema {SCHEMA_VERSION})",
            top["schema"].line,
        )
    fam = r.mapping(top["family"], _FAMILY_FIELDS, "family")
    det = r.mapping(top["detect"], _DETECT_FIELDS, "detect")
    vocab = r.mapping(top["vocab"], _VOCAB_FIELDS, "vocab")
    hf = r.mapping(top["hf"], _HF_FIELDS, "hf")

    def patterns(node: _Node | None, where: str) -> tuple[re.Pattern, ...]:
        if node is None:
            return ()
        return tuple(r.regex(t, ln, where) for t, ln in r.strings(node, where))

    roles = []
    for item in r.sequence(top["roles"], "roles"):
        f = r.mapping(item, _ROLE_FIELDS, "a roles entry")
        role = r.string(f["role"], "role")
        if role not in ROLES:
            raise r.fail(f"unknown role {role!r} (known: {', '.join(ROLES)})", f["role"].line)
        pat = r.regex(r.string(f["match"], "match"), f["match"].line, "roles.match")
        name = r.string(f["name"], "name") if "name" in f else None
        if name is not None:
            _check_template(r, pat, name, f["name"].line)
        roles.append(RoleRule(pat, role, name, item.line))

    renames = _rename_rules(r, top["rename"], "rename")
    raw_arch: tuple[str, ...] = ()
    raw_from: tuple[re.Pattern, ...] = ()
    sam2_rules: tuple[RenameRule, ...] = ()
    if "raw_base" in top:
        raw = r.mapping(top["raw_base"], _RAW_FIELDS, "raw_base")
        raw_arch = tuple(t for t, _ in r.strings(raw["architectures"], "raw_base.architectures"))
        raw_from = patterns(raw["from_checkpoint"], "raw_base.from_checkpoint")
        sam2_rules = tuple(_rename_rules(r, raw["sam2_rename"], "raw_base.sam2_rename"))

    auto_map_node = hf["auto_map"]
    if not isinstance(auto_map_node.value, dict) or not auto_map_node.value:
        raise r.fail("hf.auto_map must be a non-empty mapping", auto_map_node.line)
    auto_map = {k: r.string(v, f"hf.auto_map.{k}") for k, v in auto_map_node.value.items()}

    examples = []
    for item in r.sequence(top["examples"], "examples"):
        f = r.mapping(item, _EXAMPLE_FIELDS, "an examples entry")
        role = r.string(f["role"], "examples.role")
        if role not in ROLES:
            raise r.fail(f"unknown role {role!r}", f["role"].line)
        examples.append(
            Example(
                r.string(f["key"], "examples.key"),
                role,
                r.string(f["hf"], "examples.hf") if "hf" in f else None,
                item.line,
            )
        )

    codebase = r.string(fam["codebase"], "family.codebase")
    if codebase not in ("v1", "v2"):
        raise r.fail("family.codebase must be v1 or v2", fam["codebase"].line)
    lora_base = r.string(fam["lora_base"], "family.lora_base")
    if lora_base not in ("sa2va", "mllm"):
        raise r.fail(
            "family.lora_base must be 'sa2va' (LoRA trained on full Sa2VA weights) or 'mllm'", fam["lora_base"].line
        )

    km = Keymap(
        name=r.string(top["name"], "name"),
        description=r.string(top["description"], "description"),
        source=r.source,
        family_label=r.string(fam["label"], "family.label"),
        codebase=codebase,
        layout=r.string(fam["layout"], "family.layout"),
        lora_base=lora_base,
        detect_all=patterns(det["all"], "detect.all"),
        detect_none=patterns(det.get("none"), "detect.none"),
        detect_config=patterns(det.get("config"), "detect.config"),
        detect_config_none=patterns(det.get("config_none"), "detect.config_none"),
        roles=tuple(roles),
        rename=tuple(renames),
        require=patterns(top["require"], "require"),
        vocab_embedding=r.string(vocab["embedding"], "vocab.embedding"),
        vocab_head=r.string(vocab["head"], "vocab.head"),
        vocab_config_field=r.string(vocab["config_field"], "vocab.config_field"),
        architectures=tuple(t for t, _ in r.strings(hf["architectures"], "hf.architectures")),
        auto_map=auto_map,
        template_default=r.string(hf["template_default"], "hf.template_default"),
        remote_code=tuple(t for t, _ in r.strings(hf["remote_code"], "hf.remote_code")),
        untie_fields=tuple(t for t, _ in r.strings(hf["untie_fields"], "hf.untie_fields")),
        examples=tuple(examples),
        models=tuple(t for t, _ in r.strings(fam["models"], "family.models")) if "models" in fam else (),
        raw_base_architectures=raw_arch,
        raw_base_from_checkpoint=raw_from,
        sam2_rename=sam2_rules,
    )
    _self_test(r, km, top)
    return km


def _rename_rules(r: _Reader, node: _Node, where: str) -> list[RenameRule]:
    rules = []
    for item in r.sequence(node, where):
        f = r.mapping(item, _RENAME_FIELDS, f"a {where} entry")
        pat = r.regex(r.string(f["from"], "from"), f["from"].line, f"{where}.from")
        to = f["to"].value
        if to is None:
            to = ""
        if not isinstance(to, str):
            raise r.fail(f"{where}.to must be a string", f["to"].line)
        _check_template(r, pat, to, f["to"].line)
        rules.append(RenameRule(pat, to, item.line))
    return rules


def _check_template(r: _Reader, pat: re.Pattern, template: str, line: int) -> None:
    """A replacement that names a group the regex lacks would fail on first use; fail now."""
    for m in re.finditer(r"\\(\d+)|\\g<(\w+)>", template):
        num, name = m.group(1), m.group(2)
        if num is not None and int(num) > pat.groups:
            raise r.fail(f"replacement {template!r} uses group \\{num} but the regex has {pat.groups} group(s)", line)
        if name is not None and not name.isdigit() and name not in pat.groupindex:
            raise r.fail(f"replacement {template!r} uses group <{name}> the regex does not define", line)


def _self_test(r: _Reader, km: Keymap, top: dict[str, _Node]) -> None:
    """Every rule must do something on the family's own example keys.

    A rule that matches none of the keys the family must have is almost always
    a typo that would silently do nothing on real checkpoints.
    """
    if not km.examples:
        raise r.fail("keymap needs at least one example key under 'examples'", top["examples"].line)
    keys = [e.key for e in km.examples]
    for rule in km.roles:
        if not any(rule.pattern.search(k) for k in keys):
            raise r.fail(
                f"role rule {rule.pattern.pattern!r} matches none of the example keys",
                rule.line,
                "fix the regex, or add an example key it must match",
            )
    logical_names = [km.classify(k)[1] for k in keys if km.classify(k)[0] != "drop"]
    staged = list(logical_names)
    for ren in km.rename:
        if not any(ren.pattern.search(n) for n in staged):
            raise r.fail(
                f"rename rule {ren.pattern.pattern!r} matches none of the example keys",
                ren.line,
                "fix the regex, or add an example key it must match",
            )
        staged = [ren.pattern.sub(ren.to, n) for n in staged]
    for pat in km.detect_all:
        if not any(pat.search(k) for k in keys):
            raise r.fail(f"detect pattern {pat.pattern!r} matches none of the example keys", top["detect"].line)
    targets: dict[tuple[str, str], Example] = {}
    mapped = [(ex, *km.map_key(ex.key)) for ex in km.examples]
    for ex, role, hf_name in mapped:
        if role == "drop":
            continue
        prev = targets.get((role, hf_name))
        if prev is not None:
            raise r.fail(f"two source keys map to one target {hf_name!r}: {prev.key!r} and {ex.key!r}", ex.line)
        targets[(role, hf_name)] = ex
    for ex, role, hf_name in mapped:
        if role != ex.role:
            raise r.fail(f"example {ex.key!r} is classified as {role!r}, the example says {ex.role!r}", ex.line)
        if ex.hf is not None and role != "drop" and hf_name != ex.hf:
            raise r.fail(f"example {ex.key!r} maps to {hf_name!r}, the example says {ex.hf!r}", ex.line)


# ---------------------------------------------------------------- built-in keymaps


def builtin_dir() -> Path:
    """Where the shipped keymaps live: inside the wheel, or the repo's keymaps/ in a checkout."""
    try:
        pkg = resources.files("sa2va_convert") / "keymaps"
        if pkg.is_dir():
            return Path(str(pkg))
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    return Path(__file__).resolve().parents[3] / "keymaps"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.yaml"))


def load_builtin(name: str) -> Keymap:
    path = builtin_dir() / f"{name}.yaml"
    if not path.is_file():
        # A usage error (exit 2), not a keymap error: nothing is wrong with any file.
        raise UsageError(
            f"no built-in keymap named {name!r} (built-in: {', '.join(builtin_names())})",
            path=name,
            hint="pick a built-in name or pass a YAML file path",
        )
    return load_keymap(path)


def load_all_builtin() -> list[Keymap]:
    return [load_builtin(n) for n in builtin_names()]


def resolve_keymap(spec: str) -> Keymap:
    """A built-in name or a path to a YAML file."""
    if spec.endswith((".yaml", ".yml")) or "/" in spec or Path(spec).is_file():
        return load_keymap(spec)
    return load_builtin(spec)


def lookup(data: dict, dotted: str) -> Any:
    """``lookup(cfg, 'llm_config.vocab_size')``; KeyError if any part is missing."""
    cur: Any = data
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def assign(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value


def first_match(patterns: Iterable[re.Pattern], keys: Iterable[str]) -> dict[str, str | None]:
    """For each pattern, the first key it matches (the evidence shown to users)."""
    keys = list(keys)
    out: dict[str, str | None] = {}
    for p in patterns:
        out[p.pattern] = next((k for k in keys if p.search(k)), None)
    return out
