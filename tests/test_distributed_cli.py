"""`mlx-distill run` inside a distributed group, on 127.0.0.1: two ring ranks started with
MLX_RANK/MLX_HOSTFILE (a free port pair per run), and `--hosts` with a localhost hostfile
through mlx.launch, against one process on the same tiny quickstart run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny import ROOT, cli, free_ports, main, one_line, quickstart_sets

pytestmark = pytest.mark.skipif(
    not mx.distributed.is_available("ring"), reason="no ring backend in this MLX build"
)
# The quickstart cut down: 16 rows in 2 cache shards, 6 steps of 4 rows, 6 test problems in
# batches of 2 (the ranks get 2 and 1 batches), long enough answers for the teacher to solve.
EXTRA = (
    "train.steps=6",
    "eval.num_examples=6",
    "eval.batch_size=2",
    "eval.max_new_tokens=96",
)
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1")


def _ranks(tmp: Path, args: list[str], n: int = 2) -> list[tuple[int, str, str]]:
    """`mlx-distill ARGS` as n ring ranks: [(exit code, stdout, stderr)] by rank."""
    hostfile = tmp / f"ring-{free_ports(1)[0]}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mlx_distill", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(ENV, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)),
        )
        for r in range(n)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append((p.returncode, stdout, stderr))
    return out


def _metrics(run_dir: Path) -> dict[str, np.ndarray]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        run: np.array([[r["loss"], r["ce"], r["kd"]] for r in rows if r["run"] == run])
        for run in ("distill", "baseline")
    }


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """One process, --jobs 1: the reference run up to the baseline."""
    runs = tmp_path_factory.mktemp("one")
    args = ["run", "recipes/quickstart.yaml", *quickstart_sets(runs, *EXTRA), "--jobs", "1"]
    for stage in ("tokenizer", "teacher", "cache", "distill", "baseline"):
        args += ["--stage", stage]
    proc = cli(*args, "--no-progress", env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs / "quickstart"


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two ranks, every stage: (run dir, [(code, stdout, stderr)] by rank)."""
    runs = tmp_path_factory.mktemp("two")
    args = [
        "run",
        "recipes/quickstart.yaml",
        *quickstart_sets(runs, *EXTRA),
        "--json",
        "--no-progress",
    ]
    return runs / "quickstart", _ranks(runs, args)


@pytest.mark.slow
def test_two_rank_run_trains_like_one_process_and_rank0_alone_writes(one, two):
    from mlx_distill.cache import open_cache

    run_dir, ranks = two
    for code, _, err in ranks:
        assert code == 0, err[-3000:]
    summary = json.loads(ranks[0][1])
    assert set(summary["stages"].values()) == {"ran"} and len(summary["stages"]) == 7
    assert ranks[1][1] == ""  # rank 1 prints nothing: rank 0 reports
    assert "[distill] running" in ranks[0][2] and "[distill]" not in ranks[1][2]
    # Same global batches, token-weighted all-reduce: the one-process trajectory.
    a, b = _metrics(one), _metrics(run_dir)
    for run in ("distill", "baseline"):
        assert a[run].shape == b[run].shape == (6, 3)
        np.testing.assert_allclose(b[run], a[run], rtol=1e-4)
    # The sharded cache (a shard per rank) holds the one-process cache's rows.
    x, y = open_cache(one / "cache"), open_cache(run_dir / "cache")
    assert len(x) == len(y) == 16
    for i in range(len(x)):
        for u, v in zip(x.row(i), y.row(i)):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert not list((run_dir / "cache").glob("manifest.rank-*"))
    for stage in ("distill", "baseline"):
        info = json.loads((run_dir / stage / "stage.json").read_text())
        assert info["status"] == "done"
        assert info["result"]["ranks"] == 2 and info["result"]["allreduce_ms"] > 0
    assert (run_dir / "report.md").is_file() and (run_dir / "student" / "config.json").is_file()
    assert (run_dir / "run.lock").read_text() == ""  # rank 0 held it and let it go


@pytest.mark.slow
def test_two_rank_eval_equals_one_process_problem_for_problem(two, tmp_path):
    run_dir, _ = two
    sharded = json.loads((run_dir / "eval" / "results.json").read_text())
    assert sharded["models"]["teacher"]["solved"]  # something to compare, problem by problem
    copy = tmp_path / "runs" / "quickstart"
    shutil.copytree(run_dir, copy)
    proc = cli("eval", str(copy), "--json", "--no-progress", env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = json.loads((copy / "eval" / "results.json").read_text())
    assert alone == sharded


@pytest.mark.slow
def test_hosts_localhost_runs_through_mlx_launch_and_a_failed_rank_fails_it(one, tmp_path):
    hosts = tmp_path / "hosts.json"
    local = {"ssh": "localhost", "ips": ["127.0.0.1"]}
    hosts.write_text(json.dumps([local, local]))
    shutil.copytree(one, tmp_path / "runs" / "quickstart")
    args = [
        "run",
        "recipes/quickstart.yaml",
        *quickstart_sets(tmp_path / "runs", *EXTRA),
        "--jobs",
        "1",
    ]
    args += ["--stage", "distill", "--force", "--no-progress", "--hosts", str(hosts)]
    ok = cli(*args, env=ENV)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "[WARN]" not in ok.stderr and "[mlx-distill] rank" not in ok.stderr
    info = json.loads((tmp_path / "runs" / "quickstart" / "distill" / "stage.json").read_text())
    assert info["status"] == "done" and info["result"]["ranks"] == 2
    np.testing.assert_allclose(
        _metrics(tmp_path / "runs" / "quickstart")["distill"], _metrics(one)["distill"], rtol=1e-4
    )
    # Both ranks stopped by the step watchdog: mlx.launch itself exits 0 here; this command not.
    failed = cli(*args, env=dict(ENV, MLX_DISTILL_TIMEOUT="0.001"))
    assert failed.returncode == 1, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    # The first rank to stop reports 1; mlx.launch may kill the other before it reports.
    assert last.startswith("error: distributed run failed: rank "), last
    assert "exited with code 1" in last, last


def test_bad_hostfile_or_indivisible_batch_refused_before_any_work(monkeypatch, capsys, tmp_path):
    runs = tmp_path / "runs"
    base = [
        "run",
        "recipes/quickstart.yaml",
        *quickstart_sets(runs, "train.batch_size=4"),
        "--hosts",
    ]
    local = {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}
    three = tmp_path / "three.json"
    three.write_text(json.dumps({"backend": "ring", "hosts": [local] * 3}))
    line = one_line(*main(monkeypatch, capsys, *base, str(three))[::2])
    assert line == (
        "error: recipe key train.batch_size: 4 does not divide by the world size 3 of this "
        "distributed run; nearest valid values: 3 or 6"
    )
    missing = tmp_path / "nope.json"
    line = one_line(*main(monkeypatch, capsys, *base, str(missing))[::2])
    assert line == f"error: --hosts {missing}: hostfile not found"
    cases = {
        "[{": "not a JSON hostfile",
        json.dumps([{"ssh": "mac1"}, {"ssh": "mac2"}]): "the ring backend needs its 'ips'",
        json.dumps([{"ssh": "mac1", "ips": ["mac1.local"]}] * 2): "is not an IP address",
        json.dumps([local]): "1 host(s); a distributed run needs at least 2",
        json.dumps({"backend": "ring"}): "expected a list of hosts",
    }
    bad = tmp_path / "bad.json"
    for text, expected in cases.items():
        bad.write_text(text)
        line = one_line(*main(monkeypatch, capsys, *base, str(bad))[::2])
        assert line.startswith(f"error: --hosts {bad}: ") and expected in line, line
    assert not runs.exists()


def test_launched_ranks_refuse_an_indivisible_batch_once(tmp_path):
    runs = tmp_path / "runs"
    args = ["run", "recipes/quickstart.yaml", *quickstart_sets(runs, "train.batch_size=5")]
    (code0, _, err0), (code1, _, err1) = _ranks(tmp_path, args)
    assert (code0, code1) == (2, 2)
    assert one_line(code0, err0) == (
        "error: recipe key train.batch_size: 5 does not divide by the world size 2 of this "
        "distributed run; nearest valid values: 4 or 6"
    )
    assert err1 == ""  # rank 0 says it for the group
    assert not runs.exists()


def test_doctor_lists_backends_and_the_group_it_would_join(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("MLX_RANK", raising=False)
    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    code, out, _ = main(monkeypatch, capsys, "doctor", "--json")
    assert code == 0
    info = json.loads(out)["distributed"]
    assert set(info["backends"]) == {"ring", "jaccl", "mpi", "nccl"}
    assert info["backends"]["ring"] is True
    assert info["group"].startswith("single process")
    hostfile = tmp_path / "ring.json"
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"]]))
    monkeypatch.setenv("MLX_RANK", "1")
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    code, out, _ = main(monkeypatch, capsys, "doctor", "--json")
    group = json.loads(out)["distributed"]["group"]
    assert (group["backend"], group["rank"], group["size"]) == ("ring", 1, 2)


def test_outcome_trusts_only_the_ranks_own_exit_codes():
    from mlx_distill.run.launch import outcome

    assert outcome({0: 0, 1: 0}, 2, 0) == (0, None)
    assert outcome({0: 2, 1: 2}, 2, 0) == (2, None)  # agreed bad input: rank 0 printed it
    code, message = outcome({0: 0}, 2, 0)  # rank 1 never reported: killed
    assert code == 1 and "rank 1" in message
    code, message = outcome({0: 1, 1: 2}, 2, 0)
    assert code == 1 and "rank 0 exited with code 1" in message
    assert outcome({}, 2, 2) == (2, None)  # mlx.launch refused its arguments
