"""Read the training config that mmengine embeds in ``meta['cfg']`` -- as data, never as code.

The text is Python that names the training code (``type='peft.LoraConfig'``);
executing it would import xtuner, mmcv and the Sa2VA repo, and running text
from a downloaded checkpoint is code execution anyway. mmengine regenerates
it with variables substituted and arithmetic evaluated (FORMATS.md §2), so a
syntax tree plus a tiny literal evaluator recovers nearly everything. Whatever
is not a literal stays as an :class:`Unparsed` marker with its source text, so
reports can show it and nothing is guessed.

The same evaluator also copes with a user's own config ``.py`` (imports,
``LoraConfig`` as a bare name, ``lora_alpha=lora_r * 2``): names assigned
earlier at the top level are resolved, other names become Unparsed.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Unparsed", "LoraSettings", "EmbeddedConfig", "parse_embedded_config"]


@dataclass(frozen=True)
class Unparsed:
    """A config value that is not a literal; ``source`` is its text in the config."""

    source: str

    def __repr__(self) -> str:
        return f"Unparsed({self.source!r})"


@dataclass
class LoraSettings:
    r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool | None = None  # None: not set in the config (PEFT's default is False)
    modules_to_save: list[str] | None = None
    # PEFT also accepts a single string (a regex, or "all-linear"); it is kept as a string.
    target_modules: list[str] | str | None = None


@dataclass
class EmbeddedConfig:
    text: str
    values: dict = field(default_factory=dict)  # every top-level name; non-literals as Unparsed
    path: str | None = None
    pretrained_pth: str | None = None
    template: str | None = None
    special_tokens: list[str] | None = None
    lora: LoraSettings | None = None
    # where each extracted value came from, e.g. {"lora_alpha": "model.mllm.llm_lora.lora_alpha"}
    sources: dict[str, str] = field(default_factory=dict)
    # settings found but not readable as literals, e.g. {"r": "model.llm_lora.r = lora_r * 2"}
    unresolved: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # set when the text does not parse; the checkpoint stays usable


_MISSING = object()


# --------------------------------------------------------------------------------------------
# Literal evaluation
# --------------------------------------------------------------------------------------------

_NUMBER_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_MAX_INT_BITS = 256  # keeps ``2 ** 10 ** 9``-style text from eating the machine
_MAX_SEQUENCE = 100_000


class _Evaluator:
    """Evaluates literal expressions; everything else becomes Unparsed."""

    def __init__(self, text: str, names: dict[str, Any]):
        self.text = text
        self.names = names  # top-level names evaluated so far

    def unparsed(self, node: ast.AST) -> Unparsed:
        source = ast.get_source_segment(self.text, node)
        if source is None:
            source = ast.unparse(node)
        return Unparsed(source)

    def eval(self, node: ast.AST) -> Any:
        method = getattr(self, f"_eval_{type(node).__name__}", None)
        if method is None:
            return self.unparsed(node)
        return method(node)

    def _eval_Constant(self, node: ast.Constant) -> Any:
        if node.value is Ellipsis:
            return self.unparsed(node)
        return node.value

    def _eval_Name(self, node: ast.Name) -> Any:
        value = self.names.get(node.id, _MISSING)
        return self.unparsed(node) if value is _MISSING or isinstance(value, Unparsed) else value

    def _eval_List(self, node: ast.List | ast.Tuple | ast.Set) -> Any:
        items = [self.eval(e) for e in node.elts]
        return self.unparsed(node) if any(isinstance(e, ast.Starred) for e in node.elts) else items

    def _eval_Tuple(self, node: ast.Tuple) -> Any:
        items = self._eval_List(node)  # same rules
        return tuple(items) if isinstance(items, list) else items

    def _eval_Set(self, node: ast.Set) -> Any:
        items = self._eval_List(node)
        try:
            return set(items) if isinstance(items, list) else items
        except TypeError:
            return self.unparsed(node)

    def _eval_Dict(self, node: ast.Dict) -> Any:
        keys = [k for k in node.keys if k is not None]
        if len(keys) != len(node.keys):  # {**other}
            return self.unparsed(node)
        out = {}
        for k, v in zip(keys, node.values, strict=True):
            key = self.eval(k)
            try:
                out[key] = self.eval(v)
            except TypeError:  # unhashable key
                return self.unparsed(node)
        return out

    def _eval_Call(self, node: ast.Call) -> Any:
        # dict(a=1, b=2) is how mmengine writes every nested config
        if (
            isinstance(node.func, ast.Name)
            and node.func.id == "dict"
            and not node.args
            and all(kw.arg is not None for kw in node.keywords)
        ):
            return {kw.arg: self.eval(kw.value) for kw in node.keywords}
        return self.unparsed(node)

    def _eval_UnaryOp(self, node: ast.UnaryOp) -> Any:
        value = self.eval(node.operand)
        if isinstance(node.op, ast.Not) and isinstance(value, bool):
            return not value
        if _is_number(value):
            if isinstance(node.op, ast.USub):
                return -value
            if isinstance(node.op, ast.UAdd):
                return +value
            if isinstance(node.op, ast.Invert) and isinstance(value, int):
                return ~value
        return self.unparsed(node)

    def _eval_BinOp(self, node: ast.BinOp) -> Any:
        left, right = self.eval(node.left), self.eval(node.right)
        op = _NUMBER_OPS.get(type(node.op))
        if op is None:
            return self.unparsed(node)
        if isinstance(node.op, ast.Add) and type(left) is type(right) and isinstance(left, (str, list, tuple)):
            # names can refer to earlier names, so ``a = a + a`` repeated would double each line
            return left + right if len(left) + len(right) <= _MAX_SEQUENCE else self.unparsed(node)
        if not (_is_number(left) and _is_number(right)):
            return self.unparsed(node)
        if isinstance(node.op, ast.Pow) and not _small_power(left, right):
            return self.unparsed(node)
        try:
            result = op(left, right)
        except (ArithmeticError, ValueError):
            return self.unparsed(node)
        if isinstance(result, int) and result.bit_length() > _MAX_INT_BITS:
            return self.unparsed(node)
        if isinstance(result, complex):
            return self.unparsed(node)
        return result


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _small_power(base: Any, exponent: Any) -> bool:
    """Only int ** int can blow up memory; float overflow raises and is caught."""
    if isinstance(base, int) and isinstance(exponent, int):
        return abs(exponent) <= 64 and abs(base).bit_length() <= 64
    return True


def _evaluate_module(text: str, tree: ast.Module) -> dict[str, Any]:
    names: dict[str, Any] = {}
    evaluator = _Evaluator(text, names)
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign):
            targets, value_node = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value_node = [stmt.target], stmt.value
        else:
            continue  # imports, ifs, defs: nothing to read as data
        value = evaluator.eval(value_node)
        for target in targets:
            if isinstance(target, ast.Name):
                names[target.id] = value
    return names


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


def _walk(value: Any, path: str) -> Iterator[tuple[str, dict]]:
    """Every dict in the tree with its key path, depth first, in config order."""
    if isinstance(value, dict):
        yield path, value
        for k, v in value.items():
            if isinstance(k, str):
                yield from _walk(v, f"{path}.{k}" if path else k)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")


def _find_key(values: dict, key: str, *, under: tuple[str, ...] = (), top: bool = True) -> tuple[str, Any] | None:
    """(path, value) of ``key``: top level first (unless ``top`` is false), then nested
    inside the names in ``under``, depth first in config order."""
    if top and key in values:
        return key, values[key]
    for root in under:
        for path, d in _walk(values.get(root), root):
            if key in d:
                return f"{path}.{key}", d[key]
    return None


def _text_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Unparsed):
        return value.source
    return None


class _Extractor:
    def __init__(self, config: EmbeddedConfig):
        self.config = config

    def take(self, name: str, found: tuple[str, Any] | None, check: Callable[[Any], Any]) -> Any:
        """Validate a found value; record where it came from or why it was not used."""
        if found is None:
            return None
        path, value = found
        if value is None:
            return None
        result = check(value)
        if result is None:
            self.config.unresolved.setdefault(name, f"{path} = {_show(value)}")
            return None
        self.config.sources[name] = path
        self.config.unresolved.pop(name, None)
        return result

    def run(self) -> None:
        cfg, values = self.config, self.config.values
        cfg.path = self.take(
            "path", _find_key(values, "path") or _find_key(values, "model_path", under=("model",)), _as_str
        )
        cfg.pretrained_pth = self.take("pretrained_pth", _find_key(values, "pretrained_pth", under=("model",)), _as_str)
        cfg.template = self._template()
        cfg.special_tokens = self.take(
            "special_tokens", _find_key(values, "special_tokens", under=("model",)), _as_str_list
        )
        cfg.lora = self._lora()

    def _template(self) -> str | None:
        values = self.config.values
        if "template" in values:
            found = self.take("template", ("template", values["template"]), _as_str)
            if found is not None:
                return found
        if "prompt_template" in values:
            # 'xtuner.utils.PROMPT_TEMPLATE.qwen_chat' (regenerated) or PROMPT_TEMPLATE.qwen_chat (source)
            found = self.take("template", ("prompt_template", values["prompt_template"]), _last_dotted_part)
            if found is not None:
                return found
        return self.take("template", _find_key(values, "template", under=("model",), top=False), _as_str)

    def _lora(self) -> LoraSettings | None:
        found = _find_lora(self.config.values)
        if found is None:
            return None
        path, d = found
        self.config.sources["lora"] = path
        lora = LoraSettings()
        for name, check in (
            ("r", _as_int),
            ("lora_alpha", _as_float),
            ("use_rslora", _as_bool),
            ("modules_to_save", _as_str_list),
            ("target_modules", _as_target_modules),
        ):
            if name in d:
                setattr(lora, name, self.take(name, (f"{path}.{name}", d[name]), check))
        return lora


def _find_lora(values: dict) -> tuple[str, dict] | None:
    """The LLM's LoRA config: an ``llm_lora`` dict, else any dict typed ``...LoraConfig``."""
    roots = ["model"] + [k for k in values if k != "model"]
    for root in roots:
        for path, d in _walk(values.get(root), root):
            if isinstance(d.get("llm_lora"), dict):
                return f"{path}.llm_lora", d["llm_lora"]
    for root in roots:
        for path, d in _walk(values.get(root), root):
            type_text = _text_of(d.get("type")) or ""
            if type_text.endswith("LoraConfig") and "visual" not in path and "vision" not in path:
                return path, d
    return None


_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _last_dotted_part(v: Any) -> str | None:
    text = _text_of(v)
    return text.rsplit(".", 1)[-1] if text and _DOTTED.match(text) else None


def _as_str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _as_float(v: Any) -> float | None:
    return float(v) if _is_number(v) and math.isfinite(v) else None


def _as_bool(v: Any) -> bool | None:
    return v if isinstance(v, bool) else None


def _as_str_list(v: Any) -> list[str] | None:
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return list(v)
    return None


def _as_target_modules(v: Any) -> list[str] | str | None:
    return v if isinstance(v, str) else _as_str_list(v)


def _show(value: Any) -> str:
    text = value.source if isinstance(value, Unparsed) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# --------------------------------------------------------------------------------------------


def parse_embedded_config(text: str) -> EmbeddedConfig:
    """Parse mmengine's regenerated config text into plain values (never executes it).

    A text that does not parse gives an EmbeddedConfig with ``error`` set rather
    than an exception: the weights are still convertible when the user supplies
    the settings by flag.
    """
    config = EmbeddedConfig(text=text)
    try:
        tree = ast.parse(text, mode="exec")
        config.values = _evaluate_module(text, tree)
    except SyntaxError as e:
        config.error = f"the embedded config does not parse: line {e.lineno}: {e.msg}"
        return config
    except (ValueError, RecursionError, MemoryError) as e:  # NUL bytes, absurd nesting
        config.error = f"the embedded config cannot be read: {type(e).__name__}: {e}"
        return config
    _Extractor(config).run()
    return config
