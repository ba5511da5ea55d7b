"""The cache writer survives SIGKILL at random moments and resumes to the exact same cache."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny import ROOT, random_examples, tiny_model, tiny_tokenizer

from mlx_distill.cache import build_token_cache, open_cache, verify_cache
from mlx_distill.cache import format as fmt
from mlx_distill.files import file_sha256
from mlx_distill.teachers.local import LocalTeacher

ARGS = dict(targets="sample", samples=12, batch_size=4, shard_rows=5, seed=3)
CHILD = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
from mlx_distill import backend
backend.setup()
from tiny import random_examples, tiny_model, tiny_tokenizer
from mlx_distill.cache import build_token_cache
from mlx_distill.teachers.local import LocalTeacher
model, _ = tiny_model(97, seed=11)
teacher = LocalTeacher((model, tiny_tokenizer(97)), name="tiny")
examples = random_examples(160, 97, seed=12)
print("ready", flush=True)
build_token_cache(teacher, examples, {out!r}, progress=False, **{args!r})
print("done", flush=True)
"""


def _run_child(out: Path, kill_after: float | None) -> bool:
    """Run the writer in a subprocess; SIGKILL it `kill_after` s after it is ready. True: done."""
    code = CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(out), args=ARGS)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    assert proc.stdout.readline().strip() == "ready"
    if kill_after is not None:
        time.sleep(kill_after)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)
    return proc.returncode == 0


def _listed_shards_are_sound(out: Path) -> int:
    """After a kill: the manifest (if any) parses and every shard it lists verifies."""
    if not (out / fmt.MANIFEST).exists():
        return 0
    manifest = fmt.read_manifest(out)
    for shard in manifest["shards"]:
        assert file_sha256(out / shard["file"]) == shard["sha256"]
    return manifest["rows"]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path):
    out = tmp_path / "killed"
    rng = random.Random()
    # a clean build in this process first: its duration scales the kill times
    model, _ = tiny_model(97, seed=11)
    teacher = LocalTeacher((model, tiny_tokenizer(97)), name="tiny")
    examples = random_examples(160, 97, seed=12)
    t0 = time.perf_counter()
    build_token_cache(teacher, examples, tmp_path / "clean", progress=False, **ARGS)
    build_s = time.perf_counter() - t0
    progress, interrupted, scale = [], 0, 0.8
    while interrupted < 3:
        finished = _run_child(out, kill_after=rng.uniform(0.05, scale) * build_s)
        if finished and not interrupted:
            # the child outran the kill (a fast, idle machine): start over with earlier kills
            shutil.rmtree(out)
            scale /= 2
            continue
        progress.append(_listed_shards_are_sound(out))
        if finished:
            break
        interrupted += 1
    assert _run_child(out, kill_after=None)
    assert not list(out.glob("*.tmp*"))
    report = verify_cache(out)
    assert report["rows"] == 160 and report["shards"] == 32
    assert progress == sorted(progress)  # finished rows are never lost by a later kill
    clean = json.loads((tmp_path / "clean" / fmt.MANIFEST).read_text())
    resumed = json.loads((out / fmt.MANIFEST).read_text())
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in clean["shards"]]
    cache = open_cache(out)
    for i in rng.sample(range(160), 20):  # every row present once, in its place
        np.testing.assert_array_equal(cache.row(i).tokens, examples[i].tokens)
        assert cache.example(i).text["id"] == i
