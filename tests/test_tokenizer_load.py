"""The project's tokenizer loader on real tokenizers: loads cached by content, and generation
stopping at the chat template's end-of-turn token where it is not the EOS token (Gemma 4's
`<turn|>` against `<eos>`; a base Qwen2's `<|endoftext|>` against `<|im_end|>`), both in the
project's own sampling (`evaluate.generate_samples`) and in an exported folder read by mlx-lm.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from real_tokenizers import FACTS, available, tokenizer_dir
from tiny import SMALL, tiny_student

from mlx_distill.text.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORD = "Paris"


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory):
    """Qwen2's tokenizer as a base model ships it: EOS `<|endoftext|>`, same chat template."""
    if not available("qwen2"):
        pytest.skip("no qwen2 fixture")
    folder = tmp_path_factory.mktemp("qwen2-base")
    shutil.copy2(tokenizer_dir("qwen2") / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((tokenizer_dir("qwen2") / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"  # the instruct model's
    config["eos_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def test_loads_are_cached_by_content_never_served_stale(tmp_path):
    # The quickstart's small tokenizer: the cache's logic, not a real tokenizer's load time.
    source = ROOT / "data/quickstart/teacher"
    folder = shutil.copytree(
        source, tmp_path / "tok", ignore=shutil.ignore_patterns("*.safetensors")
    )
    original = load_tokenizer(source)
    assert load_tokenizer(folder) is original  # the same files in another folder
    assert original.eos_token_ids == {3}  # <|end|>: EOS and end of turn
    # A model's own stop ids (its config.json eos_token_id) give a wrapper that shares the
    # loaded tokenizer and adds them.
    with_config = load_tokenizer(folder, eos_token_ids=[2, 3])
    assert with_config is not original and with_config._tokenizer is original._tokenizer
    assert with_config.eos_token_ids == {2, 3} and original.eos_token_ids == {3}
    assert load_tokenizer(folder, eos_token_ids=[3, 2]) is with_config
    assert load_tokenizer(folder, eos_token_ids=3) is original

    # An edited file is a new tokenizer, never the cached one, even with the same size and
    # mtime; the unedited files still hit.
    template = folder / "chat_template.jinja"
    before = template.stat()
    template.write_text(template.read_text().replace("<|user|>", "[[user]]"))
    os.utime(template, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (template.stat().st_size, template.stat().st_mtime_ns) == (
        before.st_size,
        before.st_mtime_ns,
    )
    edited = load_tokenizer(folder)
    assert edited is not original
    chat = [{"role": "user", "content": "hi"}]
    assert edited.apply_chat_template(chat, tokenize=False) == "[[user]]\nhi\n"
    assert original.apply_chat_template(chat, tokenize=False) == "<|user|>\nhi\n"
    assert load_tokenizer(folder) is edited and load_tokenizer(source) is original
    template.write_bytes((source / "chat_template.jinja").read_bytes())
    assert load_tokenizer(folder) is original


def _stopping_model(tokenizer, prompt_ids: list[int], rows: int):
    """A tiny untied Llama whose greedy answer to `prompt_ids` is WORD, then the end-of-turn
    token, then that token forever: attention and MLP outputs are zero, so each position's
    logits depend on its own token only (embedding -> final norm -> head)."""
    import mlx.core as mx

    from mlx_distill.text.chat import end_of_turn

    model, config = tiny_student(rows, None, tie_embeddings=False)
    word = tokenizer.encode(WORD, add_special_tokens=False)
    assert len(word) == 1
    (word,), end = word, end_of_turn(tokenizer)[1]
    layer = model.model.layers[0]
    layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
    layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
    d = SMALL["hidden_size"]
    eye = mx.eye(d)
    embed = mx.zeros((rows, d))
    embed = embed.at[prompt_ids[-1]].add(eye[0]).at[word].add(eye[1]).at[end].add(eye[2])
    head = mx.zeros((rows, d)).at[word].add(eye[0]).at[end].add(eye[1] + eye[2])
    model.model.embed_tokens.weight = embed
    model.lm_head.weight = head
    mx.eval(model.parameters())
    return model, config, word, end


CASES = {
    "gemma4": (FACTS["gemma4"]["embedding_rows"], "<eos>"),
    "qwen2-base": (FACTS["qwen2"]["embedding_rows"], "<|endoftext|>"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_exported_student_and_samples_stop_at_the_end_of_turn(case, qwen2_base, tmp_path):
    from mlx_lm import load, stream_generate
    from mlx_lm.utils import load_config

    from mlx_distill.evaluate import generate_samples
    from mlx_distill.models import load_model, save_model
    from mlx_distill.text.chat import end_of_turn

    if case == "gemma4" and not available("gemma4"):
        pytest.skip("no gemma4 fixture")
    folder = tokenizer_dir("gemma4") if case == "gemma4" else qwen2_base
    rows, eos = CASES[case]
    tokenizer = load_tokenizer(folder)
    assert tokenizer.eos_token == eos and end_of_turn(tokenizer)[0] != eos
    record = {"prompt": "Capital of France?", "completion": WORD}
    messages = [{"role": "user", "content": record["prompt"]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    model, config, word, end = _stopping_model(tokenizer, ids, rows)
    out = save_model(model, config, folder, tmp_path / "student")

    stops = [tokenizer.convert_tokens_to_ids(eos), end]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == stops
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": stops}

    # mlx-lm's reading of the export: the ids its tokenizer stops at (`mlx_lm.load` passes
    # them on), and for one family (a 262k tokenizer loads slowly) the load and a generation
    assert load_config(out)["eos_token_id"] == stops
    if case == "qwen2-base":
        mlx_model, mlx_tokenizer = load(str(out))
        assert mlx_tokenizer.eos_token_ids == set(stops)
        responses = list(stream_generate(mlx_model, mlx_tokenizer, ids, max_tokens=6))
        assert [r.token for r in responses] == [word, end]
        assert responses[-1].finish_reason == "stop"
        assert "".join(r.text for r in responses) == WORD

    # the report's samples (the project's load of the same folder) stop there too
    model, tokenizer, _ = load_model(out)
    (sample,) = generate_samples(model, tokenizer, [record], max_new_tokens=6)
    end_text = end_of_turn(tokenizer)[0]
    assert sample == {
        "prompt": record["prompt"],
        "output": WORD + end_text,
        "stopped": True,
        "new_tokens": 2,
    }
