"""One async HTTP client for every server tracetailor talks to: served models (serving/model.py) and the
LLM judge (evaluate/judge.py).

It sends JSON, reads JSON, and survives the faults of real servers: 429 and 5xx replies, timeouts, reset
connections, bodies cut short or trickled, replies that are not JSON or far too large. Each is retried with
exponential backoff (a request to a model or a judge is pure, so a retry is safe) until the retries run
out; then one `ServerError` line names the URL and what happened. A request's `timeout` is a total
deadline for one attempt, body included, so a server that trickles bytes cannot hang a run. Replies are
read up to `max_reply_bytes`, never whole into memory past that. At most `max_in_flight` requests run at
once; connections are pooled and reused.

It knows nothing of models or prompts: URLs and JSON in, JSON out. Built on aiohttp (a maintained async
client); nothing here writes HTTP by hand.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from typing import Any
from urllib.parse import urlsplit

from ..errors import UserError

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class ServerError(UserError):
    """A server that could not give a usable reply (after retries where a retry could help)."""


def check_url(url: str, flag: str) -> str:
    """`url` if it is an http(s) URL with a host and a valid port, without a trailing slash; else a UserError
    naming `flag`. Checked before any request, so a typo costs no retries."""
    text = str(url).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise UserError(f"{flag} {_short(text)!r}: not an http:// or https:// URL; write it as http://HOST:PORT")
    if not parts.hostname:
        raise UserError(f"{flag} {_short(text)!r}: the URL names no host; write it as http://HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 0 < port < 65536:
        raise UserError(f"{flag} {_short(text)!r}: the port must be 1-65535")
    return text.rstrip("/")


def _short(text: str, limit: int = 120) -> str:
    """A value for an error message: never the whole of a huge one."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


class HttpClient:
    """Pooled JSON requests with retries, a total deadline per attempt and a reply-size cap.

    Use it inside one event loop: `async with HttpClient(...) as client: await client.post_json(url, body)`.
    `stats` counts requests, retries and bytes both ways (what benchmarks report).
    """

    def __init__(self, *, max_in_flight: int = 64, timeout: float = 60.0, retries: int = 4, backoff: float = 0.5,
                 max_backoff: float = 10.0, max_reply_bytes: int = 8 << 20, api_key: str | None = None):
        if max_in_flight < 1:
            raise UserError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_reply_bytes = max_reply_bytes
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session = None
        self._slots: asyncio.Semaphore | None = None
        self.stats = {"requests": 0, "retries": 0, "bytes_sent": 0, "bytes_received": 0}

    async def __aenter__(self) -> "HttpClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _open(self):
        if self._session is None:
            import aiohttp

            connector = aiohttp.TCPConnector(limit=self.max_in_flight, limit_per_host=0, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
            self._timeout = aiohttp.ClientTimeout(total=self.timeout)
            self._slots = asyncio.Semaphore(self.max_in_flight)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post_json(self, url: str, payload: dict) -> Any:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return await self._request("POST", url, body)

    async def get_json(self, url: str) -> Any:
        return await self._request("GET", url, None)

    async def _request(self, method: str, url: str, body: bytes | None) -> Any:
        import aiohttp

        session = self._open()
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))  # jitter: replicas are not hit in step
            try:
                async with self._slots:  # max_in_flight requests at once (the connector also holds that many)
                    self.stats["requests"] += 1
                    self.stats["bytes_sent"] += len(body or b"")
                    status, data = await self._attempt(session, method, url, body)
            except asyncio.TimeoutError:  # aiohttp's total timeout: connect, send and the whole reply
                last = f"no complete reply within {self.timeout:g} s"
                continue
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, ConnectionError) as e:
                last = f"{type(e).__name__}: {_short(e, 200)}"
                continue
            except aiohttp.ClientError as e:
                raise ServerError(f"{url}: {type(e).__name__}: {_short(e, 200)}") from None
            except _TooLarge as e:
                raise ServerError(f"{url}: the reply exceeds {self.max_reply_bytes} bytes ({e}); the server "
                                  "sends far more than asked for") from None
            if status in RETRY_STATUS:
                last = f"HTTP {status}: {_short(data.decode('utf-8', 'replace'), 200)}"
                continue
            if status >= 400:
                raise ServerError(f"{url}: HTTP {status}: {_short(_error_text(data), 300)}")
            try:
                return json.loads(data)
            except (UnicodeDecodeError, json.JSONDecodeError):
                last = f"a reply that is not JSON: {_short(data.decode('utf-8', 'replace'), 120)!r}"
        raise ServerError(f"{url}: {last} ({self.retries + 1} attempts); check that the server is up and "
                          "serves this endpoint")

    async def _attempt(self, session, method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        async with session.request(method, url, data=body, timeout=self._timeout) as reply:
            size = reply.content_length
            if size is not None and size > self.max_reply_bytes:
                raise _TooLarge(f"Content-Length {size}")
            if size is not None:  # a known length under the cap: one read (the common, cheap case)
                data = await reply.read()
                self.stats["bytes_received"] += len(data)
                return reply.status, data
            chunks, total = [], 0  # no length given: read in chunks, stopping at the cap
            async for chunk in reply.content.iter_chunked(1 << 16):
                total += len(chunk)
                if total > self.max_reply_bytes:
                    raise _TooLarge(f"more than {total} bytes read")
                chunks.append(chunk)
            self.stats["bytes_received"] += total
            return reply.status, b"".join(chunks)


class _TooLarge(Exception):
    pass


def _error_text(data: bytes) -> str:
    """The message of an error reply: OpenAI-style `{"error": {"message"}}`, llama.cpp's, or the raw text."""
    text = data.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()
    err = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)
    return str(err)


async def gather_all(coros) -> list:
    """Await every coroutine of `coros` at once and return their results in order; when one fails (or this is
    cancelled), the others are cancelled and awaited before the error goes on, so nothing runs on unseen."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_sync(coro):
    """Run a coroutine to its end from synchronous code: in a fresh event loop, or, when this thread already
    runs one (a notebook), in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
