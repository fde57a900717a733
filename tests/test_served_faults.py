"""The served model (serving/model.py) through a stub server's faults: each is retried or named in one line,
a server killed and restarted mid-run costs nothing, and replicas share the load. The stub is a test double
for error paths only (tests/stub_server.py); real servers are tests/test_served.py and test_served_llamacpp.py."""

from __future__ import annotations

import threading
import time

import pytest

from tracetailor.serving.http import HttpClient, ServerError, run_sync
from tracetailor.serving.model import ServedModel


def ask(urls, k=5, fault_free_after=None, **client_kw):
    async def go():
        async with HttpClient(backoff=0.01, max_backoff=0.2, **client_kw) as client:
            model = ServedModel("teacher", list(urls), "openai", None, client, vocab_size=1000)
            return await model.next_topk([1, 2, 3], k), model
    return run_sync(go())


@pytest.mark.parametrize("fault", ["429", "500", "503", "truncated", "non_json", "drop", "hang"])
def test_a_transient_fault_is_retried_to_the_same_answer(stub_server, fault):
    clean, _ = ask([stub_server.url])
    stub_server.plan(fault)
    dist, _ = ask([stub_server.url], timeout=1.0)
    assert dist == clean


def test_fewer_logprobs_than_asked_is_one_line_naming_the_cap(stub_server):
    stub_server.plan("few_logprobs")
    with pytest.raises(ServerError) as e:
        ask([stub_server.url])
    assert "\n" not in str(e.value) and "log-probs where 5 were asked" in str(e.value)


def test_a_client_error_is_not_retried(stub_server):
    stub_server.plan("400")
    with pytest.raises(ServerError, match="HTTP 400"):
        ask([stub_server.url])
    assert len(stub_server.requests) == 1


def test_a_server_killed_and_restarted_mid_run_costs_nothing(stub_server):
    clean, _ = ask([stub_server.url])
    stub_server.kill()
    threading.Timer(0.5, stub_server.restart).start()
    started = time.perf_counter()
    dist, _ = ask([stub_server.url], retries=8)
    assert dist == clean and time.perf_counter() - started < 10


def test_replicas_take_requests_in_turn(stub_server):
    from stub_server import StubServer

    other = StubServer()
    try:
        async def go():
            async with HttpClient() as client:
                model = ServedModel("teacher", [stub_server.url, other.url], "openai", None, client)
                return [await model.next_topk([1, 2, j], 5) for j in range(6)]
        run_sync(go())
        assert len(stub_server.requests) == 3 and len(other.requests) == 3
    finally:
        other.close()
