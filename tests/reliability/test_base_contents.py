"""What the base folder holds besides its shards is copied into OUT: every entry must be a real file (issue 23, item 3).

A dangling symlink or a FIFO was skipped silently and OUT was published without it (``templates.py``:
exit 0, then ``verify`` failed); a symlink to a file outside the base was followed and its content copied
into OUT, a folder users push to the Hub. Each is refused before any work (exit 3, one line naming the
entry, nothing published). The one link allowed to leave the folder is the Hugging Face cache's own
layout, ``snapshots/<rev>/file -> ../../blobs/<hash>``, which must keep converting.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from _reliability import NO_VERIFY, Guard, assert_complete_output, assert_refused


@pytest.fixture
def base_copy(tiny, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny.base, base)
    return base


def _refused(sa2va, tiny, base: Path, entry: Path, *needles: str, extra: tuple[Path, ...] = ()) -> None:
    guard = Guard((tiny.ckpt.path, base, *extra), tiny.out)
    r = sa2va(tiny.ckpt.path, tiny.out, "--base", base, *NO_VERIFY)
    assert_refused(r, 3, guard, entry, *needles)


def test_a_dangling_symlink_in_the_base_is_refused(sa2va, tiny, base_copy):
    victim = base_copy / "templates.py"
    victim.unlink()
    victim.symlink_to(base_copy / "templates_v2.py")  # the file it names is gone
    _refused(sa2va, tiny, base_copy, victim, "dangling symbolic link", "would be published without it")


def test_a_fifo_in_the_base_is_refused_without_opening_it(sa2va, tiny, base_copy):
    victim = base_copy / "templates.py"
    victim.unlink()
    os.mkfifo(victim)  # opening it to read would block the conversion forever
    _refused(sa2va, tiny, base_copy, victim, "FIFO", "not a regular file")


def test_a_symlink_to_a_file_outside_the_base_is_refused(sa2va, tiny, base_copy, tmp_path):
    secret = tmp_path / "elsewhere" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (base_copy / "notes.txt").symlink_to(secret)
    _refused(sa2va, tiny, base_copy, base_copy / "notes.txt", "outside the base folder", str(secret),
             extra=(secret.parent,))


def test_a_symlinked_directory_in_the_base_is_refused(sa2va, tiny, base_copy, tmp_path):
    elsewhere = tmp_path / "code"
    elsewhere.mkdir()
    (elsewhere / "helper.py").write_text("x = 1\n")
    (base_copy / "extra").symlink_to(elsewhere, target_is_directory=True)
    _refused(sa2va, tiny, base_copy, base_copy / "extra", "symbolic link to a directory", extra=(elsewhere,))


def test_the_hugging_face_cache_layout_converts(sa2va, tiny, tmp_path):
    """Every file of a cache snapshot is a relative link into the repo's blobs/: that is the one outside link allowed."""
    repo = tmp_path / "hub" / "models--acme--Sa2VA-1B"
    snap = repo / "snapshots" / ("3" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(tiny.base.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", digest))
    r = sa2va(tiny.ckpt.path, tiny.out, "--base", snap, *NO_VERIFY)
    assert r.returncode == 0, r
    assert_complete_output(tiny.out)
    assert (tiny.out / "templates.py").read_bytes() == (tiny.base / "templates.py").read_bytes()
    assert not (tiny.out / "templates.py").is_symlink()
