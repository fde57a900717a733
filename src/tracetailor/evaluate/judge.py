"""An LLM judge: asks any OpenAI-compatible chat endpoint whether two answers are equivalent.

The paper keeps a trace when its boxed answer equals the reference exactly or an
LLM judge says they are equivalent. `LLMJudge` is that judge: one POST to
`<url>/chat/completions` per question it has not seen, answered YES or NO.
Every reply is appended to a JSONL cache keyed by a hash of (model, prompt), so a
rerun (or a resumed run) asks nothing twice. 429, 5xx, timeouts and refused
connections are retried with exponential backoff; when the endpoint stays out of
reach, or refuses the request, `JudgeError` says so in one line.

Only the standard library (urllib) is used. It does not extract answers or decide
when a judge is needed (that is `answers.check_answer`), and it knows nothing of
records or files other than its own cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from ..errors import UserError

RETRY_STATUS = (429, 500, 502, 503, 504)

JUDGE_PROMPT = """You are grading a math answer. Decide whether the candidate answer is mathematically \
equivalent to the reference answer (same value, set or expression; formatting, units written out \
and equivalent forms do not matter).
{question}
Reference answer: {reference}
Candidate answer: {candidate}

Reply with one word: YES if they are equivalent, NO if they are not."""


class JudgeError(UserError, ValueError):
    """The judge cannot answer (bad reply, refused request); one line, shown by the CLI as a user error."""


class JudgeUnavailable(JudgeError):
    """The endpoint stayed unreachable (or overloaded) through every retry."""


def chat_endpoint(url: str) -> str:
    """`url` as given when it names `/chat/completions`, else that path under it (a base such as .../v1)."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def cache_key(model: str, prompt: str) -> str:
    return hashlib.sha256(json.dumps([model, prompt], ensure_ascii=False).encode("utf-8")).hexdigest()


def parse_yes_no(reply: str) -> bool:
    """YES -> True; NO or anything else -> False. A reasoning model's thinking (up to `</think>`) is skipped,
    and the last YES/NO wins (a model may restate the question before answering)."""
    text = reply.rsplit("</think>", 1)[-1]
    words = re.findall(r"\b(yes|no)\b", text, re.IGNORECASE)
    return bool(words) and words[-1].lower() == "yes"


class ReplyCache:
    """JSONL of {"key", "model", "reply"}: loaded whole at start, one flushed line per new reply.
    A line cut short by a kill is skipped on load (its question is asked again)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.replies: dict[str, str] = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.replies[row["key"]] = row["reply"]
                except (ValueError, KeyError, TypeError):
                    continue

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, model: str, reply: str) -> None:
        self.replies[key] = reply
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "model": model, "reply": reply}, ensure_ascii=False) + "\n")


class LLMJudge:
    """Equivalence judgements from `model` at `url` (an OpenAI-compatible server), cached in `cache_path`.

    The API key is read from the environment variable `api_key_env` at each request (none: no
    Authorization header, as local servers expect). `retries` counts the tries after the first;
    the waits are backoff_s, 2*backoff_s, ... up to max_backoff_s (or the server's Retry-After)."""

    def __init__(self, url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 cache_path: str | Path | None = None, timeout_s: float = 60.0, retries: int = 5,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0, max_tokens: int | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        if not url or not model:
            raise JudgeError("judge: both judge_url and judge_model are needed (e.g. --judge-url "
                             "http://localhost:8000/v1 --judge-model Qwen/Qwen2.5-7B-Instruct)")
        self.endpoint, self.model, self.api_key_env = chat_endpoint(url), model, api_key_env
        self.timeout_s, self.retries, self.backoff_s, self.max_backoff_s = timeout_s, retries, backoff_s, max_backoff_s
        self.max_tokens, self.sleep = max_tokens, sleep
        self.cache = ReplyCache(cache_path)
        self.requests = 0  # HTTP requests made (retries included)
        self._lock = threading.Lock()

    def equivalent(self, reference: str, candidate: str, question: str | None = None) -> bool:
        prompt = JUDGE_PROMPT.format(question=f"Question: {question}\n" if question else "",
                                     reference=reference, candidate=candidate)
        return parse_yes_no(self.ask(prompt))

    def ask(self, prompt: str) -> str:
        """The model's reply to one user message: from the cache, else from the endpoint (then cached)."""
        key = cache_key(self.model, prompt)
        with self._lock:
            cached = self.cache.get(key)
        if cached is not None:
            return cached
        reply = self._post(prompt)
        with self._lock:
            self.cache.put(key, self.model, reply)
        return reply

    def _request(self, prompt: str) -> urllib.request.Request:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.endpoint, json.dumps(body).encode("utf-8"), headers, method="POST")

    def _post(self, prompt: str) -> str:
        last, retry_after = "", None
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self._wait(attempt, retry_after))
            self.requests += 1
            try:
                with urllib.request.urlopen(self._request(prompt), timeout=self.timeout_s) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as e:
                if e.code not in RETRY_STATUS:
                    raise self._refused(e) from None
                last = f"HTTP {e.code}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last = str(getattr(e, "reason", e)) or type(e).__name__
                retry_after = None
        raise JudgeUnavailable(f"judge: no answer from {self.endpoint} after {self.retries + 1} tries (last: {last}); "
                               "check --judge-url and that the server is up")

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        """Exponential backoff; a server's Retry-After (in seconds) lengthens it, both capped."""
        wait = self.backoff_s * 2 ** (attempt - 1)
        if retry_after and retry_after.strip().isdigit():
            wait = max(wait, float(retry_after))
        return min(wait, self.max_backoff_s)

    def _refused(self, e: urllib.error.HTTPError) -> JudgeError:
        detail = e.read().decode("utf-8", "replace").strip().replace("\n", " ")[:200]
        hint = f"; set the API key in ${self.api_key_env}" if e.code in (401, 403) else ""
        return JudgeError(f"judge: {self.endpoint} refused the request (HTTP {e.code}: {detail}){hint}")

    def _content(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge: {self.endpoint} did not answer like an OpenAI chat endpoint "
                             f"(got {raw[:120]!r}); is --judge-url the server's /v1 base?") from None
        return content if isinstance(content, str) else ""


def judge_from(cfg, default_cache: str | Path | None) -> LLMJudge | None:
    """The judge a command's config asks for (its judge_url, judge_model, judge_api_key_env, judge_cache
    fields), or None when it names no endpoint. The cache defaults to `default_cache`. (The configs' validate()
    has already refused a model without an endpoint and the reverse.)"""
    if not cfg.judge_url:
        return None
    return LLMJudge(cfg.judge_url, cfg.judge_model or "", api_key_env=cfg.judge_api_key_env,
                    cache_path=cfg.judge_cache or default_cache)


__all__ = ["JudgeError", "JudgeUnavailable", "LLMJudge", "cache_key", "chat_endpoint", "judge_from", "parse_yes_no"]
