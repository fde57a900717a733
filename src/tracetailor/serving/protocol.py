"""What served models say on the wire: the request that asks a server for next-token log-probs, and the
reading of its reply into `TopK` distributions, for each protocol tracetailor speaks.

- `openai`: the OpenAI-compatible `/v1/completions` of vLLM (and servers that copy its extensions): a
  token-id prompt, `logprobs: k`, ids returned as ids (`return_tokens_as_token_ids`), and vLLM's
  `prompt_logprobs` for the distributions at every position of a prompt (one request verifies a draft).
- `llama.cpp`: llama-server's native `/completion`: a token-id prompt, `n_probs: k` (the raw softmax at
  temperature 1, before its sampler chain), ids in every entry. It has no prompt log-probs, so a draft is
  verified with one request per prefix (its prompt cache makes them cheap).

Every reply is checked: a position with fewer log-probs than asked, an id outside the vocabulary, or a
missing field is a `ServerError` naming the URL and what was wrong, never a wrong token. A `TopK` holds
exactly the k likeliest ids, likeliest first, ties by the lowest id: the order the rule's dense path uses
(decoding/rules.py, `top_k_set`). The module knows nothing of HTTP (serving/http.py) or of the rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from .http import ServerError

PROTOCOLS = ("openai", "llama.cpp")


@dataclass(frozen=True)
class TopK:
    """One position's distribution as a server gives it: the k likeliest ids and their log-probs at
    temperature 1 (natural log, of the full distribution: they need not sum to 1)."""

    ids: tuple[int, ...]
    logprobs: tuple[float, ...]

    def logprob_of(self, token: int) -> float | None:
        """The log-prob of `token` when the server returned it, else None (outside its top-k)."""
        for i, lp in zip(self.ids, self.logprobs):
            if i == token:
                return lp
        return None


def take_top(pairs: dict[int, float], k: int, where: str) -> TopK:
    """The k likeliest of `pairs` (id -> log-prob), ties by the lowest id; fewer than k is a ServerError."""
    if len(pairs) < k:
        raise ServerError(f"{where}: the server returned {len(pairs)} log-probs where {k} were asked for; raise "
                          "its log-prob cap (vLLM: --max-logprobs) or lower --top-k")
    try:
        best = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    except TypeError:  # a log-prob that is not a number
        best = []
    if len(best) < k or any(i < 0 or not lp <= 1e-6 for i, lp in best):  # `not <=` also catches NaN
        bad = next(((i, lp) for i, lp in pairs.items()
                    if not isinstance(lp, (int, float)) or not isinstance(i, int) or i < 0 or not lp <= 1e-6), None)
        raise ServerError(f"{where}: the server returned a malformed log-prob entry ({bad!r})")
    return TopK(tuple(i for i, _ in best), tuple(lp if lp < 0.0 else 0.0 for _, lp in best))


def _token_id(key, where: str) -> int:
    """vLLM's `token_id:123` (return_tokens_as_token_ids) or a plain integer (prompt log-probs' keys)."""
    if type(key) is int:
        return key
    text = key[9:] if type(key) is str and key.startswith("token_id:") else str(key)
    try:
        return int(text)
    except ValueError:
        raise ServerError(f"{where}: the server returned the token {key!r} as text, not as an id; start vLLM "
                          "with a version that knows return_tokens_as_token_ids, or use --*-protocol llama.cpp") from None


class OpenAIProtocol:
    """vLLM's `/v1/completions` with token-id prompts and ids back as ids."""

    name = "openai"
    path = "/v1/completions"
    has_prompt_logprobs = True

    def __init__(self, served_name: str | None):
        self.served_name = served_name

    def generate(self, ids: list[int], n: int, k: int) -> dict:
        """Greedy `n` tokens after `ids`, with the top-k log-probs at each position."""
        body = {"prompt": list(ids), "max_tokens": n, "temperature": 0.0, "logprobs": k,
                "return_tokens_as_token_ids": True, "skip_special_tokens": False}
        # no ignore_eos: a server may apply it as a logit bias; a draft that meets EOS is just shorter
        if self.served_name:
            body["model"] = self.served_name
        return body

    def sample(self, ids: list[int], n: int, temperature: float, top_p: float, top_k: int, seed: int) -> dict:
        """A whole completion sampled by the server (eval): its ids come back through logprobs."""
        body = {"prompt": list(ids), "max_tokens": n, "temperature": temperature, "top_p": top_p, "seed": seed,
                "logprobs": 1, "return_tokens_as_token_ids": True, "skip_special_tokens": False}
        if top_k:
            body["top_k"] = top_k
        if self.served_name:
            body["model"] = self.served_name
        return body

    def read_sample(self, reply: dict, where: str) -> tuple[list[int], list[float | None], str]:
        """(ids, each one's log-prob, finish reason "stop" or "length")."""
        choice = _first_choice(reply, where)
        lp = choice.get("logprobs") or {}
        ids = [_token_id(t, where) for t in lp.get("tokens") or []]
        lps = list(lp.get("token_logprobs") or [None] * len(ids))
        return ids, lps, "length" if choice.get("finish_reason") == "length" else "stop"

    def read_generation(self, reply: dict, k: int, where: str) -> tuple[list[int], list[TopK]]:
        choice = _first_choice(reply, where)
        lp = choice.get("logprobs") or {}
        tokens, tops = lp.get("tokens"), lp.get("top_logprobs")
        if not isinstance(tokens, list) or not isinstance(tops, list) or len(tokens) != len(tops) or not tokens:
            raise ServerError(f"{where}: the reply has no per-token log-probs (choices[0].logprobs)")
        ids = [_token_id(t, where) for t in tokens]
        dists = [take_top({_token_id(t, where): v for t, v in (top or {}).items()}, k, where) for top in tops]
        return ids, dists

    def verify(self, ids: list[int], k: int) -> dict:
        """The distributions at every position of `ids` (prompt log-probs) and after it (one token)."""
        body = self.generate(ids, 1, k)
        body["prompt_logprobs"] = k
        return body

    def read_verify(self, reply: dict, start: int, k: int, where: str) -> list[TopK]:
        """Distributions at positions start..len(prompt) (the last: the generated token's)."""
        choice = _first_choice(reply, where)
        prompt_lps = choice.get("prompt_logprobs")
        if prompt_lps is None:
            prompt_lps = reply.get("prompt_logprobs")
        if not isinstance(prompt_lps, list) or len(prompt_lps) <= start - 1:
            raise ServerError(f"{where}: the reply has no prompt log-probs; this server cannot verify drafts in one "
                              "request (use --draft-tokens 0, or a server with prompt_logprobs such as vLLM)")
        dists = []
        for entry in prompt_lps[start:]:
            if not isinstance(entry, dict):
                raise ServerError(f"{where}: a prompt log-prob entry is {type(entry).__name__}, not an object")
            dists.append(take_top(_prompt_entry(entry, k, where), k, where))
        _, after = self.read_generation(reply, k, where)
        return dists + after[:1]


def prompt_token_logprobs(reply: dict, ids: list[int], start: int, where: str) -> list[float]:
    """The log-prob of each prompt token ids[start:] under its prefix, from vLLM's prompt log-probs (every
    entry holds the prompt's own token, whatever its rank)."""
    choice = _first_choice(reply, where)
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) != len(ids):
        raise ServerError(f"{where}: the reply has no prompt log-probs for the {len(ids)} tokens sent; scoring "
                          "needs a server with prompt_logprobs (vLLM)")
    out = []
    for j in range(start, len(ids)):
        entry = entries[j] if isinstance(entries[j], dict) else {}
        value = entry.get(str(ids[j]), entry.get(ids[j]))
        lp = value.get("logprob") if isinstance(value, dict) else value
        if not isinstance(lp, (int, float)):
            raise ServerError(f"{where}: no log-prob for prompt token {j} (id {ids[j]}) in the reply")
        out.append(float(lp))
    return out


def _prompt_entry(entry: dict, k: int, where: str) -> dict[int, float]:
    """vLLM's prompt log-prob entry: {id: {"logprob", "rank", ...}}, the top-k plus the prompt's own token (a
    k+1-th when it ranks lower): keep the entries of rank <= k when ranks are given."""
    pairs = {}
    for key, value in entry.items():
        lp = value.get("logprob") if isinstance(value, dict) else value
        rank = value.get("rank") if isinstance(value, dict) else None
        if rank is None or rank <= k:
            pairs[_token_id(key, where)] = lp
    return pairs


def _first_choice(reply: dict, where: str) -> dict:
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ServerError(f"{where}: the reply has no choices[0] (not an OpenAI completions reply)")
    return choices[0]


class LlamaCppProtocol:
    """llama-server's native `/completion`."""

    name = "llama.cpp"
    path = "/completion"
    has_prompt_logprobs = False

    def __init__(self, served_name: str | None = None):
        self.served_name = served_name  # one model per llama-server: the name is informative only

    def generate(self, ids: list[int], n: int, k: int) -> dict:
        # temperature 0: greedy; n_probs: the raw softmax at temperature 1, before the sampler chain
        return {"prompt": list(ids), "n_predict": n, "n_probs": k, "temperature": 0.0, "cache_prompt": True,
                "return_tokens": True, "post_sampling_probs": False}

    def sample(self, ids: list[int], n: int, temperature: float, top_p: float, top_k: int, seed: int) -> dict:
        return {"prompt": list(ids), "n_predict": n, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                "seed": seed, "n_probs": 1, "cache_prompt": True, "return_tokens": True}

    def read_sample(self, reply: dict, where: str) -> tuple[list[int], list[float | None], str]:
        if not isinstance(reply, dict) or not isinstance(reply.get("tokens"), list):
            raise ServerError(f"{where}: the reply has no tokens (a llama-server with return_tokens?)")
        ids = [int(t) for t in reply["tokens"]]
        probs = reply.get("completion_probabilities") or []
        lps = [p.get("logprob") if isinstance(p, dict) else None for p in probs][: len(ids)]
        lps += [None] * (len(ids) - len(lps))
        return ids, lps, "length" if reply.get("stop_type") == "limit" else "stop"

    def read_generation(self, reply: dict, k: int, where: str) -> tuple[list[int], list[TopK]]:
        probs = reply.get("completion_probabilities") if isinstance(reply, dict) else None
        if not isinstance(probs, list) or not probs:
            raise ServerError(f"{where}: the reply has no completion_probabilities (a llama-server with n_probs?)")
        ids, dists = [], []
        for entry in probs:
            if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("top_logprobs"), list):
                raise ServerError(f"{where}: a completion_probabilities entry lacks id or top_logprobs")
            ids.append(int(entry["id"]))
            dists.append(take_top({int(t["id"]): t.get("logprob") for t in entry["top_logprobs"]
                                   if isinstance(t, dict) and "id" in t}, k, where))
        return ids, dists


def make_protocol(name: str, served_name: str | None):
    if name == "openai":
        return OpenAIProtocol(served_name)
    if name == "llama.cpp":
        return LlamaCppProtocol(served_name)
    raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
