"""The `sglang` protocol (SGLang's native /generate, serving/protocol.py) against its recorded reply shape and
through its error paths: a reply that lacks a field, gives fewer log-probs than asked, holds a malformed
entry or an id outside the vocabulary, was aborted, or scored other prompt tokens than sent (a server that
ignored logprob_start_len) is one line naming the server, never a wrong token. The end-to-end runs over a
real model server speaking this protocol are tests/test_served.py; the shapes are docs/serving-protocols.md's."""

from __future__ import annotations

import pytest
from aiohttp import web

from stub_server import _top
from test_http_client import LocalServer
from test_served_recorded import fixture, tops
from tracetailor.serving.http import HttpClient, ServerError, run_sync
from tracetailor.serving.model import ServedModel
from tracetailor.serving.protocol import SGLangProtocol


# -- the recorded reply (SGLang 0.5.23's shape, rendered from its source) ---------------------------------

def test_the_drafted_verification_request_is_sglangs():
    f = fixture("sglang_generate_logprobs")
    req = f["request"]
    k, start = req["top_logprobs_num"], req["logprob_start_len"] + 1
    body = SGLangProtocol().verify(req["input_ids"], k, start)
    assert {key: body[key] for key in req} == req
    assert body["return_text_in_logprobs"] is False


def test_the_recorded_reply_gives_the_drafted_positions_and_the_one_after():
    f = fixture("sglang_generate_logprobs")
    req, expected = f["request"], f["expected"]
    start = req["logprob_start_len"] + 1
    dists = SGLangProtocol().read_verify(f["response"], start, req["top_logprobs_num"], "sglang", ids=req["input_ids"])
    assert [tops(d) for d in dists[:-1]] == [g["top"] for g in expected["guess_positions"]]
    assert tops(dists[-1]) == expected["after_last_guess"][0]["top"]
    ids, after = SGLangProtocol().read_generation(f["response"], req["top_logprobs_num"], "sglang")
    assert ids == [e["token"] for e in expected["after_last_guess"]] == f["response"]["output_ids"]
    lps = SGLangProtocol().read_token_logprobs(f["response"], req["input_ids"], start, "sglang")
    assert lps == pytest.approx([g["logprob"] for g in expected["guess_positions"]])


# -- error paths, through a served model over HTTP -------------------------------------------------------

VOCAB = 1000  # the ids _top gives are below it


def triple(i: int, lp: float | None) -> list:
    return [lp, i, None]


def generate_reply(body: dict) -> dict:
    """A well-formed /generate reply in SGLang's shape, made deterministically from the request (a test
    double's numbers: stub_server._top), greedy: the top-1 is emitted."""
    ids, k = list(body["input_ids"]), body.get("top_logprobs_num") or 0
    start = body.get("logprob_start_len", -1)
    start = len(ids) - 1 if start == -1 else start
    context, out, out_top = list(ids), [], []
    for _ in range(body["sampling_params"]["max_new_tokens"]):
        top = _top(context, max(k, 1))
        out.append(triple(*top[0]))
        out_top.append([triple(i, lp) for i, lp in top[:k]])
        context.append(top[0][0])
    in_top = [None] + [[triple(i, lp) for i, lp in _top(ids[:p], k)] for p in range(start + 1, len(ids))]
    in_tok = [triple(ids[start], None)] + [triple(ids[p], -1.5) for p in range(start + 1, len(ids))]
    meta = {"id": "r", "finish_reason": {"type": "length", "length": len(out)}, "prompt_tokens": len(ids),
            "completion_tokens": len(out), "cached_tokens": 0, "input_token_logprobs": in_tok,
            "output_token_logprobs": out, "input_top_logprobs": in_top, "output_top_logprobs": out_top}
    return {"text": "", "output_ids": [t[1] for t in out], "meta_info": meta}


def ask(change, span: bool = False):
    """One next-token request (or, `span`, one drafted verification from logprob_start_len) to a /generate
    server whose every reply is `change(reply)`; returns (the answer, the bodies the server received)."""
    bodies = []

    async def reply(request, n):
        body = await request.json()
        bodies.append(body)
        out = change(generate_reply(body))
        return out if isinstance(out, web.Response) else web.json_response(out)
    server = LocalServer({"/generate": reply})
    try:
        async def go():
            async with HttpClient(backoff=0.01, retries=1) as client:
                model = ServedModel("teacher", [server.url], "sglang", None, client, vocab_size=VOCAB,
                                    prompt_logprobs=span)
                if span:
                    return await model.span_topk([5, 6, 7, 8, 9], [3, 4, 5], 5)
                return await model.next_topk([5, 6, 7], 5)
        return run_sync(go()), bodies, server.url
    finally:
        server.stop()


def test_a_well_formed_reply_reads_as_its_top_k():
    dist, bodies, _ = ask(lambda r: r)
    assert list(dist.ids) == [i for i, _ in _top([5, 6, 7], 5)]
    spans, bodies, _ = ask(lambda r: r, span=True)
    assert len(bodies) == 1 and bodies[0]["logprob_start_len"] == 2  # one request: after [5,6,7], [..8], [..9]
    assert [list(d.ids) for d in spans] == [[i for i, _ in _top([5, 6, 7, 8, 9][:e], 5)] for e in (3, 4, 5)]


def drop(key):
    def change(r):
        r["meta_info"].pop(key)
        return r
    return change


def set_meta(key, value):
    def change(r):
        r["meta_info"][key] = value(r["meta_info"]) if callable(value) else value
        return r
    return change


def whole_prompt() -> dict:
    """The input log-prob lists of ask()'s span request scored from position 0."""
    meta = generate_reply({"input_ids": [5, 6, 7, 8, 9], "sampling_params": {"max_new_tokens": 1},
                           "top_logprobs_num": 5, "logprob_start_len": 0})["meta_info"]
    return {key: meta[key] for key in ("input_token_logprobs", "input_top_logprobs")}


@pytest.mark.parametrize("change, span, says", [
    (lambda r: {"text": "", "output_ids": r["output_ids"]}, False, "the reply has no meta_info"),
    (drop("output_top_logprobs"), False, "no meta_info.output_token_logprobs and output_top_logprobs"),
    (drop("output_token_logprobs"), False, "no meta_info.output_token_logprobs and output_top_logprobs"),
    (set_meta("output_top_logprobs", lambda m: [t[:3] for t in m["output_top_logprobs"]]), False,
     "returned 3 log-probs where 5 were asked"),
    (set_meta("output_top_logprobs", [None]), False, "returned 0 log-probs where 5 were asked"),
    (set_meta("output_top_logprobs", lambda m: [[[t[0], str(t[1]), None] for t in m["output_top_logprobs"][0]]]),
     False, "not a [logprob, token_id, text] entry with an integer id"),
    (set_meta("output_top_logprobs", lambda m: [[[t[0], t[1] + VOCAB, None] for t in m["output_top_logprobs"][0]]]),
     False, "outside the teacher's vocabulary of 1000"),
    (set_meta("output_top_logprobs", lambda m: [[[None, t[1], None] for t in m["output_top_logprobs"][0]]]),
     False, "malformed log-prob entry"),
    (set_meta("finish_reason", {"type": "abort", "message": "the request was aborted by the scheduler"}), False,
     "aborted the request: the request was aborted by the scheduler"),
    (drop("input_top_logprobs"), True, "no meta_info.input_top_logprobs from logprob_start_len"),
    (drop("input_token_logprobs"), True, "no meta_info.input_token_logprobs"),
    # a server that ignored logprob_start_len and scored the whole prompt: read from the start asked, its
    # entries would be the distributions at other positions
    (lambda r: {**r, "meta_info": {**r["meta_info"], **whole_prompt()}}, True, "did not honour logprob_start_len"),
    (set_meta("input_top_logprobs", lambda m: m["input_top_logprobs"][:1]), True, "1 prompt log-prob positions where 3"),
])
def test_a_bad_reply_is_one_line_naming_the_server(change, span, says):
    with pytest.raises(ServerError) as e:
        ask(change, span)
    assert says in str(e.value) and "\n" not in str(e.value) and "teacher server http://127.0.0.1:" in str(e.value)


def test_an_sglang_error_reply_is_one_line_and_not_retried():
    """SGLang answers a request it refuses (here a logprob_start_len past the prompt) with 400 and
    {"error": {"message"}} (scheduler.handle_generate_request; http_server's error response)."""
    calls = []

    def refuse(r):
        calls.append(1)
        return web.json_response({"error": {"message": "logprob_start_len, (9) is higher than the number of input "
                                                       "tokens (5). Request with a lower logprob_start_len."}},
                                 status=400)
    with pytest.raises(ServerError) as e:
        ask(refuse, span=True)
    assert "HTTP 400" in str(e.value) and "logprob_start_len, (9)" in str(e.value) and "\n" not in str(e.value)
    assert len(calls) == 1


def test_sampling_asks_sglangs_fields_and_reads_the_ids():
    """eval --model-url over sglang: sampling_params with sampling_seed, top_k -1 for none; the ids and
    their log-probs come from meta_info.output_token_logprobs, the finish from finish_reason.type."""
    body = SGLangProtocol().sample([1, 2], 4, 0.7, 0.95, 0, seed=11)
    assert body["sampling_params"] == {"max_new_tokens": 4, "temperature": 0.7, "top_p": 0.95, "top_k": -1,
                                       "sampling_seed": 11}
    assert body["return_logprob"] is True and body["top_logprobs_num"] == 0
    reply = generate_reply({**body, "top_logprobs_num": 0})
    ids, lps, reason = SGLangProtocol().read_sample(reply, "sglang")
    assert ids == reply["output_ids"] and len(lps) == 4 and reason == "length"
    reply["meta_info"]["finish_reason"] = {"type": "stop", "matched": 0}
    assert SGLangProtocol().read_sample(reply, "sglang")[2] == "stop"
