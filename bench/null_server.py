"""The cheapest server that speaks enough HTTP/1.1 for the served-model client's CPU benchmark.

Every request (any method, any path) gets the same prebuilt 200 reply: a valid completions JSON in
vLLM's shape with `--tokens` generated tokens and `--logprobs` top log-probs each, ids as `token_id:N`.
Keep-alive and pipelining are honoured (requests are framed by Content-Length; chunked request bodies
are not supported, and a client that sends one is answered 400 and closed). No routing, no JSON
parsing, no model: it exists so that the client's own cost per request is what gets measured.

    python bench/null_server.py [--port 0] [--tokens 1] [--logprobs 20]

prints `PORT <n>` on stdout once listening, then serves until killed (SIGTERM/SIGINT) or until its
parent process dies (it checks every second), so a crashed benchmark never leaves it running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys


def fixed_body(tokens: int, logprobs: int) -> bytes:
    ids = [100 + i for i in range(tokens)]
    top = [{f"token_id:{100 + i + r}": -0.25 - r for r in range(logprobs)} for i in range(tokens)]
    choice = {"index": 0, "text": "x" * tokens,
              "logprobs": {"text_offset": list(range(tokens)), "token_logprobs": [-0.25] * tokens,
                           "tokens": [f"token_id:{t}" for t in ids], "top_logprobs": top},
              "finish_reason": "length", "stop_reason": None, "token_ids": None,
              "prompt_logprobs": None, "prompt_token_ids": None}
    return json.dumps({"id": "cmpl-null", "object": "text_completion", "created": 0, "model": "null",
                       "choices": [choice], "service_tier": None, "system_fingerprint": None,
                       "usage": {"prompt_tokens": 8, "total_tokens": 8 + tokens, "completion_tokens": tokens,
                                 "prompt_tokens_details": None}, "kv_transfer_params": None}).encode()


def reply(body: bytes) -> bytes:
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: keep-alive\r\n\r\n").encode()
    return head + body


BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class NullProtocol(asyncio.Protocol):
    response = b""

    def connection_made(self, transport):
        self.transport, self.buf = transport, bytearray()

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            if b"transfer-encoding: chunked" in head:
                self.transport.write(BAD)
                self.transport.close()
                return
            length = 0
            i = head.find(b"content-length:")
            if i >= 0:
                length = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None])
            if len(self.buf) < end + 4 + length:
                return
            del self.buf[:end + 4 + length]
            self.transport.write(self.response)


async def serve(port: int, body: bytes) -> None:
    NullProtocol.response = reply(body)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(NullProtocol, "127.0.0.1", port, backlog=1024, reuse_address=True)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    while not stop.is_set():
        if os.getppid() != parent:  # orphaned: the benchmark that started us is gone
            break
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass
    server.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--logprobs", type=int, default=20)
    args = ap.parse_args(argv)
    asyncio.run(serve(args.port, fixed_body(args.tokens, args.logprobs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
