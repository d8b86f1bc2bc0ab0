"""edgeclr.lock with real processes: one writer per output, released by the kernel on SIGKILL."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeclr import lock
from edgeclr.errors import EdgeclrError, OutputError

HELPER = Path(__file__).with_name("lock_holder.py")


class Holder:
    """A separate process that holds a lock until killed."""

    def __init__(self, target, *flags):
        self.p = subprocess.Popen([sys.executable, str(HELPER), "hold", str(target), *flags],
                                  stdout=subprocess.PIPE, text=True)
        self.child = None
        line = self.p.stdout.readline()
        if line.startswith("child "):
            self.child = int(line.split()[1])
            line = self.p.stdout.readline()
        assert line.startswith("held"), line
        self.pid = self.p.pid

    def kill(self):
        self.p.kill()
        self.p.wait(5)

    def close(self):
        if self.p.poll() is None:
            self.kill()
        self.p.stdout.close()
        if self.child:
            try:
                os.kill(self.child, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def holders():
    started = []

    def start(target, *flags):
        h = Holder(target, *flags)
        started.append(h)
        return h

    yield start
    for h in started:
        h.close()


def try_in_other_process(target, *flags):
    r = subprocess.run([sys.executable, str(HELPER), "try", str(target), *flags], capture_output=True, text=True, timeout=20)
    return r.returncode, r.stdout.strip()


def refused(target, **kw):
    """The LockedError message of locking `target` here, and how long the refusal took."""
    t = time.monotonic()
    with pytest.raises(lock.LockedError) as e:
        lock.hold(target, "the run folder", **kw).acquire()
    return str(e.value), time.monotonic() - t


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_writer_refused_at_once_then_free_after_sigkill(tmp_path, holders):
    out = tmp_path / "runs" / "x"
    h = holders(out, "--fork")  # the holder also forks a child (a DataLoader worker) that outlives it
    msg, took = refused(out)
    assert took < 0.5
    assert isinstance(lock.LockedError(msg), EdgeclrError) and "\n" not in msg
    assert msg.startswith(f"the run folder {out} is being written by another edgeclr process (pid {h.pid} on host "
                          f"{socket.gethostname()}, since ")
    assert "command: " in msg and "lock_holder.py hold" in msg
    assert msg.endswith("wait for it to finish, or choose another --out")
    assert "is being written" in try_in_other_process(out)[1]
    # the holder's JSON in the lock file
    info = json.loads((out / ".edgeclr.lock").read_text())
    assert info["pid"] == h.pid and info["what"] == f"the test output {out}" and info["started"][:2] == "20"
    h.kill()  # SIGKILL: no cleanup ran; the forked child still lives
    os.kill(h.child, 0)
    t = time.monotonic()
    with lock.hold(out, "the run folder") as held:
        assert held.kind == "flock" and lock.held_by_me(out)
        assert json.loads((out / ".edgeclr.lock").read_text())["pid"] == os.getpid()
    assert time.monotonic() - t < 0.5
    assert not lock.held_by_me(out)
    assert (out / ".edgeclr.lock").exists()  # left in place: without a held flock it is no lock


def test_different_outputs_do_not_block_each_other(tmp_path, holders):
    holders(tmp_path / "a")
    holders(tmp_path / "emb" / "one.npy")
    with lock.hold(tmp_path / "b", "the run folder"), lock.hold(tmp_path / "emb" / "two.npy", "the embeddings"):
        assert try_in_other_process(tmp_path / "c") == (0, "ok flock")


def test_nested_requests_in_one_process_are_reentrant(tmp_path):
    out = tmp_path / "out"
    with lock.hold(out, "the pipeline folder") as outer:
        assert outer.kind == "flock"
        with lock.hold(out, "the run folder") as same, lock.hold(out / "train", "the run folder") as stage, \
                lock.hold(out / "export" / "model.onnx", "the model file") as f:
            assert same.kind == stage.kind == f.kind == "nested"
            assert not (out / "train").exists() and not (out / "export").exists()
        # the inner releases kept the outer lock
        code, msg = try_in_other_process(out)
        assert code == 3 and "is being written" in msg
        # a path inside the held folder, from another process: refused, naming the folder and its holder
        code, msg = try_in_other_process(out / "train")
        assert code == 3 and f"is inside {out}, which is being written by another edgeclr process (pid {os.getpid()}" in msg
    assert try_in_other_process(out) == (0, "ok flock")


def test_inside_a_folder_held_elsewhere_is_refused(tmp_path, holders):
    out = tmp_path / "out"
    h = holders(out)
    for inner in (out / "train", out / "embeddings.npy"):
        msg, _ = refused(inner)
        assert f"is inside {out}, which is being written" in msg and f"pid {h.pid}" in msg


def test_output_file_locks_beside_it_and_folder_gets_only_the_lock_file(tmp_path, holders):
    npy = tmp_path / "emb" / "same.npy"
    with lock.hold(npy, "the embeddings file") as held:
        assert held.lock_file == tmp_path / "emb" / ".same.npy.lock" == lock.lock_file_for(npy)
        assert sorted(p.name for p in npy.parent.iterdir()) == [".same.npy.lock"]  # same.npy not created
        code, msg = try_in_other_process(npy)
        assert code == 3 and msg.startswith(f"locked: the test output {npy} is being written by another edgeclr "
                                            f"process (pid {os.getpid()}")
    run = tmp_path / "a" / "b" / "run"
    with lock.hold(run, "the run folder"):
        assert [p.name for p in run.iterdir()] == [".edgeclr.lock"]
    # the same file through another spelling of its path (relative, via a symlink) is the same lock
    (tmp_path / "link").symlink_to(npy.parent)
    h = holders(tmp_path / "link" / "same.npy")
    msg, _ = refused(npy)
    assert f"pid {h.pid}" in msg


def test_fallback_live_holder_refuses_and_release_removes_the_file(tmp_path, holders):
    out = tmp_path / "out"
    h = holders(out, "--file")
    pid_file = out / ".edgeclr.lock.pid"
    assert json.loads(pid_file.read_text())["pid"] == h.pid
    for mode in ("file", "auto"):  # flock users also see a lock-file holder
        msg, took = refused(out, mode=mode)
        assert f"pid {h.pid} on host {socket.gethostname()}" in msg and took < 0.5 and "remove the lock file" not in msg
    with lock.hold(tmp_path / "other", mode="file") as held:
        assert held.kind == "file"
    assert not (tmp_path / "other" / ".edgeclr.lock.pid").exists()


def test_fallback_flock_holder_refuses_a_lock_file_user(tmp_path, holders):
    out = tmp_path / "out"
    h = holders(out)
    msg, _ = refused(out, mode="file")
    assert f"pid {h.pid}" in msg


def test_fallback_dead_holder_is_taken_over_with_a_warning(tmp_path, holders):
    out = tmp_path / "out"
    h = holders(out, "--file")
    h.kill()  # SIGKILL leaves the pid file behind
    pid_file = out / ".edgeclr.lock.pid"
    assert json.loads(pid_file.read_text())["pid"] == h.pid
    with pytest.warns(UserWarning, match=f"took over the lock file .* left by pid {h.pid} on host .*no longer running"):
        held = lock.hold(out, "the run folder", mode="file").acquire()
    assert held.kind == "file" and json.loads(pid_file.read_text())["pid"] == os.getpid()
    assert try_in_other_process(out, "--file")[0] == 3
    held.release()
    assert not pid_file.exists()
    # a pid file written by hand for a process that has ended, this host
    pid_file.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "x", "command": "y"}))
    with pytest.warns(UserWarning, match="took over"):
        with lock.hold(out, mode="file"):
            pass


def test_fallback_foreign_host_is_refused_until_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pid_file = out / ".edgeclr.lock.pid"
    pid_file.write_text(json.dumps({"pid": 1234, "host": "elsewhere", "started": "2026-12-03T21:40:02",
                                    "command": "edgeclr train --out runs/x", "what": "the run folder", "token": "t"}))
    msg, _ = refused(out, mode="file")
    assert msg == (f"the run folder {out} is being written by another edgeclr process (pid 1234 on host elsewhere, "
                   "since 2026-12-03T21:40:02, command: edgeclr train --out runs/x); wait for it to finish, or "
                   f"choose another --out; remove the lock file {pid_file} if that host is gone")
    assert "remove the lock file" in refused(out)[0]  # flock users too
    assert pid_file.exists()  # never deleted for another host
    pid_file.unlink()
    with lock.hold(out, mode="file"):
        pass


def test_file_system_without_flock_falls_back(tmp_path, monkeypatch):
    """flock failing with ENOLCK (some network file systems) switches to the lock file."""
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    with lock.hold(tmp_path / "out") as held:
        assert held.kind == "file" and (tmp_path / "out" / ".edgeclr.lock.pid").exists()


def test_unwritable_place_is_an_output_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"cannot write to the run folder .*file/run: Not a directory .*Choose another --out"):
        lock.hold(tmp_path / "file" / "run", "the run folder").acquire()
    with pytest.raises(EdgeclrError, match="cannot write to"):
        lock.hold(tmp_path / "file" / "x" / "same.npy", "the embeddings file").acquire()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_an_output_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for target in (ro / "run", ro, ro / "same.npy"):
            with pytest.raises(OutputError, match="cannot write to .*Permission denied"):
                lock.hold(target, "the output").acquire()
    finally:
        ro.chmod(0o755)


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="no sysfs")
def test_folder_that_cannot_be_created_is_an_output_error():
    with pytest.raises(OutputError, match="cannot write to the run folder /sys/kernel/edgeclr-lock-test/run"):
        lock.hold("/sys/kernel/edgeclr-lock-test/run", "the run folder").acquire()


@pytest.mark.parametrize("mode", ["auto", "file", "file-stale"])
def test_simultaneous_writers_exactly_one_wins(tmp_path, mode):
    out = tmp_path / "out"
    if mode == "file-stale":  # all of them race to take over a dead process's lock file
        out.mkdir()
        (out / ".edgeclr.lock.pid").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    at = str(time.time() + 0.4)
    flags = ["--file"] if mode.startswith("file") else []
    ps = [subprocess.Popen([sys.executable, str(HELPER), "race", str(out), at, *flags], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(6)]
    results = [p.stdout.readline() for p in ps]  # the winner holds its lock until all have answered
    for p in ps:
        p.communicate(timeout=20)
    assert sum(r.startswith("ok") for r in results) == 1, results
    assert sum(r.startswith("locked: the test output") for r in results) == 5, results


def test_rank0_only(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with lock.hold(tmp_path / "out", rank0_only=True) as held:
        assert held.kind == "skipped" and not (tmp_path / "out").exists()
    with lock.hold(tmp_path / "out") as held:  # the caller decides
        assert held.kind == "flock"
    monkeypatch.setenv("RANK", "0")
    with lock.hold(tmp_path / "out", rank0_only=True) as held:
        assert held.kind == "flock" and lock.is_rank0()
