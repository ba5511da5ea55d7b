"""One process at a time per run directory, and side processes that die with their parent.

`RunLock` holds an exclusive `flock` on `runs/<name>/run.lock` while stages run; the file holds
the holder's pid, so a second command can say who has the run. The kernel drops a flock when its
holder dies, so the lock of a killed run is simply taken over (with one log line naming the dead
pid). A side process (the baseline trained beside the KD student) works under its parent's lock:
the parent passes its pid and the read end of a pipe (`MLX_DISTILL_PARENT=pid:fd`), and the
child exits as soon as that pipe reports end-of-file, i.e. when the parent is gone however it
died (SIGKILL included; this works on macOS too). On Linux the child also asks the kernel for
SIGKILL when its parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from mlx_distill.errors import BadInput

LOCK_FILE = "run.lock"
PARENT_ENV = "MLX_DISTILL_PARENT"  # "pid:fd", set for a side process only
_PR_SET_PDEATHSIG = 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "another process"


class RunLock:
    """Exclusive use of a run directory by this process (or by its parent, for a side process).

    `check()` refuses (BadInput) while another process holds the run, without writing anything;
    `claim()` creates the directory if needed, takes the lock and records this pid. `release()`
    (or leaving the `with` block) empties the file and drops the lock.
    """

    def __init__(self, run_dir: Path, log: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._file = None
        self.claimed = False
        self.inherited = _inherit_parent(self.path)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _lock(self, create: bool) -> bool:
        """Take the flock (not yet the pid); False if the run directory does not exist yet."""
        if self._file is not None or self.inherited:
            return True
        if not self.path.exists() and not create:
            if self.run_dir.exists():  # a run directory from before run locks: lock it too
                create = True
            else:
                return False
        if create:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise BadInput(
                f"{self.run_dir} is in use by {_holder(self.path)} (another mlx-distill command "
                "on this run); wait for it to finish or stop it, then rerun"
            ) from None
        self._file = f
        return True

    def check(self) -> None:
        """Refuse if another process holds the run; changes nothing on disk for an existing one."""
        self._lock(create=False)

    def claim(self) -> None:
        """Hold the run for stages about to write into it; record this pid in the lock file."""
        if self.claimed or self.inherited:
            return
        self._lock(create=True)
        f = self._file
        f.seek(0)
        old = f.read().strip()
        if old.isdigit() and int(old) != os.getpid():
            state = "still running but no longer holding it" if _alive(int(old)) else "gone"
            self.log(f"[run] took over the lock of pid {old} ({state})")
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self.claimed = True

    def release(self) -> None:
        if self._file is None:
            return
        if self.claimed:
            self._file.seek(0)
            self._file.truncate()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None
        self.claimed = False


_parent: dict = {}  # {"pid": int} once this process watches its parent


def watch_parent() -> None:
    """In a side process: die with the parent. Called first thing in the CLI (before the heavy
    imports), so a parent killed while this process starts up takes it down too."""
    value = os.environ.pop(PARENT_ENV, None)  # not for this process's own children
    if not value or _parent:
        return
    pid_text, _, fd_text = value.partition(":")
    _parent["pid"] = int(pid_text)
    _die_with_parent(int(pid_text), int(fd_text))


def _inherit_parent(lock_path: Path) -> bool:
    """In a side process: work under the parent's lock (which must record the parent's pid)."""
    watch_parent()
    pid = _parent.get("pid")
    if pid is None:
        return False
    try:
        holder = lock_path.read_text().strip()
    except OSError:
        holder = ""
    if holder != str(pid):
        raise BadInput(f"{lock_path}: the parent process {pid} does not hold this run")
    return True


def _die_with_parent(pid: int, fd: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != pid:  # the parent died before the line above took effect
        os._exit(1)

    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        # End of file: the parent's end of the pipe closed, so the parent is gone.
        print("[side process] parent process gone; stopping (rerun to resume)", file=sys.stderr)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def spawn_side(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start `cmd` as a side process of this one: it works under this process's run lock and
    exits when this process dies (the pipe's write end stays here, never inherited)."""
    read_fd, write_fd = os.pipe()
    env = dict(env, **{PARENT_ENV: f"{os.getpid()}:{read_fd}"})
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, pass_fds=(read_fd,))
    finally:
        os.close(read_fd)
    proc._parent_pipe = write_fd  # closed by close_side() or at this process's exit
    return proc


def close_side(proc: subprocess.Popen) -> None:
    fd = getattr(proc, "_parent_pipe", None)
    if fd is not None:
        os.close(fd)
        proc._parent_pipe = None
