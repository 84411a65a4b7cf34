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
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

import torch  # noqa: F401 - the expensive import this script exists to share

import sa2va_convert.api
import sa2va_convert.batch
import sa2va_convert.cli  # noqa: F401


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
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        replies.write(json.dumps({"rc": rc}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve()
