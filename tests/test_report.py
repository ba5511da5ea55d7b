"""The paired comparison the report prints under its table."""

import math
import random

from mlx_distill.report import sign_test


def test_sign_test_values():
    assert sign_test(0, 0) == 1.0
    assert sign_test(3, 3) == 1.0
    assert math.isclose(sign_test(5, 0), 2 / 32)
    assert math.isclose(sign_test(10, 2), 2 * (1 + 12 + 66) / 4096)


def test_sign_test_is_symmetric_and_matches_the_binomial_tail():
    rng = random.Random(random.randrange(1 << 30))
    for _ in range(20):
        a, b = rng.randrange(0, 40), rng.randrange(0, 40)
        n, low = a + b, min(a, b)
        # reference: sum of the two binomial tails in exact fractions
        tail = sum(math.comb(n, i) for i in range(low + 1))
        expected = min(1.0, 2 * tail / 2**n) if n else 1.0
        assert math.isclose(sign_test(a, b), expected, rel_tol=1e-12)
        assert sign_test(a, b) == sign_test(b, a)


def test_on_policy_curves_draw_without_a_warning(tmp_path):
    """On-policy records: a negative loss (a log-ratio estimate) and no cross-entropy (NaN);
    log scale only where every value is positive, an empty panel says so: no warning."""
    import json
    import warnings

    from mlx_distill.report import _plot

    metrics = tmp_path / "metrics.jsonl"
    lines = [{"run": "distill", "step": s, "loss": -0.1 * s, "ce": math.nan} for s in (1, 2, 3)]
    lines += [{"run": "distill", "step": 3, "valid_loss": 0.7}]
    metrics.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _plot(metrics, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_report_without_test_split_or_baseline_shows_stages_and_either_cut_count(tmp_path):
    from mlx_distill.recipe import load_recipe
    from mlx_distill.report import write_report

    recipe = load_recipe("recipes/quickstart.yaml", ["baseline=false", "data.test=null"])
    results = {
        "seed": 0,
        "num_examples": 0,
        "split": None,
        "path": None,
        "models": {"student": {"parameters": 972_288}},
    }
    stages = {"distill": {"dtype": "bfloat16", "rows_cut": 3}}
    records = {
        "cache": {
            "seconds": 12.34,
            "peak_memory_bytes": 3 * 2**30,
            "result": {"rows_left_out": {"shortened": 2, "dropped": 0, "empty": 1}},
        },
        "distill": {
            "seconds": 80.0,
            "peak_memory_bytes": 512 * 2**20,
            "result": {
                "data": {"rows": 9, "rows_cut": 5, "rows_dropped": 1},
                "valid_data": {"rows": 4, "rows_cut": 0, "rows_dropped": 0},
            },
        },
    }
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    write_report(recipe, tmp_path, results, stages, {"student": tmp_path / "student"}, records)
    report = (tmp_path / "report.md").read_text()
    assert "data.test and data.valid are not set: parameters counted, nothing scored" in report
    assert "No baseline in this run" in report
    assert "| KD student | 972,288 | n/a | - | - |" in report
    assert f"| KD student | `{tmp_path / 'student'}` | bfloat16 | 2.0 MB |" in report
    assert "| cache | 12.3 s | 3.00 GB | rows cut 2, rows dropped 0 |" in report
    row = "rows cut 5, rows dropped 1, valid rows cut 0, valid rows dropped 0"
    assert f"| distill | 80.0 s | 512.0 MB | {row} |" in report
