"""A native crash reported as one line: the command (and the pipeline's stage) that died, the signal,
and the command that resumes it.

A library's fatal error (a segfault in a native kernel, glibc's "double free or corruption" abort)
kills the process before any Python error handling runs; the shell then prints "Segmentation fault"
and nothing else. `arm()` starts a small watcher process reading a pipe, and points Python's
faulthandler at that pipe: on SIGSEGV, SIGABRT, SIGBUS, SIGFPE or SIGILL, faulthandler writes the
traceback there and the process dies; the watcher saves the traceback to a file and prints

    error: edgeclr pipeline: the compress stage died from SIGABRT (a crash inside a native library, not a
    Python error; traceback: runs/x/crash.log). runs/x keeps every finished stage and the last checkpoint:
    re-run the same command to resume compress

The process keeps its pid, its locks and its signals (SIGKILL, SIGSTOP, Ctrl-C act on it as before);
a normal exit or a SIGKILL closes the pipe with nothing written, and the watcher exits silently.
"""

from __future__ import annotations

import faulthandler
import json
import os
import subprocess
import sys

_pipe = None  # the write end faulthandler holds (kept referenced)

_WATCHER = r"""
import json, os, signal, sys, tempfile, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the watched process handles it
ctx, dump = {}, []
for raw in sys.stdin.buffer:
    line = raw.decode(errors="replace")
    if line.startswith("#EDGECLR "):
        ctx.update(json.loads(line[9:]))
    else:
        dump.append(line)
text = "".join(dump)
if "Fatal Python error" not in text:
    sys.exit(0)
names = {"Segmentation fault": "SIGSEGV", "Aborted": "SIGABRT", "Bus error": "SIGBUS", "Floating-point exception": "SIGFPE",
         "Floating point exception": "SIGFPE", "Illegal instruction": "SIGILL"}
sig = next((v for k, v in names.items() if "Fatal Python error: " + k in text), "a fatal signal")
out, command, resume = ctx.get("out"), ctx.get("command", "edgeclr"), ctx.get("resume", "re-run the same command")
what = command
if out and ctx.get("pipeline"):
    try:
        stages = json.load(open(os.path.join(out, "pipeline.json")))["stages"]
        running = [k for k, v in stages.items() if v.get("status") == "running"]
        if running:
            what = command + ": the " + running[-1] + " stage"
            resume = resume + " to resume " + running[-1]
    except Exception:
        pass
path = None
for folder in ([out] if out else []) + [tempfile.gettempdir()]:
    try:
        name = "crash-" + time.strftime("%Y%m%d-%H%M%S") + ".log" if folder != out else "crash.log"
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.write(text)
        break
    except OSError:
        path = None
kept = (out + " keeps every finished step and the last checkpoint: ") if out else ""
print("error: " + what + " died from " + sig + " (a crash inside a native library, not a Python error"
      + ("; traceback: " + path if path else "") + "). " + kept + resume, file=sys.stderr, flush=True)
"""


def arm(command: str, resume: str = "re-run the same command", out: str | None = None, pipeline: bool = False) -> None:
    """Watch this process for native crashes (once per process; later calls update what is reported)."""
    global _pipe
    ctx = {"command": command, "resume": resume, "out": str(out) if out else None, "pipeline": pipeline}
    if _pipe is None:
        r, w = os.pipe()
        try:
            subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHER], stdin=r, stdout=subprocess.DEVNULL, close_fds=True)
        except OSError:  # no process to spare: the crash goes unexplained, nothing else changes
            os.close(r)
            os.close(w)
            return
        os.close(r)
        _pipe = os.fdopen(w, "w", buffering=1)
        faulthandler.enable(file=_pipe, all_threads=False)
    _pipe.write("#EDGECLR " + json.dumps(ctx) + "\n")
    _pipe.flush()
