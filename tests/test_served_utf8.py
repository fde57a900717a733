"""llama-server holds back the probabilities of a generated token that ends inside a UTF-8 character (a byte
token) until a later token completes the character: a one-token request on such a position comes back with
its token and no `completion_probabilities`. Seen on the SmolLM2 pair (bench/served_speed.py rounds --pair
smollm2 --k 3 stopped on it). The served model asks for up to 3 more greedy tokens and keeps the first ones."""

from __future__ import annotations

import asyncio

import pytest

from tracetailor.serving.http import ServerError
from tracetailor.serving.model import ServedModel
from tracetailor.serving.protocol import CutCharacter, LlamaCppProtocol


def _entry(token: int, top: dict[int, float]) -> dict:
    return {"id": token, "logprob": top[token], "top_logprobs": [{"id": i, "logprob": lp} for i, lp in top.items()]}


TOP = {7: -0.1, 3: -2.5}  # token 7 is a lead byte of a 2-byte character, 8 its continuation
REPLIES = {  # n_predict -> the reply a llama-server gives after the prompt: token 7 then 8 complete one character
    1: {"tokens": [7], "completion_probabilities": []},
    2: {"tokens": [7, 8], "completion_probabilities": [_entry(7, TOP), _entry(8, {8: -0.2, 5: -1.9})]},
}


def _model(replies: dict, asked: list) -> ServedModel:
    model = ServedModel("teacher", ["http://127.0.0.1:1"], "llama.cpp", None, client=None, vocab_size=100)

    async def post(payload):
        asked.append(payload["n_predict"])
        model.requests += 1
        return replies[payload["n_predict"]], "http://127.0.0.1:1"

    model._post = post
    return model


def test_the_protocol_names_a_reply_cut_inside_a_character():
    with pytest.raises(CutCharacter, match="inside a UTF-8 character") as cut:
        LlamaCppProtocol(None).read_generation(REPLIES[1], 2, "teacher server X")
    assert cut.value.ids == [] and isinstance(cut.value, ServerError)


def test_one_more_token_gives_the_held_back_probabilities():
    asked = []
    tokens, dists = asyncio.run(_model(REPLIES, asked).generate([1, 2, 3], 1, 2))
    assert asked == [1, 2]  # asked again for one more token, and only the first position kept
    assert tokens == [7] and list(dists[0].ids) == [7, 3]


def test_a_character_never_completed_is_one_error():
    asked = []
    never = {n: {"tokens": [7] * n, "completion_probabilities": []} for n in range(1, 5)}
    with pytest.raises(CutCharacter, match="teacher server"):
        asyncio.run(_model(never, asked).generate([1, 2, 3], 1, 2))
    assert asked == [1, 2, 3, 4]
