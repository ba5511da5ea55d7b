"""The chat REPL: streaming answers with the model's chat template, /reset and /quit.

Reads from a terminal or a pipe: each input line is one user turn, so a session can be
scripted (`printf 'hi\n/quit\n' | mlx-distill chat runs/quickstart/student`).
"""

from __future__ import annotations

import sys
import time

HELP = "commands: /reset clears the conversation, /quit exits"


def _answer(model, tokenizer, messages, max_tokens, temperature, out) -> str:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    text, n, t0 = "", 0, time.perf_counter()
    for response in stream_generate(
        model, tokenizer, ids, max_tokens=max_tokens, sampler=make_sampler(temp=temperature)
    ):
        out.write(response.text)
        out.flush()
        text += response.text
        n = response.generation_tokens
    elapsed = time.perf_counter() - t0
    out.write(f"\n[{n} tokens, {n / max(elapsed, 1e-9):.1f} tokens/s]\n")
    out.flush()
    return text


def chat_loop(
    path: str,
    *,
    teacher: str | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    system: str | None = None,
    stdin=None,
    out=None,
) -> int:
    """Run the REPL until /quit or end of input. Returns the number of answered turns."""
    from mlx_distill.models import load_model

    stdin = stdin or sys.stdin
    out = out or sys.stdout
    model, tokenizer, _ = load_model(path)
    other = load_model(teacher)[:2] if teacher else None
    interactive = stdin.isatty()
    if interactive:
        out.write(f"chatting with {path}; {HELP}\n")
    base = [{"role": "system", "content": system}] if system else []
    history: list[dict] = list(base)
    turns = 0
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            history = list(base)
            out.write("[conversation cleared]\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        history.append({"role": "user", "content": line})
        if other is not None:
            out.write("student: ")
        reply = _answer(model, tokenizer, history, max_tokens, temperature, out)
        if other is not None:
            out.write("teacher: ")
            _answer(other[0], other[1], history, max_tokens, temperature, out)
        history.append({"role": "assistant", "content": reply})
        turns += 1
    return turns
