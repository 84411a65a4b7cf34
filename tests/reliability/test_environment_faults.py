"""The machine fails the converter: disk full, file-size limit, read-only places, kill -9, Ctrl-C, SIGTERM.

The contract: OUT appears only complete. A failed or interrupted run leaves
no OUT (or the previous complete OUT exactly as it was), nothing hidden that
looks finished, and a rerun succeeds and leaves no partial folder behind.
Interrupted runs exit 130. Signals and kills use fresh interpreters
(``spawn_cli``) and the ``medium`` fixture, written in 64 KB shards so the
signal lands while shards are being written (the test waits until the hidden
``.out.partial-*`` folder exists).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _reliability import (
    NO_VERIFY,
    CliResult,
    Guard,
    assert_complete_output,
    assert_one_error_line,
    assert_refused,
    leftovers,
    partials,
    permission_preexec,
    run_fresh,
    spawn_cli,
    tree_digest,
    wait_for,
)

# ------------------------------------------------------------------ disk full


@pytest.fixture
def small_fs(tmp_path):
    """``small_fs(size) -> Path``: a tmpfs of that size (root only; skipped where mounting is not allowed)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"small-{len(mounted)}"
        point.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
                           capture_output=True, text=True, check=False)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


def test_disk_full_on_a_small_file_system(sa2va, tiny, small_fs):
    out = small_fs("256k") / "out"  # the tiny conversion needs ~560 KB
    guard = Guard((tiny.ckpt.path, tiny.base), out)
    r = sa2va(tiny.ckpt.path, out, "--base", tiny.base)
    assert_refused(r, 6, guard, out, "disk full", "free space")


def test_disk_full_with_shards_written_side_by_side(sa2va, tiny, small_fs):
    """Several shards open at once (issue 14): the first ENOSPC still ends the run cleanly, nothing left."""
    out = small_fs("256k") / "out"
    guard = Guard((tiny.ckpt.path, tiny.base), out)
    r = sa2va(tiny.ckpt.path, out, "--base", tiny.base, "--max-shard-size", "60KB", env=SIDE_BY_SIDE)
    assert_refused(r, 6, guard, out, "disk full", "free space")


def test_disk_full_while_replacing_a_previous_out(sa2va, tiny, small_fs):
    """Room for one output but not two: the --force rerun fails and the first OUT stays exactly as it was."""
    out = small_fs("1m") / "out"
    first = sa2va(tiny.ckpt.path, out, "--base", tiny.base, *NO_VERIFY)
    assert first.returncode == 0, first
    guard = Guard((tiny.ckpt.path, tiny.base), out)
    r = sa2va(tiny.ckpt.path, out, "--base", tiny.base, "--force")
    assert_refused(r, 6, guard, out, "disk full")
    assert_complete_output(out)


def test_file_size_limit_reached(tiny):
    """RLIMIT_FSIZE (``ulimit -f``) below one shard: EFBIG, reported as such, nothing left."""

    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    guard = Guard((tiny.ckpt.path, tiny.base), tiny.out)
    r = run_fresh(tiny.ckpt.path, tiny.out, "--base", tiny.base, preexec_fn=limit)
    assert_refused(r, 6, guard, tiny.out, "file size limit", "--max-shard-size")


# ------------------------------------------------------------------ places that cannot be written


def test_read_only_output_parent(tiny, tmp_path):
    preexec = permission_preexec(tmp_path)
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    out = parent / "out"
    guard = Guard((tiny.ckpt.path, tiny.base), out)
    try:
        r = run_fresh(tiny.ckpt.path, out, "--base", tiny.base, preexec_fn=preexec)
        assert_refused(r, 6, guard, parent, "not writable")
    finally:
        parent.chmod(0o755)


def test_output_parent_does_not_exist(sa2va, tiny, tmp_path):
    out = tmp_path / "no" / "such" / "out"
    guard = Guard((tiny.ckpt.path, tiny.base), out.parent.parent)
    r = sa2va(tiny.ckpt.path, out, "--base", tiny.base)
    assert_refused(r, 6, guard, out.parent, "does not exist", "create it")


def test_out_is_an_existing_file_even_with_force(sa2va, tiny):
    tiny.out.write_text("my notes, not a model")
    guard = Guard((tiny.ckpt.path, tiny.base, tiny.out), tiny.out)
    r = sa2va(tiny.ckpt.path, tiny.out, "--base", tiny.base, "--force")
    assert_refused(r, 6, guard, tiny.out, "not a folder")


# ------------------------------------------------------------------ kill -9, Ctrl-C, SIGTERM


# the write stage as it runs on a many-core machine (issue 14): several merge workers, shards side by side
SIDE_BY_SIDE = {"SA2VA_PARALLEL_SHARDS": "3", "SA2VA_MERGE_WORKERS": "4"}


def _signal_mid_write(fam, sig: int, *extra: str, when: str = "shards", env: dict | None = None) -> CliResult:
    """Start a conversion, send ``sig`` once its hidden partial folder exists (``when="partial"``: the very
    start of the write, while the writer is setting up) or holds a first shard (``"shards"``: mid-write)."""
    before = set(partials(fam.out))
    p = spawn_cli(fam.ckpt.path, fam.out, "--base", fam.base, *fam.shard_args, *NO_VERIFY, *extra, env=env)

    def ready() -> bool:
        new = set(partials(fam.out)) - before
        return bool(new) and (when == "partial" or any(any(d.glob("*.safetensors")) for d in new))

    try:
        wait_for(ready, 120, f"the partial folder ({when})", p)
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0, "the conversion finished before the signal arrived: make the fixture bigger"
    return CliResult(p.returncode, out, err, ("<signal>",))


def _convert(sa2va, fam, *extra: str, env: dict | None = None) -> CliResult:
    r = sa2va(fam.ckpt.path, fam.out, "--base", fam.base, *fam.shard_args, *NO_VERIFY, *extra, env=env)
    assert r.returncode == 0, r
    assert_complete_output(fam.out)
    assert leftovers(fam.out) == [], "a successful run left hidden partial/old/lock entries"
    return r


def test_kill_9_mid_write_then_rerun_succeeds(sa2va, medium):
    guard = Guard((medium.ckpt.path, medium.base), medium.out)
    r = _signal_mid_write(medium, signal.SIGKILL)
    assert r.returncode == -signal.SIGKILL
    assert not os.path.lexists(medium.out), "a killed run published OUT"
    assert all(p.name.startswith(".") for p in partials(medium.out)), "a partial folder is visible"
    debris = [p.name for p in partials(medium.out)]
    guard.check(ignore_leftovers=leftovers(medium.out))  # inputs untouched; only hidden debris so far
    rerun = _convert(sa2va, medium)  # the rerun clears the dead run's partial folder and stale lock
    for name in debris:  # and says so (issue 23: it used to be removed silently)
        assert f"removed {name} (" in rerun.stderr and "a run that did not finish" in rerun.stderr, rerun


def test_kill_9_mid_force_rewrite_keeps_the_previous_out(sa2va, medium):
    _convert(sa2va, medium)
    guard = Guard((medium.ckpt.path, medium.base), medium.out)
    r = _signal_mid_write(medium, signal.SIGKILL, "--force")
    assert r.returncode == -signal.SIGKILL
    guard.check(ignore_leftovers=leftovers(medium.out))  # previous OUT byte-identical
    _convert(sa2va, medium, "--force")


def test_sigint_as_the_write_starts_leaves_nothing(medium):
    """Ctrl-C right after the hidden partial folder is made, while the writer sets up its threads."""
    guard = Guard((medium.ckpt.path, medium.base), medium.out)
    r = _signal_mid_write(medium, signal.SIGINT, when="partial")
    guard.check()  # no OUT, no partial folder, no lock file
    _assert_interrupted(r)


@pytest.mark.parametrize("env", [None, SIDE_BY_SIDE], ids=["defaults", "side-by-side-shards"])
def test_sigterm_mid_force_rewrite_keeps_the_previous_out(sa2va, medium, env):
    _convert(sa2va, medium, env=env)
    guard = Guard((medium.ckpt.path, medium.base), medium.out)
    r = _signal_mid_write(medium, signal.SIGTERM, "--force", env=env)
    guard.check()  # previous OUT byte-identical, nothing hidden left
    _assert_interrupted(r)


PIPELINE_ABORT = (
    "BUG (write/pipeline.py): an interrupt can end in SIGABRT ('terminate called without an active exception', "
    "exit -6) instead of 130: a KeyboardInterrupt raised inside TensorPipeline.__init__ (Thread.start() waits on "
    "an Event) after a worker started means the `with` block is never entered, close() never runs, and the "
    "sa2va-read/sa2va-merge daemon threads are still alive at interpreter exit; start the threads under "
    "try/except BaseException: self.close(); raise (or in __enter__)")


def _assert_interrupted(r: CliResult) -> None:
    """Exit 130 and one 'interrupted' line (checked after the files: a known crash must not hide them)."""
    if r.returncode == -signal.SIGABRT and "terminate called" in r.stderr:
        pytest.xfail(PIPELINE_ABORT)  # the files were checked above; only the exit status is wrong
    assert r.returncode == 130, r
    assert len(r.error_lines) == 1 and "interrupted" in r.error_lines[0], r
    assert "Traceback" not in r.stderr, r


def test_interrupt_error_line_names_out_and_the_fix(tiny):
    """Interrupt while the command is still reading: the one line must name OUT and say what to do."""
    p = spawn_cli(tiny.ckpt.path, tiny.out, "--base", tiny.base, stdout=subprocess.DEVNULL)
    try:
        line = p.stderr.readline()  # 'sa2va-convert: reading ...': the CLI is past start-up
        assert "reading" in line, line
        p.send_signal(signal.SIGINT)
        err = line + p.stderr.read()
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert_one_error_line(CliResult(p.returncode, "", err), 130, tiny.out, "(fix: ")


# ------------------------------------------------------------------ the publish step, at every point


def test_interrupt_at_every_line_of_publish_keeps_a_complete_out(tmp_path):
    """Ctrl-C can arrive between any two Python lines of ``atomic.publish`` (replacing an OUT with --force).

    Whatever the point, OUT must afterwards be the old folder or the new one, complete, and once
    the caller has cleaned its partial folder (as write_folder does) nothing hidden may remain.
    """
    from sa2va_convert.write import atomic

    def folder(path: Path, tag: str) -> Path:
        path.mkdir()
        for i in range(3):
            (path / f"f{i}").write_text(f"{tag}-{i}")
        return path

    source = atomic.__file__
    point = 1
    while True:
        case = tmp_path / f"case-{point}"
        case.mkdir()
        out = folder(case / "out", "old")
        old_digest = _contents(out)
        tmp = folder(case / f"{atomic.partial_prefix(out)}{os.getpid()}", "new")
        new_digest = _contents(tmp)
        seen = 0

        def tracer(frame, event, arg):
            nonlocal seen
            if frame.f_code.co_filename != source:
                return None
            if event == "line":
                seen += 1
                if seen == point:  # noqa: B023 - used within the same iteration
                    raise KeyboardInterrupt
            return tracer

        interrupted = False
        sys.settrace(tracer)
        try:
            atomic.publish(tmp, out, True)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sys.settrace(None)
        shutil.rmtree(tmp, ignore_errors=True)  # what write_folder does on the way out
        assert out.is_dir(), f"OUT is missing after an interrupt at line event {point}"
        assert _contents(out) in (old_digest, new_digest), f"OUT is mixed after an interrupt at line event {point}"
        assert leftovers(out) == [], f"hidden debris after an interrupt at line event {point}: {leftovers(out)}"
        if not interrupted:
            assert _contents(out) == new_digest
            break
        point += 1
    assert point > 3  # the loop really walked through publish


def _contents(path: Path) -> dict:
    return {k.replace(str(path), ""): v[1] for k, v in tree_digest(path).items() if v[0] == "file"}
