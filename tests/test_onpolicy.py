"""On-policy distillation: the sampler, teacher scoring, the losses, mixed mode and resume."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from kd_reference import reference
from tiny import (
    ROOT,
    cli,
    random_examples,
    sets,
    tiny_model,
    tiny_tokenizer,
    train_run,
    weights,
)

from mlx_distill.cache import build_token_cache, open_cache
from mlx_distill.cache.loader import Loader
from mlx_distill.errors import BadInput
from mlx_distill.kernels import SparseTargets, distill_loss
from mlx_distill.recipe import DistillConfig, LossConfig, TrainConfig, load_recipe
from mlx_distill.teachers.local import LocalTeacher
from mlx_distill.train.onpolicy import (
    LOSS_TAG,
    OnPolicySource,
    check_templates,
    onpolicy_loss,
    sampled_token_objective,
)
from mlx_distill.train.sampler import sample_completions

V = 41
EOS = 1


def _prompts(n, seed, lo=2, hi=9):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, V, int(rng.integers(lo, hi))).astype(np.int32) for _ in range(n)]


def _argmax_chain(model, prompt, steps):
    seq = [int(t) for t in prompt]
    for _ in range(steps):
        nxt = int(mx.argmax(model(mx.array([seq]))[0, -1, :V]).item())
        seq.append(nxt)
        if nxt == EOS:
            break
    return seq[len(prompt) :]


def test_greedy_samples_are_the_students_argmax_chains():
    model, _ = tiny_model(V, seed=5, scale=2.0)
    prompts = _prompts(4, seed=int(np.random.default_rng().integers(1 << 30)))
    out = sample_completions(
        model, prompts, samples=2, temperature=0, max_new_tokens=9, eos_ids=[EOS]
    )
    assert len(out) == 8
    for i, prompt in enumerate(prompts):
        expect = _argmax_chain(model, prompt, 9)
        assert out[2 * i].tolist() == expect and out[2 * i + 1].tolist() == expect
    # a nucleus holding only the top token is greedy decoding too
    nucleus = sample_completions(
        model,
        prompts,
        temperature=1.0,
        top_p=1e-6,
        max_new_tokens=9,
        eos_ids=[EOS],
        key=mx.random.key(0),
    )
    assert [c.tolist() for c in nucleus] == [c.tolist() for c in out[::2]]


def test_sampling_is_fixed_by_its_key():
    model, _ = tiny_model(V, seed=6, scale=1.0)
    prompts = _prompts(3, seed=1)
    draw = lambda key: [  # noqa: E731
        c.tolist()
        for c in sample_completions(model, prompts, samples=3, max_new_tokens=12, key=key)
    ]
    first = draw(mx.random.key(7))
    assert draw(mx.random.key(7)) == first
    assert draw(mx.random.key(8)) != first
    assert len({tuple(c) for c in first}) > 3  # samples of one prompt differ


def _source(student, teacher, cfg, *, batch_size=4, seq_len=24, temperature=1.0, cache=None):
    return OnPolicySource(
        student,
        teacher,
        _prompts(10, seed=2),
        cfg,
        batch_size=batch_size,
        seq_len=seq_len,
        temperature=temperature,
        eos_ids=[EOS],
        vocab_size=V,
        seed=3,
        cache=cache,
    )


def _log_softmax(z, T=1.0):
    z = np.asarray(z, np.float64) / T
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("loss", ["reverse_kl", "sampled_token"])
def test_teacher_scores_on_sampled_sequences_equal_a_direct_forward(loss):
    student, _ = tiny_model(V, seed=8, scale=1.0)
    teacher_model, _ = tiny_model(V, seed=9)
    teacher = LocalTeacher((teacher_model, tiny_tokenizer(V)))
    cfg = DistillConfig(mode="on_policy", samples_per_prompt=2, max_new_tokens=10, k=5, loss=loss)
    batch = next(_source(student, teacher, cfg, temperature=2.0))
    assert batch.loss == LOSS_TAG
    tokens, labels, mask = (np.array(a) for a in (batch.tokens, batch.labels, batch.mask))
    assert mask.any() and (labels[:, :-1] == tokens[:, 1:])[mask[:, :-1]].all()
    logits = np.array(teacher_model(batch.tokens).astype(mx.float32))
    ids, lps = np.array(batch.targets.ids), np.array(batch.targets.logprobs)
    if loss == "sampled_token":
        direct = np.take_along_axis(_log_softmax(logits), labels[..., None], -1)[..., 0]
        assert (ids[..., 0] == labels).all()
        np.testing.assert_allclose(lps[..., 0][mask], direct[mask], rtol=1e-5, atol=1e-5)
        return
    direct = _log_softmax(logits, T=2.0)
    for b, t in zip(*np.nonzero(mask)):
        top = np.argsort(-direct[b, t])[:5]
        assert ids[b, t].tolist() == top.tolist()
        np.testing.assert_allclose(lps[b, t], direct[b, t, top], rtol=1e-5, atol=1e-5)
    # positions without loss hold the label with probability 1
    assert (ids[~mask][:, 0] == labels[~mask]).all() and (lps[~mask][:, 0] == 0).all()


def test_onpolicy_topk_loss_and_gradient_match_float64():
    """The on-policy batch's reverse-KL loss (fused, tail bucket) against the float64 reference."""
    rng = np.random.default_rng()
    student, _ = tiny_model(V, seed=10, scale=1.0)
    # a teacher with real tail mass: near 1 - P = 0 the fp32 tail is below its own resolution
    teacher_model, _ = tiny_model(V, seed=11, scale=1.5)
    teacher = LocalTeacher((teacher_model, tiny_tokenizer(V)))
    cfg = DistillConfig(mode="on_policy", max_new_tokens=8, k=4)
    batch = next(_source(student, teacher, cfg, batch_size=3))
    N, d = int(np.prod(batch.tokens.shape)), 32
    h = 0.3 * rng.standard_normal((N, d))
    W = rng.standard_normal((V, d))
    ids = np.array(batch.targets.ids).reshape(N, -1)
    lps = np.array(batch.targets.logprobs).reshape(N, -1).astype(np.float64)
    mask = np.array(batch.mask).reshape(N)

    def f(h, W):
        return distill_loss(
            h,
            W,
            SparseTargets(mx.array(ids), mx.array(lps)),
            kind="reverse_kl",
            mask=mx.array(mask),
        )[0]

    loss, (dh, dW) = mx.value_and_grad(f, argnums=(0, 1))(mx.array(h), mx.array(W))
    ref_loss, _, ref_dh, ref_dW = reference(
        h, W, ("sparse", ids, lps), kind="reverse_kl", mask=mask
    )
    # fp32 logits against float64: errors ~1e-6 relative to the largest entry
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-5)
    for got, ref in ((dh, ref_dh), (dW, ref_dW)):
        np.testing.assert_allclose(np.array(got), ref, atol=1e-4 * np.abs(ref).max())
    # and the trainer's on-policy loss is that fused loss, without a CE term
    loss_fn = onpolicy_loss(cfg, LossConfig(kind="forward_kl", kd_weight=0.5))
    value, metrics = loss_fn(student, batch.tokens, batch.labels, batch.mask, *batch.targets)
    assert metrics["ce"].item() == 0.0 and value.item() == pytest.approx(metrics["kd"].item())


def test_sampled_token_objective_and_gradient_match_float64():
    rng = np.random.default_rng()
    N, d = 13, 6
    h = rng.standard_normal((N, d))
    W = rng.standard_normal((V, d))
    y = rng.integers(0, V, N)
    lp_teacher = np.log(rng.uniform(0.01, 1.0, N))
    mask = rng.random(N) < 0.7
    mask[0] = True

    def f(h, W):
        return sampled_token_objective(
            h, W, mx.array(y), mx.array(lp_teacher), mx.array(mask), chunk=4
        )

    (loss, metrics), (dh, dW) = mx.value_and_grad(f, argnums=(0, 1))(
        mx.array(h, mx.float32), mx.array(W, mx.float32)
    )
    z = h @ W.T
    lq_all = _log_softmax(z)
    lq = lq_all[np.arange(N), y]
    ratio = lq - lp_teacher
    count = mask.sum()
    ref = (ratio * lq)[mask].sum() / count
    # d/dz of sum_t c_t log q(y_t) with c_t = ratio_t / count held fixed: c_t (onehot - softmax)
    c = np.where(mask, ratio / count, 0.0)
    dz = c[:, None] * (np.eye(V)[y] - np.exp(lq_all))
    np.testing.assert_allclose(loss.item(), ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["kd"].item(), ratio[mask].mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["ce"].item(), -lq[mask].mean(), rtol=1e-4)
    np.testing.assert_allclose(np.array(dh), dz @ W, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(np.array(dW), dz.T @ h, rtol=1e-3, atol=1e-5)


# -- runs through the trainer ---------------------------------------------------------------


def _train(tmp_path, model, loader, run, steps=4, extra=True, loss=None, ckpt_every=0):
    cfg = TrainConfig(
        steps=steps, batch_size=4, lr=5e-3, warmup=1, log_every=1, checkpoint_every=ckpt_every
    )
    loss_cfg = loss or LossConfig(kind="forward_kl", kd_weight=0.5)
    extra_losses = {LOSS_TAG: onpolicy_loss(DistillConfig(), loss_cfg)} if extra else None
    return train_run(tmp_path, model, loader, cfg, loss_cfg, run, extra_losses=extra_losses)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    teacher_model, _ = tiny_model(V, seed=12)
    teacher = LocalTeacher((teacher_model, tiny_tokenizer(V)))
    path = tmp_path_factory.mktemp("cache")
    build_token_cache(
        teacher, random_examples(24, V, seed=4, hi=20), path, k=4, shard_rows=8, progress=False
    )
    return teacher, path


def _cache_loader(path):
    return Loader(open_cache(path), batch_size=4, seq_len=24, seed=1)


def test_mixed_with_lambda_zero_is_bit_identical_to_offline(tmp_path, cached):
    teacher, path = cached
    offline = tiny_model(V, seed=13, scale=1.0)[0]
    _train(tmp_path, offline, _cache_loader(path), "offline", extra=False)
    mixed = tiny_model(V, seed=13, scale=1.0)[0]
    cfg = DistillConfig(mode="mixed", lmbda=0.0)
    _train(tmp_path, mixed, _source(mixed, teacher, cfg, cache=_cache_loader(path)), "mixed")
    for key, value in weights(offline).items():
        assert np.array_equal(weights(mixed)[key], value), key
    losses = [
        [json.loads(x)["loss"] for x in (tmp_path / f"{r}.jsonl").read_text().splitlines()]
        for r in ("offline", "mixed")
    ]
    assert losses[0] == losses[1]


def test_offline_steps_train_the_first_batches_from_the_cache(tmp_path, cached):
    teacher, path = cached
    offline = tiny_model(V, seed=13, scale=1.0)[0]
    _train(tmp_path, offline, _cache_loader(path), "offline", extra=False)
    warm = tiny_model(V, seed=13, scale=1.0)[0]
    cfg = DistillConfig(mode="on_policy", offline_steps=2, max_new_tokens=8)
    source = _source(warm, teacher, cfg, cache=_cache_loader(path))
    _train(tmp_path, warm, source, "warm")
    assert source.counts["on_policy"] == 2  # batches 3 and 4: sampled and scored
    records = {
        r: [json.loads(x) for x in (tmp_path / f"{r}.jsonl").read_text().splitlines()]
        for r in ("offline", "warm")
    }
    # the same two cache batches at the same learning rates, then the student's own samples
    assert [x["loss"] for x in records["warm"][:2]] == [x["loss"] for x in records["offline"][:2]]
    assert records["warm"][2]["loss"] != records["offline"][2]["loss"]
    assert records["warm"][1]["on_policy_batches"] == 0
    assert records["warm"][3]["on_policy_batches"] == 2
    with pytest.raises(BadInput, match="needs the teacher cache"):
        _source(warm, teacher, cfg)


class _Killed(OnPolicySource):
    """Stops the process (as a kill would) when batch `at` is requested."""

    at = 4

    def __next__(self):
        if self._batches + 1 == self.at:
            raise KeyboardInterrupt
        return super().__next__()


@pytest.mark.parametrize("mode, offline_steps", [("on_policy", 0), ("mixed", 0), ("on_policy", 3)])
def test_killed_onpolicy_run_resumes_to_the_same_trajectory(tmp_path, cached, mode, offline_steps):
    teacher, path = cached
    cfg = DistillConfig(
        mode=mode, lmbda=0.5, samples_per_prompt=2, max_new_tokens=8, offline_steps=offline_steps
    )

    def source(cls, model):
        cache = _cache_loader(path) if cfg.reads_cache() else None
        return cls(
            model, teacher, _prompts(10, seed=2), cfg, batch_size=4, seq_len=24,
            temperature=1.0, eos_ids=[EOS], vocab_size=V, seed=3, cache=cache,
        )  # fmt: skip

    whole = tiny_model(V, seed=14, scale=1.0)[0]
    whole_src = source(OnPolicySource, whole)
    _train(tmp_path, whole, whole_src, "whole", steps=6, ckpt_every=2)
    if mode == "mixed":
        assert 0 < whole_src.counts["on_policy"] < 6  # both kinds of batch were trained
    if offline_steps:  # killed in the warm start, resumed across its end
        assert whole_src.counts["on_policy"] == 6 - offline_steps
    killed = tiny_model(V, seed=14, scale=1.0)[0]
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, killed, source(_Killed, killed), "b", steps=6, ckpt_every=2)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-000002"]
    state = json.loads((tmp_path / "b" / "step-000002" / "state.json").read_text())
    assert state["loader"]["batches"] == 2  # the sampler's position travels with the checkpoint
    resumed = tiny_model(V, seed=14, scale=1.0)[0]
    result = _train(tmp_path, resumed, source(OnPolicySource, resumed), "b", steps=6, ckpt_every=2)
    assert result.resumed_from == 2
    for key, value in weights(whole).items():
        np.testing.assert_array_equal(weights(resumed)[key], value)
    records = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["train_tokens_per_s"] > 0 for r in records)


# -- refusals -------------------------------------------------------------------------------


def test_gemini_teacher_cannot_score_student_text():
    for mode in ("on_policy", "mixed"):
        with pytest.raises(BadInput, match="Gemini cannot score text it did not write"):
            load_recipe(None, ["teacher.kind=gemini", f"distill.mode={mode}"])
    load_recipe(None, ["teacher.kind=gemini", "distill.mode=offline"])


def test_template_mismatch_is_refused(tmp_path):
    from mlx_distill.text.tokenizer import load_tokenizer

    source = ROOT / "data/quickstart/teacher"
    other = tmp_path / "other"
    shutil.copytree(source, other)
    (other / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    config = json.loads((other / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    student = load_tokenizer(source)
    check_templates(student, load_tokenizer(source), "same")
    with pytest.raises(BadInput, match="chat template differs"):
        check_templates(student, load_tokenizer(other), str(other))


def test_cli_refuses_on_policy_with_gemini_before_any_work(tmp_path):
    proc = cli(
        "run",
        "recipes/gemini_to_qwen2.5-0.5b_seqkd.yaml",
        *sets("distill.mode=on_policy", f"runs_dir={tmp_path}"),
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Gemini cannot score text it did not write" in proc.stderr.strip().splitlines()[-1]
    assert "teacher.kind: local" in proc.stderr
    assert list(tmp_path.iterdir()) == []
