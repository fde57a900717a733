"""An LLM judge: asks any OpenAI-compatible chat endpoint whether two answers are equivalent.

The paper keeps a trace when its boxed answer equals the reference exactly or an
LLM judge says they are equivalent. `LLMJudge` is that judge: one POST to
`<url>/chat/completions` per question it has not seen, answered YES or NO.

Requests go through the shared async client (serving/http.py, aiohttp): many questions in
flight at once (`max_in_flight`), a total deadline per request (`--judge-timeout`, so a server
that trickles its reply cannot hang a run), replies capped in size, and 429/5xx/timeouts/resets/
cut or non-JSON bodies retried with backoff, then one line naming the URL. The URL is checked
before any request. A reply whose verdict is empty (`content` null or blank) is a failed request
too: retried, then one line; it is never cached.

`judged` feeds the commands' grading loops: each item is graded once with a stand-in that only
notes the judge's questions; items that need the judge wait (a chunk at most: in eval, up to a
batch of finished samples is held back meanwhile), their questions are asked all at once (a
progress bar over the questions), and they are graded again, answered from memory.

Only the verdict (true/false) is cached, one JSONL line {"key", "model", "verdict"} per question,
keyed by a hash of (model, prompt), so a rerun (or a resumed run) asks nothing twice. Lines that
are cut (a kill mid-append, even inside a UTF-8 character), unreadable or too long are skipped
(their questions are asked again); lines of the older format that kept the whole reply are read
as their verdict.

It does not extract answers or decide when a judge is needed (that is `answers.check_answer`),
and it knows nothing of records or files other than its own cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from ..errors import UserError

JUDGE_PROMPT = """You are grading a math answer. Decide whether the candidate answer is mathematically \
equivalent to the reference answer (same value, set or expression; formatting, units written out \
and equivalent forms do not matter).
{question}
Reference answer: {reference}
Candidate answer: {candidate}

Reply with one word: YES if they are equivalent, NO if they are not."""

MAX_REPLY_BYTES = 1 << 20  # a YES/NO (with a reasoning model's thinking) is far below; more is a broken server
MAX_CACHE_LINE = 64 << 10  # a verdict line is ~200 bytes; longer lines (old whole replies) are skipped


class JudgeError(UserError, ValueError):
    """The judge cannot answer (bad reply, refused request); one line, shown by the CLI as a user error."""


class JudgeUnavailable(JudgeError):
    """The endpoint stayed unreachable (or overloaded) through every retry."""


def chat_endpoint(url: str) -> str:
    """`url` as given when it names `/chat/completions`, else that path under it (a base such as .../v1);
    refused in one line unless it is an http(s) URL with a host and a valid port."""
    from ..serving.http import check_url

    url = check_url(url, "--judge-url")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def cache_key(model: str, prompt: str) -> str:
    return hashlib.sha256(json.dumps([model, prompt], ensure_ascii=False).encode("utf-8")).hexdigest()


def reply_verdict(reply: str) -> str:
    """The part of a reply that holds the verdict: after a reasoning model's thinking (up to `</think>`)."""
    return reply.rsplit("</think>", 1)[-1]


def parse_yes_no(reply: str) -> bool:
    """YES -> True; NO or anything else -> False. A reasoning model's thinking (up to `</think>`) is skipped,
    and the last YES/NO wins (a model may restate the question before answering)."""
    words = re.findall(r"\b(yes|no)\b", reply_verdict(reply), re.IGNORECASE)
    return bool(words) and words[-1].lower() == "yes"


def check_cache_path(path: str | Path | None, flag: str = "--judge-cache") -> Path | None:
    """The cache file, or one line when it names a directory."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.is_dir():
        raise JudgeError(f"{flag} {path}: is a directory; name a file (e.g. {path / 'judge-cache.jsonl'})")
    return path


class VerdictCache:
    """JSONL of {"key", "model", "verdict"}: loaded at start (module docstring: what is skipped), one line per
    new verdict, appended and flushed."""

    def __init__(self, path: str | Path | None, flag: str = "--judge-cache"):
        self.path, self.flag = check_cache_path(path, flag), flag
        self.verdicts: dict[str, bool] = {}
        self._cut_tail = False  # the file ends inside a line: the next append starts a new one
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            with self.path.open("rb") as f:
                for raw in _lines(f):
                    self._cut_tail = not raw.endswith(b"\n")
                    if self._cut_tail:
                        continue  # a kill mid-append: the question is asked again
                    verdict = _line_verdict(raw)
                    if verdict is not None:
                        self.verdicts[verdict[0]] = verdict[1]
        except OSError as e:
            raise JudgeError(f"{self.flag} {self.path}: cannot read it ({e.strerror}); fix it or name another "
                             "file") from e

    def get(self, key: str) -> bool | None:
        return self.verdicts.get(key)

    def put(self, key: str, model: str, verdict: bool) -> None:
        self.verdicts[key] = verdict
        if self.path is None:
            return
        line = json.dumps({"key": key, "model": model, "verdict": verdict}) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(("\n" if self._cut_tail else "") + line)
        except OSError as e:
            raise JudgeError(f"{self.flag} {self.path}: cannot write it ({e.strerror}); free space, fix the "
                             "permissions or name another file") from e
        self._cut_tail = False


def _lines(f) -> Iterator[bytes]:
    """The file's lines (with their newline; the last may lack it); a line over MAX_CACHE_LINE is yielded as
    an empty stand-in (b"\\n"), never read whole into memory."""
    while True:
        raw = f.readline(MAX_CACHE_LINE)
        if not raw:
            return
        if len(raw) == MAX_CACHE_LINE and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # the rest of the long line, in bounded reads
                raw = f.readline(MAX_CACHE_LINE)
            yield b"\n" if raw else b""
            continue
        yield raw


def _line_verdict(raw: bytes) -> tuple[str, bool] | None:
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(row, dict) or not isinstance(row.get("key"), str):
        return None
    if isinstance(row.get("verdict"), bool):
        return row["key"], row["verdict"]
    reply = row.get("reply")  # the older format kept the whole reply
    if isinstance(reply, str) and reply_verdict(reply).strip():
        return row["key"], parse_yes_no(reply)
    return None


class _Questions:
    """A stand-in judge that notes every question it is asked and says no (the first pass of `judged`)."""

    def __init__(self):
        self.asked: list[tuple[str, str, str | None]] = []

    def equivalent(self, reference: str, candidate: str, question: str | None = None) -> bool:
        self.asked.append((reference, candidate, question))
        return False


T = TypeVar("T")
R = TypeVar("R")


def judged(items: Iterable[T], grade: Callable[[T, Any], R], judge: "LLMJudge | None",
           chunk: int = 256) -> Iterator[tuple[T, R]]:
    """(item, grade(item, judge)) for every item, in order. With a judge, each item is graded first with a
    stand-in that notes the questions it would ask: one that asks none is done (and passes straight through
    when nothing waits before it); the others wait, up to `chunk` items, and their questions are asked all at
    once (`LLMJudge.prefetch`) before they are graded again, answered from memory. `grade` must be
    deterministic."""
    if judge is None:
        for item in items:
            yield item, grade(item, None)
        return
    pending: list[tuple[T, R, bool]] = []  # (item, its first grade, whether it asked anything)
    noted = _Questions()
    for item in items:
        before = len(noted.asked)
        first = grade(item, noted)
        asked = len(noted.asked) > before
        if not pending and not asked:
            yield item, first  # the judge was not consulted: the stand-in made no difference
            continue
        pending.append((item, first, asked))
        if len(pending) >= chunk:
            yield from _answered(pending, noted, grade, judge)
            pending, noted = [], _Questions()
    if pending:
        yield from _answered(pending, noted, grade, judge)


def _answered(pending: list, noted: _Questions, grade: Callable, judge: "LLMJudge") -> Iterator[tuple]:
    judge.prefetch(noted.asked)
    for item, first, asked in pending:
        yield item, (grade(item, judge) if asked else first)


class LLMJudge:
    """Equivalence judgements from `model` at `url` (an OpenAI-compatible server), cached in `cache_path`.

    The API key is read from the environment variable `api_key_env` (none: no Authorization header, as
    local servers expect). `timeout_s`: the total deadline of one request; `retries`: the tries after the
    first (backoff_s, 2*backoff_s, ... between them); `max_in_flight`: the questions asked at once.
    `log` gets one line per batch of questions (how many, where, the timeout); `progress`: a bar over them."""

    def __init__(self, url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 cache_path: str | Path | None = None, timeout_s: float = 60.0, retries: int = 4,
                 backoff_s: float = 1.0, max_in_flight: int = 16, max_tokens: int | None = None,
                 max_reply_bytes: int = MAX_REPLY_BYTES, log: Callable[[str], None] | None = None,
                 progress: bool = False):
        if not url or not model:
            raise JudgeError("judge: both judge_url and judge_model are needed (e.g. --judge-url "
                             "http://localhost:8000/v1 --judge-model Qwen/Qwen2.5-7B-Instruct)")
        if not timeout_s or timeout_s <= 0:
            raise JudgeError(f"--judge-timeout {timeout_s}: give a number of seconds above 0")
        self.endpoint, self.model, self.api_key_env = chat_endpoint(url), model, api_key_env
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), retries, backoff_s
        self.max_in_flight, self.max_tokens, self.max_reply_bytes = max_in_flight, max_tokens, max_reply_bytes
        self.log, self.progress = log, progress
        self.cache = VerdictCache(cache_path)
        self.requests = 0  # HTTP requests made (retries included)
        # the protocol: how a question is written and a reply read (evaluate/grading.py `paper_judge` swaps both)
        self.make_prompt: Callable[..., str] | None = None  # (reference, candidate, question) -> prompt
        self.read_verdict: Callable[[str], bool] = parse_yes_no

    # -- the questions
    def prompt(self, reference: str, candidate: str, question: str | None = None) -> str:
        if self.make_prompt is not None:
            return self.make_prompt(reference, candidate, question)
        return JUDGE_PROMPT.format(question=f"Question: {question}\n" if question else "",
                                   reference=reference, candidate=candidate)

    def equivalent(self, reference: str, candidate: str, question: str | None = None) -> bool:
        key = cache_key(self.model, self.prompt(reference, candidate, question))
        if self.cache.get(key) is None:
            self.prefetch([(reference, candidate, question)])
        return bool(self.cache.get(key))

    def prefetch(self, questions: Iterable[tuple[str, str, str | None]]) -> None:
        """Ask every question not in the cache, `max_in_flight` at a time; each verdict is cached as it comes.
        A question that cannot be answered stops the batch with one line (the verdicts already in are kept)."""
        pending: dict[str, str] = {}
        for reference, candidate, question in questions:
            prompt = self.prompt(reference, candidate, question)
            key = cache_key(self.model, prompt)
            if self.cache.get(key) is None:
                pending.setdefault(key, prompt)
        if not pending:
            return
        if self.log is not None:
            self.log(f"judge: asking {len(pending)} question(s) at {self.endpoint} ({self.model}; up to "
                     f"{self.max_in_flight} at once, each request given {self.timeout_s:g} s, --judge-timeout)")
        from ..serving.http import run_sync

        run_sync(self._ask_all(pending))

    async def _ask_all(self, pending: dict[str, str]) -> None:
        from tqdm.auto import tqdm

        from ..serving.http import HttpClient, gather_all

        client = HttpClient(max_in_flight=self.max_in_flight, timeout=self.timeout_s, retries=self.retries,
                            backoff=self.backoff_s, max_reply_bytes=self.max_reply_bytes,
                            api_key=os.environ.get(self.api_key_env) or None)
        bar = tqdm(total=len(pending), desc="judge", unit="question", disable=not self.progress, leave=False)

        async def one(key: str, prompt: str) -> None:
            self.cache.put(key, self.model, await self._ask(client, prompt))
            bar.update(1)

        try:
            await gather_all(one(key, prompt) for key, prompt in pending.items())
        finally:
            self.requests += client.stats["requests"]
            bar.close()
            await client.close()

    async def _ask(self, client, prompt: str) -> bool:
        """One question's verdict; an empty one is retried like a failed request, then one line."""
        import asyncio

        from ..serving.http import ServerError

        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                                "temperature": 0}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(10.0, self.backoff_s * 2 ** (attempt - 1)))
            try:
                reply = await client.post_json(self.endpoint, body)
            except ServerError as e:
                raise self._failed(e) from None
            content = self._content(reply)
            if reply_verdict(content).strip():
                return self.read_verdict(content)
        raise JudgeError(f"judge: {self.endpoint} gave an empty verdict (content {content!r}) {self.retries + 1} "
                         f"times; check --judge-model {self.model} and the server's log (a reasoning model may need "
                         "more tokens)")

    def _failed(self, e: Exception) -> JudgeError:
        text = str(e)
        hint = f"; set the API key in ${self.api_key_env}" if re.search(r"HTTP 40[13]\b", text) else ""
        kind = JudgeError if re.search(r"HTTP 4\d\d\b", text) else JudgeUnavailable
        return kind(f"judge: {text}{hint}")

    def _content(self, reply: Any) -> str:
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"judge: {self.endpoint} did not answer like an OpenAI chat endpoint "
                             f"(got {json.dumps(reply)[:120]}); is --judge-url the server's /v1 base?") from None
        return content if isinstance(content, str) else ""


def judge_from(cfg, default_cache: str | Path | None, log: Callable[[str], None] | None = None) -> LLMJudge | None:
    """The judge a command's config asks for (its judge_url, judge_model, judge_api_key_env, judge_cache and
    judge_timeout fields), or None when it names no endpoint. The cache defaults to `default_cache`. (The
    configs' validate() has already refused a model without an endpoint and the reverse.)"""
    if not cfg.judge_url:
        return None
    return LLMJudge(cfg.judge_url, cfg.judge_model or "", api_key_env=cfg.judge_api_key_env,
                    cache_path=cfg.judge_cache or default_cache, timeout_s=getattr(cfg, "judge_timeout", 60.0),
                    log=log, progress=getattr(cfg, "progress", True))


__all__ = ["JudgeError", "JudgeUnavailable", "LLMJudge", "VerdictCache", "cache_key", "chat_endpoint",
           "check_cache_path", "judge_from", "judged", "parse_yes_no"]
