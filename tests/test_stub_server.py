"""The error-path stub (tests/stub_server.py) does what its faults say, so a client test that drives a
client through it tests the client, not the stub."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from stub_server import StubServer, completion_response

REQ = {"model": "stub-model", "prompt": [5, 6, 7], "max_tokens": 2, "logprobs": 4, "temperature": 0,
       "return_tokens_as_token_ids": True}


def post(stub: StubServer, body: dict = REQ, timeout: float = 5.0):
    """(status, raw body) of one POST, or the exception the client raised."""
    async def go():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.post(stub.url + "/v1/completions", json=body) as r:
                return r.status, await r.read()
    try:
        return asyncio.run(go())
    except Exception as e:  # noqa: BLE001 - the fault under test
        return e


@pytest.fixture
def stub():
    s = StubServer(hang_s=3.0, slow_s=0.5)
    yield s
    s.close()


def test_stub_ok_reply_has_ids_and_k_logprobs(stub):
    status, raw = post(stub)
    choice = json.loads(raw)["choices"][0]
    assert status == 200
    assert len(choice["logprobs"]["tokens"]) == 2
    assert all(len(d) == 4 and all(key.startswith("token_id:") for key in d) for d in choice["logprobs"]["top_logprobs"])
    assert choice["logprobs"]["tokens"][0] == next(iter(choice["logprobs"]["top_logprobs"][0]))
    assert stub.requests[-1] == ("/v1/completions", REQ)


def test_stub_prompt_logprobs_shape():
    body = completion_response({**REQ, "prompt_logprobs": 3, "max_tokens": 1})
    rows = body["choices"][0]["prompt_logprobs"]
    assert rows[0] is None and len(rows) == 3
    assert all(str(tok) in row for tok, row in zip(REQ["prompt"][1:], rows[1:]))


@pytest.mark.parametrize("code", ["429", "500", "503", "404"])
def test_stub_status_faults(stub, code):
    stub.plan(code)
    status, raw = post(stub)
    assert status == int(code) and json.loads(raw)["error"]["code"] == int(code)
    assert post(stub)[0] == 200  # the fault is spent


def test_stub_hang_times_out_the_client(stub):
    stub.plan("hang")
    t = time.monotonic()
    assert isinstance(post(stub, timeout=0.5), asyncio.TimeoutError)
    assert time.monotonic() - t < 2.5


def test_stub_slow_reply_arrives_whole_but_late(stub):
    stub.plan("slow")
    t = time.monotonic()
    status, raw = post(stub)
    assert status == 200 and json.loads(raw)["choices"][0]["logprobs"]
    assert time.monotonic() - t >= 0.4
    assert isinstance(post(stub.plan("slow"), timeout=0.2), asyncio.TimeoutError)


def test_stub_truncated_body_is_a_payload_error(stub):
    stub.plan("truncated")
    assert isinstance(post(stub), aiohttp.ClientPayloadError)


def test_stub_dropped_connection(stub):
    stub.plan("drop")
    assert isinstance(post(stub), aiohttp.ClientError)


def test_stub_non_json_body(stub):
    stub.plan("non_json")
    status, raw = post(stub)
    with pytest.raises(ValueError):
        json.loads(raw)
    assert status == 200


def test_stub_few_logprobs(stub):
    stub.plan("few_logprobs")
    status, raw = post(stub)
    tops = json.loads(raw)["choices"][0]["logprobs"]["top_logprobs"]
    assert status == 200 and all(len(d) < REQ["logprobs"] for d in tops)


def test_stub_killed_and_restarted_on_the_same_port(stub):
    port = stub.port
    stub.kill()
    assert isinstance(post(stub), aiohttp.ClientConnectorError)
    stub.restart()
    assert stub.port == port and post(stub)[0] == 200


def test_stub_kill_drops_a_request_in_flight(stub):
    stub.plan("hang")

    async def go():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            task = asyncio.ensure_future(s.post(stub.url + "/v1/completions", json=REQ))
            await asyncio.sleep(0.3)
            await asyncio.get_running_loop().run_in_executor(None, stub.kill)
            with pytest.raises(aiohttp.ClientError):
                await task
    asyncio.run(go())


def test_null_server_answers_every_request_on_one_connection():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "bench" / "null_server.py"
    proc = subprocess.Popen([sys.executable, str(script), "--logprobs", "3"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().split()[1])

        async def go():
            conn = aiohttp.TCPConnector(limit=1)  # one keep-alive connection for all requests
            async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=5)) as s:
                bodies = []
                for path in ("/v1/completions", "/anything", "/v1/completions"):
                    async with s.post(f"http://127.0.0.1:{port}{path}", json={"prompt": [1], "pad": "x" * 5000}) as r:
                        bodies.append(await r.json())
                return bodies
        bodies = asyncio.run(go())
        assert [len(b["choices"][0]["logprobs"]["top_logprobs"][0]) for b in bodies] == [3, 3, 3]
    finally:
        proc.terminate()
        proc.wait(5)
