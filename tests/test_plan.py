"""`plan`: predicted training peaks against `mx.get_peak_memory()`, and refusals before work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import ROOT, cli

from mlx_distill.models import model_config_dict, model_from_config
from mlx_distill.models.adapters import apply_adapters
from mlx_distill.plan import shape_of, train_terms
from mlx_distill.recipe import LoraConfig, ModelConfig, StudentConfig

# Real training steps (the trainer's own step and loss) in a fresh process; the peak of each
# config's second step, with nothing of the previous config left alive.
MEASURE = """
import json, sys
from mlx_distill import backend
backend.setup()
import mlx.core as mx, mlx.optimizers as optim, numpy as np
from mlx_distill.models import build_model
from mlx_distill.models.adapters import apply_adapters
from mlx_distill.recipe import LoraConfig, LossConfig, ModelConfig, StudentConfig, TrainConfig
from mlx_distill.train.recompute import checkpoint_blocks
from mlx_distill.train.step import make_step
from mlx_distill.train.loss import make_loss
import gc
def measure(c):
    mx.random.seed(0)
    model, _ = build_model(ModelConfig(**c["model"]), c["V"])
    apply_adapters(model, StudentConfig(train=c["train"], lora=LoraConfig(rank=8)))
    cfg = TrainConfig(batch_size=c["B"], grad_checkpoint=c["ckpt"])
    opt = optim.AdamW(1e-4)
    opt.init(model.trainable_parameters())
    step = make_step(model, opt, make_loss(LossConfig(kind="forward_kl")), cfg)
    if cfg.grad_checkpoint:
        checkpoint_blocks(model)
    rng = np.random.default_rng(0)
    B, L, V, k = c["B"], c["L"], c["V"], 16
    tokens = mx.array(rng.integers(0, V, (B, L)), dtype=mx.int32)
    mask = mx.ones((B, L), dtype=mx.bool_)
    ids = mx.array(rng.integers(0, V, (B, L, k)), dtype=mx.int32)
    lp = mx.array(np.log(rng.dirichlet(np.ones(k), (B, L)) * 0.9), dtype=mx.float32)
    for _ in range(2):  # the second step: compiled, optimizer state allocated
        mx.eval(model.state, opt.state)
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(step((tokens, tokens, mask, ids, lp)), model.state, opt.state)
    return mx.get_peak_memory()
peaks = []
for c in json.loads(sys.argv[1]):
    peaks.append(measure(c))
    gc.collect()
    mx.clear_cache()
print(json.dumps(peaks))
"""

MODEL = dict(hidden_size=96, num_layers=3, num_heads=3, num_kv_heads=1, intermediate_size=256)
CONFIGS = [  # full and LoRA, two vocabularies, two sequence lengths, with and without ckpt
    {"train": "full", "V": 4000, "B": 4, "L": 128, "ckpt": False},
    {"train": "full", "V": 30000, "B": 2, "L": 128, "ckpt": False},
    {"train": "lora", "V": 30000, "B": 2, "L": 256, "ckpt": False},
    {"train": "lora", "V": 2000, "B": 2, "L": 1024, "ckpt": True},
]


def _predicted(c):
    config = model_config_dict(ModelConfig(**MODEL), c["V"])
    model = model_from_config(config)  # lazy: nothing is allocated
    apply_adapters(model, StudentConfig(train=c["train"], lora=LoraConfig(rank=8)))
    terms = train_terms(
        shape_of(model, config),
        batch=c["B"],
        seq=c["L"],
        k=16,
        kd=True,
        grad_checkpoint=c["ckpt"],
    )
    return sum(terms.values())


@pytest.mark.slow
def test_predicted_peak_within_25_percent_of_measured():
    arg = json.dumps([dict(c, model=MODEL) for c in CONFIGS])
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, arg], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ratios = [_predicted(c) / m for c, m in zip(CONFIGS, json.loads(proc.stdout))]
    assert all(0.75 <= r <= 1.25 for r in ratios), ratios


def test_plan_json_names_each_stage():
    proc = cli("plan", "recipes/quickstart.yaml", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert set(plan["stages"]) == {"cache", "distill", "baseline", "eval"}
    assert not any("time" in v for v in plan["stages"].values())  # no probes without --time
    assert plan["fits"] and plan["device_bytes"] > 0
    distill = plan["stages"]["distill"]
    assert distill["peak_bytes"] == sum(distill["terms"].values())


def test_run_predicted_not_to_fit_is_refused_before_any_work(tmp_path):
    sets = ["--set", f"runs_dir={tmp_path}", "--set", "train.batch_size=200000"]
    proc = cli("run", "recipes/quickstart.yaml", *sets, "--no-progress")
    assert proc.returncode == 2
    assert "stage distill is predicted to need" in proc.stderr
    assert "train.grad_checkpoint=true" in proc.stderr and "student.train=lora" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_on_policy_plan_counts_the_teacher_beside_the_student():
    offline = json.loads(cli("plan", "recipes/quickstart.yaml", "--json").stdout)
    proc = cli("plan", "recipes/quickstart.yaml", "--json", "--set", "distill.mode=mixed")
    assert proc.returncode == 0, proc.stderr
    mixed = json.loads(proc.stdout)
    teacher = Path(ROOT / "data/quickstart/teacher/model.safetensors").stat().st_size
    terms = mixed["stages"]["distill"]["terms"]
    # fp32 weights: the safetensors file is the tensors plus a small JSON header
    assert 0.98 * teacher <= terms["teacher_weights"] <= teacher
    added = mixed["stages"]["distill"]["peak_bytes"] - offline["stages"]["distill"]["peak_bytes"]
    assert added == terms["teacher_weights"] + terms["teacher_scoring"]
    assert mixed["stages"]["baseline"] == offline["stages"]["baseline"]


def test_refinement_plan_counts_the_teacher_and_both_phases_evaluated():
    offline = json.loads(cli("plan", "recipes/quickstart.yaml", "--json").stdout)
    proc = cli("plan", "recipes/quickstart.yaml", "--json", "--set", "refine.steps=5")
    assert proc.returncode == 0, proc.stderr
    refined = json.loads(proc.stdout)["stages"]
    teacher = Path(ROOT / "data/quickstart/teacher/model.safetensors").stat().st_size
    assert 0.98 * teacher <= refined["distill"]["terms"]["teacher_weights"] <= teacher
    # two more students in the eval stage: the KD student and the baseline before refinement
    student = refined["distill"]["terms"]["weights"]
    grown = refined["eval"]["terms"]["weights"] - offline["stages"]["eval"]["terms"]["weights"]
    assert grown == 2 * student


def test_time_estimate_from_timed_probes_scales_with_the_recipe():
    import math

    from tiny import QUICKSTART_TINY

    from mlx_distill.plan_time import estimate
    from mlx_distill.recipe import load_recipe

    def times(*sets):
        recipe = load_recipe(str(ROOT / "recipes/quickstart.yaml"), [*QUICKSTART_TINY, *sets])
        return estimate(recipe, ["cache", "distill", "baseline", "eval"])

    short, long = times("train.steps=10"), times("train.steps=40", "data.max_train=64")
    assert short["distill"]["units"] == 10 and long["distill"]["units"] == 40
    assert short["cache"]["units"] == math.ceil(16 / 64) and long["cache"]["units"] == 1
    for est in (short, long):
        for stage, t in est.items():
            assert 0 < t["seconds"] < 3600, (stage, t)  # sane for a 1M-parameter student
            if "per" in t:
                assert t["seconds"] == round(t["per"] * t["units"], 1)
    assert "student: " in short["eval"]["basis"] and "teacher: " in short["eval"]["basis"]


# -- sizing from config.json alone -----------------------------------------------------------


def _folder(tmp_path, name, dtype=None, bits=None):
    """A tiny qwen2 folder with weights (fp32, bf16 or quantized) and its config-only twin."""
    import mlx.core as mx
    from mlx_lm.utils import quantize_model

    from mlx_distill.models import build_model, save_model

    cfg = ModelConfig(arch="qwen2", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    model, config = build_model(cfg, 1000)
    if dtype:
        model.set_dtype(getattr(mx, dtype))
        config["torch_dtype"] = dtype
    if bits:
        model, config = quantize_model(model, config, group_size=32, bits=bits)
    full = save_model(model, config, tmp_path / "none", tmp_path / name)
    bare = tmp_path / f"{name}-config-only"
    bare.mkdir()
    (bare / "config.json").write_text((full / "config.json").read_text())
    return full, bare


@pytest.mark.parametrize("dtype, bits", [(None, None), ("bfloat16", None), (None, 4), (None, 8)])
def test_config_only_folder_sizes_as_its_weights_do(tmp_path, dtype, bits):
    from mlx_distill.plan import folder_skeleton

    full, bare = _folder(tmp_path, "m", dtype, bits)
    with_weights, from_config = folder_skeleton(full), folder_skeleton(bare)
    assert isinstance(with_weights.weights, Path)
    assert "config.json only" in from_config.weights
    a = shape_of(with_weights.model, with_weights.config)
    b = shape_of(from_config.model, from_config.config)
    assert a == b
    blob = (full / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(blob[:8], "little")  # safetensors: length, JSON, tensors
    assert b.weight_bytes == len(blob) - header
    assert b.quantized == bool(bits)


def test_a_7b_4bit_config_is_sized_without_memory(tmp_path):
    """Qwen2.5-7B-Instruct as mlx-community's 4-bit conversion: 7.62B parameters, 4.28 GB."""
    import mlx.core as mx

    from mlx_distill.plan import folder_skeleton

    config = {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "torch_dtype": "bfloat16",
        "quantization": {"group_size": 64, "bits": 4},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    before = mx.get_active_memory()
    built = folder_skeleton(tmp_path)
    s = shape_of(built.model, built.config)
    assert mx.get_active_memory() - before < 1 << 20  # nothing materialized
    assert abs(s.values - 7.6156e9) < 1e6
    assert 4.25e9 < s.weight_bytes < 4.31e9


def test_plan_before_the_download(tmp_path):
    """A pair given as config.json (+ tokenizer) folders: sized, and its time not estimated."""
    from tiny import tiny_tokenizer

    tok = tmp_path / "tok"
    tiny_tokenizer(1000).save_pretrained(tok)
    _, teacher = _folder(tmp_path, "teacher", bits=4)
    _, student = _folder(tmp_path, "student")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "t5 t6", "completion": "t7"}) + "\n")
    recipe = {
        "name": "bare",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"train": str(data), "test": str(data), "max_seq_len": 64},
        "tokenizer": {"path": str(tok)},
        "teacher": {"kind": "local", "path": str(teacher)},
        "student": {"init": "pretrained", "path": str(student)},
        "train": {"steps": 5, "batch_size": 2},
    }
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    proc = cli("plan", str(path), "--json", "--time")
    assert proc.returncode == 0, proc.stderr
    stages = json.loads(proc.stdout)["stages"]
    assert set(stages) == {"cache", "distill", "baseline", "eval"}
    for name, v in stages.items():
        assert v["peak_bytes"] > 0
        assert v["time"]["seconds"] is None and "config.json only" in v["time"]["why"], name
    table = cli("plan", str(path), "--time").stdout
    assert "time not estimated for cache:" in table and "holds no weights" in table


# -- real vocabularies: each stage's planned peak against its measured one ----------------------

# `mlx-distill run` in a fresh process, each stage's body wrapped to record its own peak
# (`mx.reset_peak_memory()` before it, `mx.get_peak_memory()` after it).
MEASURE_STAGES = """
import gc, json, sys
from mlx_distill import backend
backend.setup()
import mlx.core as mx
from mlx_distill import cli, stages
peaks = {}
def wrap(name, body):
    def run(ctx):
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        out = body(ctx)
        peaks[name] = mx.get_peak_memory()
        return out
    return run
for name in list(stages.BODIES):
    stages.BODIES[name] = wrap(name, stages.BODIES[name])
sys.argv = ["mlx-distill", "run", sys.argv[1], "--jobs", "1", "--no-progress"]
try:
    cli.main()
except SystemExit as e:
    assert e.code in (0, None), e.code
print(json.dumps(peaks))
"""

# family -> (architecture, tied head, student training); 2-layer models, teacher d=384,
# student d=256, rows cut at 256 tokens (every position of the answers carries loss).
REAL_VOCAB = {"qwen2": ("qwen2", True, "full"), "llama3": ("llama", False, "lora")}


def _real_vocab_recipe(tmp: Path, family: str) -> Path:
    import mlx.core as mx
    from real_tokenizers import FACTS, tokenizer_dir

    from mlx_distill.models import build_model, save_model

    arch, tied, train = REAL_VOCAB[family]
    tok = tokenizer_dir(family)
    for name, d in (("teacher", 384), ("student", 256)):
        cfg = ModelConfig(
            arch=arch,
            hidden_size=d,
            num_layers=2,
            num_heads=d // 64,
            num_kv_heads=2,
            intermediate_size=4 * d,
            tie_embeddings=tied,
        )
        mx.random.seed(0)
        model, config = build_model(cfg, FACTS[family]["embedding_rows"])
        save_model(model, config, tok, tmp / name)
    words = [f"w{i}" for i in range(300)]
    rows = [
        {"prompt": " ".join(words[i : i + 20]), "completion": " ".join(words[i:])} for i in range(4)
    ]
    (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "name": family,
        "runs_dir": str(tmp / "runs"),
        "data": {
            "train": str(tmp / "data.jsonl"),
            "test": str(tmp / "data.jsonl"),
            "max_seq_len": 256,
        },
        "tokenizer": {"path": str(tok)},
        "teacher": {"kind": "local", "path": str(tmp / "teacher")},
        "cache": {"k": 16, "batch_size": 4},
        "student": {"init": "pretrained", "path": str(tmp / "student"), "train": train},
        "train": {"steps": 2, "batch_size": 4, "warmup": 1},
        "eval": {"num_examples": 4, "max_new_tokens": 4, "batch_size": 4},
    }
    path = tmp / "recipe.json"
    path.write_text(json.dumps(recipe))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("family", list(REAL_VOCAB))
def test_plan_within_25_percent_of_each_stage_at_real_vocabularies(tmp_path, family):
    from real_tokenizers import available

    from mlx_distill.plan import plan_recipe
    from mlx_distill.recipe import load_recipe

    if not available(family):
        pytest.skip(f"no {family} tokenizer fixture")
    path = _real_vocab_recipe(tmp_path, family)
    planned = plan_recipe(load_recipe(str(path), []))["stages"]
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE_STAGES, str(path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = []
    for stage in ("cache", "distill", "baseline", "eval"):
        plan, peak = planned[stage]["peak_bytes"], measured[stage]
        rows.append((stage, plan / 2**30, peak / 2**30, plan / peak))
    print(
        "\n"
        + "\n".join(
            f"{family} {s}: planned {p:.3f} GB, measured {m:.3f} GB, {r:.2f}" for s, p, m, r in rows
        )
    )
    assert all(0.75 <= r <= 1.25 for *_, r in rows), rows
