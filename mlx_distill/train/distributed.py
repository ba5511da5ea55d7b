"""Data parallelism with MLX's own engine (`mx.distributed`): the group, reductions, sharding.

A process is part of a group when a launcher started it: `mlx.launch` (or `mlx-distill run
--hosts FILE`, which calls it) sets `MLX_RANK` plus `MLX_HOSTFILE` (ring), `MLX_JACCL_COORDINATOR`
(jaccl) or `NCCL_HOST_IP` (nccl); `mpirun` sets `OMPI_COMM_WORLD_RANK`. `init()` joins that group
strictly (a group that cannot form is an error, never a silent single process). Without a launcher
every helper here is the identity and the code runs as one process.

Rules the rest of the package follows inside a group:
- every rank seeds NumPy and MLX identically and builds the same global batch; rank r trains on
  rows [r * B / W, (r + 1) * B / W) of it (`shard_rows`);
- gradients are summed weighted by each rank's unmasked token count and divided by the global
  count (`token_mean`), so the update equals the one-process update on the global batch;
- rank 0 alone writes run files (`is_main`); the run directory must be one folder that every
  rank sees at the same path (checked by `check_shared_dir`);
- reductions run on the CPU stream (ring collectives on a GPU stream can hang: mlx#4475).

Failure is loud: a rank that dies closes its sockets and the ring backend raises "connection to a
peer was lost" in the others' next collective (exit 1). `watch(...)` adds a deadline around a
collective that should be quick (a training step): a rank still waiting after `timeout()` seconds
(a hung peer) prints why and exits 1. A rank that `mlx-distill run --hosts` started
(`run/launch.py`) ends with its exit code as its last stderr line (`launched.report_exit`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_distill.errors import BadInput, StageIncomplete
from mlx_distill.train.launched import report_exit

TIMEOUT_ENV = "MLX_DISTILL_TIMEOUT"  # seconds a training step may wait for the other ranks
DEFAULT_TIMEOUT = 300.0
BACKENDS = ("ring", "jaccl", "mpi", "nccl")

_group: mx.distributed.Group | None = None


def launched_backend() -> str | None:
    """The backend a launcher set this process up for, from its environment; None if none."""
    env = os.environ
    if "MLX_RANK" in env and env.get("MLX_JACCL_COORDINATOR"):
        return "jaccl"
    if "MLX_RANK" in env and env.get("NCCL_HOST_IP"):
        return "nccl"
    if "MLX_RANK" in env and env.get("MLX_HOSTFILE"):
        return "ring"
    if "OMPI_COMM_WORLD_RANK" in env:
        return "mpi"
    return None


def init() -> mx.distributed.Group | None:
    """Join the launcher's group (once); None when not launched or the group has one rank."""
    global _group
    backend = launched_backend()
    if _group is not None or backend is None:
        return _group
    if not mx.distributed.is_available(backend):
        raise BadInput(f"launched for the {backend} backend, which this MLX build does not have")
    group = mx.distributed.init(strict=True, backend=backend)
    if group.size() > 1:
        _group = group
    return _group


def group() -> mx.distributed.Group | None:
    return _group


def rank() -> int:
    return _group.rank() if _group is not None else 0


def world() -> int:
    return _group.size() if _group is not None else 1


def is_main() -> bool:
    return rank() == 0


def timeout() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))


def available_backends() -> dict[str, bool]:
    return {b: bool(mx.distributed.is_available(b)) for b in BACKENDS}


def launched_world() -> int | None:
    """The world size the launcher's environment names (before joining), None if unknown."""
    env, backend = os.environ, launched_backend()
    try:
        if backend == "ring":
            return len(json.loads(Path(env["MLX_HOSTFILE"]).read_text()))
        if backend == "jaccl" and env.get("MLX_IBV_DEVICES"):
            return len(json.loads(Path(env["MLX_IBV_DEVICES"]).read_text()))
        if backend == "nccl" and env.get("MLX_WORLD_SIZE"):
            return int(env["MLX_WORLD_SIZE"])
        if backend == "mpi" and env.get("OMPI_COMM_WORLD_SIZE"):
            return int(env["OMPI_COMM_WORLD_SIZE"])
    except (OSError, ValueError, TypeError):
        return None
    return None


def describe() -> dict:
    """For `doctor`: backends this MLX build has, and the group this process would join (from
    the launcher's environment; nothing is joined)."""
    backend = launched_backend()
    info: dict = {"backends": available_backends()}
    if backend is None:
        info["group"] = "single process (start ranks with mlx.launch, or run --hosts FILE)"
        return info
    rank = int(os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))
    info["group"] = {"backend": backend, "rank": rank, "size": launched_world()}
    if backend == "ring":
        try:
            info["group"]["hosts"] = json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text())
        except (OSError, ValueError) as e:
            info["group"]["hostfile_error"] = f"{os.environ['MLX_HOSTFILE']}: {e}"
    return info


# -- reductions (all on the CPU stream) ------------------------------------------------------


def all_sum(x: mx.array) -> mx.array:
    if _group is None:
        return x
    return mx.distributed.all_sum(x, group=_group, stream=mx.cpu)


def barrier() -> None:
    """Wait until every rank gets here (a dead rank makes this raise)."""
    if _group is not None:
        mx.eval(all_sum(mx.array(1.0)))


def token_mean(grads, loss: mx.array, metrics: dict, n: mx.array):
    """Global token means from per-rank token means.

    grads/loss/metrics are means over this rank's n unmasked tokens; returns the means over all
    ranks' tokens: sum_r(n_r * x_r) / sum_r(n_r). The leaves travel in one flat buffer per dtype
    (one all-reduce each, plus one for n). Identity outside a group.
    """
    if _group is None:
        return grads, loss, metrics
    n = n.astype(mx.float32)
    total = mx.maximum(all_sum(n), 1.0)
    tree = {"grads": grads, "loss": loss, "metrics": metrics}
    flat = tree_flatten(tree)
    out = []
    for dtype in {v.dtype for _, v in flat}:
        keys = [(k, v) for k, v in flat if v.dtype == dtype]
        buffer = mx.concatenate([(v * n).astype(dtype).reshape(-1) for _, v in keys])
        summed = all_sum(buffer)
        offset = 0
        for k, v in keys:
            part = summed[offset : offset + v.size].reshape(v.shape)
            out.append((k, (part / total).astype(dtype)))
            offset += v.size
    tree = tree_unflatten(out)
    return tree["grads"], tree["loss"], tree["metrics"]


def allreduce_seconds(params, repeats: int = 10) -> float | None:
    """Median wall time of one all-reduce of a float32 buffer the size of `params` (what a
    training step sends: its gradient), after one warm-up; None outside a group."""
    if _group is None:
        return None
    size = sum(v.size for _, v in tree_flatten(params))
    buffer = mx.zeros((size,), mx.float32)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        mx.eval(all_sum(buffer))
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def gather_objects(obj) -> list:
    """Every rank's JSON-able `obj`, in rank order, on every rank."""
    if _group is None:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
    sizes = mx.distributed.all_gather(mx.array([data.size]), group=_group, stream=mx.cpu)
    sizes = [int(s) for s in np.array(sizes)]
    padded = np.zeros(max(sizes), dtype=np.int32)  # int32: every backend reduces it
    padded[: data.size] = data
    got = mx.distributed.all_gather(mx.array(padded)[None], group=_group, stream=mx.cpu)
    rows = np.array(got).astype(np.uint8)
    return [json.loads(rows[r, : sizes[r]].tobytes()) for r in range(len(sizes))]


def broadcast(obj):
    """Rank 0's JSON-able `obj` on every rank."""
    return gather_objects(obj if is_main() else None)[0]


def _rethrow(kind: str, message: str):
    """The exception a rank raises for another rank's error (`on_main`, `agree`): the same class
    for BadInput and StageIncomplete, so every rank exits with the same code. Marked `shared`:
    rank 0 prints it, the others exit quietly (`quiet`)."""
    cls = {"BadInput": BadInput, "StageIncomplete": StageIncomplete}.get(kind, RuntimeError)
    e = cls(message)
    e.shared = True
    return e


def _error(e: BaseException) -> list[str]:
    if isinstance(e, (BadInput, StageIncomplete)):
        return [type(e).__name__, str(e)]
    return ["RuntimeError", f"{type(e).__name__}: {e}"]


def quiet(e: BaseException) -> bool:
    """True when this rank should not print `e`: another rank's error that rank 0 prints."""
    return _group is not None and not is_main() and getattr(e, "shared", False)


def on_main(fn):
    """Run `fn()` on rank 0 alone while the others wait; its JSON-able result on every rank.

    An exception on rank 0 is raised on every rank (`_rethrow`). Outside a group: `fn()`.
    """
    if _group is None:
        return fn()
    out, error = None, None
    if is_main():
        try:
            out = fn()
        except Exception as e:
            error = e
    shared = broadcast({"result": out} if error is None else {"error": _error(error)})
    if error is not None:
        raise error
    if "error" in shared:
        raise _rethrow(*shared["error"])
    return shared["result"]


def agree(fn) -> None:
    """Run the check `fn()` on every rank; if any rank raised, every rank raises the first
    failing rank's error (named "rank r: ..." when it is not rank 0). For checks every rank
    makes before any collective work (inputs, memory)."""
    if _group is None:
        fn()
        return
    error = None
    try:
        fn()
    except Exception as e:
        error = e
    errors = gather_objects(None if error is None else _error(error))
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    r, (kind, message) = failed[0]
    if r == 0 and is_main():
        raise error
    raise _rethrow(kind, message if r == 0 else f"rank {r}: {message}")


def map_shards(items: Sequence, fn) -> list:
    """[fn(x) for x in items], each rank computing every W-th item; the results (JSON-able)
    in order on every rank."""
    mine = [fn(x) for x in shard(items)]
    return unshard(gather_objects(mine))


def check_same(label: str, value) -> None:
    """Fail loudly when ranks disagree on `value` (seeds, weights, batch settings)."""
    values = gather_objects(value)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"ranks disagree on {label}: {values}")


def weights_digest(params) -> float:
    """A cheap fingerprint of a parameter tree (ranks must start from the same weights)."""
    leaves = [v for _, v in tree_flatten(params)]
    total = sum(mx.sum(v.astype(mx.float32) * (i + 1)) for i, v in enumerate(leaves))
    return round(float(total.item()), 3)


# -- sharding --------------------------------------------------------------------------------


def check_batch(batch_size: int, label: str, world_size: int, accum: int = 1) -> None:
    """BadInput unless the global batch splits into `world_size` equal shares that each split
    into `accum` micro-batches; the message names the key, the world size and the nearest
    valid values."""
    unit = world_size * accum
    if batch_size % unit == 0:
        return
    below, above = batch_size // unit * unit, (batch_size // unit + 1) * unit
    nearest = " or ".join(str(v) for v in (below, above) if v > 0)
    per = f" times {label.rsplit('.', 1)[0]}.grad_accum {accum}" if accum > 1 else ""
    raise BadInput(
        f"recipe key {label}: {batch_size} does not divide by the world size {world_size}"
        f"{per} of this distributed run; nearest valid values: {nearest}"
    )


def shard(items: Sequence) -> list:
    """This rank's share of `items` (every W-th, from index r)."""
    return list(items[rank() :: world()])


def unshard(parts: list[list]) -> list:
    """Undo `shard`: interleave the per-rank lists back into the original order."""
    out = []
    for i in range(max((len(p) for p in parts), default=0)):
        out += [p[i] for p in parts if i < len(p)]
    return out


def sum_floats(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks of a few float64 numbers (counts and sums)."""
    if _group is None:
        return list(values)
    return [sum(col) for col in zip(*gather_objects([float(v) for v in values]))]


def check_shared_dir(path: Path) -> None:
    """Every rank must see the run directory rank 0 writes: rank 0 writes a token, all look."""
    if _group is None:
        return
    token = f"{time.time_ns()}-{os.getpid()}"
    probe = path / ".distributed-probe"
    if is_main():
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    token = broadcast(token)
    seen = gather_objects(probe.exists() and probe.read_text() == token)
    barrier()
    if is_main():
        probe.unlink(missing_ok=True)
    if not all(seen):
        missing = [r for r, ok in enumerate(seen) if not ok]
        raise BadInput(
            f"ranks {missing} do not see the run directory {path} that rank 0 writes; put it on "
            "a folder shared by every host, at the same path"
        )


# -- watchdog --------------------------------------------------------------------------------


class _Watchdog:
    """One daemon thread; `watch(label)` arms a deadline, leaving the block disarms it."""

    def __init__(self) -> None:
        self.deadline: float | None = None
        self.label = ""
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def _run(self) -> None:
        while True:
            time.sleep(0.2)
            with self.lock:
                late = self.deadline is not None and time.monotonic() > self.deadline
                label = self.label
            if late:
                print(
                    f"error: rank {rank()}: {label} waited more than {timeout():.0f}s for the "
                    f"other ranks (one died or hung; {TIMEOUT_ENV} sets the limit); exiting",
                    file=sys.stderr,
                    flush=True,
                )
                report_exit(1)
                os._exit(1)  # the main thread is blocked inside the collective

    def arm(self, label: str) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        with self.lock:
            self.deadline, self.label = time.monotonic() + timeout(), label

    def disarm(self) -> None:
        with self.lock:
            self.deadline = None


_watchdog = _Watchdog()


class watch:
    """Context manager: exit the process if the block takes longer than `timeout()` (in a
    group only)."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __enter__(self):
        if _group is not None:
            _watchdog.arm(self.label)

    def __exit__(self, *exc):
        if _group is not None:
            _watchdog.disarm()
