"""An aiohttp application served on 127.0.0.1 from a thread of its own: the local servers of the served-model
and judge tests (tests/test_http_client.py's LocalServer, tests/model_server.py's ModelServer)."""

from __future__ import annotations

import asyncio
import socket
import threading


class AppThread:
    """`app` (an aiohttp.web.Application) on a free port of 127.0.0.1 until `stop()`; `url`, `port`."""

    def __init__(self, app, ready_timeout: float = 30.0):
        from aiohttp import web

        self.runner = web.AppRunner(app)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert ready.wait(ready_timeout), "the local server did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
