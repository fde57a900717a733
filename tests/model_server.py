"""A small real model behind a real HTTP server, for the served-model tests of the default suite.

It serves a transformers model (the tests' tiny random-weight pairs, loaded by path) on 127.0.0.1 in the
three wire shapes tracetailor speaks: vLLM's `/v1/completions` (token-id prompts, `logprobs`, ids as
`token_id:N`, `prompt_logprobs` entries `{id: {logprob, rank, decoded_token}}` holding the top-k plus
the prompt's own token), SGLang's native `/generate` (`input_ids`, `return_logprob`, `top_logprobs_num`,
`logprob_start_len`; `meta_info` with `[logprob, id, null]` triples, the input lists from logprob_start_len
with a null first entry) and llama-server's native `/completion` (`n_probs`, `completion_probabilities`).
The shapes are docs/serving-protocols.md's.
Log-probs are computed in float64 and rounded to float32: the same prefix gives the same numbers whatever
the request (a one-token step or a position inside a prompt), as a batch-invariant server does. Greedy
generation is argmax. The real third-party server (llama.cpp's) is tested in tests/test_serve_llamacpp.py;
this one makes the end-to-end path fast enough for every run of the suite.
"""

from __future__ import annotations

import torch

from local_app import AppThread


class ModelServer:
    def __init__(self, model_dir: str, *, name: str = "tiny", max_logprobs: int = 20, prompt_logprobs: bool = True,
                 gguf_file: str | None = None):
        from aiohttp import web
        from transformers import AutoModelForCausalLM

        extra = {"gguf_file": gguf_file} if gguf_file else {}  # a GGUF is de-quantised by transformers
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, **extra).eval()
        self.name, self.max_logprobs, self.prompt_logprobs = name, max_logprobs, prompt_logprobs
        self.requests = 0
        self.spans: list[tuple[int, int]] = []  # (logprob_start_len, prompt length) of each /generate that set it
        app = web.Application()
        app.router.add_post("/v1/completions", self._openai)
        app.router.add_post("/completion", self._llamacpp)
        app.router.add_post("/generate", self._sglang)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", lambda r: web.json_response({"status": "ok"}))
        self._web = web
        self._server = AppThread(app)
        self.port, self.url = self._server.port, self._server.url

    def stop(self):
        self._server.stop()

    # -- the model ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """float32-rounded log-probs at every position of `ids` [len, V]; row j predicts token j + 1. The
        model runs in float64, so a row computed in a longer forward rounds to the same float32 as from a
        forward of its prefix alone (a flip would need a float64 difference at a float32 rounding edge)."""
        return torch.log_softmax(self.model(torch.tensor([ids])).logits[0], -1).float()

    @torch.no_grad()
    def _last(self, ids: list[int]) -> torch.Tensor:
        """The float32-rounded log-probs after `ids`, from one forward of `ids` alone."""
        return torch.log_softmax(self.model(torch.tensor([ids])).logits[0, -1], -1).float()

    def _greedy(self, ids: list[int], n: int, temperature: float = 0.0, seed: int = 0
                ) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy tokens (temperature 0) or sampled ones (seeded), up to n, ending at EOS."""
        tokens, rows = [], []
        ctx = list(ids)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(n):
            row = self._last(ctx)
            if temperature > 0:
                tok = int(torch.multinomial(torch.softmax(row.double() / temperature, -1), 1, generator=gen))
            else:
                tok = int(row.double().argmax())
            tokens.append(tok)
            rows.append(row)
            ctx.append(tok)
            if tok == self.model.config.eos_token_id:
                break
        return tokens, rows

    @staticmethod
    def _top(row: torch.Tensor, k: int) -> list[tuple[int, float]]:
        """The k likeliest (id, log-prob), ties by the lowest id (a stable sort)."""
        vals, ids = torch.sort(-row, stable=True)
        return list(zip(ids[:k].tolist(), (-vals[:k]).tolist()))

    # -- the wire shapes -------------------------------------------------------------------------------
    async def _models(self, request):
        return self._web.json_response({"object": "list", "data": [{"id": self.name, "object": "model",
                                                                    "max_model_len": 512}]})

    async def _openai(self, request):
        body = await request.json()
        self.requests += 1
        web = self._web
        if body.get("model") not in (None, self.name):
            return web.json_response({"error": {"message": f"The model `{body['model']}` does not exist.",
                                                 "type": "NotFoundError", "code": 404}}, status=404)
        k = body.get("logprobs") or 0
        pk = body.get("prompt_logprobs")
        if max(k, pk or 0) > self.max_logprobs:
            return web.json_response({"error": {"message": f"Requested sample logprobs of {max(k, pk or 0)}, which "
                                                 f"is greater than max allowed: {self.max_logprobs}",
                                                 "type": "BadRequestError", "code": 400}}, status=400)
        ids = body["prompt"]
        tokens, rows = self._greedy(ids, body.get("max_tokens", 16), body.get("temperature", 1.0), body.get("seed", 0))
        eos = self.model.config.eos_token_id
        choice = {"index": 0, "text": "", "finish_reason": "stop" if tokens and tokens[-1] == eos else "length",
                  "stop_reason": None,
                  "logprobs": {"text_offset": list(range(len(tokens))),
                               "tokens": [f"token_id:{t}" for t in tokens],
                               "token_logprobs": [float(r[t]) for t, r in zip(tokens, rows)],
                               "top_logprobs": [{f"token_id:{i}": lp for i, lp in self._top(r, k)} for r in rows]}}
        if pk is not None:
            if not self.prompt_logprobs:
                return web.json_response({"error": {"message": "prompt_logprobs is not supported"}}, status=400)
            all_rows = self._logprobs(ids)
            vals, order = torch.sort(-all_rows, dim=-1, stable=True)
            entries = [None]
            for j in range(1, len(ids)):
                row = all_rows[j - 1]
                top = list(zip(order[j - 1, :pk].tolist(), (-vals[j - 1, :pk]).tolist()))
                entry = {str(i): {"logprob": lp, "rank": r + 1, "decoded_token": f"token_id:{i}"}
                         for r, (i, lp) in enumerate(top)}
                own = ids[j]
                if str(own) not in entry:  # the prompt's own token, with its true rank
                    rank = 1 + int((row > row[own]).sum())
                    entry[str(own)] = {"logprob": float(row[own]), "rank": rank, "decoded_token": f"token_id:{own}"}
                entries.append(entry)
            choice["prompt_logprobs"] = entries
        return web.json_response({"id": "cmpl-test", "object": "text_completion", "model": self.name,
                                  "choices": [choice], "usage": {"prompt_tokens": len(ids),
                                                                 "completion_tokens": len(tokens)}})

    async def _llamacpp(self, request):
        body = await request.json()
        self.requests += 1
        k = body.get("n_probs", 0)
        tokens, rows = self._greedy(body["prompt"], body.get("n_predict", 16))
        probs = [{"id": t, "token": "", "bytes": [], "logprob": float(r[t]),
                  "top_logprobs": [{"id": i, "token": "", "bytes": [], "logprob": lp} for i, lp in self._top(r, k)]}
                 for t, r in zip(tokens, rows)]
        return self._web.json_response({"content": "", "tokens": tokens, "completion_probabilities": probs,
                                        "stop": True, "stop_type": "limit", "model": self.name})

    async def _sglang(self, request):
        body = await request.json()
        self.requests += 1
        ids, params = body["input_ids"], body.get("sampling_params") or {}
        start = body.get("logprob_start_len", -1)
        if start not in (None, -1):
            self.spans.append((start, len(ids)))
        start = len(ids) - 1 if start in (None, -1) else start
        if start >= len(ids):  # SGLang aborts such a request with a 400 (scheduler.handle_generate_request)
            return self._web.json_response({"error": {"message": f"logprob_start_len, ({start}) is higher than the "
                                                                 f"number of input tokens ({len(ids)})."}}, status=400)
        tokens, rows = self._greedy(ids, params.get("max_new_tokens", 128), params.get("temperature", 1.0),
                                    params.get("sampling_seed") or 0)
        eos = self.model.config.eos_token_id
        finish = {"type": "stop", "matched": eos} if tokens and tokens[-1] == eos else {"type": "length",
                                                                                         "length": len(tokens)}
        meta = {"id": f"req-{self.requests}", "finish_reason": finish, "prompt_tokens": len(ids),
                "completion_tokens": len(tokens), "cached_tokens": 0}
        if body.get("return_logprob"):
            k = body.get("top_logprobs_num") or 0
            all_rows = self._logprobs(ids) if start + 1 < len(ids) else None  # the span's rows only when asked
            triple = (lambda i, lp: [lp, i, None])
            meta["input_token_logprobs"] = [triple(ids[start], None)] + [
                triple(ids[p], float(all_rows[p - 1][ids[p]])) for p in range(start + 1, len(ids))]
            meta["output_token_logprobs"] = [triple(t, float(r[t])) for t, r in zip(tokens, rows)]
            if k > 0:
                meta["input_top_logprobs"] = [None] + [[triple(i, lp) for i, lp in self._top(all_rows[p - 1], k)]
                                                       for p in range(start + 1, len(ids))]
                meta["output_top_logprobs"] = [[triple(i, lp) for i, lp in self._top(r, k)] for r in rows]
        return self._web.json_response({"text": "", "output_ids": tokens, "meta_info": meta})
