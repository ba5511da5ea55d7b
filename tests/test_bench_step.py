"""`bench step` at a tiny size: each variant runs in its own process and reports real numbers."""

import pytest

from mlx_distill.train.bench import bench_step


@pytest.mark.slow
def test_bench_step_compares_kd_with_mlx_lm_lora():
    out = bench_step(
        layers=1,
        batch=2,
        seq=32,
        k=8,
        steps=1,
        vocab=1000,
        trains=("lora",),
        variants=("mlx_lm", "kd"),
    )
    assert out["tokens_per_step"] == 64 and out["model"]["hidden_size"] == 896
    rows = out["lora"]
    for variant in ("mlx_lm", "kd"):
        assert rows[variant]["tokens_per_s"] > 0 and rows[variant]["peak_bytes"] > 0
    kd = rows["kd"]
    assert kd["peak_vs_mlx_lm"] == kd["peak_bytes"] / rows["mlx_lm"]["peak_bytes"]
    floor = rows["kd_floor"]
    assert floor["bytes"] == sum(floor["terms"].values())
    # the floor is a lower bound of what the step holds: its weights alone are in it
    assert floor["terms"]["weights"] < kd["peak_bytes"]
    # LoRA: only the adapters have AdamW state
    assert floor["terms"]["optimizer"] < floor["terms"]["weights"] / 20
