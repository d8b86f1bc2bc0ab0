"""One writer per output: an exclusive lock on a run folder or an output file while a command writes it.

    with lock.hold("runs/x", "the run folder"):      # lock file runs/x/.edgeclr.lock
        ...                                           # everything written into runs/x
    with lock.hold("emb/same.npy", "the embeddings file"):   # lock file emb/.same.npy.lock
        ...

- The lock is an OS file lock (`fcntl.flock`, exclusive, non-blocking) on the lock file: the kernel
  releases it when the process ends, however it ends (a SIGKILL leaves no stale lock). The lock file
  itself stays after release; a file without a held lock is not a lock.
- The holder writes JSON into the lock file (pid, host, command, started, what); a second writer
  is refused at once with `LockedError`, one line naming the holder and what to do.
- Re-entrant within one process: a request for a path this process already holds, or for a path
  inside a folder it holds, succeeds without taking another lock (a pipeline holding OUT runs
  train on OUT or OUT/train).
- A request for a path inside a folder that another process holds (its `.edgeclr.lock` exists and is
  locked) is refused too. Only that direction is checked: locking a folder does not look for locks
  held further down inside it.
- Forked children (DataLoader workers) close their copy of the lock's descriptor and start with no
  locks held, so a killed holder's orphaned workers do not keep its output locked. Descriptors are
  close-on-exec, so spawned programs never inherit them.
- Where the file system cannot lock (flock fails with ENOLCK, EOPNOTSUPP or ENOSYS, some network
  file systems), or without fcntl, or with EDGECLR_LOCK=file: an exclusive-create lock file
  (`.edgeclr.lock.pid` beside the other) holding the same JSON, deleted on release. A file left by a
  dead process on this host is taken over with a warning; one from another host is refused (its
  liveness cannot be checked from here) until someone removes it. Each kind of holder also checks
  for the other, so a process with EDGECLR_LOCK=file and one with flock still exclude each other.

Torch-free, standard library only.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shlex
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

from edgeclr.errors import EdgeclrError, OutputError

try:
    import fcntl
except ImportError:  # Windows: the lock-file fallback only
    fcntl = None

DIR_LOCK = ".edgeclr.lock"
FALLBACK_SUFFIX = ".pid"
# "auto": flock, falling back to the lock file where the file system cannot lock; "file": lock file only
MODE = "file" if os.environ.get("EDGECLR_LOCK", "").lower() == "file" else "auto"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
_ADVICE = "wait for it to finish, or choose another --out"


class LockedError(EdgeclrError, RuntimeError):
    """Another process is writing the same output: the message names it and what to do."""


class _Held:
    """One lock this process holds: the OS-level handle and how many `hold`s share it."""

    def __init__(self, path: Path, is_dir: bool, lock_file: Path, fd: int | None, token: str | None):
        self.path, self.is_dir, self.lock_file, self.fd, self.token = path, is_dir, lock_file, fd, token
        self.count = 1


_held: dict[Path, _Held] = {}
_mutex = threading.RLock()


def _after_fork_in_child() -> None:
    """A forked child is another process: it closes its copies of the lock descriptors (the parent
    keeps the locks) and holds nothing."""
    global _mutex
    _mutex = threading.RLock()
    for h in _held.values():
        if h.fd is not None:
            try:
                os.close(h.fd)
            except OSError:
                pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def is_rank0() -> bool:
    """True unless torchrun's RANK names another process than rank 0."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def command_line() -> str:
    """This process's command line as a user typed it (`edgeclr train ...` for the console script or -m)."""
    argv = list(sys.argv) or [sys.executable]
    if Path(argv[0]).name in ("edgeclr", "__main__.py"):
        argv[0] = "edgeclr"
    return shlex.join(argv)


def lock_file_for(target: str | Path, is_dir: bool | None = None) -> Path:
    """The lock file of `target`: `<folder>/.edgeclr.lock` for a folder, `<dir>/.<name>.lock` for a file."""
    path = _resolve(target)
    if _is_dir(path, is_dir):
        return path / DIR_LOCK
    return path.parent / f".{path.name}.lock"


def held_by_me(target: str | Path) -> bool:
    """True when this process holds `target`, or a folder that contains it."""
    return _holder_of(_resolve(target)) is not None


def hold(target: str | Path, what: str = "the output", *, is_dir: bool | None = None, rank0_only: bool = False,
         mode: str | None = None) -> "OutputLock":
    """An `OutputLock` on `target` (use it in `with`); see `OutputLock`."""
    return OutputLock(target, what, is_dir=is_dir, rank0_only=rank0_only, mode=mode)


class OutputLock:
    """An exclusive lock on an output folder or file, taken by `acquire()` or `with`.

    Args:
        target: the run/stage folder, or the output file (its lock file lies beside it).
        what: the output in words, for messages ("the run folder", "the embeddings file").
        is_dir: whether `target` is a folder; None guesses (an existing folder, or a missing path
            without a suffix). Callers that know should say.
        rank0_only: under torchrun, only rank 0 locks; the other ranks get a lock that does nothing.
        mode: "auto" (flock, the lock-file fallback where the file system cannot lock) or "file"
            (the lock file only); None takes the module's MODE (EDGECLR_LOCK=file sets it).

    Raises (from `acquire`):
        LockedError: another process holds `target` or a folder that contains it.
        OutputError: the folder for the lock file cannot be created or written.
    """

    def __init__(self, target: str | Path, what: str = "the output", *, is_dir: bool | None = None,
                 rank0_only: bool = False, mode: str | None = None):
        self.target, self.what = Path(target), what
        self.path = _resolve(target)
        self.is_dir = _is_dir(self.path, is_dir)
        self.lock_file = self.path / DIR_LOCK if self.is_dir else self.path.parent / f".{self.path.name}.lock"
        self.mode = mode or MODE
        if self.mode not in ("auto", "file"):
            raise ValueError(f"lock mode {self.mode!r}: use 'auto' or 'file'")
        self.skip = rank0_only and not is_rank0()
        self.kind: str | None = None  # after acquire: "flock", "file", "nested" or "skipped"
        self._entry: _Held | None = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"OutputLock({str(self.target)!r}, kind={self.kind})"

    def acquire(self) -> "OutputLock":
        if self.kind is not None:
            raise RuntimeError(f"{self!r} is already acquired")
        if self.skip:
            self.kind = "skipped"
            return self
        with _mutex:
            outer = _holder_of(self.path)
            if outer is not None:  # this process already writes it (or the folder around it)
                outer.count += 1
                self._entry, self.kind = outer, "nested"
                return self
            self._check_ancestors()  # before anything is created: a refused writer leaves no folder behind
            self._make_parent()
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command_line(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "what": f"{self.what} {self.target}",
                    "token": secrets.token_hex(8)}
            use_file = self.mode == "file" or fcntl is None
            if not use_file:
                fd = self._flock(info)
                if fd is None:
                    use_file = True
                else:
                    entry = _Held(self.path, self.is_dir, self.lock_file, fd, None)
                    self.kind = "flock"
            if use_file:
                self._file_lock(info)
                entry = _Held(self.path, self.is_dir, self._pid_file, None, info["token"])
                self.kind = "file"
            _held[self.path] = entry
            self._entry = entry
        return self

    def release(self) -> None:
        if self.kind in (None, "skipped"):
            self.kind = None
            return
        with _mutex:
            e, self._entry, self.kind = self._entry, None, None
            e.count -= 1
            if e.count > 0 or _held.get(e.path) is not e:
                return
            del _held[e.path]
            if e.fd is not None:
                os.close(e.fd)  # releases the flock; the lock file stays (another process may hold it next)
            else:
                _remove_own_pid_file(e.lock_file, e.token)

    # -- acquiring ---------------------------------------------------------------------------

    @property
    def _pid_file(self) -> Path:
        return self.lock_file.with_name(self.lock_file.name + FALLBACK_SUFFIX)

    def _cannot(self, e: OSError, where: Path) -> OutputError:
        return OutputError(f"cannot write to {self.what} {self.target}: {e.strerror or e} ({where}). Choose another "
                           "--out (a folder you can write to), or fix its permissions; nothing was done")

    def _make_parent(self) -> None:
        folder = self.lock_file.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._cannot(e, folder) from None

    def _check_ancestors(self) -> None:
        """Refuse a path inside a folder that another process holds (its lock file is locked)."""
        for folder in self.lock_file.parent.parents if self.is_dir else [self.lock_file.parent, *self.lock_file.parent.parents]:
            lf = folder / DIR_LOCK
            if lf.is_file() and _locked_elsewhere(lf):
                holder = _read_info(lf)
                raise LockedError(f"{self.what} {self.target} is inside {_shown(folder, self.target)}, "
                                  f"which is being written by another edgeclr process ({_describe(holder)}); {_ADVICE}")
            pf = lf.with_name(lf.name + FALLBACK_SUFFIX)
            if pf.is_file():
                holder = _read_info(pf)
                if holder and _pid_file_is_live(holder):
                    raise LockedError(f"{self.what} {self.target} is inside {_shown(folder, self.target)}, "
                                      f"which is being written by another edgeclr process ({_describe(holder)}); "
                                      f"{_ADVICE}{_foreign_advice(holder, pf)}")

    def _flock(self, info: dict) -> int | None:
        """The locked descriptor, or None where the file system cannot flock."""
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM) and _locked_elsewhere(self.lock_file):
                # another user's lock file: say who holds it rather than "permission denied"
                raise LockedError(self._message(_read_info(self.lock_file, wait=True))) from None
            raise self._cannot(e, self.lock_file) from None
        for attempt in range(5):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) and attempt < 4:
                    time.sleep(0.02)  # a moment's shared probe by a process checking its ancestors
                    continue
                os.close(fd)
                if e.errno in _NO_FLOCK:
                    return None
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LockedError(self._message(_read_info(self.lock_file, wait=True))) from None
                raise self._cannot(e, self.lock_file) from None
        try:
            # a process using the lock-file fallback (EDGECLR_LOCK=file) may hold it
            pf = self._pid_file
            holder = _read_info(pf) if pf.is_file() else None
            if holder and _pid_file_is_live(holder):
                raise LockedError(self._message(holder) + _foreign_advice(holder, pf))
            data = (json.dumps(info) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as e:
            os.close(fd)
            raise self._cannot(e, self.lock_file) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _file_lock(self, info: dict) -> None:
        """Exclusive-create the pid file; take over one left by a dead process on this host."""
        pf = self._pid_file
        if self.lock_file.is_file() and _locked_elsewhere(self.lock_file):  # a process using flock holds it
            raise LockedError(self._message(_read_info(self.lock_file, wait=True)))
        data = (json.dumps(info) + "\n").encode()
        for _ in range(5):
            try:
                fd = os.open(pf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            except FileExistsError:
                holder = _read_info(pf, wait=True)
                if holder is None:
                    try:  # unreadable or empty: written by a process that died while writing it, unless new
                        if time.time() - pf.stat().st_mtime < 10:
                            raise LockedError(self._message(None)) from None
                    except FileNotFoundError:
                        continue
                elif _pid_file_is_live(holder):
                    raise LockedError(self._message(holder) + _foreign_advice(holder, pf)) from None
                if _take_over(pf, holder):
                    warnings.warn(f"{self.what} {self.target}: took over the lock file {pf} left by "
                                  f"{_describe(holder) if holder else 'an unknown process'}, which is no longer running",
                                  stacklevel=3)
                continue
            except OSError as e:
                raise self._cannot(e, pf) from None
            try:
                os.write(fd, data)
            except OSError as e:
                os.close(fd)
                try:
                    os.unlink(pf)  # created just now by this process, empty or partial
                except OSError:
                    pass
                raise self._cannot(e, pf) from None
            os.close(fd)
            return
        raise LockedError(self._message(_read_info(pf)))

    def _message(self, holder: dict | None) -> str:
        return f"{self.what} {self.target} is being written by another edgeclr process ({_describe(holder)}); {_ADVICE}"


# -- helpers -------------------------------------------------------------------------------------

def _resolve(target: str | Path) -> Path:
    return Path(os.path.abspath(Path(target).expanduser())).resolve()


def _is_dir(path: Path, is_dir: bool | None) -> bool:
    if is_dir is not None:
        return is_dir
    if path.exists():
        return path.is_dir()
    return path.suffix == ""


def _holder_of(path: Path) -> _Held | None:
    """The lock this process holds on `path` or on a folder containing it."""
    with _mutex:
        for h in _held.values():
            if path == h.path or (h.is_dir and path.is_relative_to(h.path)):
                return h
    return None


def _shown(folder: Path, target: Path) -> str:
    """`folder` as the user would write it: relative when `target` was given relative."""
    return str(folder) if target.is_absolute() else os.path.relpath(folder)


def _locked_elsewhere(lock_file: Path) -> bool:
    """True when another open file holds an exclusive flock on `lock_file` (probed, then let go)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(lock_file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)
    return False


def _read_info(path: Path, wait: bool = False) -> dict | None:
    """The holder's JSON, or None. With `wait`, give a holder that has just locked 0.2 s to write it."""
    for i in range(5 if wait else 1):
        try:
            d = json.loads(path.read_text())
            if isinstance(d, dict):
                return d
        except (OSError, ValueError):
            pass
        if i < 4 and wait:
            time.sleep(0.05)
    return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "its details are not written yet"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('started', '?')}, "
            f"command: {holder.get('command', '?')}")


def _foreign_advice(holder: dict, pid_file: Path) -> str:
    if holder.get("host") != socket.gethostname():
        return f"; remove the lock file {pid_file} if that host is gone"
    return ""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill would end the process there
        import ctypes

        k = ctypes.windll.kernel32
        h = k.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not h:
            return ctypes.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        ok = k.GetExitCodeProcess(h, ctypes.byref(code))
        k.CloseHandle(h)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_file_is_live(holder: dict) -> bool:
    """A pid file counts unless its process is known to be gone: on another host it always counts."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        return _pid_alive(int(holder.get("pid")))
    except (TypeError, ValueError):
        return False


def _take_over(pf: Path, stale: dict | None) -> bool:
    """Move a dead holder's pid file aside, so that the next exclusive create can succeed. Renaming
    is atomic: of two processes taking over, one moves it; if what was moved is not the stale file
    (a third process created a new one meanwhile), it is put back."""
    aside = pf.with_name(f"{pf.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(pf, aside)
    except FileNotFoundError:
        return False
    if _read_info(aside) != stale:
        try:
            os.link(aside, pf)  # put a live holder's file back (never over a newer one)
            os.unlink(aside)
        except FileExistsError:
            os.unlink(aside)
        except OSError:  # no hard links on this file system
            os.replace(aside, pf)
        return False
    os.unlink(aside)
    return True


def _remove_own_pid_file(pf: Path, token: str | None) -> None:
    """Delete the pid file only when it is still this holder's (never another process's)."""
    holder = _read_info(pf)
    if holder is not None and holder.get("token") == token:
        try:
            os.unlink(pf)
        except FileNotFoundError:
            pass
