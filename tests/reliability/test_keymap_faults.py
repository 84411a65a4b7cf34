"""Broken user keymaps passed with ``--keymap FILE``: refused with ``FILE:LINE`` before anything is written.

Loader-level checks of the same faults are in ``tests/test_keymap.py``
(``test_invalid_yaml_names_the_line``, ``test_bad_regex_is_refused_with_line``,
``test_two_source_keys_to_one_target_is_refused``,
``test_rule_matching_nothing_the_family_has_is_refused``) and the unknown-field
case at the CLI is ``tests/test_convert_errors.py::test_bad_keymap``. Here each
fault goes through the whole command: exit 5, one line naming ``file:line``
and the fix, inputs untouched, no OUT. The YAML-feature cases (aliases, tags)
are refusals a keymap loader must make because keymaps come from users.
"""

from __future__ import annotations

from pathlib import Path

from _reliability import Guard, assert_refused

from sa2va_convert.plan.keymap import builtin_dir

GOOD = builtin_dir() / "sa2va-v1-internvl-qwen2.yaml"


def _keymap(tmp_path: Path, old: str, new: str) -> Path:
    text = GOOD.read_text()
    assert old in text, old
    path = tmp_path / "my-keymap.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def _refused(sa2va, tiny, keymap: Path, *needles: str, line: int | None = None, code: int = 5) -> str:
    guard = Guard((tiny.ckpt.path, tiny.base, keymap), tiny.out)
    r = sa2va(tiny.ckpt.path, tiny.out, "--base", tiny.base, "--keymap", keymap)
    where = f"{keymap}:{line}" if line is not None else keymap
    return assert_refused(r, code, guard, where, *needles)


def test_keymap_with_invalid_yaml(sa2va, tiny, tmp_path):
    km = _keymap(tmp_path, "rename:\n", "rename: [\n")
    _refused(sa2va, tiny, km, "invalid YAML", "fix the YAML syntax")


def test_keymap_with_bad_regex(sa2va, tiny, tmp_path):
    km = _keymap(tmp_path, "- from: '\\.gamma$'", "- from: '\\.gamma($'")
    _refused(sa2va, tiny, km, "bad regex", line=_line_of(km, "gamma($"))


def test_keymap_mapping_two_example_keys_to_one_target(sa2va, tiny, tmp_path):
    km = _keymap(tmp_path, "  - from: '\\.gamma$'\n    to: '.g_weight'\n",
                 "  - from: '\\.gamma$'\n    to: '.g_weight'\n"
                 "  - from: 'text_hidden_fcs\\.2\\.bias'\n    to: 'language_model.lm_head.weight'\n")
    _refused(sa2va, tiny, km, "two source keys map to one target")


def test_keymap_rule_that_matches_nothing(sa2va, tiny, tmp_path):
    km = _keymap(tmp_path, "  - from: '\\.gamma$'", "  - from: '\\.gammma$'")
    _refused(sa2va, tiny, km, "matches none of the example keys", line=_line_of(km, "gammma"))


def test_keymap_collision_only_visible_on_the_real_checkpoint(sa2va, tiny, tmp_path):
    """The rule passes the keymap's own examples, but folds text_hidden_fcs.0 onto .2 in the real keys."""
    km = _keymap(tmp_path, "  - from: '\\.gamma$'\n    to: '.g_weight'\n",
                 "  - from: '\\.gamma$'\n    to: '.g_weight'\n"
                 "  - from: '^text_hidden_fcs\\.[02]\\.'\n    to: 'text_hidden_fcs.2.'\n")
    guard = Guard((tiny.ckpt.path, tiny.base, km), tiny.out)
    r = sa2va(tiny.ckpt.path, tiny.out, "--base", tiny.base, "--keymap", km)
    assert_refused(r, 5, guard, tiny.ckpt.path, "two checkpoint keys map to one target", str(km))


def test_keymap_with_recursive_yaml_alias(sa2va, tiny, tmp_path):
    """``&a [*a]`` is a cycle: walking it must not recurse until the interpreter gives up (exit 1)."""
    km = _keymap(tmp_path, "require:\n", "loop: &loop [*loop]\nrequire:\n")
    _refused(sa2va, tiny, km, "aliases", line=_line_of(km, "loop:"))


def test_keymap_with_python_yaml_tag(sa2va, tiny, tmp_path):
    """A ``!!python/name:`` tag is neither honoured nor a crash: a keymap line error."""
    km = _keymap(tmp_path, "name: sa2va-v1-internvl-qwen2", "name: !!python/name:os.system")
    _refused(sa2va, tiny, km, "unsupported YAML value", line=_line_of(km, "!!python"))
