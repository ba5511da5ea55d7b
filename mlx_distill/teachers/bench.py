"""`mlx-distill bench teacher`: throughput and client overhead of the Gemini teacher path.

The fake server (`tests/fake_gemini.py`, from the repository checkout) runs in its own process
with zero added latency, so the numbers are the client's own costs: SDK request building and
parsing, our limiter/retry wrapper, and the fsync'd records store, all through
`run_gemini_teacher`. `client_cpu_ms_per_request` is this process's CPU time per request.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlx_distill.errors import BadInput

FAKE = Path(__file__).resolve().parents[2] / "tests" / "fake_gemini.py"
BENCH_KEY = "bench-fake-key"  # only ever sent to the loopback fake


@contextmanager
def _env(**values: str):
    """Set environment variables for the duration, then restore them exactly."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bench_teacher(requests: int = 256, levels: tuple[int, ...] = (1, 8, 64)) -> dict[str, Any]:
    """Requests/s and client CPU per request at each concurrency level (max_in_flight)."""
    from google.genai import version

    from mlx_distill.recipe import load_recipe
    from mlx_distill.teachers.gemini import run_gemini_teacher

    if not FAKE.exists():
        raise BadInput(f"bench teacher needs the repository checkout: {FAKE} not found")
    server = subprocess.Popen(
        [sys.executable, str(FAKE), "--key", BENCH_KEY],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        base_url = server.stdout.readline().strip()
        if not base_url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"fake Gemini server did not start (got {base_url!r})")
        results = []
        with _env(
            GEMINI_API_KEY=BENCH_KEY,
            GOOGLE_API_KEY=BENCH_KEY,
            NO_PROXY="127.0.0.1,localhost",
        ), tempfile.TemporaryDirectory() as tmp:  # fmt: skip
            for level in (0, *levels):  # level 0: warm-up (imports, connection), not reported
                recipe = load_recipe(
                    None,
                    [
                        "teacher.kind=gemini",
                        f"teacher.gemini.base_url={base_url}",
                        f"teacher.gemini.max_in_flight={max(level, 1)}",
                        "teacher.gemini.rpm=0",
                        "teacher.gemini.timeout_s=30",
                    ],
                )
                n = requests if level else 8
                prompts = [{"prompt": f"Bench c{level} #{i}: what is {i} + {level}?"}
                           for i in range(n)]  # fmt: skip
                cpu, wall = time.process_time(), time.perf_counter()
                summary = run_gemini_teacher(
                    recipe, prompts, Path(tmp) / f"c{level}", progress=False
                )
                wall = time.perf_counter() - wall
                cpu = time.process_time() - cpu
                if level == 0:
                    continue
                results.append(
                    {
                        "concurrency": level,
                        "requests": requests,
                        "failed": summary["failed"],
                        "seconds": round(wall, 3),
                        "requests_per_s": round(requests / wall, 1),
                        "wall_ms_per_request": round(1000 * wall / requests, 3),
                        "client_cpu_ms_per_request": round(1000 * cpu / requests, 3),
                    }
                )
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return {
        "bench": "teacher",
        "server": "loopback fake Gemini (tests/fake_gemini.py), separate process, no latency",
        "sdk": f"google-genai {version.__version__}",
        "path": "run_gemini_teacher: SDK async client, limiter, retries, fsync'd records store",
        "cpus": os.cpu_count(),
        "levels": results,
    }
