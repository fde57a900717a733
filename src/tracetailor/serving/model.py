"""A model behind a server, as the served engine sees it: the top-k distribution after a sequence of ids,
a greedy draft with the distribution at each drafted position, and the distributions over a span (prompt
log-probs where the protocol has them, else one request per prefix, all in flight at once).

Replicas: several URLs for one model take requests in turn. `probe()` asks each server, before any real
request, whether it serves this model, gives k log-probs and (for drafting with --verify-with
prompt-logprobs: vLLM's prompt_logprobs, SGLang's logprob_start_len) prompt log-probs; what it says goes in
run.json. Counters: requests and round trips (a round of requests that go out together counts once), which
the benchmarks report per emitted token.

It holds no cache and no state of a sequence: every request is pure, so a retry (serving/http.py) or a
resumed run asks again and gets the same answer.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from .http import HttpClient, ServerError
from .protocol import CutCharacter, TopK, make_protocol

UTF8_TAIL = 3  # a UTF-8 character is at most 4 bytes: at most 3 more byte tokens complete it


@dataclass
class ServedModel:
    role: str  # "teacher" or "student": how messages name it
    urls: list[str]
    protocol_name: str
    served_name: str | None
    client: HttpClient
    vocab_size: int | None = None  # ids at or above it are refused (a server of another model)
    prompt_logprobs: bool = False  # verify a draft with one prompt-log-prob request (where the protocol has them)
    requests: int = 0
    rounds: int = 0
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.protocol = make_protocol(self.protocol_name, self.served_name)
        self._next_url = itertools.cycle(self.urls)

    def _where(self, url: str) -> str:
        return f"{self.role} server {url}"

    async def _post(self, payload: dict) -> tuple[dict, str]:
        url = next(self._next_url)
        self.requests += 1
        return await self.client.post_json(url + self.protocol.path, payload), url

    def _check_ids(self, ids, where: str) -> None:
        if self.vocab_size is not None and any(i >= self.vocab_size for i in ids):
            raise ServerError(f"{where}: the server returned token id {max(ids)}, outside the {self.role}'s "
                              f"vocabulary of {self.vocab_size}; it serves another model than --{self.role}")

    async def _generate(self, ids: list[int], n: int, k: int) -> tuple[list[int], list[TopK]]:
        for ask in range(n, n + UTF8_TAIL + 1):  # greedy: asking for more tokens gives the same first ones
            reply, url = await self._post(self.protocol.generate(ids, ask, k))
            try:
                tokens, dists = self.protocol.read_generation(reply, k, self._where(url))
                break
            except CutCharacter as e:  # the last tokens end inside a UTF-8 character (llama-server)
                tokens, dists = e.ids, e.dists
                if len(tokens) >= n:
                    break
                if ask == n + UTF8_TAIL:
                    raise
        tokens, dists = tokens[:n], dists[:n]
        self._check_ids(tokens, self._where(url))
        for d in dists:
            self._check_ids(d.ids, self._where(url))
        return tokens, dists

    async def generate(self, ids: list[int], n: int, k: int) -> tuple[list[int], list[TopK]]:
        """Greedy tokens after `ids` (up to n: fewer when the model ends the sequence) and the top-k at each."""
        self.rounds += 1
        return await self._generate(ids, n, k)

    async def sample(self, ids: list[int], n: int, temperature: float, top_p: float, top_k: int, seed: int
                     ) -> tuple[list[int], list[float | None], str]:
        """A whole completion sampled by the server: (ids, log-probs, "stop" or "length")."""
        self.rounds += 1
        reply, url = await self._post(self.protocol.sample(ids, n, temperature, top_p, top_k, seed))
        tokens, lps, reason = self.protocol.read_sample(reply, self._where(url))
        self._check_ids(tokens, self._where(url))
        return tokens, lps, reason

    async def token_logprobs(self, ids: list[int], start: int) -> list[float]:
        """Teacher-forced: the log-prob of each of ids[start:] under its prefix, in one request (prompt
        log-probs; refused up front where the protocol has none)."""
        if not self.protocol.has_prompt_logprobs:
            raise ServerError(f"the {self.role} server speaks {self.protocol_name}, which has no prompt log-probs, so "
                              "it cannot score given tokens; use a vLLM or SGLang server, or score in-process")
        self.rounds += 1
        reply, url = await self._post(self.protocol.verify(ids, 1, start))
        return self.protocol.read_token_logprobs(reply, ids, start, self._where(url))

    async def next_topk(self, ids: list[int], k: int) -> TopK:
        """The distribution at the position after `ids`."""
        return (await self.generate(ids, 1, k))[1][0]

    async def span_topk(self, ids: list[int], ends: list[int], k: int) -> list[TopK]:
        """The distribution after `ids[:e]` for each e in `ends` (ascending, each <= len(ids)). One request
        with prompt log-probs, or one per prefix in parallel; either way one round trip."""
        self.rounds += 1
        if self.prompt_logprobs and self.protocol.has_prompt_logprobs:
            start = ends[0]
            reply, url = await self._post(self.protocol.verify(ids, k, start))
            dists = self.protocol.read_verify(reply, start, k, self._where(url), ids=ids)
            if len(dists) < len(ids) - start + 1:
                raise ServerError(f"{self._where(url)}: {len(dists)} prompt log-prob positions where "
                                  f"{len(ids) - start + 1} were expected")
            for d in dists:
                self._check_ids(d.ids, self._where(url))
            return [dists[e - start] for e in ends]
        out = await asyncio.gather(*[self._generate(ids[:e], 1, k) for e in ends])
        return [dists[0] for _, dists in out]

    async def probe(self, k: int, draft: bool, prompt: list[int]) -> dict:
        """Ask every server one small request of each kind the run will send; a missing feature, a log-prob
        cap below k or a model it does not serve is a ServerError in one line, before any real request."""
        infos = []
        for url in self.urls:
            info = {"url": url, "protocol": self.protocol_name}
            where = self._where(url)
            info.update(await self._describe(url))
            if self.served_name and info.get("models") and self.served_name not in info["models"]:
                raise ServerError(f"{where} serves {', '.join(info['models'])}, not {self.served_name!r}; "
                                  f"set --{self.role}-served-name to one of them")
            reply = await self.client.post_json(url + self.protocol.path, self.protocol.generate(prompt, 1, k))
            self.protocol.read_generation(reply, k, where)
            if draft and self.prompt_logprobs and self.protocol.has_prompt_logprobs:
                reply = await self.client.post_json(url + self.protocol.path, self.protocol.verify(prompt, k, 1))
                self.protocol.read_verify(reply, 1, k, where, ids=prompt)
            infos.append(info)
        self.info = {"urls": list(self.urls), "protocol": self.protocol_name, "served_name": self.served_name,
                     "servers": infos}
        return self.info

    async def _describe(self, url: str) -> dict:
        """What the server says of itself (never fatal: an endpoint it lacks is left out)."""
        out: dict = {}
        for path in ("/v1/models", "/props", "/version"):
            try:
                reply = await self.client.get_json(url + path)
            except ServerError:
                continue
            if path == "/v1/models" and isinstance(reply, dict):
                models = [m for m in reply.get("data", []) if isinstance(m, dict)]
                out["models"] = [m.get("id") for m in models]
                lengths = [m["max_model_len"] for m in models if isinstance(m.get("max_model_len"), int)]
                if lengths:
                    out["context"] = min(lengths)
            elif path == "/props" and isinstance(reply, dict):
                out["props"] = {key: reply[key] for key in ("model_path", "build_info", "total_slots") if key in reply}
                n_ctx = (reply.get("default_generation_settings") or {}).get("n_ctx")
                if isinstance(n_ctx, int):
                    out["context"] = n_ctx
            elif path == "/version" and isinstance(reply, dict):
                out["version"] = reply.get("version")
        return out
