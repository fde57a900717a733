"""Captures llama-server's real responses into llamacpp_*.json here and prints the protocol facts it measured.

    PYTHONPATH=src python tests/data/served/capture_llamacpp.py

Starts the SmolLM2 teacher (tests/serving.py) with 4 slots, asks it what docs/serving-protocols.md says it
answers, and writes each request with its response. Facts printed: whether returned log-probs ignore the
sampler settings, whether repeats, cache_prompt and concurrent requests change a single bit, the log-prob cap.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import urllib.error
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))

from serving import get_json, post_json, smollm2_pair, start_llama_server  # noqa: E402


def write(name: str, obj: dict) -> None:
    (HERE / name).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def post_any(url: str, body: dict) -> tuple[int, dict]:
    try:
        return 200, post_json(url, body)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def dists(resp: dict) -> list[dict[int, float]]:
    """Per generated position: {id: logprob} of the returned top tokens (native /completion)."""
    return [{t["id"]: t["logprob"] for t in p["top_logprobs"]} for p in resp["completion_probabilities"]]


def maxdiff(a: list[dict], b: list[dict]) -> float:
    """Largest |difference| of log-probs at matching positions and ids (inf if the id sets differ)."""
    worst = 0.0
    for x, y in zip(a, b):
        if set(x) != set(y):
            return math.inf
        worst = max(worst, max(abs(x[i] - y[i]) for i in x))
    return worst


def main() -> None:
    from transformers import AutoTokenizer

    pair = smollm2_pair()
    tok = AutoTokenizer.from_pretrained(pair["teacher_dir"])
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False)
    prompt = list(tok(text, add_special_tokens=False)["input_ids"])
    srv = start_llama_server(pair["teacher_gguf"], parallel=4, ctx=4096, alias="smollm2-135m-teacher")
    url = srv.url
    facts: dict = {"prompt_len": len(prompt)}
    try:
        base = {"prompt": prompt, "n_predict": 3, "n_probs": 5, "temperature": 0, "return_tokens": True,
                "cache_prompt": True}
        r1 = post_json(url + "/completion", base)
        write("llamacpp_completion_native.json", {"endpoint": "POST /completion", "request": base, "status": 200,
                                                  "response": r1})
        facts["ids_as_ids"] = all(isinstance(p["id"], int) for p in r1["completion_probabilities"])
        facts["tokens_field"] = r1["tokens"]

        # the sampler chain does not touch the returned log-probs (pre-sampling = raw softmax at T=1)
        greedy = post_json(url + "/completion", {**base, "n_predict": 1})
        hot = post_json(url + "/completion", {**base, "n_predict": 1, "temperature": 0.3, "top_k": 2, "seed": 1})
        facts["probs_ignore_temperature_and_top_k"] = dists(greedy) == dists(hot)
        post = post_json(url + "/completion", {**base, "n_predict": 1, "temperature": 0.7, "top_k": 3, "seed": 1,
                                               "post_sampling_probs": True})
        write("llamacpp_completion_post_sampling.json", {"endpoint": "POST /completion",
                                                         "request": {**base, "n_predict": 1, "temperature": 0.7,
                                                                     "top_k": 3, "seed": 1, "post_sampling_probs": True},
                                                         "status": 200, "response": post})
        raw = dists(greedy)[0]
        facts["raw_logprob_sum_exp_top5"] = sum(math.exp(v) for v in raw.values())
        facts["post_sampling_top_probs"] = [[t["id"], t["prob"]] for t in post["completion_probabilities"][0]["top_probs"]]

        # repeats, cache_prompt and concurrency: bit-identical?
        again = post_json(url + "/completion", base)
        facts["repeat_bit_identical"] = dists(again) == dists(r1)
        nocache = post_json(url + "/completion", {**base, "cache_prompt": False})
        facts["cache_prompt_false_vs_true_maxdiff"] = maxdiff(dists(nocache), dists(r1))
        facts["cache_prompt_false_vs_true_identical"] = dists(nocache) == dists(r1)
        # one token at a time (lockstep) vs prefill of the whole prefix
        step = post_json(url + "/completion", {**base, "prompt": prompt + r1["tokens"][:1], "n_predict": 1})
        facts["lockstep_step2_vs_generated_step2_maxdiff"] = maxdiff(dists(step), dists(r1)[1:2])
        others = [{**base, "prompt": prompt[:-3] + [t], "n_predict": 8, "cache_prompt": False} for t in (28, 29, 30)]
        out: list = [None] * 4

        def go(i, body):
            out[i] = post_json(url + "/completion", body)

        threads = [threading.Thread(target=go, args=(i, b)) for i, b in enumerate(others + [{**base, "cache_prompt": False}])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        facts["concurrent_vs_alone_nocache_maxdiff"] = maxdiff(dists(out[3]), dists(nocache))
        facts["concurrent_vs_alone_nocache_identical"] = dists(out[3]) == dists(nocache)
        # a cached one-token step (lockstep) while 3 other slots are decoding: same bits as alone?
        probe = {**base, "prompt": prompt + r1["tokens"][:1], "n_predict": 1}
        post_json(url + "/completion", probe)
        alone = post_json(url + "/completion", probe)
        busy = [{**base, "prompt": prompt[:-2] + [t], "n_predict": 24, "cache_prompt": False} for t in (28, 29, 30)]
        out = [None] * 4
        threads = [threading.Thread(target=go, args=(i, b)) for i, b in enumerate(busy)]
        for t in threads:
            t.start()
        import time
        time.sleep(0.3)
        go(3, probe)
        for t in threads:
            t.join()
        facts["concurrent_step_vs_alone_maxdiff"] = maxdiff(dists(out[3]), dists(alone))
        facts["concurrent_step_vs_alone_identical"] = dists(out[3]) == dists(alone)
        facts["concurrent_step_tokens_cached"] = out[3].get("tokens_cached"), alone.get("tokens_cached")

        # the log-prob cap: ask for more than anyone needs
        big = post_json(url + "/completion", {**base, "n_predict": 1, "n_probs": 1000})
        facts["n_probs_1000_returned"] = len(big["completion_probabilities"][0]["top_logprobs"])
        whole = post_json(url + "/completion", {**base, "n_predict": 1, "n_probs": 10 ** 6})
        facts["n_probs_1e6_returned"] = len(whole["completion_probabilities"][0]["top_logprobs"])

        # a drafted verification in ONE request: a grammar of token ids forces the guesses; the log-probs
        # returned at each forced position are the raw distributions there (same as lockstep?)
        third = dists(r1)[2]
        guesses = r1["tokens"][:2] + [sorted(third, key=lambda i: -third[i])[3]]  # the last guess is wrong
        gram = "root ::= " + " ".join(f"<[{g}]>" for g in guesses) + " !<[0]>"
        forced = post_json(url + "/completion", {**base, "n_predict": 4, "grammar": gram})
        write("llamacpp_completion_grammar_forced.json", {"endpoint": "POST /completion",
                                                          "request": {**base, "n_predict": 4, "grammar": gram},
                                                          "status": 200, "response": forced})
        facts["grammar_forced_tokens"] = forced["tokens"]
        lock = [post_json(url + "/completion", {**base, "prompt": prompt + guesses[:i], "n_predict": 1}) for i in range(4)]
        facts["grammar_forced_vs_lockstep_maxdiff"] = maxdiff(dists(forced), [dists(x)[0] for x in lock])
        facts["grammar_forced_vs_lockstep_identical"] = dists(forced) == [dists(x)[0] for x in lock]
        # the other way: the K+1 prefixes as parallel requests (4 slots)
        par: list = [None] * 4
        threads = [threading.Thread(target=lambda i=i: par.__setitem__(i, post_json(url + "/completion", {
            **base, "prompt": prompt + guesses[:i], "n_predict": 1}))) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        facts["parallel_prefixes_vs_lockstep_maxdiff"] = maxdiff([dists(x)[0] for x in par], [dists(x)[0] for x in lock])
        facts["parallel_prefixes_vs_lockstep_identical"] = [dists(x)[0] for x in par] == [dists(x)[0] for x in lock]
        facts["parallel_prefixes_prompt_n"] = [x["timings"]["prompt_n"] for x in par]

        # OpenAI-compatible /v1/completions
        oai = {"model": "smollm2-135m-teacher", "prompt": prompt, "max_tokens": 2, "temperature": 0, "logprobs": 5}
        status, v1 = post_any(url + "/v1/completions", oai)
        write("llamacpp_v1_completions.json", {"endpoint": "POST /v1/completions", "request": oai, "status": status,
                                               "response": v1})
        status, echo = post_any(url + "/v1/completions", {**oai, "echo": True})
        write("llamacpp_v1_completions_echo_ignored.json", {"endpoint": "POST /v1/completions",
                                                          "request": {**oai, "echo": True}, "status": status, "response": echo})
        status, bad = post_any(url + "/completion", {**base, "prompt": prompt + [10 ** 7]})
        write("llamacpp_error_bad_token.json", {"endpoint": "POST /completion",
                                                "request": {**base, "prompt": "<prompt> + [10000000]"}, "status": status,
                                                "response": bad})
        status, long = post_any(url + "/completion", {**base, "prompt": prompt * 60})
        write("llamacpp_error_context.json", {"endpoint": "POST /completion", "request": {**base, "prompt": "<prompt> * 60"},
                                              "status": status, "response": long})
        for path, name in (("/props", "llamacpp_props.json"), ("/v1/models", "llamacpp_v1_models.json"),
                           ("/health", "llamacpp_health.json")):
            write(name, {"endpoint": "GET " + path, "status": 200, "response": get_json(url + path)})
    finally:
        srv.stop()
    print(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main()
