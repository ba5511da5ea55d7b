"""The side process: the baseline training in a second process beside the KD student (the
runner spawns and joins it, `runner._spawn_side`).

Distill and baseline share no state: each reads the upstream stages and writes its own folders,
so they can train side by side. On a 2-core CPU this nearly halves their wall time, since a step
of a small model cannot keep both cores busy; each process keeps half of the BLAS threads.

The child works under its parent's run lock and dies with it: the parent passes its pid and the
read end of a pipe (`MLX_DISTILL_PARENT=pid:fd`), and the child exits as soon as that pipe
reports end-of-file, i.e. when the parent is gone however it died (SIGKILL included; this works
on macOS too). On Linux the child also asks the kernel for SIGKILL when its parent dies
(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from mlx_distill import backend
from mlx_distill.errors import BadInput

PARENT_ENV = "MLX_DISTILL_PARENT"  # "pid:fd", set for a side process only
_PR_SET_PDEATHSIG = 1


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


def inherit_parent(lock_path: Path) -> bool:
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


def half_cores() -> tuple[int, int]:
    n = os.cpu_count() or 1
    return max(1, n // 2), max(1, n - n // 2)


class blas_share:
    """While a side process trains, this process keeps half of the BLAS threads."""

    def __init__(self, active: bool):
        self.active = active

    def __enter__(self):
        self.before = backend.blas_threads() if self.active else None
        if self.active:
            backend.set_blas_threads(half_cores()[0])

    def __exit__(self, *exc):
        if self.active:  # the count it had (OPENBLAS_NUM_THREADS), not the core count
            backend.set_blas_threads(self.before or os.cpu_count() or 1)


def stop(proc: subprocess.Popen) -> None:
    """Stop a side process (it checkpoints as it goes; a rerun resumes it)."""
    proc.terminate()
    proc.wait()
    close_side(proc)


def is_side_process() -> bool:
    """Whether `spawn` started this process (`watch_parent` consumes the variable early in the
    CLI, so what it found is remembered)."""
    return bool(os.environ.get(PARENT_ENV)) or "pid" in _parent
