"""Exports that ship: the student saved in the dtype it came in or trained in (or export.dtype),
config.json saying so, loadable by mlx-lm; parameters counted as unquantized weights; a LoRA
run's report naming its adapters and how mlx-lm loads them; the per-stage table of the report.

One bf16 pretrained student (the quickstart teacher cast to bf16) is distilled for 2 steps
through the real CLI: fully (exported bf16), then with LoRA adapters and export.dtype float16
through eval and report.
"""

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import pytest
from tiny import ROOT, cli, quickstart_sets, tiny_model

from mlx_distill.models import load_model, num_params, save_model
from mlx_distill.recipe import load_recipe
from mlx_distill.stages.distill import export_dtype

TEACHER = ROOT / "data" / "quickstart" / "teacher"


def _dtypes(folder: Path) -> set[str]:
    """The dtypes of the floating-point tensors in a folder's model.safetensors."""
    weights = mx.load(str(folder / "model.safetensors"))
    return {str(v.dtype) for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)}


@pytest.fixture(scope="module")
def bf16_student(tmp_path_factory) -> Path:
    """The quickstart teacher saved in bfloat16: a pretrained bf16 student."""
    model, _, config = load_model(TEACHER)
    model.set_dtype(mx.bfloat16)
    return save_model(model, config, TEACHER, tmp_path_factory.mktemp("bf16") / "student")


def _distill(runs: Path, student: Path, *extra: str, stages: str):
    sets = ["student.init=pretrained", f"student.path={student}", f"stages=[{stages}]"]
    proc = cli("run", "recipes/quickstart.yaml", *quickstart_sets(runs, *sets, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs / "quickstart"


@pytest.mark.slow
def test_bf16_student_exports_as_bf16_and_loads_with_mlx_lm(bf16_student, tmp_path):
    import mlx_lm

    assert _dtypes(bf16_student) == {"mlx.core.bfloat16"}
    run = _distill(tmp_path, bf16_student, stages="tokenizer,teacher,cache,distill")
    out = run / "student"
    assert _dtypes(out) == {"mlx.core.bfloat16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # the same tensors as the input: its size, not twice it (float32)
    size, given = (
        f.stat().st_size for f in (out / "model.safetensors", bf16_student / "model.safetensors")
    )
    assert abs(size - given) < 0.01 * given
    model, tokenizer = mlx_lm.load(str(out))
    assert {str(v.dtype) for _, v in _flat(model)} == {"mlx.core.bfloat16"}
    summary = json.loads((run / "distill" / "stage.json").read_text())
    assert summary["result"]["dtype"] == "bfloat16"
    assert summary["peak_memory_bytes"] > 0


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


@pytest.mark.slow
def test_lora_float16_export_and_the_report_of_it(bf16_student, tmp_path):
    import mlx_lm

    extra = (
        "export.dtype=float16",
        "student.train=lora",
        "data.max_seq_len=96",  # some quickstart rows are longer: the report counts the cut
        "eval.num_examples=4",
        "eval.max_new_tokens=8",
    )
    run = _distill(
        tmp_path, bf16_student, *extra, stages="tokenizer,teacher,cache,distill,eval,report"
    )
    out, adapters = run / "student", run / "student-adapters"
    assert _dtypes(out) == {"mlx.core.float16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    model, _ = mlx_lm.load(str(bf16_student), adapter_path=str(adapters))
    assert any("lora_a" in k for k, _ in _flat(model))
    report = (run / "report.md").read_text()
    assert f'mlx_lm.load("{bf16_student}", adapter_path="{adapters}")' in report
    assert f"| KD student | `{out}` | float16 |" in report
    # the stage table: wall time and peak memory of each stage, and the rows cut
    for name in ("cache", "distill", "eval"):
        info = json.loads((run / name / "stage.json").read_text())
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {info['seconds']:,.1f} s |" in row
        assert f"{info['peak_memory_bytes'] / 2**20:,.1f} MB" in row
    cache = json.loads((run / "cache" / "stage.json").read_text())["result"]
    cut, dropped = cache["data"]["rows_cut"], cache["data"]["rows_dropped"]
    assert cut > 0, cache  # rows longer than 96 tokens were cut
    row = next(line for line in report.splitlines() if line.startswith("| cache |"))
    assert f"| rows cut {cut:,}, rows dropped {dropped:,} |" in row


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_counts_its_unquantized_parameters(bits):
    from mlx_lm.utils import quantize_model

    model, args = tiny_model(100, hidden=64)
    count = num_params(model)
    assert count == sum(v.size for _, v in _flat(model))  # unquantized: every weight
    config = {k: v for k, v in dataclasses.asdict(args).items() if v is not None}
    quantized, _ = quantize_model(tiny_model(100, hidden=64)[0], config, group_size=32, bits=bits)
    assert any(v.dtype == mx.uint32 for _, v in _flat(quantized))
    assert num_params(quantized) == count


def test_export_dtype_is_the_trained_or_the_narrower_checkpoint_one():
    def dtype(start, *overrides):
        return export_dtype(load_recipe("recipes/quickstart.yaml", overrides), start)

    assert dtype("bfloat16") == "bfloat16"  # a bf16 checkpoint under train.dtype float32
    assert dtype("float32") == "float32"
    assert dtype("float32", "train.dtype=bfloat16") == "bfloat16"  # trained in bf16
    assert dtype("float16", "train.dtype=bfloat16") == "bfloat16"
    assert dtype("bfloat16", "export.dtype=float32") == "float32"
    assert dtype("float32", "export.dtype=float16") == "float16"
