"""The training loop: loss goes down, and a killed run resumes to the same weights."""

import json

import numpy as np
import pytest
from tiny import InterruptingLoader, train_run, trainer_examples, trainer_student, weights

from mlx_distill.cache.loader import Loader
from mlx_distill.recipe import LossConfig, TrainConfig


def test_loss_decreases_and_metrics_are_logged(tmp_path):
    model = trainer_student()
    cfg = TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup=3, log_every=5)
    loader = Loader(trainer_examples(), batch_size=8, seq_len=16, seed=0)
    result = train_run(tmp_path, model, loader, cfg, None, "baseline", "fp")
    rows = [json.loads(line) for line in (tmp_path / "baseline.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert result.steps == 30 and result.resumed_from == 0 and result.tokens > 0


@pytest.mark.parametrize("loss_cfg", [None, LossConfig(kind="ce")])
def test_killed_run_resumes_to_identical_weights(tmp_path, loss_cfg):
    cfg = TrainConfig(steps=6, batch_size=4, lr=5e-3, warmup=2, log_every=1, checkpoint_every=2)
    examples = trainer_examples()

    whole = trainer_student()
    train_run(
        tmp_path,
        whole,
        Loader(examples, batch_size=4, seq_len=16, seed=1),
        cfg,
        loss_cfg,
        "a",
        "fp",
    )

    killed = trainer_student()
    with pytest.raises(KeyboardInterrupt):
        train_run(
            tmp_path,
            killed,
            InterruptingLoader(examples, batch_size=4, seq_len=16, seed=1, at=4),
            cfg,
            loss_cfg,
            "b",
            "fp",
        )
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-000002"]
    resumed = trainer_student()
    result = train_run(
        tmp_path,
        resumed,
        Loader(examples, batch_size=4, seq_len=16, seed=1),
        cfg,
        loss_cfg,
        "b",
        "fp",
    )
    assert result.resumed_from == 2
    for key, value in weights(whole).items():
        np.testing.assert_allclose(weights(resumed)[key], value, rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 3, logged before the kill, is replaced


def test_checkpoint_of_another_recipe_is_not_resumed(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=4, log_every=1)
    train_run(
        tmp_path,
        trainer_student(),
        Loader(trainer_examples(), batch_size=4, seq_len=16),
        cfg,
        None,
        "r",
        "one",
    )
    result = train_run(
        tmp_path,
        trainer_student(),
        Loader(trainer_examples(), batch_size=4, seq_len=16),
        cfg,
        None,
        "r",
        "two",
    )
    assert result.resumed_from == 0


def test_validation_loss_every_eval_every_steps(tmp_path):
    import math

    from mlx_distill.evaluate import perplexity

    valid = trainer_examples(n=12, seed=5)
    seen = []

    def validate(model):
        loss = math.log(perplexity(model, valid, batch_size=4))
        seen.append(loss)
        return loss

    model = trainer_student()
    cfg = TrainConfig(steps=7, batch_size=8, lr=1e-2, warmup=2, log_every=5, eval_every=3)
    loader = Loader(trainer_examples(), batch_size=8, seq_len=16, seed=0)
    train_run(
        tmp_path, model, loader, cfg, None, "r", metrics=tmp_path / "m.jsonl", validate=validate
    )
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    checks = [r for r in rows if "valid_loss" in r]
    assert [r["step"] for r in checks] == [3, 6, 7]  # every 3 steps, and after the last
    assert [r["valid_loss"] for r in checks] == seen
    # The last check saw the final weights: it equals a fresh evaluation of the trained model.
    assert checks[-1]["valid_loss"] == pytest.approx(
        math.log(perplexity(model, valid, batch_size=4)), rel=1e-6
    )
    assert seen[-1] < seen[0]
