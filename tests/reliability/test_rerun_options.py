"""``--all`` reruns skip only what was made from the same inputs with the same options (issue 23, item 4).

A finished ``OUT/iter_N`` used to be skipped whenever the checkpoint's sha256 matched, even when the
rerun asked for another dtype, base, keymap or shard size: exit 0 with the old folders. Now the
conversion records its recipe in ``conversion_report.json`` and a rerun compares it: the same recipe
is skipped (``--force`` or not: the bytes would be identical), a different one is reconverted with
``--force``, and without it the folder fails (exit 8 for the batch, 6 for the item) with what differs,
and is left exactly as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from _reliability import NO_VERIFY, CliResult, tree_digest

from sa2va_convert.plan.keymap import load_builtin
from sa2va_convert.testing.fixtures import write_training_checkpoint


def _items(r: CliResult) -> list[dict]:
    return json.loads(r.stdout)["items"]


def test_a_rerun_skips_only_the_same_recipe(sa2va, tiny, tmp_path):
    work = tmp_path / "work_dirs" / "run"
    write_training_checkpoint(work / "iter_100.pth", "sa2va-1b", base_dir=tiny.base, seed=3, iteration=100)
    root = tmp_path / "outs"
    out = root / "iter_100"

    def batch(*extra) -> CliResult:
        return sa2va(work, root, "--base", tiny.base, "--all", "--json", *NO_VERIFY, *extra)

    first = batch()
    assert first.returncode == 0, first
    assert [i["status"] for i in _items(first)] == ["converted"]
    recipe = json.loads((out / "conversion_report.json").read_text())["recipe"]
    assert recipe["options"]["dtype"] == "bf16" and recipe["keymap"]["name"] == "sa2va-v1-internvl-qwen2"

    same = batch()
    assert same.returncode == 0 and [i["status"] for i in _items(same)] == ["skipped"], same

    before = tree_digest(out)
    other = batch("--dtype", "fp16", "--max-shard-size", "64KB")
    assert other.returncode == 8, other
    (item,) = _items(other)
    assert item["status"] == "failed" and item["error"]["exit_code"] == 6
    assert "dtype bf16 -> fp16" in item["error"]["message"] and "max_shard_bytes 5000000000 -> 64000" in \
        item["error"]["message"]
    assert "--force" in item["error"]["hint"]
    assert f"{out}: was converted from other inputs or with other options: dtype bf16 -> fp16" in other.stderr
    assert tree_digest(out) == before, "a folder that differs was changed without --force"

    moved = tmp_path / "elsewhere" / "base"
    shutil.copytree(tiny.base, moved)
    edited = tmp_path / "keymap.yaml"
    edited.write_text(Path(load_builtin("sa2va-v1-internvl-qwen2").source).read_text() + "\n# tuned\n")
    elsewhere = sa2va(work, root, "--base", moved, "--keymap", edited, "--all", "--json", *NO_VERIFY)
    assert elsewhere.returncode == 8, elsewhere
    message = _items(elsewhere)[0]["error"]["message"]
    assert f"base {Path(tiny.base).resolve()} -> {moved.resolve()}" in message
    assert "keymap sa2va-v1-internvl-qwen2's rules changed since" in message
    assert tree_digest(out) == before

    forced = batch("--dtype", "fp16", "--force")
    assert forced.returncode == 0, forced
    (item,) = _items(forced)
    assert item["status"] == "reconverted" and item["differences"] == ["dtype bf16 -> fp16"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"

    again = batch("--dtype", "fp16", "--force")  # the same recipe: nothing to redo, --force or not
    assert again.returncode == 0 and [i["status"] for i in _items(again)] == ["skipped"], again
