"""A loopback fake of the Gemini REST API, for the real `google-genai` SDK in tests and benches.

Serves `/v1/` and `/v1beta/`: `models/{m}:generateContent`, `:countTokens`,
`:batchGenerateContent`, `GET batches/{id}`, `GET batches`, `POST batches/{id}:cancel`.
Answers are deterministic in sha256(model, prompt, seed): a thought summary part, the answer,
top-k log-probs (`logprobsResult`, chosen token first among sorted candidates), usage metadata
consistent with the text. Request bodies are read in camelCase or snake_case.

Faults, by a marker in the prompt (`xN`: the first N requests for that prompt fail, then it
succeeds; without `xN`, always): `[429xN]` (RetryInfo.retryDelay = `retry_delay`), `[500xN]`,
`[503xN]`, `[504xN]`, `[html500xN]` (non-JSON error body), `[hangxN]` (sleeps `hang_s` before
answering), `[malformedxN]` (200 with a broken body), `[dropxN]` (connection closed mid-body),
`[400]`, `[maxtokens]` (MAX_TOKENS, thoughts, no text), `[safety]` (SAFETY finish, no text),
`[blocked]` (promptFeedback.blockReason, no candidates), `[avgonly]` (avgLogprobs only).
Server-wide: `refuse_logprobs=True` answers any log-probs request with the Developer API's 400.
Batch items honour `[429xN]`, `[500xN]`, `[503xN]` as per-item errors (counted per prompt).
`tokenize` / `token_id` (callables) make the teacher tokenize answers with a real vocabulary
and report its ids as `tokenId`s (as Gemini does with the Gemma 3 vocabulary); alternatives
that are not a token of that vocabulary are left out.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_FAULT = re.compile(r"\[(429|500|503|504|html500|hang|malformed|drop)(?:x(\d+))?\]")
_TOKEN = re.compile(r"\s?\w+|\s?[^\w\s]|\s+")
_ALTS = [" the", " a", " is", ",", ".", " of", " and", " to", " in", " it", " we", " so"]


def get(d: dict | None, camel: str, default: Any = None) -> Any:
    """d[camel] or d[snake_case(camel)]: the SDK sends both spellings (see reference §4)."""
    if not isinstance(d, dict):
        return default
    if camel in d:
        return d[camel]
    snake = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel)
    return d.get(snake, default)


def prompt_of(body: dict) -> str:
    contents = get(body, "contents") or []
    return "".join(p.get("text", "") for c in contents for p in (c.get("parts") or []))


def fake_tokens(text: str) -> list[str]:
    """The fake's teacher tokenization: words with their leading space, punctuation, spaces."""
    return _TOKEN.findall(text)


def fake_answer(model: str, prompt: str, seed: int = 0) -> tuple[str, str]:
    """(thought summary, answer) for a prompt; a `[ans=...]` marker fixes the answer."""
    h = hashlib.sha256(f"{model}|{prompt}|{seed}".encode()).hexdigest()
    fixed = re.search(r"\[ans=([^\]]*)\]", prompt)
    answer = fixed.group(1) if fixed else f"The answer is {int(h[:6], 16) % 1000}."
    thought = f"Reading the question carefully. Step {int(h[6:8], 16) % 7 + 1}: compute it."
    return thought, answer


def candidates_for(token: str, k: int, h: bytes) -> list[tuple[str, float]]:
    """Chosen token plus k-1 alternatives with sorted log-probs summing to < 1 in probability."""
    alts = [token.upper(), token.lower(), token.strip(), " " + token.strip(), token + "s"]
    alts += _ALTS
    seen, out = {token}, [token]
    for a in alts:
        if a and a not in seen:
            seen.add(a)
            out.append(a)
    out = out[:k]
    p0 = 0.55 + 0.4 * (h[0] / 255)
    rest = 1.0 - p0
    probs = [p0] + [rest * 0.5 ** (i + 1) for i in range(len(out) - 1)]
    return [(t, float(__import__("math").log(p))) for t, p in zip(out, probs)]


def generate_response(
    model: str, body: dict, seed: int = 0, tokenize: Any = None, token_id: Any = None
) -> dict:
    """A `GenerateContentResponse` body for one request, honouring the prompt's markers."""
    prompt = prompt_of(body)
    cfg = get(body, "generationConfig") or {}
    thinking = get(cfg, "thinkingConfig") or {}
    thought, answer = fake_answer(model, prompt, seed)
    parts: list[dict] = []
    if get(thinking, "includeThoughts"):
        parts.append({"text": thought, "thought": True})
    finish = "STOP"
    if "[maxtokens]" in prompt:
        finish = "MAX_TOKENS"
    elif "[safety]" in prompt:
        finish = "SAFETY"
    else:
        sig = base64.b64encode(b"signature").decode()
        parts.append({"text": answer, "thoughtSignature": sig})
    tokens = (tokenize or fake_tokens)(answer) if finish == "STOP" else []
    thought_tokens = len(fake_tokens(thought)) + 5
    cand: dict[str, Any] = {
        "content": {"role": "model", "parts": parts},
        "finishReason": finish,
        "index": 0,
        "unknownFutureField": {"x": 1},  # the SDK must drop unknown fields
    }
    k = int(get(cfg, "logprobs") or 0)
    if get(cfg, "responseLogprobs") and tokens:
        cand["avgLogprobs"] = -0.1
        if "[avgonly]" not in prompt:
            tops, chosen = [], []
            for i, tok in enumerate(tokens):
                h = hashlib.sha256(f"{prompt}|{i}".encode()).digest()
                cands = candidates_for(tok, max(k, 1), h)
                if token_id is not None:
                    cands = [c for i, c in enumerate(cands) if i == 0 or token_id(c[0]) is not None]
                entries = [
                    {
                        "token": t,
                        "tokenId": token_id(t)
                        if token_id is not None
                        else int.from_bytes(hashlib.sha256(t.encode()).digest()[:3]),
                        "logProbability": lp,
                    }
                    for t, lp in cands
                ]
                tops.append({"candidates": entries})
                chosen.append(entries[0])
            cand["logprobsResult"] = {
                "topCandidates": tops,
                "chosenCandidates": chosen,
                "logProbabilitySum": sum(c["logProbability"] for c in chosen),
            }
    prompt_tokens = len(fake_tokens(prompt)) + 2
    usage = {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": len(tokens),
        "thoughtsTokenCount": thought_tokens,
        "totalTokenCount": prompt_tokens + len(tokens) + thought_tokens,
    }
    response = {
        "candidates": [cand],
        "usageMetadata": usage,
        "modelVersion": model,
        "responseId": hashlib.sha256(prompt.encode()).hexdigest()[:12],
    }
    if "[blocked]" in prompt:
        response = {
            "promptFeedback": {"blockReason": "SAFETY"},
            "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
        }
    return response


def error_body(code: int, status: str, message: str, details: list | None = None) -> dict:
    return {"error": {"code": code, "message": message, "status": status, "details": details or []}}


class FakeGemini:
    """Run with `with FakeGemini() as fake:`; point the SDK at `fake.base_url`."""

    def __init__(
        self,
        *,
        key: str = "test-key",
        retry_delay: str = "0.05s",
        hang_s: float = 3.0,
        latency_s: float = 0.0,
        refuse_logprobs: bool = False,
        batch_final_state: str = "BATCH_STATE_SUCCEEDED",
        batch_output: str = "inline",  # or "file": results in a downloadable JSONL file
        seed: int = 0,
        tokenize: Any = None,
        token_id: Any = None,
    ) -> None:
        self.tokenize = tokenize
        self.token_id = token_id
        self.key = key
        self.retry_delay = retry_delay
        self.hang_s = hang_s
        self.latency_s = latency_s
        self.refuse_logprobs = refuse_logprobs
        self.batch_final_state = batch_final_state
        self.batch_output = batch_output
        self.files: dict[str, bytes] = {}
        self.seed = seed
        self.lock = threading.Lock()
        self.requests: list[dict] = []  # path, method, headers (key removed), body
        self.answered: Counter[str] = Counter()  # prompt -> 200 answers sent
        self.attempts: Counter[str] = Counter()  # prompt -> generateContent calls
        self.batches: dict[str, dict] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.fake = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeGemini:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fault(self, prompt: str) -> str | None:
        """The fault to inject for this attempt at `prompt` (counts attempts)."""
        with self.lock:
            self.attempts[prompt] += 1
            n = self.attempts[prompt]
        for match in _FAULT.finditer(prompt):
            times = int(match.group(2)) if match.group(2) else None
            if times is None or n <= times:
                return match.group(1)
        return None

    def run_batch(self, job: dict) -> None:
        """Compute a batch's inline output (mixing responses and per-request errors)."""
        results = []
        for entry in job["requests"]:
            request = get(entry, "request") or {}
            meta = get(entry, "metadata") or {}
            prompt = prompt_of(request)
            fault = self.fault(prompt) if _FAULT.search(prompt) else None
            if fault in ("429", "500", "503"):
                results.append(
                    {"error": {"code": int(fault), "message": "Try again."}, "metadata": meta}
                )
            elif "[400]" in prompt:
                results.append(
                    {"error": {"code": 400, "message": "Invalid request."}, "metadata": meta}
                )
            elif self.refuse_logprobs and get(get(request, "generationConfig"), "responseLogprobs"):
                results.append(
                    {
                        "error": {"code": 400, "message": _LOGPROBS_400.format(job["model"])},
                        "metadata": meta,
                    }
                )
            else:
                with self.lock:
                    self.answered[prompt] += 1
                results.append(
                    {
                        "response": generate_response(
                            job["model"], request, self.seed, self.tokenize, self.token_id
                        ),
                        "metadata": meta,
                    }
                )
        if self.batch_output == "file":  # one JSONL line per request, keyed like the input
            name = f"out-{job['name']}"
            lines = [json.dumps({"key": r["metadata"].get("key"), **r}) for r in results]
            self.files[name] = ("\n".join(lines) + "\n").encode()
            job["output"] = {"responsesFile": f"files/{name}"}
        else:
            job["output"] = {"inlinedResponses": {"inlinedResponses": results}}


_LOGPROBS_400 = "Logprobs is not enabled for models/{}"
_STATES = ["BATCH_STATE_PENDING", "BATCH_STATE_RUNNING"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle + delayed ACK add
        # ~40 ms to every response and the bench would measure the fake, not the client.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    @property
    def fake(self) -> FakeGemini:
        return self.server.fake  # type: ignore[attr-defined]

    def _send(self, code: int, obj: Any, content_type: str = "application/json") -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        try:
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (a hung-response fault)

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else {}
        headers = {k: v for k, v in self.headers.items() if k.lower() != "x-goog-api-key"}
        with self.fake.lock:
            self.fake.requests.append(
                {
                    "method": method,
                    "path": self.path,
                    "headers": headers,
                    "body": body,
                    "t": time.monotonic(),
                }
            )
        if self.headers.get("x-goog-api-key") != self.fake.key:
            return self._send(
                400,
                error_body(
                    400,
                    "INVALID_ARGUMENT",
                    "API key not valid.",
                    [
                        {
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "API_KEY_INVALID",
                        }
                    ],
                ),
            )
        path = self.path.split("?")[0]
        download = re.fullmatch(r"/(?:download/)?(?:v1|v1beta)/files/([^/:]+):download", path)
        if method == "GET" and download:
            blob = self.fake.files.get(download.group(1))
            if blob is None:
                return self._send(404, error_body(404, "NOT_FOUND", "File not found."))
            return self._send(200, blob, "application/octet-stream")
        match = re.fullmatch(r"/(v1|v1beta)/(.+)", path)
        rest = match.group(2) if match else ""
        if method == "POST" and (m := re.fullmatch(r"models/([^:]+):generateContent", rest)):
            return self._generate(m.group(1), body)
        if method == "POST" and (m := re.fullmatch(r"models/([^:]+):countTokens", rest)):
            return self._send(200, {"totalTokens": len(fake_tokens(prompt_of(body))) + 2})
        if method == "POST" and (m := re.fullmatch(r"models/([^:]+):batchGenerateContent", rest)):
            return self._batch_create(m.group(1), body)
        if method == "GET" and rest == "batches":
            jobs = [self._job_view(j, advance=False) for j in self.fake.batches.values()]
            return self._send(200, {"operations": jobs})
        if method == "GET" and (m := re.fullmatch(r"batches/([^/:]+)", rest)):
            job = self.fake.batches.get(m.group(1))
            if job is None:
                return self._send(404, error_body(404, "NOT_FOUND", "Batch not found."))
            return self._send(200, self._job_view(job, advance=True))
        if method == "POST" and (m := re.fullmatch(r"batches/([^/:]+):cancel", rest)):
            job = self.fake.batches.get(m.group(1))
            if job is not None:
                job["state"] = "BATCH_STATE_CANCELLED"
            return self._send(200, {})
        self._send(404, error_body(404, "NOT_FOUND", f"Unknown route {method} {path}."))

    def _generate(self, model: str, body: dict) -> None:
        fake = self.fake
        prompt = prompt_of(body)
        if model.startswith("no-such"):
            message = f"models/{model} is not found for API version {self.path.split('/')[1]}."
            return self._send(404, error_body(404, "NOT_FOUND", message))
        if fake.latency_s:
            time.sleep(fake.latency_s)
        fault = fake.fault(prompt)
        if fault == "429":
            details = [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [{"quotaMetric": "generate_content_requests", "quotaId": "rpm"}],
                },
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": fake.retry_delay,
                },
            ]
            return self._send(
                429, error_body(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", details)
            )
        if fault in ("500", "503", "504"):
            status = {"500": "INTERNAL", "503": "UNAVAILABLE", "504": "DEADLINE_EXCEEDED"}[fault]
            return self._send(
                int(fault), error_body(int(fault), status, "The model is overloaded.")
            )
        if fault == "html500":
            return self._send(500, b"<html>Internal error</html>", "text/html")
        if fault == "hang":
            time.sleep(fake.hang_s)
        if fault == "malformed":
            return self._send(200, b'{"candidates": [{"content": ')
        if fault == "drop":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "4000")
            self.end_headers()
            self.wfile.write(b'{"candidates": [')
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return None
        if "[400]" in prompt:
            return self._send(400, error_body(400, "INVALID_ARGUMENT", "Invalid request."))
        cfg = get(body, "generationConfig") or {}
        if fake.refuse_logprobs and get(cfg, "responseLogprobs"):
            return self._send(400, error_body(400, "INVALID_ARGUMENT", _LOGPROBS_400.format(model)))
        response = generate_response(model, body, fake.seed, fake.tokenize, fake.token_id)
        with fake.lock:
            fake.answered[prompt] += 1
        self._send(200, response)

    def _batch_create(self, model: str, body: dict) -> None:
        batch = get(body, "batch") or {}
        requests = get(get(get(batch, "inputConfig"), "requests"), "requests") or []
        with self.fake.lock:
            name = f"job{len(self.fake.batches) + 1}"
            self.fake.batches[name] = {
                "name": name,
                "model": model,
                "requests": requests,
                "display": get(batch, "displayName"),
                "gets": 0,
                "state": "BATCH_STATE_PENDING",
            }
        self._send(200, self._job_view(self.fake.batches[name], advance=False))

    def _job_view(self, job: dict, advance: bool) -> dict:
        """PENDING -> RUNNING -> final state on successive gets; output once SUCCEEDED."""
        if advance and job["state"] in _STATES:
            job["gets"] += 1
            if job["gets"] < len(_STATES):
                job["state"] = _STATES[job["gets"]]
            else:
                job["state"] = self.fake.batch_final_state
                if job["state"] == "BATCH_STATE_SUCCEEDED":
                    self.fake.run_batch(job)
        meta = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": f"models/{job['model']}",
            "displayName": job["display"],
            "state": job["state"],
            "createTime": "2026-11-27T00:00:00Z",
        }
        if "output" in job:
            meta["output"] = job["output"]
        return {"name": f"batches/{job['name']}", "metadata": meta}


def main() -> None:
    """`python tests/fake_gemini.py [--key K] [--latency S]`: serve until stdin closes.

    Prints the base URL on the first line of stdout (used by `mlx-distill bench teacher`)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", default="test-key")
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    with FakeGemini(key=args.key, latency_s=args.latency) as fake:
        print(fake.base_url, flush=True)
        sys.stdin.read()  # the parent closes our stdin (or dies) when it is done


if __name__ == "__main__":
    main()
