"""A pre-warmed launcher for ``sa2va-convert`` child processes (test speed-up only).

Importing torch costs 2-4 s on the CI machines; the reliability catalogue runs
the CLI ~40 times. This script imports the converter's heavy dependencies
once, then, for each request read from stdin, forks a child that behaves like
a fresh ``sa2va-convert`` process: its own pid, cwd, environment, stdout and
stderr files and exit status, running the same ``sa2va_convert.cli.main`` the
console script runs. Nothing from a previous child survives into the next
(each child starts from the pristine post-import zygote), and the zygote never
runs a conversion itself (no thread pools exist before fork).

Protocol, one JSON object per line: request {"args", "env", "cwd", "stdout",
"stderr", "timeout"} -> reply {"rc"}. ``SA2VA_RELIABILITY_FRESH=1`` makes the
tests bypass this and start a new interpreter per run.

Optional request fields, for the interrupt sweep (``test_interrupt_sweep.py``): ``"entry": "console"``
runs the console script's entry (``sa2va_convert._entry.main``, which owns SIGINT/SIGTERM) instead of
the click group; ``"signal"`` + ``"delay"`` make this launcher send that signal to the child ``delay``
seconds after the fork (if it is still running); ``"signal"`` + ``"after_publish_lines"`` + ``"probe"``
make the child send the signal to itself at the N-th line Python executes from the moment OUT starts
to be published (``write.atomic.publish`` entered), and write {"lines", "fired"} to the probe file at exit. The
reply then also has "seconds" (fork to exit) and "signalled".
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

import torch  # noqa: F401 - the expensive import this script exists to share

import sa2va_convert.api
import sa2va_convert.batch
import sa2va_convert.cli  # noqa: F401


_SWEPT = {signal.SIGINT, signal.SIGTERM}


def _child(req: dict) -> int:
    for name, fd in (("stdout", 1), ("stderr", 2)):
        target = os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGALRM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.alarm(int(req.get("timeout", 300)))  # a hung child dies instead of hanging the suite
    sys.argv = ["sa2va-convert", *req["args"]]
    if req.get("after_publish_lines"):
        _signal_after_publish(int(req["after_publish_lines"]), int(req["signal"]), req["probe"])
    if req.get("entry") == "console":
        from sa2va_convert._entry import main as console

        # as in a fresh interpreter before the entry point runs: a signal kills (the start-up window)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SWEPT)  # blocked since the fork (see serve)
        try:
            console(list(req["args"]))
            return 0
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1
    from sa2va_convert.cli import main

    try:
        main(args=list(req["args"]), prog_name="sa2va-convert")
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - report like the interpreter would
        traceback.print_exc()
        return 1


def _signal_after_publish(n: int, sig: int, probe: str) -> None:
    """Send ``sig`` to this process at the ``n``-th line executed from the moment ``atomic.publish`` (the
    rename of the finished folder into place) is entered, every frame on the stack traced; the product's
    code runs unchanged (test instrumentation only)."""
    import sa2va_convert.write.atomic as atomic

    real_publish, real_exit = atomic.publish, os._exit
    state = {"lines": 0, "fired": False}

    def tracer(frame, event, arg):
        if state["fired"]:  # done: stop tracing (the rest of the run at full speed)
            sys.settrace(None)
            return None
        if event == "line":
            state["lines"] += 1
            if state["lines"] == n:
                state["fired"] = True
                os.kill(os.getpid(), sig)
        return tracer

    def traced_publish(*args, **kwargs):
        frame = sys._getframe(1)
        while frame is not None:
            frame.f_trace, frame.f_trace_lines = tracer, True
            frame = frame.f_back
        sys.settrace(tracer)
        return real_publish(*args, **kwargs)

    def exit_with_probe(code):
        sys.settrace(None)
        with open(probe, "w") as f:
            json.dump(state, f)
        real_exit(code)

    atomic.publish = traced_publish
    os._exit = exit_with_probe


def _wait(pid: int, req: dict) -> tuple[int, bool]:
    """waitpid, sending ``req["signal"]`` ``req["delay"]`` seconds after the fork if the child still runs."""
    if req.get("delay") is None or not req.get("signal"):
        return os.waitpid(pid, 0)[1], False
    deadline = time.monotonic() + float(req["delay"])
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, False
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, int(req["signal"]))
            return os.waitpid(pid, 0)[1], True
        time.sleep(min(left, 0.0005))


def serve() -> None:
    requests = os.fdopen(os.dup(0), "r")
    replies = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # stray prints must not corrupt the protocol
    sys.stdout.flush()
    replies.write('{"ready": true}\n')
    replies.flush()
    for line in requests:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        for name in ("stdout", "stderr"):  # there even if a signal ends the child before it opens them
            open(req[name], "w").close()  # noqa: SIM115
        swept = req.get("entry") == "console"
        if swept:  # the child unblocks them right before the entry point, like a fresh interpreter's start
            signal.pthread_sigmask(signal.SIG_BLOCK, _SWEPT)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                requests.close()
                replies.close()
                code = _child(req)
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code & 0xFF)
        if swept:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SWEPT)
        started = time.monotonic()
        status, signalled = _wait(pid, req)
        rc = os.waitstatus_to_exitcode(status)
        replies.write(json.dumps({"rc": rc, "seconds": time.monotonic() - started, "signalled": signalled}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve()
