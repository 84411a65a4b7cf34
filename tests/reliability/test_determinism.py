"""Two runs of the command on the same inputs give byte-identical folders.

Reproducible output is what lets a user (or batch mode's skip logic) trust that
a rerun after a crash produced the same model. The API-level check is
``tests/test_convert.py::test_two_runs_give_byte_identical_shards_and_index``;
this one goes through the command line, with many shards, and runs one of the
two conversions in a brand-new interpreter and the other through the
catalogue's pre-warmed launcher, which also shows that the launcher changes
nothing in what the converter writes.
"""

from __future__ import annotations

import stat

from _reliability import (
    NO_VERIFY,
    assert_complete_output,
    leftovers,
    run_fresh,
    tree_digest,
)


def _files(root) -> dict[str, tuple]:
    """Relative name -> (sha256, mode) of every file (sizes and names included via the sha and key)."""
    out = {}
    for name, entry in tree_digest(root).items():
        if entry[0] == "file":
            out[name[len(str(root)):]] = (entry[1], entry[2])
    return out


def test_two_cli_runs_give_byte_identical_shards_and_index(sa2va, tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ("--base", tiny.base, "--max-shard-size", "16KB", *NO_VERIFY)
    ra = run_fresh(tiny.ckpt.path, a, *args)
    assert ra.returncode == 0, ra
    rb = sa2va(tiny.ckpt.path, b, *args)
    assert rb.returncode == 0, rb
    fa, fb = _files(a), _files(b)
    shards = [n for n in fa if n.endswith(".safetensors")]
    assert len(shards) > 10, "the test wants many shards"
    assert "/model.safetensors.index.json" in fa and "/config.json" in fa
    assert fa == fb, sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    assert all(mode == stat.S_IMODE(0o644) for _, mode in fa.values())
    for out in (a, b):
        assert_complete_output(out)
        assert leftovers(out) == []
