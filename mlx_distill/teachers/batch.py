"""Batch mode for the Gemini teacher: half price, results within a day, no paying twice.

A job's prompts are written to `batches/<display_name>.json` in the cache (atomically) before
the job is created, and its name goes into the manifest right after, so a rerun polls the job
it already paid for instead of submitting again. A crash between creating the job and storing
its name is covered by looking the job up by its unique display name. Results (inline, or a
JSONL results file) are ingested into the same records store as online answers.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from mlx_distill.cache.records import RecordStore
from mlx_distill.errors import BadInput, StageFailed
from mlx_distill.files import write_json_atomic
from mlx_distill.recipe import GeminiConfig, fingerprint
from mlx_distill.teachers.gemini_client import (
    RunState,
    failed_fields,
    is_transport_error,
    make_client,
    make_record,
    parse_response,
    redact,
    request_config,
    run_wide_error,
)
from mlx_distill.teachers.limits import RETRYABLE_CODES, backoff
from mlx_distill.teachers.prices import cost_usd

INLINE_BYTES = 15_000_000  # the inline request limit is ~20 MB; keep a margin
TERMINAL = {"SUCCEEDED", "PARTIALLY_SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED", "PAUSED"}


def _state(job: Any) -> str:
    state = str(getattr(job.state, "value", job.state) or "")
    return state.removeprefix("JOB_STATE_").removeprefix("BATCH_STATE_")


def _chunks(cfg: GeminiConfig, todo: list[tuple[str, dict]]) -> list[list[tuple[str, dict]]]:
    """Split the prompts into jobs that stay under the inline size limit."""
    chunks: list[list[tuple[str, dict]]] = [[]]
    size = 0
    for key, item in todo:
        need = len(item["prompt"].encode()) + len((cfg.system_instruction or "").encode()) + 400
        if chunks[-1] and size + need > INLINE_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append((key, item))
        size += need
    return [c for c in chunks if c]


def _affordable(cfg: GeminiConfig, store: RecordStore, state: RunState, n: int) -> int:
    """How many prompts fit under max_cost at the estimated cost per prompt."""
    if cfg.max_cost is None:
        return n
    left = cfg.max_cost - store.cost_usd
    out = state.avg_out_tokens if state.answered else cfg.max_output_tokens
    each = cost_usd({"prompt": 200, "answer": int(out)}, state.price, batch=True)
    return max(0, min(n, int(left / each))) if each > 0 else n


def run_batch(
    cfg: GeminiConfig,
    store: RecordStore,
    todo: list[tuple[str, dict]],
    state: RunState,
    *,
    progress: bool = True,
) -> str | None:
    """Answer `todo` through the Batch API into `store`; returns "max_cost" if it stopped early."""
    client = make_client(cfg)
    jobs_dir = store.path / "batches"
    jobs_dir.mkdir(exist_ok=True)
    stopped = None
    rounds = cfg.max_retries + 2  # one more than the retries: a log-probs refusal costs a round
    try:
        for round_ in range(rounds):
            # Later rounds resubmit only prompts that came back without an answer for a passing
            # reason: a 429/5xx item error, or a request that lost its log-probs to a refusal.
            final = round_ == rounds - 1
            jobs = [j for j in store.meta.get("batch_jobs", []) if not j.get("ingested")]
            covered = {k for j in jobs for k in _load_items(jobs_dir, j)}
            pending = [(k, it) for k, it in todo if store.status(k) != "ok" and k not in covered]
            n = _affordable(cfg, store, state, len(pending))
            if n < len(pending):
                stopped = "max_cost"
                pending = pending[:n]
            for chunk in _chunks(cfg, pending):
                jobs.append(_submit(client, cfg, store, jobs_dir, chunk, state, progress))
            if not jobs:
                break
            for job in jobs:
                _finish(client, cfg, store, jobs_dir, job, state, progress, final=final)
            todo = [(k, it) for k, it in todo if store.status(k) is None]
            if not todo or stopped:
                break
            if progress:
                print(f"gemini batch: {len(todo)} prompts to resubmit", file=sys.stderr)
            time.sleep(backoff(round_, cfg.backoff_base_s, cfg.backoff_max_s))
    finally:
        client.close()
    return stopped


def _load_items(jobs_dir: Path, job: dict) -> dict[str, dict]:
    return json.loads((jobs_dir / f"{job['display_name']}.json").read_text())["items"]


def _set_job(store: RecordStore, job: dict) -> None:
    jobs = [j for j in store.meta.get("batch_jobs", []) if j["display_name"] != job["display_name"]]
    store.set_meta(batch_jobs=[*jobs, job])


def _submit(client, cfg, store, jobs_dir, chunk, state, progress) -> dict:
    """Persist the job's prompts, create the job, persist its name; returns the job entry."""
    from google.genai import types

    keys = [k for k, _ in chunk]
    display = f"mlx-distill-{fingerprint(keys)}-{len(store.meta.get('batch_jobs', []))}"
    write_json_atomic(
        jobs_dir / f"{display}.json", {"items": dict(chunk)}, indent=1, sort_keys=True
    )
    job = {"display_name": display, "name": None, "count": len(chunk), "state": "SUBMITTING"}
    _set_job(store, job)  # before create(): a crash here is found again by display name
    config = request_config(cfg, logprobs=state.logprobs)
    src = [
        types.InlinedRequest(contents=item["prompt"], metadata={"key": key}, config=config)
        for key, item in chunk
    ]
    created = _call(cfg, lambda: client.batches.create(
        model=cfg.model, src=src, config={"display_name": display}
    ))  # fmt: skip
    job.update(name=created.name, state=_state(created), logprobs=cfg.logprobs * state.logprobs)
    _set_job(store, job)
    if progress:
        print(f"gemini batch: submitted {created.name} ({len(chunk)} prompts)", file=sys.stderr)
    return job


def _call(cfg: GeminiConfig, fn):
    """A control-plane call (create/get/list/download) with the run's retry policy."""
    from google.genai import errors as genai_errors

    for attempt in range(cfg.max_retries + 1):
        try:
            return fn()
        except genai_errors.APIError as exc:
            fatal = run_wide_error(exc, cfg)
            if fatal:
                raise BadInput(fatal) from None
            if exc.code not in RETRYABLE_CODES or attempt == cfg.max_retries:
                raise StageFailed(redact(f"Gemini batch API: {exc.code} {exc.message}")) from None
        except Exception as exc:
            if not is_transport_error(exc) or attempt == cfg.max_retries:
                raise
        time.sleep(backoff(attempt, cfg.backoff_base_s, cfg.backoff_max_s))
    raise AssertionError("unreachable")


def _finish(client, cfg, store, jobs_dir, job, state, progress, *, final=True) -> None:
    """Poll one job to a terminal state and ingest its results (transient item errors are left
    unanswered for the next round unless `final`)."""
    if job["name"] is None:  # created but the name was never stored: find it by display name
        found = [
            j for j in _call(cfg, lambda: list(client.batches.list()))
            if j.display_name == job["display_name"]
        ]  # fmt: skip
        if not found:
            job.update(state="NOT_CREATED", ingested=True)
            _set_job(store, job)
            return
        job["name"] = found[0].name
        _set_job(store, job)
    last = None
    while True:
        remote = _call(cfg, lambda: client.batches.get(name=job["name"]))
        state_name = _state(remote)
        if state_name != last:
            job["state"] = last = state_name
            _set_job(store, job)
            if progress:
                print(f"gemini batch: {job['name']} {state_name}", file=sys.stderr)
        if state_name in TERMINAL:
            break
        time.sleep(cfg.poll_interval_s)
    items = _load_items(jobs_dir, job)
    results: dict[str, dict] = {}
    if state_name in ("SUCCEEDED", "PARTIALLY_SUCCEEDED") and remote.dest is not None:
        results = _results(client, cfg, remote.dest, state, job.get("logprobs", 0), final)
    else:
        why = getattr(getattr(remote, "error", None), "message", None) or ""
        reason = f"batch job {job['name']} {state_name} {why}".strip()
        results = {k: {**failed_fields(redact(reason)), "attempts": 1} for k in items}
    rows = []
    for key, item in items.items():
        if store.status(key) == "ok":
            continue
        fields = results.get(key)
        if fields is _RESUBMIT:
            continue  # left unanswered: the next round asks it again
        if fields is None:
            fields = {**failed_fields("missing from the batch output"), "attempts": 1}
        rows.append(make_record(key, item, fields, "batch"))
    store.append(rows)
    job["ingested"] = True
    _set_job(store, job)


_RESUBMIT: dict = {}  # a result lost to a passing error or a log-probs refusal: asked again


def _results(client, cfg, dest, state: RunState, logprobs: int, final: bool) -> dict[str, dict]:
    """key -> record fields, from inline responses or a downloaded JSONL results file."""
    from google.genai import types

    entries: list[tuple[str, Any, Any]] = []  # (key, response | None, error dict | None)
    if dest.inlined_responses:
        for r in dest.inlined_responses:
            error = None if r.error is None else {"code": r.error.code, "message": r.error.message}
            entries.append(((r.metadata or {}).get("key", ""), r.response, error))
    elif dest.file_name:
        blob = _call(cfg, lambda: client.files.download(file=dest.file_name))
        for line in bytes(blob).decode().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            response = row.get("response")
            if response is not None:
                # The SDK's own parse path: mldev field mapping, unknown fields dropped.
                from google.genai.models import _GenerateContentResponse_from_mldev

                response = types.GenerateContentResponse._from_response(
                    response=_GenerateContentResponse_from_mldev(response, None), kwargs={}
                )
            error = row.get("error") or row.get("status")
            key = row.get("key") or (row.get("metadata") or {}).get("key", "")
            entries.append((str(key), response, error))
    out: dict[str, dict] = {}
    for key, response, error in entries:
        if response is not None:
            fields = parse_response(response)
            fields["cost_usd"] = state.account(fields["usage"])
            fields.update(attempts=1, logprobs=logprobs)
            out[key] = fields
            continue
        message = str((error or {}).get("message", "unknown error"))
        if logprobs and "logprob" in message.lower():
            state.refuse_logprobs(redact(f"{(error or {}).get('code')} {message}"))
            out[key] = _RESUBMIT
            continue
        code = (error or {}).get("code")
        code = int(code) if str(code).isdigit() else code  # a results file may carry "503"
        if not final and code in RETRYABLE_CODES:
            out[key] = _RESUBMIT  # 429/5xx on one item: transient, resubmitted next round
            continue
        out[key] = {
            **failed_fields(redact(f"{code}: {message}")),
            "attempts": 1,
        }
    return out
