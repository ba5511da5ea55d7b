"""The cache benchmark runs end to end at a tiny size and its numbers are self-consistent."""

from __future__ import annotations

import json

from mlx_distill.cache.bench import bench_cache


def test_bench_cache_small():
    result = bench_cache(rows=6, batch_size=3, seq_len=64, loader_batches=3, train_steps=1)
    json.dumps(result)  # JSON-able for `bench cache --json`
    for key in ("write_rows_per_s", "encode_write_rows_per_s", "loader_tokens_per_s"):
        assert result[key] > 0
    assert result["encode_write_rows_per_s"] >= result["write_rows_per_s"]
    assert 0 < result["bytes_per_target_position"] < result["bytes_per_target_position_k32"] <= 100
    ratio = result["loader_tokens_per_s"] / result["trainer_tokens_per_s"]
    assert abs(result["loader_to_trainer_ratio"] - ratio) <= 0.06
    expected = 3 * 64 / result["trainer_step_s"]  # step_s is rounded to 0.1 ms
    assert abs(result["trainer_tokens_per_s"] - expected) <= 0.01 * expected + 1
