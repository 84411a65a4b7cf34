"""Two conversions into one OUT: one wins cleanly, the other stops at once with exit 6.

The lock is ``flock`` on ``.OUT.sa2va-convert.lock`` beside OUT (released by
the kernel even on kill -9). The deterministic tests hold that lock from the
test itself; the race test runs two real converters at once and asserts only
what must hold whatever the timing.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from _reliability import (
    NO_VERIFY,
    Guard,
    assert_complete_output,
    assert_refused,
    leftovers,
    spawn_cli,
)

BUSY = "another sa2va-convert is writing this output"


def _hold_lock(out: Path) -> tuple[int, Path]:
    lock = out.parent / f".{out.name}.sa2va-convert.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd, lock


def test_held_lock_makes_the_cli_refuse_with_exit_6(sa2va, tiny):
    fd, lock = _hold_lock(tiny.out)
    try:
        guard = Guard((tiny.ckpt.path, tiny.base), tiny.out)
        r = sa2va(tiny.ckpt.path, tiny.out, "--base", tiny.base)
        assert_refused(r, 6, guard, tiny.out, BUSY, "wait for it", ignore_leftovers=[lock.name])
    finally:
        os.close(fd)


def test_refused_run_leaves_the_running_conversions_lock_alone(sa2va, tiny):
    """A refused run must not delete the lock file: else a third run locks a new file and writes beside the first."""
    fd, lock = _hold_lock(tiny.out)
    try:
        for _ in range(2):
            guard = Guard((tiny.ckpt.path, tiny.base), tiny.out)
            r = sa2va(tiny.ckpt.path, tiny.out, "--base", tiny.base)
            assert_refused(r, 6, guard, tiny.out, BUSY, ignore_leftovers=[lock.name])
            assert lock.exists() and os.path.samestat(os.fstat(fd), os.stat(lock)), "the held lock file was replaced"
    finally:
        os.close(fd)


def test_two_real_conversions_race_into_one_out(medium):
    """Both start together with --force: either one wins and the other is refused as busy, or they ran one
    after the other; in every case OUT ends complete and nothing hidden is left."""
    args = (medium.ckpt.path, medium.out, "--base", medium.base, *medium.shard_args, *NO_VERIFY, "--force")
    guard = Guard((medium.ckpt.path, medium.base), medium.out)
    procs = [spawn_cli(*args), spawn_cli(*args)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 0], [0, 6]), results
    for rc, err in results:
        if rc == 6:
            lines = [line for line in err.splitlines() if line.startswith("error:")]
            assert len(lines) == 1 and BUSY in lines[0], err
    assert_complete_output(medium.out)
    assert leftovers(medium.out) == []
    guard.out_before = None  # OUT is expected now; inputs must still be untouched
    assert {k: v for k, v in guard.before.items()} == {k: v for k, v in Guard(guard.inputs, medium.out).before.items()}
