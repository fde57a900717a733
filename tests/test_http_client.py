"""The shared async HTTP client (serving/http.py) against a real aiohttp server on 127.0.0.1 that misbehaves
on purpose: each fault is retried or refused in one line, and nothing hangs."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from tracetailor.errors import UserError
from tracetailor.serving.http import HttpClient, ServerError, check_url, run_sync

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from local_app import AppThread  # noqa: E402


class LocalServer(AppThread):
    """An aiohttp app on 127.0.0.1 in a thread of its own; `hits` counts requests per path."""

    def __init__(self, routes):
        self.hits: dict[str, int] = {}
        self.seen_headers: list[dict] = []
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_route("*", path, self._counted(path, handler))
        super().__init__(app, ready_timeout=10)

    def _counted(self, path, handler):
        async def wrapped(request):
            self.hits[path] = self.hits.get(path, 0) + 1
            self.seen_headers.append(dict(request.headers))
            return await handler(request, self.hits[path])
        return wrapped


@pytest.fixture
def server(request):
    servers = []

    def start(routes):
        s = LocalServer(routes)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def post(url, payload=None, **kw):
    async def go():
        async with HttpClient(backoff=0.01, **kw) as client:
            return await client.post_json(url, payload or {"x": 1}), client.stats
    return run_sync(go())


def test_retries_429_then_succeeds(server):
    async def h(request, n):
        return web.json_response({"error": "slow down"}, status=429) if n < 3 else web.json_response({"ok": n})
    s = server({"/a": h})
    reply, stats = post(s.url + "/a")
    assert reply == {"ok": 3} and stats["retries"] == 2


def test_server_error_after_retries_names_url_and_status(server):
    async def h(request, n):
        return web.Response(status=500, text="boom")
    s = server({"/a": h})
    with pytest.raises(ServerError) as e:
        post(s.url + "/a", retries=2)
    msg = str(e.value)
    assert "\n" not in msg and "/a" in msg and "HTTP 500" in msg and "3 attempts" in msg
    assert s.hits["/a"] == 3


def test_client_error_is_not_retried_and_says_why(server):
    async def h(request, n):
        return web.json_response({"error": {"message": "logprobs must be <= 20"}}, status=400)
    s = server({"/a": h})
    with pytest.raises(ServerError, match="HTTP 400: logprobs must be <= 20"):
        post(s.url + "/a")
    assert s.hits["/a"] == 1


def test_reply_cut_short_is_retried(server):
    async def h(request, n):
        if n == 1:  # Content-Length larger than the body, then the connection closes
            resp = web.StreamResponse(headers={"Content-Length": "100", "Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(b'{"ok"')
            request.transport.close()
            return resp
        return web.json_response({"ok": True})
    s = server({"/a": h})
    reply, stats = post(s.url + "/a")
    assert reply == {"ok": True} and stats["retries"] == 1


def test_trickled_body_is_cut_by_the_total_deadline(server):
    async def h(request, n):
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for _ in range(100):
            await resp.write(b" ")
            await asyncio.sleep(0.2)
        return resp
    s = server({"/a": h})
    start = time.perf_counter()
    with pytest.raises(ServerError, match="no complete reply within 0.5 s"):
        post(s.url + "/a", timeout=0.5, retries=1)
    assert time.perf_counter() - start < 5


def test_oversized_reply_is_refused_without_reading_it_all(server):
    async def h(request, n):
        return web.Response(body=b"x" * 200_000, content_type="application/json")
    s = server({"/a": h})
    with pytest.raises(ServerError, match="exceeds 1000 bytes"):
        post(s.url + "/a", max_reply_bytes=1000)
    assert s.hits["/a"] == 1  # the same server would send it again: no retry


def test_non_json_reply_is_retried_then_named(server):
    async def h(request, n):
        return web.Response(text="<html>proxy error</html>")
    s = server({"/a": h})
    with pytest.raises(ServerError, match="not JSON.*proxy error"):
        post(s.url + "/a", retries=1)


def test_refused_connection_is_retried_then_named():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there
    with pytest.raises(ServerError, match="check that the server is up"):
        post(f"http://127.0.0.1:{port}/a", retries=1)


def test_api_key_goes_in_the_authorization_header(server):
    async def h(request, n):
        return web.json_response({})
    s = server({"/a": h})
    post(s.url + "/a", api_key="sk-test")
    assert s.seen_headers[0]["Authorization"] == "Bearer sk-test"


def test_max_in_flight_bounds_concurrent_requests(server):
    state = {"now": 0, "most": 0}

    async def h(request, n):
        state["now"] += 1
        state["most"] = max(state["most"], state["now"])
        await asyncio.sleep(0.02)
        state["now"] -= 1
        return web.json_response({"n": n})
    s = server({"/a": h})

    async def go():
        async with HttpClient(max_in_flight=4) as client:
            return await asyncio.gather(*[client.post_json(s.url + "/a", {}) for _ in range(20)])
    replies = run_sync(go())
    assert len(replies) == 20 and state["most"] == 4


@pytest.mark.parametrize("url, problem", [
    ("localhost:8000", "not an http"), ("ftp://host/x", "not an http"), ("http://:80", "no host"),
    ("http://host:99999", "port must be 1-65535"),
])
def test_check_url_refuses_bad_urls_up_front(url, problem):
    with pytest.raises(UserError, match=problem) as e:
        check_url(url, "--teacher-url")
    assert str(e.value).startswith("--teacher-url")


def test_check_url_normalises():
    assert check_url(" http://127.0.0.1:8000/ ", "--x") == "http://127.0.0.1:8000"


def test_run_sync_works_inside_a_running_loop():
    async def inner():
        return 7

    async def outer():
        return run_sync(inner())
    assert asyncio.run(outer()) == 7
