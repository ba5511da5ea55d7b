"""Gemini as a teacher: answers and thought summaries (optionally top-k log-probs) at scale.

`run_gemini_teacher` fills a records cache (`mlx_distill.cache.records`) from a prompt list:
resumable (a prompt whose answer is durable is never asked again), bounded in flight, rate
limited, retried, cost-tallied and stoppable at `teacher.gemini.max_cost`; batch mode goes
through the Batch API (`teachers/batch.py`). `teachers.align.records_to_examples` turns the
records into training examples for a student tokenizer. `GeminiTeacher` is the plain
`Teacher` interface over the same request path.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from mlx_distill.cache.records import RecordStore, record_key
from mlx_distill.errors import BadInput
from mlx_distill.recipe import GeminiConfig, fingerprint
from mlx_distill.teachers.base import Completion, TokenCandidates
from mlx_distill.teachers.batch import run_batch
from mlx_distill.teachers.gemini_client import (
    RunState,
    api_key,
    ask,
    generation_params,
    make_client,
    make_record,
)
from mlx_distill.teachers.limits import Limiter
from mlx_distill.teachers.prices import cost_usd, model_price, price_table


def teacher_identity(cfg: GeminiConfig) -> dict[str, Any]:
    """{"id", "params"}: what the cache manifest and the record keys are made from."""
    return {"id": f"gemini/{cfg.model.removeprefix('models/')}", "params": generation_params(cfg)}


class GeminiTeacher:
    """The `Teacher` interface over Gemini (no cache: `run_gemini_teacher` is the durable path)."""

    def __init__(self, cfg: GeminiConfig) -> None:
        api_key()  # fail early, with how to set it
        self.cfg = cfg
        identity = teacher_identity(cfg)
        self.id = identity["id"]
        self.params = identity["params"]
        self.logprobs_note: str | None = None

    def generate(self, prompts: list[str]) -> list[Completion]:
        """One Completion per prompt, in order; failures have `error` set instead of raising."""
        return asyncio.run(self._generate(prompts))

    async def _generate(self, prompts: list[str]) -> list[Completion]:
        client = make_client(self.cfg)
        state = RunState(self.cfg, Limiter(self.cfg.rpm, self.cfg.tpm), self.cfg.logprobs > 0)
        gate = asyncio.Semaphore(self.cfg.max_in_flight)

        async def one(prompt: str) -> dict[str, Any]:
            async with gate:
                return await ask(client, state, prompt)

        try:
            results = await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.aio.aclose()
            client.close()
        self.logprobs_note = state.logprobs_note
        return [to_completion(p, r) for p, r in zip(prompts, results)]


def partial_message(summary: dict[str, Any], recipe: Any) -> str:
    """What a partial teach has, why it stopped and how to continue, in one line."""
    cfg = recipe.teacher.gemini
    why = ""
    more = ""
    if summary.get("stopped") == "max_cost":
        why = f" (stopped at max_cost ${cfg.max_cost:g}, ${summary['total_cost_usd']:.4f} spent)"
        more = " after raising teacher.gemini.max_cost (e.g. --set teacher.gemini.max_cost=...)"
    return (
        f"teacher incomplete: {summary['answered']} of {summary['unique']} prompts answered, "
        f"{summary['unasked']} not asked{why}; rerun `mlx-distill teach RECIPE`{more} to ask only "
        "those (answered prompts are never asked again), or set teacher.allow_partial: true to "
        "train on the answers so far"
    )


def to_completion(prompt: str, record: dict[str, Any]) -> Completion:
    """A `Completion` from a record (or the record fields `ask` returns)."""
    tokens = None
    if record.get("tokens"):
        tokens = [
            TokenCandidates(token=t[0], logprob=t[1], candidates=[(c[0], c[1]) for c in t[2]])
            for t in record["tokens"]
        ]
    return Completion(
        prompt=prompt,
        text=record.get("text", ""),
        thoughts=record.get("thoughts", ""),
        finish_reason=record.get("finish_reason", ""),
        usage=dict(record.get("usage") or {}),
        tokens=tokens,
        error=record.get("error") if record.get("status") != "ok" else None,
    )


def _check_prompts(prompts: list[dict]) -> None:
    for i, item in enumerate(prompts):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise BadInput(f"prompt {i}: expected an object with a string 'prompt' field")
        if not item["prompt"].strip():
            raise BadInput(f"prompt {i}: the 'prompt' field is empty")


def _estimate(
    cfg: GeminiConfig, store: RecordStore, todo: list[tuple[str, dict]], answered: int
) -> str:
    """The one-paragraph cost estimate printed before the first request.

    The bound assumes every answer runs to max_output_tokens; with `max_cost` it is capped by
    what is left under the cap, plus what the requests in flight when it is reached can add
    (each finishes and is paid for): at most max_in_flight requests at the per-request bound.
    """
    price = model_price(cfg.model)
    batch = cfg.batch
    chars = sum(len(item["prompt"]) + len(cfg.system_instruction or "") for _, item in todo)
    est_in = int(chars / 4)  # ~4 characters per token for English text
    done = [r for r in store.records.values() if r.get("usage", {}).get("answer")]
    head = (
        f"gemini teacher: {len(todo)} prompts to ask ({answered} already answered), "
        f"model {cfg.model}{' via the Batch API' if batch else ''}"
    )
    if price is None:
        return f"{head}; no price for this model in prices.json: cost unknown"
    cap = {"prompt": est_in, "answer": cfg.max_output_tokens * len(todo)}
    bound = cost_usd(cap, price, batch=batch)
    line = f"{head}; prices of {price_table()['as_of']}: ~{est_in} input tokens, "
    if cfg.max_cost is not None:
        per_request = bound / len(todo) if todo else 0.0
        overshoot = per_request * min(cfg.max_in_flight, len(todo))
        left = max(0.0, cfg.max_cost - store.cost_usd)
        if left < bound:
            line += (
                f"cost at most ${left + overshoot:.4f}, capped by max_cost ${cfg.max_cost:g} "
                f"(${store.cost_usd:.4f} spent so far; the stop may overshoot the cap by the "
                f"{min(cfg.max_in_flight, len(todo))} requests in flight, at most "
                f"${overshoot:.4f}; uncapped: ${bound:.4f})"
            )
        else:
            line += f"cost at most ${bound:.4f} (under max_cost ${cfg.max_cost:g})"
    else:
        line += f"cost at most ${bound:.4f}"
    line += f" (every answer at max_output_tokens={cfg.max_output_tokens})"
    if done:
        out = sum(r["usage"]["answer"] + r["usage"].get("thoughts", 0) for r in done) / len(done)
        typical = {"prompt": est_in, "answer": int(out * len(todo))}
        typical_usd = cost_usd(typical, price, batch=batch)
        line += f", ~${typical_usd:.4f} at the {out:.0f} output tokens per answer seen so far"
    return line


def logprobs_refused(store_meta: dict[str, Any], model: str) -> str | None:
    """The stored log-probs refusal for `model` (a plain string from older runs: any model)."""
    note = store_meta.get("logprobs_disabled")
    return note.get(model) if isinstance(note, dict) else note


def run_gemini_teacher(
    recipe: Any,
    prompts: list[dict],
    out_dir: Path,
    *,
    retry_failed: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer every prompt into the records cache at `out_dir`; returns the run's counts.

    prompts: [{"prompt": str, "id"?: str, "answer"?: reference answer}, ...]. Prompts already
    answered are skipped; failed ones too unless `retry_failed`. Identical prompts are asked once.
    Returns {"prompts", "unique", "done", "failed" (this run), "answered", "failed_prompts",
    "unasked" (all stored records for these prompts), "complete", "stopped", "tokens",
    "cost_usd", "total_cost_usd", "logprobs_disabled", "failures": {reason: count}, "content"}.
    """
    cfg: GeminiConfig = recipe.teacher.gemini
    api_key()
    _check_prompts(prompts)
    if cfg.max_cost is not None and model_price(cfg.model) is None:
        raise BadInput(
            f"recipe key teacher.gemini.max_cost: no price for {cfg.model} in prices.json, "
            "so the cost cannot be tallied; remove max_cost or add the model's price"
        )
    identity = teacher_identity(cfg)
    model = identity["id"].split("/", 1)[1]
    unique: dict[str, dict] = {}
    for item in prompts:
        unique.setdefault(record_key(model, identity["params"], item["prompt"]), item)
    with RecordStore(out_dir, identity) as store:
        facts = {
            "api_version": cfg.api_version,
            # includeThoughts returns summaries of the model's thinking, not its raw thoughts.
            "thoughts": "summaries",
            "prices_as_of": price_table()["as_of"],  # the table each record's cost_usd used
        }
        if any(store.meta.get(k) != v for k, v in facts.items()):
            store.set_meta(**facts)
        todo, skipped = [], 0
        for key, item in unique.items():
            status = store.status(key)
            if status == "ok" or (status == "failed" and not retry_failed):
                skipped += 1
            else:
                todo.append((key, item))
        answered_before = sum(store.status(k) == "ok" for k in unique)
        print(_estimate(cfg, store, todo, answered_before), file=sys.stderr, flush=True)
        logprobs = cfg.logprobs > 0 and not logprobs_refused(store.meta, model)
        state = RunState(cfg, Limiter(cfg.rpm, cfg.tpm), logprobs, batch=cfg.batch)

        def remember_refusal(note: str) -> None:
            old = store.meta.get("logprobs_disabled")
            refused = dict(old) if isinstance(old, dict) else {}
            store.set_meta(logprobs_disabled={**refused, model: note})

        state.on_logprobs_refused = remember_refusal
        start_cost = store.cost_usd
        started = time.time()
        if cfg.batch:
            stopped = run_batch(cfg, store, todo, state, progress=progress)
        else:
            stopped = asyncio.run(_run_online(cfg, store, todo, state, start_cost, progress))
        failures: dict[str, int] = {}
        done = failed = 0
        for key, _ in todo:
            record = store.records.get(key)
            if record is None or record.get("time", 0) < started:
                continue  # not asked in this run (stopped early)
            if record["status"] == "ok":
                done += 1
            else:
                failed += 1
                failures[record["error"]] = failures.get(record["error"], 0) + 1
        statuses = [store.status(key) for key in unique]
        answered = sorted(k for k in unique if store.status(k) == "ok")
        unasked = statuses.count(None)
        summary = {
            "out_dir": str(out_dir),
            "prompts": len(prompts),
            "unique": len(unique),
            "done": done,
            "failed": failed,
            "skipped": skipped,
            "not_asked": len(todo) - done - failed,
            "answered": len(answered),
            "failed_prompts": statuses.count("failed"),
            "unasked": unasked,
            "complete": unasked == 0,
            "stopped": stopped,
            "tokens": state.tokens,
            "cost_usd": round(store.cost_usd - start_cost, 9),
            "total_cost_usd": round(store.cost_usd, 9),
            "max_cost": cfg.max_cost,
            "logprobs_disabled": logprobs_refused(store.meta, model),
            "failures": failures,
            "content": fingerprint(answered),  # which answers the cache stage will read
        }
    if state.logprobs_note:
        print(
            f"gemini teacher: log-probs refused ({state.logprobs_note}); continued text-only",
            file=sys.stderr,
        )
    return summary


async def _run_online(
    cfg: GeminiConfig,
    store: RecordStore,
    todo: list[tuple[str, dict]],
    state: RunState,
    start_cost: float,
    progress: bool,
) -> str | None:
    """Workers ask, a committer appends finished records in groups (one fsync per group)."""
    from tqdm import tqdm

    client = make_client(cfg)
    queue = list(reversed(todo))
    finished: asyncio.Queue = asyncio.Queue()
    shared = {"stopped": None, "in_flight": 0, "failed": 0}
    bar = tqdm(total=len(todo), disable=not progress, unit="prompt", file=sys.stderr)

    def over_budget() -> bool:
        return cfg.max_cost is not None and start_cost + state.cost >= cfg.max_cost

    async def worker() -> None:
        while queue and shared["stopped"] is None:
            if over_budget():
                shared["stopped"] = "max_cost"
                break
            key, item = queue.pop()
            shared["in_flight"] += 1
            fields = await ask(client, state, item["prompt"])
            finished.put_nowait(make_record(key, item, fields, "online"))

    async def committer() -> None:
        while True:
            group = [await finished.get()]
            while not finished.empty():
                group.append(finished.get_nowait())
            end = None in group
            group = [r for r in group if r is not None]
            if group:
                await asyncio.to_thread(store.append, group)
                shared["in_flight"] -= len(group)
                shared["failed"] += sum(r["status"] != "ok" for r in group)
                bar.update(len(group))
                bar.set_postfix(
                    failed=shared["failed"],
                    in_flight=shared["in_flight"],
                    tokens=state.tokens.get("total", 0),
                    cost=f"${state.cost:.4f}",
                    refresh=False,
                )
            if end:
                return

    commit_task = asyncio.create_task(committer())
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(cfg.max_in_flight, max(1, len(todo)))):
                group.create_task(worker())
    except* BadInput as group_error:
        # A run-wide error (bad key, unknown model): finished answers are still committed below.
        raise group_error.exceptions[0] from None
    finally:
        finished.put_nowait(None)
        await commit_task
        bar.close()
        await client.aio.aclose()
        client.close()
    if shared["stopped"] == "max_cost" or (queue and over_budget()):
        spent = start_cost + state.cost
        print(
            f"gemini teacher: stopped at max_cost ${cfg.max_cost:g} (spent ${spent:.4f}, "
            f"${max(0.0, spent - cfg.max_cost):.4f} over the cap from the requests that were in "
            f"flight, at most {cfg.max_in_flight}); {len(queue)} prompts not asked",
            file=sys.stderr,
        )
        return "max_cost"
    return None
