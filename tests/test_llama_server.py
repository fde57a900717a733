"""The llama-server facts the served client is designed on (docs/serving-protocols.md), checked against
the real server so an upgrade of llama.cpp that breaks one fails here, not in a generate run.

Runs only with a built llama-server (`-m serve`; the fixture builds it once, see tests/serving.py)."""

from __future__ import annotations

import threading
import urllib.error

import pytest

from serving import get_json, post_json

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
          2, 198, 1, 4093, 198, 1780, 314, 216, 34, 1232, 216, 35, 47, 2, 198, 1, 520, 9531, 198]  # chat: "What is 2 + 3?"
BASE = {"prompt": PROMPT, "n_predict": 1, "n_probs": 20, "temperature": 0, "return_tokens": True}


def dists(resp: dict) -> list[dict[int, float]]:
    return [{t["id"]: t["logprob"] for t in p["top_logprobs"]} for p in resp["completion_probabilities"]]


def complete(server, **over) -> dict:
    return post_json(server.url + "/completion", {**BASE, **over})


def test_llama_server_restarts_on_the_same_port(llama_servers):
    srv = llama_servers["student"]
    port = srv.port
    srv.restart()
    assert srv.port == port and get_json(srv.url + "/health") == {"status": "ok"}


def test_llamacpp_token_id_prompt_gives_ids_and_sorted_topk(llama_servers):
    r = complete(llama_servers["teacher"], n_predict=3)
    probs = r["completion_probabilities"]
    assert r["tokens"] == [p["id"] for p in probs] and r["tokens_evaluated"] == len(PROMPT)
    for p in probs:
        lps = [t["logprob"] for t in p["top_logprobs"]]
        assert len(lps) == 20 and lps == sorted(lps, reverse=True)
        assert p["top_logprobs"][0]["id"] == p["id"]  # greedy: the emitted token is the top-1


def test_llamacpp_logprobs_ignore_the_sampler(llama_servers):
    """n_probs reports the raw softmax at T=1 whatever temperature/top_k the request samples with."""
    t = llama_servers["teacher"]
    assert dists(complete(t)) == dists(complete(t, temperature=0.3, top_k=2, seed=3))


def test_llamacpp_post_sampling_probs_are_after_the_chain(llama_servers):
    r = complete(llama_servers["teacher"], temperature=0.7, top_k=3, seed=1, post_sampling_probs=True)
    top = r["completion_probabilities"][0]["top_probs"]
    assert len(top) == 3 and abs(sum(x["prob"] for x in top) - 1) < 1e-5


def test_llamacpp_repeated_request_is_bit_identical(llama_servers):
    t = llama_servers["teacher"]
    first = dists(complete(t, n_predict=3))
    assert dists(complete(t, n_predict=3)) == first


def test_llamacpp_no_logprob_cap_below_the_vocabulary(llama_servers):
    assert len(dists(complete(llama_servers["teacher"], n_probs=500))[0]) == 500


def test_llamacpp_student_is_another_model_on_the_same_vocabulary(llama_servers):
    t, s = dists(complete(llama_servers["teacher"]))[0], dists(complete(llama_servers["student"]))[0]
    assert t != s and max(max(t), max(s)) < 49152


def test_llamacpp_v1_completions_ignores_echo(llama_servers):
    """/v1/completions has no prompt log-probs: `echo` is accepted and silently ignored."""
    body = {"prompt": PROMPT, "max_tokens": 1, "logprobs": 5, "echo": True, "temperature": 0}
    r = post_json(llama_servers["teacher"].url + "/v1/completions", body)
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 1 and isinstance(content[0]["id"], int)


def test_llamacpp_quantized_teacher_same_bits_with_and_without_cache(llama_servers):
    """Q4_1 weights: a position's log-probs do not depend on whether it was prefilled or decoded."""
    t = llama_servers["teacher"]
    gen = complete(t, n_predict=3)
    steps = [complete(t, prompt=PROMPT + gen["tokens"][:i], cache_prompt=False) for i in range(3)]
    assert [dists(x)[0] for x in steps] == dists(gen)


def test_llamacpp_grammar_forced_draft_equals_lockstep(llama_servers):
    """One request verifies a K-token draft: a token-id grammar forces the guesses and the returned
    (pre-sampling) log-probs at the K+1 positions are the lockstep ones."""
    t = llama_servers["teacher"]
    gen = complete(t, n_predict=3)
    third = dists(gen)[2]
    guesses = gen["tokens"][:2] + [sorted(third, key=lambda i: -third[i])[3]]  # the last guess is wrong
    grammar = "root ::= " + " ".join(f"<[{g}]>" for g in guesses) + " !<[0]>"
    forced = complete(t, n_predict=4, grammar=grammar)
    assert forced["tokens"][:3] == guesses
    assert dists(forced) == [dists(complete(t, prompt=PROMPT + guesses[:i]))[0] for i in range(4)]


def test_llamacpp_concurrent_requests_do_not_change_bits(llama_servers):
    t = llama_servers["teacher"]
    alone = dists(complete(t, cache_prompt=False))
    out = [None] * 4
    bodies = [{**BASE, "prompt": PROMPT[:-3] + [tok], "n_predict": 4, "cache_prompt": False} for tok in (28, 29, 30)]
    bodies.append({**BASE, "cache_prompt": False})

    def run(i):
        out[i] = post_json(t.url + "/completion", bodies[i], timeout=300)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert dists(out[3]) == alone
