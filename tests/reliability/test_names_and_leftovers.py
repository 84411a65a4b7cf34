"""Names are never patterns, and what a dead run left behind is removed out loud (issue 23, items 5 and 7).

The hidden folders beside OUT are ``.OUT.partial-<pid>`` and ``.OUT.old-<pid>``. The clean-up of a
dead run's leftovers once passed OUT's name to a glob, so an OUT named ``r[1]?*`` removed the live
partial folder of a conversion into ``r1x``. Each name must belong to exactly one OUT, and the
leftovers of a killed run (up to a shard's worth of bytes) are removed by the next run into the same
OUT with a note that says so.
"""

from __future__ import annotations

from _reliability import NO_VERIFY, assert_complete_output, leftovers


def test_an_out_name_with_glob_characters_touches_no_other_outs_folders(sa2va, tiny, tmp_path):
    parent = tmp_path / "outs"
    parent.mkdir()
    out = parent / "r[1]?*"
    # another OUT's hidden folders, which `.r[1]?*.partial-*` / `.r[1]?*.old-*` would match as globs
    theirs = [parent / ".r1x.partial-999999", parent / ".r1x.old-999999", parent / ".r[1]?*x.partial-999999"]
    for folder in theirs:
        folder.mkdir()
        (folder / "shard").write_text("another conversion's")
    stale = parent / f".{out.name}.partial-999999"  # this OUT's own leftover, from a killed run
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 3000)

    first = sa2va(tiny.ckpt.path, out, "--base", tiny.base, *NO_VERIFY)
    assert first.returncode == 0, first
    assert not stale.exists()
    assert f"removed {stale.name} (2.9 KiB): a partial folder of a run that did not finish" in first.stderr, first
    second = sa2va(tiny.ckpt.path, out, "--base", tiny.base, "--force", *NO_VERIFY)  # OUT exists: .old-* too
    assert second.returncode == 0, second
    assert "removed" not in second.stderr, second
    assert_complete_output(out)
    for folder in theirs:
        assert (folder / "shard").read_text() == "another conversion's", f"{folder.name} was touched"
    assert leftovers(out) == []
