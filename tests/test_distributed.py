"""Data parallelism on 127.0.0.1: two ring ranks (MLX_RANK/MLX_HOSTFILE, a free port pair per
test) against one process on the same global batch. Each rank runs tests/dist_worker.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny import ROOT, free_ports

pytestmark = [
    pytest.mark.skipif(
        not mx.distributed.is_available("ring"), reason="no ring backend in this MLX build"
    ),
    pytest.mark.slow,  # every test here starts ranks (the module fixture too)
]
WORKER = Path(__file__).with_name("dist_worker.py")


def _start(tmp: Path, args: list[str], ranks: int, **extra: str) -> list[subprocess.Popen]:
    # PYTHONPATH: the worker (a script in tests/) imports this checkout's mlx_distill, not the
    # one an editable install of another checkout would give it.
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    if ranks == 1:
        cmd = [sys.executable, str(WORKER), *args]
        return [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)]
    hostfile = tmp / f"hosts-{time.time_ns()}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(ranks)]))
    procs = []
    for r in range(ranks):
        env_r = dict(env, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile))
        cmd = [sys.executable, str(WORKER), *args]
        procs.append(subprocess.Popen(cmd, env=env_r, stderr=subprocess.PIPE, text=True))
    return procs


def _run(tmp: Path, args: list[str], ranks: int, ok: bool = True) -> list[int]:
    procs = _start(tmp, args, ranks)
    codes = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        codes.append(p.returncode)
        if ok:
            assert p.returncode == 0, err
    return codes


def _trajectory(out: Path) -> np.ndarray:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return np.array([[r["loss"], r["ce"], r["kd"]] for r in lines if "loss" in r])


def _weights(out: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(out / "final.safetensors")).items()}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The one-process cache (the reference for the sharded one) and a 1-rank training run."""
    root = tmp_path_factory.mktemp("dist")
    (root / "shared").mkdir()
    _run(root, ["cache", str(root / "shared")], 1)
    (root / "one").mkdir()
    _run(root, ["train", str(root / "one"), "6"], 1)
    return root


def _close(a: np.ndarray, b: np.ndarray) -> None:
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= 1e-5 * scale, (np.abs(a - b).max(), scale)


def test_two_ranks_equal_one_process_token_weighted(shared):
    out = shared / "two"
    out.mkdir()
    _run(shared, ["train", str(out), "6"], 2)
    one, two = _trajectory(shared / "one"), _trajectory(out)
    assert one.shape == two.shape == (6, 3)
    np.testing.assert_allclose(two, one, rtol=1e-5)
    w1, w2 = _weights(shared / "one"), _weights(out)
    assert w1.keys() == w2.keys()
    for k in w1:
        _close(w2[k], w1[k])
    assert not np.allclose(w1[next(iter(w1))], 0)


def test_ranks_hold_different_token_counts(shared):
    from dist_worker import examples

    from mlx_distill.cache import open_cache
    from mlx_distill.cache.loader import Loader

    cache = open_cache(shared / "shared" / "cache")
    kw = dict(batch_size=8, seq_len=14, seed=5, world=2)
    halves = [next(iter(Loader(cache, rank=r, **kw))) for r in (0, 1)]
    whole = next(iter(Loader(cache, batch_size=8, seq_len=14, seed=5)))
    counts = [int(h.mask.sum().item()) for h in halves]
    assert counts[0] != counts[1] and sum(counts) == int(whole.mask.sum().item())
    np.testing.assert_array_equal(
        np.concatenate([np.array(h.tokens) for h in halves]), np.array(whole.tokens)
    )
    assert len(examples()) == len(cache)


def test_killed_two_rank_run_resumes_to_the_same_trajectory(shared):
    out = shared / "killed"
    out.mkdir()
    codes = _run(shared, ["train", str(out), "6", "4"], 2, ok=False)
    assert all(c != 0 for c in codes)
    assert (out / "ckpt" / "step-000002").is_dir()
    _run(shared, ["train", str(out), "6"], 2)
    np.testing.assert_allclose(_trajectory(out), _trajectory(shared / "one"), rtol=1e-5)
    w1, w2 = _weights(shared / "one"), _weights(out)
    for k in w1:
        _close(w2[k], w1[k])


def test_sharded_cache_equals_single_process_row_for_row(shared):
    from mlx_distill.cache import open_cache, verify_cache

    out = shared / "sharded"
    out.mkdir()
    _run(shared, ["cache", str(out)], 2)
    assert not list((out / "cache").glob("manifest.rank-*"))
    assert verify_cache(out / "cache")["ok"] if "ok" in verify_cache(out / "cache") else True
    a, b = open_cache(shared / "shared" / "cache"), open_cache(out / "cache")
    assert len(a) == len(b) == 48
    for i in range(len(a)):
        for x, y in zip(a.row(i), b.row(i)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rank_killed_mid_run_fails_the_others_fast(shared):
    out = shared / "dies"
    out.mkdir()
    # A peer's death either raises in the ring backend or leaves the step waiting: the
    # watchdog (its limit shortened here) then exits the process.
    procs = _start(shared, ["train", str(out), "400"], 2, MLX_DISTILL_TIMEOUT="5")
    deadline = time.time() + 60
    while time.time() < deadline and not (
        (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2
    ):
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    _, err = procs[0].communicate(timeout=60)
    procs[1].communicate()
    assert procs[0].returncode != 0
    assert time.time() - t0 < 30
    assert "peer" in err or "waited more than" in err, err
