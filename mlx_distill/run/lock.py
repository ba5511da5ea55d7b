"""One process at a time per run directory.

`RunLock` holds an exclusive `flock` on `runs/<name>/run.lock` while stages run; the file holds
the holder's pid, so a second command can say who has the run. The kernel drops a flock when its
holder dies, so the lock of a killed run is simply taken over (with one log line naming the dead
pid). A side process (`side.py`: the baseline trained beside the KD student) works under its
parent's lock.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Callable
from pathlib import Path

from mlx_distill.errors import BadInput
from mlx_distill.run.side import inherit_parent

LOCK_FILE = "run.lock"


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
        self.inherited = inherit_parent(self.path)

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
