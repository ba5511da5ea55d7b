"""Mixture-of-experts and hybrid (SSM, linear attention) architectures through the head contract.

Each architecture of issue 26's list is built tiny with mlx-lm's own classes (random weights, a
vocabulary padded to 160 rows), saved as an mlx-lm folder and loaded back with
`models.load_model`, which proves the head contract on a probe. The trainer's losses (CE, KD to
dense and to top-k targets) and the gradients of every trainable parameter must match the same
losses on the model's own `model(tokens)` logits within 1e-4 relative (`test_heads.measure`),
a few also 4- and 8-bit quantized. A model whose logits no known transform reproduces is
refused with one line, before any stage of a run writes.

`python tests/test_architectures.py` prints the architecture table (these and test_heads' dense
architectures): the transform and hidden-state path each was proven with, the largest loss and
gradient errors, or the one-line refusal.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_heads import BASE, TOL, V, measure
from tiny import ROOT, main, one_line, quickstart_sets

from mlx_distill.errors import BadInput
from mlx_distill.models import (
    check_folder,
    contract,
    from_teacher_layers,
    head_inputs,
    load_model,
    model_from_config,
    save_model,
)
from mlx_distill.models.adapters import apply_adapters
from mlx_distill.models.heads import head_site
from mlx_distill.recipe import LoraConfig, StudentConfig

# test_heads' tiny shapes with four layers (room for alternating and mixed layer kinds)
D = {k: v for k, v in BASE.items() if k not in ("layer_norm_eps", "norm_epsilon")}
D["num_hidden_layers"] = 4
EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
LINEAR = dict(
    linear_num_value_heads=2,
    linear_num_key_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
)
MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
SHARED = dict(
    n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1
)
SHARED.update(n_group=1, topk_group=1, moe_intermediate_size=32, routed_scaling_factor=1.0)
ROPE_LLAMA4 = dict(
    rope_type="default",
    rope_theta=10000.0,
    llama_4_scaling_beta=0.1,
    original_max_position_embeddings=64,
)
ALTERNATE = ["sliding_attention", "full_attention"] * 2
UNTIED = dict(tie_word_embeddings=False)

MOE = {
    "qwen3_moe": dict(
        D, **EXPERTS, **UNTIED, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True
    ),
    "qwen3_5_moe": dict(
        UNTIED,
        text_config=dict(
            D,
            **LINEAR,
            **EXPERTS,
            **UNTIED,
            model_type="qwen3_5_moe_text",
            shared_expert_intermediate_size=32,
            full_attention_interval=2,
            rope_parameters={
                "type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [2, 1, 1],
            },
        ),
    ),
    "qwen3_next": dict(
        D,
        **LINEAR,
        **EXPERTS,
        **UNTIED,
        decoder_sparse_step=1,
        shared_expert_intermediate_size=32,
        mlp_only_layers=[],
        partial_rotary_factor=0.5,
        full_attention_interval=2,
    ),
    "gpt_oss": dict(
        D, num_local_experts=4, num_experts_per_tok=2, sliding_window=8, layer_types=ALTERNATE
    ),
    "mixtral": dict(D, **UNTIED, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(D, **UNTIED, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(D, **MLA, **SHARED),
    "glm4_moe": dict(
        D,
        **SHARED,
        **UNTIED,
        norm_topk_prob=True,
        rope_scaling=None,
        use_qk_norm=True,
        attention_bias=False,
        partial_rotary_factor=0.5,
    ),
    "llama4_text": dict(
        D,
        **UNTIED,
        intermediate_size_mlp=64,
        no_rope_layers=[1, 1, 1, 0],
        use_qk_norm=True,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        attention_chunk_size=8,
    ),
    "ernie4_5_moe": dict(
        D,
        **UNTIED,
        use_bias=False,
        moe_num_experts=4,
        moe_k=2,
        moe_intermediate_size=32,
        moe_layer_start_index=1,
    ),
    "minimax": dict(
        D, **UNTIED, num_experts_per_tok=2, num_local_experts=4, shared_intermediate_size=32
    )
    | dict(rotary_dim=8),
    "mistral4": dict(D, **MLA, **SHARED, norm_topk_prob=True, rope_parameters=ROPE_LLAMA4),
}
STUDENTS = {
    "gemma4_text": dict(
        D,
        global_head_dim=32,
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=V,
        sliding_window=8,
        sliding_window_pattern=2,
        use_double_wide_mlp=False,
        final_logit_softcapping=30.0,
    ),
    "gemma3n": dict(
        text_config=dict(
            D,
            model_type="gemma3n_text",
            num_kv_shared_layers=0,
            vocab_size_per_layer_input=V,
            sliding_window=8,
            rope_local_base_freq=10000.0,
            final_logit_softcapping=30.0,
            layer_types=ALTERNATE,
            activation_sparsity_pattern=[0.0] * 4,
            hidden_size_per_layer_input=8,
            altup_num_inputs=2,
            altup_coef_clip=120.0,
            altup_correct_scale=True,
            altup_active_idx=0,
            laurel_rank=8,
        )
    ),
    "lfm2": dict(
        D,
        norm_eps=1e-5,
        conv_bias=False,
        conv_L_cache=3,
        block_dim=64,
        block_ff_dim=64,
        block_multiple_of=16,
        block_ffn_dim_multiplier=1.0,
        block_auto_adjust_ff_dim=False,
        full_attn_idxs=[1, 3],
    ),
    "granitemoehybrid": dict(
        D,
        **UNTIED,
        attention_bias=False,
        embedding_multiplier=2.0,
        attention_multiplier=0.25,
        logits_scaling=0.25,
        residual_multiplier=0.5,
        layer_types=["mamba", "attention"] * 2,
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=32,
        mamba_n_heads=8,  # transformers checks n_heads * d_head = 2 * hidden_size
        mamba_d_head=16,
        mamba_proj_bias=False,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_n_groups=1,
        mamba_conv_bias=True,
    ),
    "falcon_h1": dict(
        D,
        **UNTIED,
        mamba_d_head=16,
        mamba_n_heads=4,
        mamba_d_ssm=64,
        mamba_d_state=16,
        mamba_chunk_size=8,
    ),
    "nemotron_h": dict(
        D,
        **UNTIED,
        attention_bias=False,
        mamba_num_heads=4,
        mamba_head_dim=16,
        mamba_proj_bias=False,
        ssm_state_size=16,
        conv_kernel=4,
        n_groups=1,
        mlp_bias=False,
        layer_norm_epsilon=1e-5,
        use_bias=False,
        use_conv_bias=True,
        hybrid_override_pattern="M*M-",
    ),
    "ministral3": dict(
        D, **UNTIED, layer_types=ALTERNATE, sliding_window=8, rope_parameters=ROPE_LLAMA4
    ),
    "olmo3": dict(D, **UNTIED, sliding_window=8),
    "exaone4": dict(D, **UNTIED, rope_scaling=None, sliding_window=8, sliding_window_pattern="LG")
    | dict(layer_types=ALTERNATE),  # transformers' config reads these, mlx-lm the pattern
    "seed_oss": dict(D, **UNTIED),
}
QUICKSTART = ROOT / "data/quickstart/teacher"
CONFIGS = {k: dict(v, model_type=k) for k, v in (MOE | STUDENTS).items()}
SOFTCAPPED = {"gemma4_text", "gemma3n"}  # logits spread past the cap (30), as in test_heads
# quantized variants (affine, group 32): MoE teachers as users run them, and two hybrids
QUANTIZED = {"qwen3_moe": "q4", "mixtral": "q8", "gpt_oss": "q4", "deepseek_v3": "q4"}
QUANTIZED |= {"qwen3_next": "q8", "nemotron_h": "q4"}
# tied heads where the config chooses (Falcon-H1's tied head scales its logits)
TIED = ("falcon_h1", "qwen3_moe", "olmo3")
CASES = [(a, "fp32") for a in CONFIGS] + sorted(QUANTIZED.items()) + [(a, "tied") for a in TIED]
# the teacher layers a student keeps: these line up with their kinds (MoE and hybrids)
CUTS = {
    "qwen3_moe": [0, 3],
    "deepseek_v3": [0, 2],
    "mixtral": [1, 3],
    "gpt_oss": [0, 1],
    "qwen3_next": [0, 1],
    "nemotron_h": [1, 2],
    "granitemoehybrid": [0, 3],
    "lfm2": [0, 1],
    "gemma4_text": [0, 3],
    "gemma3n": [0, 1],  # Gemma 3n's layer code wants a sliding and a full attention layer
}
# Gemma's per-layer input embeddings (vocab, layers * p) and their projection (layers * p, d)
PER_LAYER_INPUTS = ("embed_tokens_per_layer.weight", "per_layer_model_projection.weight")


def _spread_head(model, tokens: mx.array, target: float) -> None:
    """Scale the head (or tied embedding) so that max |logit| is about `target`."""
    owner, name, _ = head_site(model)
    for _ in range(2):  # a tied embedding also scales the input: repeat once
        peak = mx.abs(model(tokens)).max().item()
        owner[name].weight = owner[name].weight * (target / peak)


def build(arch: str, variant: str, tokenizer_dir, tmp_path, seed: int):
    """`arch` tiny, in `variant` (fp32, tied, q4, q8), saved and loaded back through the project."""
    from mlx_lm.utils import quantize_model

    mx.random.seed(seed)
    config = json.loads(json.dumps(CONFIGS[arch]))
    if variant == "tied":
        config["tie_word_embeddings"] = True
    model = model_from_config(config)
    tokens = mx.array(np.random.default_rng(seed).integers(0, V, (2, 11)), dtype=mx.int32)
    _spread_head(model, tokens, 90.0 if arch in SOFTCAPPED else 30.0)
    mx.eval(model.parameters())
    if variant in ("q4", "q8"):
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(model, config, 32, int(variant[1:]))
    path = save_model(model, config, tokenizer_dir, tmp_path / f"{arch}-{variant}")
    loaded, _, _ = load_model(path)
    return loaded, tokens


@pytest.mark.parametrize("arch,variant", CASES)
def test_trains_like_its_own_logits(arch, variant, tokenizer_dir, tmp_path):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    model, tokens = build(arch, variant, tokenizer_dir, tmp_path, seed)
    proven = contract(model)
    assert proven.error <= 1e-4
    if arch in SOFTCAPPED:
        assert dict(proven.fields) == {"softcap": 30.0}
    if arch == "granitemoehybrid":
        assert dict(proven.fields) == {"logit_scale": 4.0}  # 1 / logits_scaling
    if (arch, variant) == ("falcon_h1", "tied"):  # lm_head_multiplier / embedding_multiplier
        assert dict(proven.fields) == {"logit_scale": pytest.approx(0.0390625 / 5.656854249492381)}
    errs = measure(model, tokens, seed)
    assert errs["n_trainable"] > 0
    bad = {k: v for k, v in errs.items() if k != "n_trainable" and not v <= TOL}
    assert not bad, f"{arch}/{variant} seed {seed}: {bad}"


# LoRA students (mlx-lm's adapters, mixture-of-experts layers included), one with its head adapted
LORA = {
    "qwen3_moe": ["self_attn.q_proj", "mlp.switch_mlp.down_proj", "lm_head"],
    "nemotron_h": None,
    # every linear is not an option: Gemma 3n's AltUp reads its Linear weights directly
    "gemma3n": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"],
    "granitemoehybrid": None,
}


@pytest.mark.parametrize("arch", sorted(LORA))
def test_lora_students_train_like_their_own_logits(arch, tokenizer_dir, tmp_path):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    model, tokens = build(arch, "fp32", tokenizer_dir, tmp_path, seed)
    lora = LoraConfig(rank=4, scale=2.0, keys=LORA[arch])
    apply_adapters(model, StudentConfig(train="lora", lora=lora))
    errs = measure(model, tokens, seed)
    assert errs["n_trainable"] > 0
    bad = {k: v for k, v in errs.items() if k != "n_trainable" and not v <= TOL}
    assert not bad, f"{arch}/lora seed {seed}: {bad}"


@pytest.mark.parametrize("arch", sorted(CUTS))
def test_teacher_layers_cut_moe_and_hybrid_teachers(arch):
    mx.random.seed(0)
    teacher = model_from_config(CONFIGS[arch])
    mx.eval(teacher.parameters())
    keep = CUTS[arch]
    student, _ = from_teacher_layers(teacher, CONFIGS[arch], stride=2, layers=keep)
    t_params = dict(tree_flatten(teacher.parameters()))
    for key, value in tree_flatten(student.parameters()):
        for j, i in enumerate(keep):  # the student's layer j is the teacher's layer keep[j]
            key = key.replace(f".layers.{j}.", f".layers.@{i}.")
        want = np.array(t_params[key.replace("@", "")])
        if key.endswith(PER_LAYER_INPUTS):  # one block of columns (rows) per teacher layer
            axis = 1 if key.endswith(PER_LAYER_INPUTS[0]) else 0
            blocks = np.split(want, len(teacher.layers), axis=axis)
            want = np.concatenate([blocks[i] for i in keep], axis=axis)
        assert np.array_equal(np.array(value), want), key
    tokens = mx.array([[1, 5, 9, 2, 7]], dtype=mx.int32)
    hidden, head = head_inputs(student, tokens)
    logits = head.logits(hidden)
    assert mx.allclose(logits, student(tokens).astype(mx.float32), atol=1e-4).item()


def test_a_cut_that_changes_a_layers_kind_is_refused():
    # Qwen3-Next alternates linear and full attention: teacher layer 2 (linear) cannot be the
    # student's layer 1 (full attention).
    teacher = model_from_config(CONFIGS["qwen3_next"])
    with pytest.raises(BadInput, match=r"teacher layer 2 would become student layer 1 of another"):
        from_teacher_layers(teacher, CONFIGS["qwen3_next"], stride=2, layers=[0, 2])


def test_logits_no_known_transform_reproduces_are_refused(tokenizer_dir, tmp_path, monkeypatch):
    from mlx_lm.models import qwen3_moe

    build("qwen3_moe", "fp32", tokenizer_dir, tmp_path, 0)
    folder = shutil.copytree(tmp_path / "qwen3_moe-fp32", tmp_path / "copy")  # not proven yet
    own = qwen3_moe.Model.__call__
    monkeypatch.setattr(
        qwen3_moe.Model, "__call__", lambda self, x, cache=None: 1.37 * own(self, x)
    )
    with pytest.raises(BadInput) as refused:
        load_model(folder)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        "architecture 'qwen3_moe': the fused LM head does not reproduce its own logits on a "
        "probe: max error 0.27 of the largest logit (tolerance 0.0001), best with hidden states "
        "from its backbone and no transform (1 transform(s) tried"
    ), message


def test_an_architecture_mlx_lm_cannot_build_is_refused_from_its_config(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(D, model_type="qwen9_moe")))
    with pytest.raises(BadInput, match=r"architecture 'qwen9_moe' is not one mlx-lm .* can build"):
        check_folder(folder)
    (folder / "config.json").write_text(json.dumps(CONFIGS["mixtral"]))
    check_folder(folder)  # config.json alone: mlx-lm builds it, nothing to probe yet


def _teacher_folder(tmp_path, model_type: str | None = None):
    folder = shutil.copytree(QUICKSTART, tmp_path / "teacher")
    if model_type:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(config, model_type=model_type)))
    return folder


def _run(monkeypatch, capsys, runs, folder):
    # the recipe's tokenizer is the quickstart teacher's own, as the copy's: transformers warns
    # on stderr when it loads a tokenizer beside a model_type it does not know
    extra = (f"tokenizer.path={QUICKSTART}", f"teacher.path={folder}")
    return main(
        monkeypatch, capsys, "run", "recipes/quickstart.yaml", *quickstart_sets(runs, *extra)
    )


def test_a_teacher_mlx_lm_cannot_build_is_refused_before_any_write(monkeypatch, capsys, tmp_path):
    folder = _teacher_folder(tmp_path, "qwen9_moe")
    runs = tmp_path / "runs"
    code, _, err = _run(monkeypatch, capsys, runs, folder)
    assert one_line(code, err).startswith(
        f"error: recipe key teacher.path: {folder}: architecture 'qwen9_moe' is not one mlx-lm"
    )
    assert not runs.exists()


def test_dry_run_refuses_the_same_teacher(monkeypatch, capsys, tmp_path):
    folder = _teacher_folder(tmp_path, "qwen9_moe")
    runs = tmp_path / "runs"
    extra = (f"tokenizer.path={QUICKSTART}", f"teacher.path={folder}")
    sets_ = quickstart_sets(runs, *extra)
    code, out, err = main(
        monkeypatch, capsys, "run", "recipes/quickstart.yaml", "--dry-run", *sets_
    )
    assert "architecture 'qwen9_moe' is not one mlx-lm" in one_line(code, err)
    assert out == "" and not runs.exists()


def test_plan_refuses_the_same_teacher_from_its_config_alone(monkeypatch, capsys, tmp_path):
    folder = _teacher_folder(tmp_path, "qwen9_moe")
    (folder / "model.safetensors").unlink()  # config.json alone, as before a download
    extra = (f"tokenizer.path={QUICKSTART}", f"teacher.path={folder}")
    sets_ = quickstart_sets(tmp_path / "runs", *extra)
    code, _, err = main(monkeypatch, capsys, "plan", "recipes/quickstart.yaml", *sets_)
    assert "architecture 'qwen9_moe' is not one mlx-lm" in one_line(code, err)


def test_a_teacher_layer_cut_is_checked_before_any_write(monkeypatch, capsys, tmp_path):
    folder = _teacher_folder(tmp_path)
    runs = tmp_path / "runs"
    extra = (f"tokenizer.path={QUICKSTART}", f"teacher.path={folder}")
    extra += ("student.init=teacher_layers", "student.layers=[0, 99]")
    sets_ = quickstart_sets(runs, *extra)
    code, _, err = main(monkeypatch, capsys, "run", "recipes/quickstart.yaml", *sets_)
    assert one_line(code, err) == "error: student.layers [0, 99]: the teacher has layers 0..7"
    assert not runs.exists()


def test_a_teacher_whose_logits_do_not_match_is_refused_before_any_write(
    monkeypatch, capsys, tmp_path
):
    from mlx_lm.models import llama

    folder = _teacher_folder(tmp_path)
    own = llama.Model.__call__
    monkeypatch.setattr(llama.Model, "__call__", lambda self, x, cache=None: 0.5 * own(self, x))
    runs = tmp_path / "runs"
    code, _, err = _run(monkeypatch, capsys, runs, folder)
    line = one_line(code, err)
    assert line.startswith(
        "error: recipe key teacher.path: architecture 'llama': the fused LM head does not "
        "reproduce its own logits on a probe: max error 1 of the largest logit"
    ), line
    assert not runs.exists()


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    from test_heads import CASES as DENSE_CASES
    from test_heads import build_case
    from tiny import arithmetic_tokenizer

    def describe(model) -> str:
        found = contract(model)
        parts = [f"{k} {v:g}" for k, v in found.fields] + [f"hidden: {found.hidden}"]
        return ", ".join(parts)

    with tempfile.TemporaryDirectory() as tmp:
        tok = arithmetic_tokenizer(Path(tmp) / "tok")
        print("| architecture | kind | variant | contract | loss rel. err | grad rel. err |")
        print("|---|---|---|---|---|---|")
        hybrid = {"qwen3_5_moe", "qwen3_next", "lfm2", "granitemoehybrid", "falcon_h1"}
        hybrid |= {"nemotron_h"}  # state-space, linear-attention or convolution layers
        rows = [(a, v, "dense") for a, v in DENSE_CASES]
        for arch, variant in CASES:
            moe = arch in MOE or arch == "granitemoehybrid"
            kind = " + ".join(["MoE"] * moe + ["hybrid"] * (arch in hybrid)) or "dense"
            rows.append((arch, variant, kind))
        for arch, variant, kind in rows:
            try:
                if arch not in CONFIGS:
                    model, tokens = build_case(arch, variant, tok, Path(tmp), 0)
                else:
                    model, tokens = build(arch, variant, tok, Path(tmp), 0)
            except BadInput as e:
                print(f"| {arch} | {kind} | {variant} | refused: {e} | | |")
                continue
            errs = measure(model, tokens, 0)
            loss = max(errs[k] for k in ("ce", "kd_dense", "kd_topk"))
            grad = max(errs[k] for k in ("grad_ce", "grad_kd_topk"))
            print(f"| {arch} | {kind} | {variant} | {describe(model)} | {loss:.1e} | {grad:.1e} |")

        def cut(arch: str, keep: list[int]) -> str:
            teacher = model_from_config(CONFIGS[arch])
            try:
                from_teacher_layers(teacher, CONFIGS[arch], stride=2, layers=keep)
            except BadInput as e:
                return f"refused: {e}"
            return "ok"

        print("\n| architecture | teacher_layers [0, 1] | teacher_layers [0, 2] |\n|---|---|---|")
        for arch in CONFIGS:
            print(f"| {arch} | {cut(arch, [0, 1])} | {cut(arch, [0, 2])} |")
