"""`mlx-distill bench`: dispatch to each component's benchmark; each returns one JSON object."""

from __future__ import annotations

from mlx_distill.errors import BadInput


def _parse_size(size: str | None) -> tuple[int, int, int] | None:
    if size is None:
        return None
    try:
        n, v, d = (int(x) for x in size.split(","))
    except ValueError:
        raise BadInput(f"--size {size!r}: expected N,V,d such as 4096,32768,512") from None
    if min(n, v, d) <= 0:
        raise BadInput(f"--size {size!r}: all of N, V, d must be > 0")
    return n, v, d


def run_bench(what: str, size: str | None = None, step: dict | None = None) -> dict:
    """Run benchmark `what` (loss, step, cache, teacher or all) and return its results.

    step: keyword arguments of `train.bench.bench_step` (layers, batch, seq, ...)."""
    parsed = _parse_size(size)
    out: dict = {}
    if what in ("loss", "all"):
        from mlx_distill.kernels.bench import bench_loss

        out["loss"] = bench_loss(parsed) if parsed else bench_loss()
    if what in ("step", "all"):
        from mlx_distill.train.bench import bench_step

        out["step"] = bench_step(**(step or {}))
    if what in ("cache", "all"):
        from mlx_distill.cache.bench import bench_cache

        out["cache"] = bench_cache()
    if what in ("teacher", "all"):
        from mlx_distill.teachers.bench import bench_teacher

        out["teacher"] = bench_teacher()
    return out[what] if what != "all" else out
