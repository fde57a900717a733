"""Writes the vLLM and SGLang response fixtures in this folder (run once; the JSON files are committed).

vLLM and SGLang cannot run on this machine, so their responses are RENDERED, not captured: the numbers are
SmolLM2-135M-Instruct's own log-probs (the offline GGUF, de-quantised, computed in-process in float32 with
transformers), and the JSON around them follows, field for field, the code of vLLM 0.33.0 and SGLang 0.5.23
cited in docs/serving-protocols.md (each fixture's "source" names the file and lines). The llamacpp_*.json
files are real captures from llama-server (tests/test_llama_server.py writes them with --capture).

    PYTHONPATH=src python tests/data/served/make_fixtures.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
K = 5  # top log-probs asked for (the paper's 20 has the same shape; 5 keeps the files readable)
QUESTION = "What is 2 + 3?"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def f32(x) -> float:
    """A float32 value as vLLM/SGLang put it in JSON (tensor.tolist() of float32: the float32 value as a double)."""
    return float(np.float32(x))


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracetailor.assets import smollm2_gguf

    g = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    return tok, model


def logprobs_at(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] log-softmax of the logits at every position (row i predicts token i+1)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def top(row: torch.Tensor, k: int) -> list[tuple[int, float]]:
    v, i = torch.topk(row, k)
    return [(int(a), f32(b)) for a, b in zip(i, v)]


def rank(row: torch.Tensor, tok: int) -> int:
    return int((row > row[tok]).sum()) + 1


def vllm_sample_logprobs(tok, rows, out_ids, as_ids: bool) -> dict:
    """CompletionLogProbs as vllm/entrypoints/openai/completion/serving.py:714-804 builds it."""
    name = (lambda t: f"token_id:{t}") if as_ids else (lambda t: tok.decode([t]))
    lp = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for row, t in zip(rows, out_ids):
        # vllm/logprobs.py:178-209: the sampled token first (its own rank), then the top-k; a dict, so a sampled
        # token inside the top-k appears once; serving.py:784-789 keeps the first logprobs+1 entries
        entries = {t: f32(row[t])}
        for a, b in top(row, K):
            entries.setdefault(a, b)
        shown = dict(list(entries.items())[: K + 1])
        lp["text_offset"].append(lp["text_offset"][-1] + len(lp["tokens"][-1]) if lp["tokens"] else 0)
        lp["tokens"].append(name(t))
        lp["token_logprobs"].append(max(f32(row[t]), -9999.0))
        lp["top_logprobs"].append({name(a): max(b, -9999.0) for a, b in shown.items()})
    return lp


def vllm_response(model_name, choice: dict, n_prompt: int, n_out: int) -> dict:
    """CompletionResponse.model_dump() (vllm/entrypoints/openai/completion/protocol.py:668-723)."""
    return {"id": "cmpl-8c1f0b6e2a4d4e0f9a3c5b7d1e2f3a4b", "object": "text_completion", "created": 1765152000,
            "model": model_name, "choices": [choice], "service_tier": None, "system_fingerprint": None,
            "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_out, "completion_tokens": n_out,
                      "prompt_tokens_details": None, "completion_tokens_details": None},
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def vllm_choice(text, logprobs, prompt_logprobs=None) -> dict:
    return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length", "stop_reason": None,
            "token_ids": None, "prompt_logprobs": prompt_logprobs, "prompt_token_ids": None,
            "routed_experts": None, "weight_versions": None}


def greedy(model, ids, n):
    out, rows = [], []
    for _ in range(n):
        row = logprobs_at(model, ids + out)[-1]
        rows.append(row)
        out.append(int(row.argmax()))
    return out, rows


def write(name: str, obj: dict) -> None:
    (HERE / name).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def expected_positions(rows, ids) -> list[dict]:
    """What a client should read from a fixture: per position the token and its top-K (id, logprob)."""
    return [{"token": t, "logprob": f32(r[t]), "top": top(r, K)} for r, t in zip(rows, ids)]


def main() -> None:
    tok, model = load()
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)
    prompt = list(tok(text, add_special_tokens=False)["input_ids"])
    src_v = "vllm 0.33.0: vllm/entrypoints/openai/completion/serving.py:560-660,714-804; protocol.py:668-723; vllm/logprobs.py:178-209"

    # 1. lockstep / student draft: 3 greedy tokens, top-K log-probs at each, ids as ids
    out, rows = greedy(model, prompt, 3)
    req = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": K,
           "return_tokens_as_token_ids": True}
    write("vllm_completion_logprobs.json", {
        "source": src_v, "endpoint": "POST /v1/completions", "request": req, "status": 200,
        "response": vllm_response(MODEL, vllm_choice(tok.decode(out), vllm_sample_logprobs(tok, rows, out, True)),
                                  len(prompt), 3),
        "expected": expected_positions(rows, out)})

    # 1b. the same without return_tokens_as_token_ids: tokens are decoded strings (a client must map them back)
    write("vllm_completion_logprobs_strings.json", {
        "source": src_v, "endpoint": "POST /v1/completions", "request": {**req, "return_tokens_as_token_ids": False},
        "status": 200,
        "response": vllm_response(MODEL, vllm_choice(tok.decode(out), vllm_sample_logprobs(tok, rows, out, False)),
                                  len(prompt), 3),
        "expected": expected_positions(rows, out)})

    # 1c. sampling at temperature 1 where the sampled token is outside the top-K: top_logprobs has K+1 entries
    row = logprobs_at(model, prompt)[-1]
    outside = int(torch.topk(row, K + 3).indices[-1])
    write("vllm_completion_logprobs_sampled_outside_topk.json", {
        "source": src_v, "endpoint": "POST /v1/completions",
        "request": {**req, "max_tokens": 1, "temperature": 1.0, "seed": 0}, "status": 200,
        "note": f"the sampled token (rank {rank(row, outside)}) comes first, then the top-{K}: {K + 1} entries",
        "response": vllm_response(MODEL, vllm_choice(tok.decode([outside]),
                                                     vllm_sample_logprobs(tok, [row], [outside], True)), len(prompt), 1),
        "expected": expected_positions([row], [outside])})

    # 2. drafted verification: prompt = context + 3 guesses (the third one wrong), prompt log-probs at every prompt
    #    position, plus one generated token with its top-K: the teacher's K+1 distributions in one request
    guesses = out[:2] + [int(torch.topk(rows[2], 4).indices[-1])]
    full = prompt + guesses
    all_rows = logprobs_at(model, full)
    plp = [None]
    for i in range(1, len(full)):
        r = all_rows[i - 1]
        entry = {str(full[i]): {"logprob": f32(r[full[i]]), "rank": rank(r, full[i]), "decoded_token": tok.decode([full[i]])}}
        for rk, (a, b) in enumerate(top(r, K), 1):
            entry.setdefault(str(a), {"logprob": b, "rank": rk, "decoded_token": tok.decode([a])})
        plp.append(entry)
    last = all_rows[-1]
    nxt = int(last.argmax())
    req2 = {"model": MODEL, "prompt": full, "max_tokens": 1, "temperature": 0, "logprobs": K, "prompt_logprobs": K,
            "return_tokens_as_token_ids": True}
    write("vllm_prompt_logprobs.json", {
        "source": src_v + "; prompt log-probs: vllm/v1/engine/logprobs.py, vllm/logprobs.py:165-170 (first entry None)",
        "endpoint": "POST /v1/completions", "request": req2, "status": 200,
        "note": "prompt_logprobs[i] is the distribution that predicted prompt token i (keys are ids as strings, "
                "the prompt token first with its own rank); prompt_logprobs[0] is null. return_tokens_as_token_ids "
                "does not touch prompt_logprobs. The guesses are the last 3 prompt tokens.",
        "response": vllm_response(MODEL, vllm_choice(tok.decode([nxt]), vllm_sample_logprobs(tok, [last], [nxt], True), plp),
                                  len(full), 1),
        "expected": {"guess_positions": expected_positions([all_rows[i - 1] for i in range(len(prompt), len(full))], guesses),
                     "after_last_guess": expected_positions([last], [nxt])}})

    # 3. errors (vllm/sampling_params.py:923-981 raises; serve/exception_handling/error_response.py:14-105 shapes)
    src_e = "vllm 0.33.0: vllm/sampling_params.py:923-981; vllm/exceptions.py:28-56; vllm/entrypoints/serve/exception_handling/error_response.py:14-105"
    write("vllm_error_logprobs_cap.json", {
        "source": src_e, "endpoint": "POST /v1/completions", "request": {**req, "logprobs": 25}, "status": 400,
        "response": {"error": {"message": "Requested sample logprobs of 25, which is greater than max allowed: 20 "
                                          "(parameter=logprobs, value=25)", "type": "BadRequestError",
                               "param": "logprobs", "code": 400}}})
    write("vllm_error_prompt_logprobs_cap.json", {
        "source": src_e, "endpoint": "POST /v1/completions", "request": {**req2, "prompt_logprobs": 25}, "status": 400,
        "response": {"error": {"message": "Requested prompt logprobs of 25, which is greater than max allowed: 20 "
                                          "(parameter=prompt_logprobs, value=25)", "type": "BadRequestError",
                               "param": "prompt_logprobs", "code": 400}}})
    write("vllm_error_model_not_found.json", {
        "source": "vllm 0.33.0: vllm/entrypoints/serve/engine/serving.py:75-84", "endpoint": "POST /v1/completions",
        "request": {**req, "model": "no-such-model"}, "status": 404,
        "response": {"error": {"message": f"The model `no-such-model` does not exist. Valid aliases: {MODEL}.",
                               "type": "NotFoundError", "param": "model", "code": 404}}})
    write("vllm_models.json", {
        "source": "vllm 0.33.0: vllm/entrypoints/serve/engine/protocol.py:90-118", "endpoint": "GET /v1/models",
        "status": 200,
        "response": {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1765152000, "owned_by": "vllm",
                                                 "root": MODEL, "parent": None, "max_model_len": 8192, "permission": [
                {"id": "modelperm-0f3e", "object": "model_permission", "created": 1765152000, "allow_create_engine": False,
                 "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                 "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}]}]}})

    # 4. SGLang native /generate: the drafted verification with logprob_start_len (prefix cache kept up to it)
    s = len(prompt) - 1  # the first returned position; its own log-prob is null (the model did not predict it here)
    triple = lambda lp, t: [lp, t, None]  # noqa: E731 - (logprob, token_id, text); text only with return_text_in_logprobs
    in_tok = [triple(None, full[s])] + [triple(f32(all_rows[i - 1][full[i]]), full[i]) for i in range(s + 1, len(full))]
    in_top = [None] + [[triple(b, a) for a, b in top(all_rows[i - 1], K)] for i in range(s + 1, len(full))]
    req3 = {"input_ids": full, "sampling_params": {"max_new_tokens": 1, "temperature": 0}, "return_logprob": True,
            "logprob_start_len": s, "top_logprobs_num": K}
    write("sglang_generate_logprobs.json", {
        "source": "sglang 0.5.23: sglang/srt/managers/io_struct.py:177-247 (request); tokenizer_manager.py:2507-2530, "
                  "2840-2973, 3098-3116 (meta_info); scheduler_components/logprob_result_processor.py:26-85 "
                  "(leading None, last row dropped); schedule_batch.py:1766-1775 (prefix cache capped at logprob_start_len)",
        "endpoint": "POST /generate", "request": req3, "status": 200,
        "note": "entries are [logprob, token_id, text-or-null]; input_* start at logprob_start_len with a null first "
                "logprob; output_* carry the distribution after the last guess",
        "response": {"text": tok.decode([nxt]), "output_ids": [nxt], "meta_info": {
            "id": "5b0e9d6c3f2a4c1e8d7b6a5f4e3d2c1b", "finish_reason": {"type": "length", "length": 1},
            "prompt_tokens": len(full), "weight_version": "default", "num_retractions": 0,
            "input_token_logprobs": in_tok, "output_token_logprobs": [triple(f32(last[nxt]), nxt)],
            "output_token_logprobs_length": 1, "input_top_logprobs": in_top,
            "output_top_logprobs": [[triple(b, a) for a, b in top(last, K)]],
            "reasoning_tokens": 0, "completion_tokens": 1, "cached_tokens": s, "e2e_latency": 0.0213}},
        "expected": {"guess_positions": expected_positions([all_rows[i - 1] for i in range(len(prompt), len(full))], guesses),
                     "after_last_guess": expected_positions([last], [nxt])}})

    # 5. SGLang OpenAI /v1/completions: top_logprobs keyed by TEXT (no ids option); text_offset is -1
    lp = {"text_offset": [-1] * 3, "token_logprobs": [f32(r[t]) for r, t in zip(rows, out)],
          "tokens": [tok.decode([t]) for t in out],
          "top_logprobs": [{tok.decode([a]): b for a, b in top(r, K)} for r in rows]}
    write("sglang_completion_logprobs.json", {
        "source": "sglang 0.5.23: sglang/srt/entrypoints/openai/protocol.py:150-154,365-526; serving_completions.py:71-135; "
                  "entrypoints/openai/utils.py:126-175",
        "endpoint": "POST /v1/completions", "request": {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0,
                                                        "logprobs": K, "return_token_ids": True},
        "status": 200, "note": "token strings only: two ids with one text collide in a top_logprobs object; "
                               "token_ids (return_token_ids) gives the generated ids",
        "response": {"id": "d2c4e6f8a0b1c3d5e7f9a1b3c5d7e9f1", "object": "text_completion", "created": 1765152000,
                     "model": MODEL, "choices": [{"index": 0, "text": tok.decode(out), "logprobs": lp,
                                                  "finish_reason": "length", "matched_stop": None, "token_ids": out}],
                     "usage": {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + 3, "completion_tokens": 3,
                               "prompt_tokens_details": None, "reasoning_tokens": 0, "completion_tokens_details": None}, "metadata": {"weight_version": "default"}},
        "expected": expected_positions(rows, out)})


if __name__ == "__main__":
    main()
