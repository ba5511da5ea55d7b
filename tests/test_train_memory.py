"""Memory options of the trainer: gradient accumulation equals the larger batch, checkpointing
changes nothing but memory, bf16 keeps fp32 master weights that small updates land in, and a
killed run resumes to the same weights with each of them."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from tiny import InterruptingLoader, train_run, trainer_examples, trainer_student, weights

from mlx_distill.cache.loader import Loader
from mlx_distill.errors import BadInput
from mlx_distill.recipe import LossConfig, TrainConfig, load_recipe
from mlx_distill.train.step import make_master, make_step


def _run(tmp_path, name, steps=4, **kw):
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup=1, log_every=1, **kw)
    model = trainer_student()
    loader = Loader(trainer_examples(seed=5), batch_size=8, seq_len=16, seed=2)
    train_run(tmp_path, model, loader, cfg, LossConfig(kind="ce"), name)
    return weights(model)


def test_grad_accum_equals_the_larger_batch(tmp_path):
    # Rows have different numbers of trained tokens, so micro-batches must be token-weighted.
    whole = _run(tmp_path, "whole")
    for accum in (2, 4, 8):
        split = _run(tmp_path, f"accum{accum}", grad_accum=accum)
        for key, value in whole.items():
            np.testing.assert_allclose(split[key], value, rtol=2e-5, atol=2e-6, err_msg=key)


def test_grad_checkpoint_gives_the_same_weights(tmp_path):
    plain = _run(tmp_path, "plain")
    ckpt = _run(tmp_path, "ckpt", grad_checkpoint=True)
    model = trainer_student()  # the block classes are restored after training
    assert not type(model.layers[0]).__name__.startswith("Checkpointed")
    for key, value in plain.items():
        np.testing.assert_allclose(ckpt[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_bf16_small_updates_land_in_fp32_master_weights():
    """With a constant gradient, bias-corrected Adam moves each weight by lr per step: 1e-3 of a
    weight equal to 1, below bf16's spacing there (2^-8)."""
    layer = nn.Linear(8, 4, bias=False)
    layer.weight = mx.ones((4, 8))
    layer.set_dtype(mx.bfloat16)
    master = make_master(layer)
    optimizer = optim.Adam(learning_rate=1e-3, bias_correction=True)
    optimizer.init(master["params"])
    direction = mx.array(np.random.default_rng(0).choice([-1.0, 1.0], size=(4, 8)))

    def loss_fn(model, tokens, labels, mask, ids, logprobs):
        loss = mx.sum(model.weight.astype(mx.float32) * direction)
        return loss, {"ce": loss}

    cfg = TrainConfig(grad_clip=0.0)
    step = make_step(layer, optimizer, loss_fn, cfg, master)
    arrays = (mx.zeros((2, 1)), mx.zeros((2, 1)), mx.ones((2, 1), dtype=mx.bool_), None, None)
    mx.eval(step(arrays), master)
    moved = (1.0 - np.array(master["params"]["weight"])) * np.array(direction)
    np.testing.assert_allclose(moved, 1e-3, rtol=1e-3)  # landed, in fp32
    assert np.all(np.array(layer.weight.astype(mx.float32)) == 1.0)  # below bf16's spacing
    for _ in range(9):
        mx.eval(step(arrays), master)
    expect = (1.0 - 1e-2 * np.array(direction)).astype(np.float32)
    np.testing.assert_allclose(np.array(master["params"]["weight"]), expect, rtol=1e-4)
    # the bf16 model follows the master: 10 steps of 1e-3 are visible in bf16
    got = np.array(layer.weight.astype(mx.float32))
    assert np.all(np.abs(got - expect) <= 2**-8) and np.all(got != 1.0)
    assert optimizer.state["weight"]["m"].dtype == mx.float32


def test_bf16_training_casts_the_model_and_keeps_fp32_masters(tmp_path):
    model = trainer_student()
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-2, warmup=1, log_every=1, dtype="bfloat16")
    loader = Loader(trainer_examples(), batch_size=8, seq_len=16, seed=0)
    train_run(tmp_path, model, loader, cfg, None, "bf16")
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    saved = mx.load(str(tmp_path / "bf16" / "step-000003" / "model.safetensors"))
    assert all(v.dtype == mx.float32 for v in saved.values())
    loaded = trainer_student()
    loaded.set_dtype(mx.bfloat16)
    assert np.array_equal(  # the checkpoint holds the masters the bf16 weights came from
        np.array(saved["model.embed_tokens.weight"].astype(mx.bfloat16).astype(mx.float32)),
        np.array(model.model.embed_tokens.weight.astype(mx.float32)),
    )


@pytest.mark.parametrize(
    "options",
    [{"grad_accum": 2}, {"grad_checkpoint": True}, {"dtype": "bfloat16"}],
    ids=["accum", "checkpoint", "bf16"],
)
def test_killed_run_resumes_exactly(tmp_path, options):
    cfg = TrainConfig(
        steps=5, batch_size=4, lr=5e-3, warmup=2, log_every=1, checkpoint_every=2, **options
    )
    examples = trainer_examples()
    whole = trainer_student()
    train_run(tmp_path, whole, Loader(examples, batch_size=4, seq_len=16, seed=1), cfg, None, "a")
    killed = trainer_student()
    with pytest.raises(KeyboardInterrupt):
        loader = InterruptingLoader(examples, batch_size=4, seq_len=16, seed=1, at=4)
        train_run(tmp_path, killed, loader, cfg, None, "b")
    resumed = trainer_student()
    result = train_run(
        tmp_path, resumed, Loader(examples, batch_size=4, seq_len=16, seed=1), cfg, None, "b"
    )
    assert result.resumed_from == 2
    for key, value in weights(whole).items():
        assert np.array_equal(weights(resumed)[key], value), key


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.grad_accum=3", "train.grad_accum: 3 does not divide train.batch_size 8"),
        ("train.grad_accum=0", "train.grad_accum: 0 does not divide"),
        ("train.dtype=float16", "train.dtype: 'float16' is not one of float32, bfloat16"),
    ],
)
def test_bad_memory_options(override, message):
    with pytest.raises(BadInput, match=message):
        load_recipe(None, ["train.batch_size=8", override])
