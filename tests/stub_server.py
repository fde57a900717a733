"""A small HTTP stub of an OpenAI-compatible completions server, for the served-model client's ERROR paths.

It answers `POST /v1/completions` (and `/completions`) with a well-formed response in vLLM's shape
(docs/serving-protocols.md, "vLLM"), made deterministically from the request: token ids as ids
(`token_id:N` keys when `return_tokens_as_token_ids`), top-k log-probs at every generated position,
`prompt_logprobs` when asked. Faults are queued with `plan(...)` and each is spent by one request, in
order; with the queue empty every request gets the normal reply (or `default`, if set):

    ok            the normal reply
    429 / 500 / 503 / 400 / 404   that status with an OpenAI-style error body (429 and 503 carry Retry-After: 0)
    hang          no reply for `hang_s` seconds (bounded), then the connection is closed
    slow          the normal reply trickled in chunks over `slow_s` seconds
    truncated     Content-Length larger than the body, then the connection is closed
    non_json      status 200, content-type application/json, a body that is not JSON
    few_logprobs  the normal reply with fewer top log-probs at each position than asked
    drop          the connection closed with no reply at all

`kill()` stops the server (open connections are dropped); `restart()` serves again on the same port.
`requests` records every (path, JSON body) received. It runs in a daemon thread with its own event loop
on 127.0.0.1 and stops itself at interpreter exit. It is a test double, not a model: nothing here is a
fact about a real server except the response shape.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import socket
import threading
import time

from aiohttp import web

FAULTS = ("ok", "429", "500", "503", "400", "404", "hang", "slow", "truncated", "non_json", "few_logprobs", "drop")
VOCAB = 1000  # the stub's pretend vocabulary: ids it returns are below this


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_body(status: int) -> dict:
    kinds = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError", 500: "InternalServerError",
             503: "ServiceUnavailableError"}
    return {"error": {"message": f"stub fault {status}", "type": kinds.get(status, "Error"), "param": None,
                      "code": status}}


def _prompt_ids(body: dict) -> list[int]:
    prompt = body.get("prompt", [])
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        prompt = prompt[0]
    return [int(t) for t in prompt] if isinstance(prompt, list) else [ord(c) % VOCAB for c in str(prompt)]


def _top(context: list[int], k: int) -> list[tuple[int, float]]:
    """A fixed descending top-k at a position, a function of the context only."""
    base = (sum(context) * 31 + len(context)) % VOCAB
    return [((base + 7 * r) % VOCAB, -0.5 - r) for r in range(k)]


def completion_response(body: dict, *, drop_logprobs: int = 0, model: str = "stub-model") -> dict:
    """The normal reply to a completions request, in vLLM's non-streaming shape (greedy: the top-1 is emitted)."""
    prompt = _prompt_ids(body)
    n = int(body.get("max_tokens") or 16)
    k = body.get("logprobs")
    as_ids = bool(body.get("return_tokens_as_token_ids"))
    name = (lambda t: f"token_id:{t}") if as_ids else (lambda t: f"<{t}>")
    context, out, lp = list(prompt), [], {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for _ in range(n):
        top = _top(context, max(int(k or 0), 1))
        tok, logprob = top[0]
        if k is not None:
            shown = top[: max(len(top) - drop_logprobs, 1)] if drop_logprobs else top
            lp["text_offset"].append(sum(len(name(t)) for t in out))
            lp["token_logprobs"].append(logprob)
            lp["tokens"].append(name(tok))
            lp["top_logprobs"].append({name(t): v for t, v in shown})
        out.append(tok)
        context.append(tok)
    choice = {"index": 0, "text": "".join(name(t) for t in out), "logprobs": lp if k is not None else None,
              "finish_reason": "length", "stop_reason": None, "token_ids": out if body.get("return_token_ids") else None,
              "prompt_logprobs": None, "prompt_token_ids": prompt if body.get("return_token_ids") else None,
              "routed_experts": None, "weight_versions": None}
    pk = body.get("prompt_logprobs")
    if pk is not None:
        rows = [None]
        for i in range(1, len(prompt)):
            top = _top(prompt[:i], max(int(pk), 1))
            row = {str(prompt[i]): {"logprob": -3.0, "rank": 50, "decoded_token": f"<{prompt[i]}>"}}
            row.update({str(t): {"logprob": v, "rank": r + 1, "decoded_token": f"<{t}>"} for r, (t, v) in enumerate(top)})
            rows.append(row)
        choice["prompt_logprobs"] = rows
    return {"id": "cmpl-stub", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "service_tier": None, "system_fingerprint": None,
            "usage": {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + n, "completion_tokens": n,
                      "prompt_tokens_details": None, "completion_tokens_details": None},
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


class StubServer:
    """The stub in a background thread; `url` is its base URL (http://127.0.0.1:PORT)."""

    def __init__(self, port: int | None = None, *, hang_s: float = 30.0, slow_s: float = 2.0, model: str = "stub-model"):
        self.port = port or free_port()
        self.hang_s, self.slow_s, self.model = min(hang_s, 120.0), slow_s, model
        self.default = "ok"
        self.requests: list[tuple[str, dict | None]] = []
        self._faults: list[str] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="stub-server")
        self._thread.start()
        self._runner: web.AppRunner | None = None
        atexit.register(self.close)
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def plan(self, *faults: str) -> "StubServer":
        """Queue faults; each is spent by the next request, in order."""
        bad = [f for f in faults if f not in FAULTS]
        if bad:
            raise ValueError(f"unknown stub faults {bad}; known: {FAULTS}")
        with self._lock:
            self._faults.extend(faults)
        return self

    def _next_fault(self) -> str:
        with self._lock:
            return self._faults.pop(0) if self._faults else self.default

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> None:
        self._call(self._start())

    def kill(self) -> None:
        """Stop serving now: the port is closed and open connections are dropped."""
        if self._runner is not None:
            self._call(self._runner.cleanup())
            self._runner = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self.kill()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            if not self._loop.is_running():
                self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2, handle_signals=False, access_log=None)
        await self._runner.setup()
        deadline = time.monotonic() + 5
        while True:  # the port of a just-killed stub can take a moment to free
            try:
                await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "vllm", "root": self.model,
             "parent": None, "max_model_len": 4096, "permission": []}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        self.requests.append((request.path, body))
        fault = self._next_fault()
        if fault.isdigit():
            headers = {"Retry-After": "0"} if fault in ("429", "503") else None
            return web.json_response(_error_body(int(fault)), status=int(fault), headers=headers)
        if body is None:
            return web.json_response(_error_body(400), status=400)
        if fault == "drop":
            request.transport.close()
            raise asyncio.CancelledError
        if fault == "hang":
            await asyncio.sleep(self.hang_s)
            request.transport.close()
            raise asyncio.CancelledError
        if fault == "non_json":
            return web.Response(body=b"<html><body>502 Bad Gateway</body></html>", content_type="application/json")
        k = body.get("logprobs")
        data = json.dumps(completion_response(body, drop_logprobs=max(int(k or 0) // 2, 1) if fault == "few_logprobs" else 0,
                                              model=self.model)).encode()
        if fault == "ok" or fault == "few_logprobs":
            return web.Response(body=data, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if fault == "truncated":
            resp.content_length = len(data) + 64
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            request.transport.close()
            raise asyncio.CancelledError
        resp.content_length = len(data)  # slow: the whole body, trickled
        await resp.prepare(request)
        chunks = 10
        step = -(-len(data) // chunks)
        for i in range(0, len(data), step):
            await resp.write(data[i:i + step])
            await asyncio.sleep(self.slow_s / chunks)
        await resp.write_eof()
        return resp
