"""Students as mlx-lm models: build, save/load round trip, hidden states + LM head, layer cuts."""

import random
import time

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny import vocab_of

from mlx_distill.errors import BadInput
from mlx_distill.models import (
    build_model,
    from_teacher_layers,
    hidden_states,
    lm_head_weight,
    load_model,
    save_model,
)
from mlx_distill.recipe import ModelConfig


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_and_fused_view(arch, tied, tokenizer_dir, tmp_path):
    cfg = ModelConfig(
        arch=arch,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
        tie_embeddings=tied,
    )
    vocab = vocab_of(tokenizer_dir) + 7  # padded embedding rows, as real models have
    model, config = build_model(cfg, vocab)
    path = save_model(model, config, tokenizer_dir, tmp_path / "m")
    loaded, tokenizer, loaded_config = load_model(path)
    assert loaded_config["model_type"] == arch and loaded_config["vocab_size"] == vocab
    tokens = mx.array(np.random.default_rng().integers(0, vocab, (2, 9)), dtype=mx.int32)
    expected = model(tokens)
    assert mx.allclose(loaded(tokens), expected, atol=1e-5).item()
    head = lm_head_weight(loaded)
    assert head.shape == (vocab, 32)
    assert mx.allclose(hidden_states(loaded, tokens) @ head.T, expected, atol=1e-4).item()
    keys = {k for k, _ in tree_flatten(loaded.parameters())}
    assert ("lm_head.weight" in keys) == (not tied)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temp folder left


def test_student_from_every_second_teacher_layer(tokenizer_dir):
    cfg = ModelConfig(
        hidden_size=32, num_layers=5, num_heads=4, num_kv_heads=2, intermediate_size=48
    )
    teacher, config = build_model(cfg, vocab_of(tokenizer_dir))
    student, student_config = from_teacher_layers(teacher, config, stride=2)
    assert student_config["num_hidden_layers"] == 3  # layers 0, 2, 4
    for s_index, t_index in enumerate([0, 2, 4]):
        s = student.model.layers[s_index].self_attn.q_proj.weight
        t = teacher.model.layers[t_index].self_attn.q_proj.weight
        assert mx.array_equal(s, t).item()
    assert mx.array_equal(lm_head_weight(student), lm_head_weight(teacher)).item()
    # Keeping every layer reproduces the teacher exactly.
    clone, _ = from_teacher_layers(teacher, config, stride=1)
    tokens = mx.array([[1, 5, 9, 4]])
    assert mx.allclose(clone(tokens), teacher(tokens)).item()
    # An explicit list overrides the stride: exactly those layers, in the teacher's order.
    picked, picked_config = from_teacher_layers(teacher, config, stride=2, layers=[3, 1])
    assert picked_config["num_hidden_layers"] == 2
    for s_index, t_index in enumerate([1, 3]):
        s = picked.model.layers[s_index].mlp.down_proj.weight
        t = teacher.model.layers[t_index].mlp.down_proj.weight
        assert mx.array_equal(s, t).item()
    with pytest.raises(BadInput, match=r"student.layers \[0, 5\]: the teacher has layers 0..4"):
        from_teacher_layers(teacher, config, stride=2, layers=[0, 5])


def test_bad_model_folders(tmp_path):
    with pytest.raises(BadInput, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BadInput, match="no .safetensors"):
        load_model(tmp_path)
    with pytest.raises(BadInput, match="must divide"):
        build_model(ModelConfig(hidden_size=30, num_heads=4), 50)


def test_student_init_is_seeded_by_the_recipe(tmp_path):
    """KD student and baseline are built by separate calls (maybe in separate processes):
    the recipe seed alone fixes their initial weights."""

    from mlx_distill.context import Context
    from mlx_distill.recipe import Recipe
    from mlx_distill.stages.distill import student as _student

    class Vocab:
        def get_vocab(self):
            return {str(i): i for i in range(40)}

    recipe = Recipe(seed=random.randrange(1 << 20))
    recipe.student.model = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    ctx = Context(recipe, tmp_path)

    def weights():
        model, _ = _student(ctx, Vocab())
        mx.random.uniform(shape=(3,))  # whatever else draws from the global RNG in between
        return dict(tree_flatten(model.parameters()))

    first, second = weights(), weights()
    assert all(mx.array_equal(first[k], second[k]).item() for k in first)
    recipe.seed += 1
    other = weights()
    assert not all(mx.array_equal(first[k], other[k]).item() for k in first)


def test_the_head_contract_is_proven_once_per_folder(tokenizer_dir, tmp_path, monkeypatch):
    from mlx_distill.models import check_folder, heads

    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    model, config = build_model(cfg, vocab_of(tokenizer_dir))
    assert model._head_contract.hidden == "backbone"  # build_model proved it
    path = save_model(model, config, tokenizer_dir, tmp_path / "m")
    probes = []
    own = heads.prove
    monkeypatch.setattr(heads, "prove", lambda m: probes.append(m) or own(m))
    check_folder(path)  # the preflight
    first, _, _ = load_model(path)  # the stage that loads it next
    second, _, _ = load_model(path)
    assert len(probes) == 1
    assert first._head_contract == second._head_contract == probes[0]._head_contract
    # new weights in the folder (its file time moves on: kernel clocks tick every few ms)
    time.sleep(0.05)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    load_model(path)
    assert len(probes) == 2
