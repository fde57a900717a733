"""The served client's readers against recorded replies in the exact shapes of vLLM 0.33 (rendered field for
field from its source) and llama-server (real captures): tests/data/served/, docs/serving-protocols.md.
vLLM cannot run on this machine; these are the paths of the client that only its replies exercise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp import web

from test_http_client import LocalServer
from tracetailor.serving.http import HttpClient, ServerError, run_sync
from tracetailor.serving.model import ServedModel
from tracetailor.serving.protocol import LlamaCppProtocol, OpenAIProtocol

DATA = Path(__file__).parent / "data" / "served"


def fixture(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def tops(dist):
    return [[i, pytest.approx(lp, abs=1e-6)] for i, lp in zip(dist.ids, dist.logprobs)]


def test_vllm_generated_logprobs_read_as_ids():
    f = fixture("vllm_completion_logprobs")
    ids, dists = OpenAIProtocol(None).read_generation(f["response"], f["request"]["logprobs"], "vllm")
    assert ids == [e["token"] for e in f["expected"]]
    assert [tops(d) for d in dists] == [e["top"] for e in f["expected"]]


def test_vllm_sampled_token_outside_the_topk_is_not_taken_into_it():
    """vLLM shows the sampled token first, then the top-k: k + 1 entries when it ranks below k."""
    f = fixture("vllm_completion_logprobs_sampled_outside_topk")
    k = f["request"]["logprobs"]
    assert len(f["response"]["choices"][0]["logprobs"]["top_logprobs"][0]) == k + 1
    ids, dists = OpenAIProtocol(None).read_generation(f["response"], k, "vllm")
    assert ids == [f["expected"][0]["token"]] and tops(dists[0]) == f["expected"][0]["top"]
    assert dists[0].logprob_of(ids[0]) is None  # outside the top-k: null in a record


def test_vllm_prompt_logprobs_give_the_drafted_positions():
    f = fixture("vllm_prompt_logprobs")
    guesses = f["expected"]["guess_positions"]
    start = len(f["request"]["prompt"]) - len(guesses)
    dists = OpenAIProtocol(None).read_verify(f["response"], start, f["request"]["prompt_logprobs"], "vllm")
    assert [tops(d) for d in dists[:-1]] == [g["top"] for g in guesses]
    assert tops(dists[-1]) == f["expected"]["after_last_guess"][0]["top"]


def test_vllm_tokens_as_text_are_refused_in_one_line():
    f = fixture("vllm_completion_logprobs_strings")
    with pytest.raises(ServerError, match="as text, not as an id"):
        OpenAIProtocol(None).read_generation(f["response"], f["request"]["logprobs"], "vllm")


def test_numeric_token_text_is_not_read_as_an_id():
    """A server that ignores return_tokens_as_token_ids writes each token's TEXT; a token whose text is a
    number ("3") must not pass for the id 3."""
    f = fixture("vllm_completion_logprobs_strings")
    reply = json.loads(json.dumps(f["response"]))
    reply["choices"][0]["logprobs"].update(tokens=["3"], token_logprobs=[-0.1], text_offset=[0],
                                           top_logprobs=[{"3": -0.1, "4": -2.5, "12": -3.0}])
    with pytest.raises(ServerError, match="'3' as text, not as an id"):
        OpenAIProtocol(None).read_generation(reply, 3, "vllm")


def test_llama_servers_openai_shape_names_the_protocol_to_use():
    f = fixture("llamacpp_v1_completions")
    with pytest.raises(ServerError, match="llama-server's .* use --\\*-protocol llama.cpp"):
        OpenAIProtocol(None).read_generation(f["response"], f["request"]["logprobs"], "llama.cpp")


def test_a_strings_only_server_is_refused_at_the_probe_naming_the_setting():
    """SGLang's /v1/completions keys log-probs by token text (recorded): refused before any real request, in
    one line that says what gives ids (vLLM's flag, or SGLang's native protocol)."""
    f = fixture("sglang_completion_logprobs")

    async def reply(request, n):
        return web.json_response(f["response"])
    server = LocalServer({"/v1/completions": reply})
    try:
        async def go():
            async with HttpClient() as client:
                model = ServedModel("teacher", [server.url], "openai", None, client, vocab_size=49152)
                await model.probe(5, False, f["request"]["prompt"])
        with pytest.raises(ServerError) as e:
            run_sync(go())
        text = str(e.value)
        assert "\n" not in text and f"teacher server {server.url}" in text and "as text, not as an id" in text
        assert "--return-tokens-as-token-ids" in text and "--*-protocol sglang" in text
    finally:
        server.stop()


@pytest.mark.parametrize("name, says", [("vllm_error_logprobs_cap", "greater than max allowed: 20"),
                                        ("vllm_error_prompt_logprobs_cap", "max allowed"),
                                        ("vllm_error_model_not_found", "does not exist")])
def test_vllm_errors_come_back_as_one_line(name, says):
    f = fixture(name)

    async def reply(request, n):
        return web.json_response(f["response"], status=f["status"])
    server = LocalServer({"/v1/completions": reply})
    try:
        async def go():
            async with HttpClient() as client:
                return await client.post_json(server.url + "/v1/completions", f["request"])
        with pytest.raises(ServerError) as e:
            run_sync(go())
        assert says in str(e.value) and "\n" not in str(e.value) and f"HTTP {f['status']}" in str(e.value)
        assert server.hits["/v1/completions"] == 1  # a 4xx is not retried
    finally:
        server.stop()


def test_llamacpp_native_reply_reads_ids_and_topk():
    f = fixture("llamacpp_completion_native")
    k = f["request"]["n_probs"]
    ids, dists = LlamaCppProtocol().read_generation(f["response"], k, "llama.cpp")
    probs = f["response"]["completion_probabilities"]
    assert ids == f["response"]["tokens"] == [p["id"] for p in probs]
    for d, p in zip(dists, probs):
        assert list(d.ids) == [t["id"] for t in p["top_logprobs"]]
        assert list(d.logprobs) == pytest.approx([t["logprob"] for t in p["top_logprobs"]])
