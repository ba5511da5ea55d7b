"""LoRA / DoRA / QLoRA students: mlx-lm's adapter layers, its adapter format, fused export."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny import TRAINER_VOCAB, cli, sets, tiny_student, train_run, trainer_examples

from mlx_distill.cache.loader import Loader
from mlx_distill.errors import BadInput
from mlx_distill.kernels import distill_loss
from mlx_distill.models import hidden_states, lm_head_weight
from mlx_distill.models.adapters import apply_adapters, fuse_adapters
from mlx_distill.recipe import LoraConfig, StudentConfig, TrainConfig

VOCAB = TRAINER_VOCAB  # the vocabulary of trainer_examples, which _fit trains on


def _greedy(model, prompt, n=10):
    tokens = list(prompt)
    for _ in range(n):
        logits = model(mx.array([tokens]))[0, -1]
        tokens.append(int(mx.argmax(logits).item()))
    return tokens[len(prompt) :]


def _student(tie=True, intermediate=48):
    cfg = dict(hidden_size=32, num_layers=2, intermediate_size=intermediate, tie_embeddings=tie)
    return tiny_student(VOCAB, 4, **cfg)[0]


def _fit(tmp_path, model, name, steps=8):
    cfg = TrainConfig(steps=steps, batch_size=8, lr=2e-2, warmup=1, log_every=4)
    train_run(
        tmp_path,
        model,
        Loader(trainer_examples(), batch_size=8, seq_len=16, seed=0),
        cfg,
        None,
        name,
    )


@pytest.mark.parametrize(
    "train, keys, tie",
    [
        ("lora", None, True),
        ("lora", ["self_attn.q_proj", "mlp.down_proj", "lm_head"], False),
        ("dora", ["self_attn.v_proj", "model.embed_tokens"], True),
    ],
    ids=["lora-all", "lora-untied-head", "dora-tied-head"],
)
def test_adapters_train_only_themselves_and_fuse_exactly(tmp_path, train, keys, tie):
    model = _student(tie)
    base = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    s = StudentConfig(train=train, lora=LoraConfig(rank=4, scale=2.0, keys=keys))
    apply_adapters(model, s)
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m") for k in names)
    if keys and (keys[-1] in ("lm_head", "model.embed_tokens")):
        assert any(k.startswith(keys[-1]) for k in names)  # the head is an adapter target
    _fit(tmp_path, model, train)
    frozen = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    for key, value in base.items():  # the base did not move
        wrapped = [
            k for k in frozen if k.replace(".linear.", ".").replace(".embedding.", ".") == key
        ]
        assert len(wrapped) == 1 and np.array_equal(frozen[wrapped[0]], value), key
    tokens = mx.array([[1, 2, 3, 4, 5, 6]])
    logits = model(tokens)
    head_view = hidden_states(model, tokens) @ lm_head_weight(model).T
    np.testing.assert_allclose(np.array(head_view), np.array(logits), rtol=1e-4, atol=1e-4)
    assert float(mx.abs(logits - _student(tie)(tokens)).max()) > 1e-3  # the adapters learned
    fuse_adapters(model)
    fused = dict(tree_flatten(model.parameters()))
    assert sorted(fused) == sorted(base)  # plain layers again, under the base's names
    np.testing.assert_allclose(np.array(model(tokens)), np.array(logits), rtol=1e-4, atol=1e-4)


def test_frozen_head_forms_no_weight_gradient_and_the_rest_is_unchanged():
    rng = np.random.default_rng(7)
    hidden = mx.array(rng.normal(size=(37, 16)), dtype=mx.float32)
    weight = mx.array(rng.normal(size=(301, 16)) * 0.3, dtype=mx.float32)
    labels = mx.array(rng.integers(0, 301, 37), dtype=mx.int32)

    def loss(h, w, frozen):
        out, _ = distill_loss(
            h, w, None, kind="ce", labels=labels, chunk_size=16, weight_grad=not frozen
        )
        return out

    both = mx.value_and_grad(lambda h, w: loss(h, w, False), argnums=(0, 1))(hidden, weight)
    frozen = mx.value_and_grad(lambda h, w: loss(h, w, True), argnums=(0, 1))(hidden, weight)
    assert float(both[0]) == float(frozen[0])
    np.testing.assert_array_equal(np.array(frozen[1][0]), np.array(both[1][0]))  # dh
    assert float(mx.abs(both[1][1]).max()) > 0 and float(mx.abs(frozen[1][1]).max()) == 0


def test_qlora_trains_adapters_on_a_quantized_base(tmp_path):
    model = _student(intermediate=64)
    nn.quantize(model, group_size=32, bits=4)
    packed = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if v.dtype == mx.uint32}
    with pytest.raises(BadInput, match="'full' on a quantized student"):
        apply_adapters(model, StudentConfig(train="full"))
    apply_adapters(model, StudentConfig(train="lora", lora=LoraConfig(rank=4)))
    before = model(mx.array([[1, 2, 3]]))
    _fit(tmp_path, model, "qlora", steps=3)
    after = dict(tree_flatten(model.parameters()))
    for key, value in packed.items():
        wrapped = key.replace("_proj.", "_proj.linear.")
        assert np.array_equal(np.array(after[wrapped]), value), key  # 4-bit weights untouched
    assert float(mx.abs(model(mx.array([[1, 2, 3]])) - before).max()) > 1e-3
    fuse_adapters(model)  # re-quantized, as mlx_lm.fuse does
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)


@pytest.mark.parametrize(
    "lora, train, message",
    [
        ({"keys": ["self_attn.nope"]}, "lora", "'self_attn.nope' names no module"),
        ({"keys": ["input_layernorm"]}, "lora", "RMSNorm, which mlx-lm's LoRA cannot wrap"),
        ({"keys": ["lm_head"], "dropout": 0.1}, "lora", "head's adapter without dropout"),
    ],
)
def test_adapter_bad_input(lora, train, message):
    with pytest.raises(BadInput, match=message):
        apply_adapters(_student(tie=False), StudentConfig(train=train, lora=LoraConfig(**lora)))


def test_dora_on_a_mixture_of_experts_layer_is_refused():
    from mlx_lm.models.switch_layers import SwitchLinear

    model = _student()
    model.layers[0].mlp.down_proj = SwitchLinear(48, 32, 4)
    s = StudentConfig(train="dora", lora=LoraConfig(keys=["mlp.down_proj"]))
    with pytest.raises(BadInput, match="mixture-of-experts"):
        apply_adapters(model, s)


LORA_RUN = [
    "data.max_train=16",
    "train.steps=4",
    "train.batch_size=8",
    "train.log_every=2",
    "cache.shard_rows=20",
    "stages=[tokenizer,teacher,cache,distill,baseline]",
    "student.train=lora",
    "student.lora.rank=4",
    "student.lora.keys=[self_attn.q_proj,self_attn.v_proj,mlp.down_proj,model.embed_tokens]",
    "train.lr=1e-2",
]


@pytest.mark.slow
def test_lora_recipe_round_trips_through_mlx_lm(tmp_path):
    from mlx_lm import load

    args = sets(*LORA_RUN, f"runs_dir={tmp_path}")
    proc = cli("run", "recipes/quickstart.yaml", *args, "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "quickstart"
    for name in ("student", "baseline"):
        adapters = run / f"{name}-adapters"
        config = json.loads((adapters / "adapter_config.json").read_text())
        assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == 4
        with_adapters, tokenizer = load(config["model"], adapter_path=str(adapters))
        fused, _ = load(str(run / name))  # loads alone
        prompt = tokenizer.encode("12+34=", add_special_tokens=False)
        assert _greedy(fused, prompt) == _greedy(with_adapters, prompt)
        base, _ = load(config["model"])
        tokens = mx.array([prompt])
        assert float(mx.abs(base(tokens) - fused(tokens)).max()) > 1e-3  # trained, not the base
    stage = json.loads((run / "distill" / "stage.json").read_text())
    assert 0 < stage["result"]["trainable"] < stage["result"]["parameters"] / 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("student.lora.rank=0", "student.lora.rank: must be >= 1"),
        ("student.lora.keys=[mlp.gate]", "'mlp.gate' names no module"),
        ("train.grad_accum=3", "train.grad_accum: 3 does not divide train.batch_size 8"),
    ],
)
def test_bad_adapter_recipe_exits_2_and_writes_nothing(tmp_path, override, message):
    args = sets(*LORA_RUN, f"runs_dir={tmp_path}", override)
    proc = cli("run", "recipes/quickstart.yaml", *args, "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tie, quantized", [(False, False), (True, False), (False, True)])
def test_lora_head_low_rank_term_matches_the_adapted_matrix(tie, quantized):
    """A LoRA head reaches the loss as its frozen base + low-rank term (never the adapted
    matrix); loss and every adapter gradient equal those of the dense adapted head."""
    from mlx_distill.kernels import SparseTargets
    from mlx_distill.models import head_inputs

    model = _student(tie, intermediate=64)
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    key = "model.embed_tokens" if tie else "lm_head"
    lora = LoraConfig(rank=3, scale=1.5, keys=[key])
    apply_adapters(model, StudentConfig(train="lora", lora=lora))
    rng = np.random.default_rng(11)
    for _, m in model.named_modules():  # lora_b starts at zero: give it values
        if "lora_b" in m:
            m.lora_b = mx.array(rng.normal(size=m.lora_b.shape) * 0.2, dtype=mx.float32)
    tokens = mx.array(rng.integers(0, VOCAB, (3, 7)), dtype=mx.int32)
    labels = mx.array(rng.integers(0, VOCAB, (3, 7)), dtype=mx.int32)
    ids = mx.array(rng.integers(0, VOCAB, (3, 7, 4)), dtype=mx.int32)
    logprobs = mx.array(np.log(rng.dirichlet(np.ones(4), (3, 7)) * 0.9), dtype=mx.float32)
    kw = dict(kind="forward_kl", labels=labels, kd_weight=0.5, chunk_size=5)

    def fused(model):
        hidden, head = head_inputs(model, tokens)
        assert head.adapter is not None
        assert isinstance(head.weight, mx.array) != quantized  # the base, still quantized
        low_rank = head.low_rank(hidden)
        return distill_loss(
            hidden,
            head.weight,
            SparseTargets(ids, logprobs),
            weight_grad=False,
            low_rank=low_rank,
            transform=head.transform,
            **kw,
        )[0]

    def dense(model):
        hidden = hidden_states(model, tokens)
        return distill_loss(hidden, lm_head_weight(model), SparseTargets(ids, logprobs), **kw)[0]

    got, g_got = nn.value_and_grad(model, fused)(model)
    want, g_want = nn.value_and_grad(model, dense)(model)
    assert abs(float(got) - float(want)) < 1e-5
    g_got, g_want = dict(tree_flatten(g_got)), dict(tree_flatten(g_want))
    assert sorted(g_got) == sorted(g_want) and any(k.startswith(key) for k in g_got)
    for name, value in g_want.items():
        assert float(mx.abs(value).max()) > 0, name
        np.testing.assert_allclose(np.array(g_got[name]), np.array(value), rtol=1e-4, atol=1e-6)
