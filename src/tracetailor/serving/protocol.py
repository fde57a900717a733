"""What served models say on the wire: the request that asks a server for next-token log-probs, and the
reading of its reply into `TopK` distributions, for each protocol tracetailor speaks.

- `openai`: the OpenAI-compatible `/v1/completions` of vLLM (and servers that copy its extensions): a
  token-id prompt, `logprobs: k`, ids returned as ids (`return_tokens_as_token_ids`), and vLLM's
  `prompt_logprobs` for the distributions at every position of a prompt (one request verifies a draft).
- `sglang`: SGLang's native `/generate`: `input_ids`, `return_logprob` with `top_logprobs_num: k`, every
  entry a `[logprob, id, text]` triple (ids always ids), and `logprob_start_len` for the prompt log-probs
  from a position on (one request verifies a draft, and the server's prefix cache serves the context).
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

PROTOCOLS = ("openai", "sglang", "llama.cpp")  # config.py offers these names


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


def _token_id(key, where: str, *, generated: bool = True) -> int:
    """An id as vLLM writes it: `token_id:123` for a generated token (return_tokens_as_token_ids), a plain
    integer (or its string) for a prompt log-prob key. A generated token without the prefix is the token's
    TEXT, even when that text is a number ("42"), so it is refused, never read as an id."""
    if type(key) is int:
        return key
    if type(key) is str and key.startswith("token_id:"):
        text = key[9:]
    elif type(key) is str and not generated:
        text = key
    else:
        raise ServerError(STRINGS_ONLY.format(where=where, token=key))
    try:
        return int(text)
    except ValueError:
        raise ServerError(STRINGS_ONLY.format(where=where, token=key)) from None


STRINGS_ONLY = ("{where}: the server returned the token {token!r} as text, not as an id, and text cannot be mapped "
                "back to ids exactly; start vLLM with --return-tokens-as-token-ids, or speak a protocol that returns "
                "ids: --*-protocol sglang (SGLang's native /generate) or llama.cpp (llama-server)")


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
        if isinstance(lp.get("content"), list):  # llama-server's /v1/completions (ids there, in its own shape)
            raise ServerError(f"{where}: choices[0].logprobs is llama-server's {{content: [...]}}, not vLLM's shape; "
                              "use --*-protocol llama.cpp (its native /completion)")
        if not isinstance(tokens, list) or not isinstance(tops, list) or len(tokens) != len(tops) or not tokens:
            raise ServerError(f"{where}: the reply has no per-token log-probs (choices[0].logprobs)")
        ids = [_token_id(t, where) for t in tokens]
        dists = [take_top({_token_id(t, where): v for t, v in (top or {}).items()}, k, where) for top in tops]
        return ids, dists

    def verify(self, ids: list[int], k: int, start: int) -> dict:
        """The distributions at every position of `ids` (prompt log-probs) and after it (one token); vLLM's
        request has no start position, so `start` is read off the reply only."""
        body = self.generate(ids, 1, k)
        body["prompt_logprobs"] = k
        return body

    def read_verify(self, reply: dict, start: int, k: int, where: str, ids: list[int] | None = None) -> list[TopK]:
        """Distributions at positions start..len(prompt) (the last: the generated token's)."""
        choice = _first_choice(reply, where)
        prompt_lps = choice.get("prompt_logprobs")
        if prompt_lps is None:
            prompt_lps = reply.get("prompt_logprobs")
        if not isinstance(prompt_lps, list) or len(prompt_lps) <= start - 1:
            raise ServerError(f"{where}: the reply has no prompt log-probs; this server cannot verify drafts in one "
                              "request (use --draft-tokens 0, or a server with prompt_logprobs such as vLLM)")
        if ids is not None and len(prompt_lps) != len(ids):
            raise ServerError(f"{where}: {len(prompt_lps)} prompt log-prob entries for the {len(ids)} prompt "
                              "tokens sent")
        dists = []
        for entry in prompt_lps[start:]:
            if not isinstance(entry, dict):
                raise ServerError(f"{where}: a prompt log-prob entry is {type(entry).__name__}, not an object")
            dists.append(take_top(_prompt_entry(entry, k, where), k, where))
        _, after = self.read_generation(reply, k, where)
        return dists + after[:1]

    def read_token_logprobs(self, reply: dict, ids: list[int], start: int, where: str) -> list[float]:
        return prompt_token_logprobs(reply, ids, start, where)


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
            pairs[_token_id(key, where, generated=False)] = lp
    return pairs


def _first_choice(reply: dict, where: str) -> dict:
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ServerError(f"{where}: the reply has no choices[0] (not an OpenAI completions reply)")
    return choices[0]


class SGLangProtocol:
    """SGLang's native `/generate` (docs/serving-protocols.md, "SGLang"): ids in, `[logprob, id, text]`
    triples out, prompt log-probs from `logprob_start_len` on."""

    name = "sglang"
    path = "/generate"
    has_prompt_logprobs = True

    def __init__(self, served_name: str | None = None):
        self.served_name = served_name  # one model per SGLang server: the name is checked by probe() only

    @staticmethod
    def _body(ids: list[int], params: dict, k: int) -> dict:
        return {"input_ids": list(ids), "sampling_params": params, "return_logprob": True,
                "top_logprobs_num": k, "return_text_in_logprobs": False}

    def generate(self, ids: list[int], n: int, k: int) -> dict:
        # temperature 0 is SGLang's greedy: top_k 1 at temperature 1, so the log-probs are the T=1 softmax
        return self._body(ids, {"max_new_tokens": n, "temperature": 0.0}, k)

    def sample(self, ids: list[int], n: int, temperature: float, top_p: float, top_k: int, seed: int) -> dict:
        return self._body(ids, {"max_new_tokens": n, "temperature": temperature, "top_p": top_p,
                                "top_k": top_k or -1, "sampling_seed": seed}, 0)

    @staticmethod
    def logprob_start(start: int) -> int:
        """SGLang's `logprob_start_len` for the distributions after ids[:start] on: its entry j at position
        s + j (j >= 1) is the distribution that predicted token s + j; entry 0 is null."""
        return max(start - 1, 0)

    def verify(self, ids: list[int], k: int, start: int) -> dict:
        """The distributions after ids[:start], ..., after all of `ids` (the last: the generated token's). The
        server's prefix cache serves ids[:logprob_start_len]; only the span is computed."""
        body = self.generate(ids, 1, k)
        body["logprob_start_len"] = self.logprob_start(start)
        return body

    def read_sample(self, reply: dict, where: str) -> tuple[list[int], list[float | None], str]:
        meta = _meta(reply, where)
        pairs = _triples(meta.get("output_token_logprobs"), where, "output_token_logprobs")
        reason = (meta.get("finish_reason") or {}).get("type")
        return [i for _, i in pairs], [lp for lp, _ in pairs], "length" if reason == "length" else "stop"

    def read_generation(self, reply: dict, k: int, where: str) -> tuple[list[int], list[TopK]]:
        meta = _meta(reply, where)
        tokens, tops = meta.get("output_token_logprobs"), meta.get("output_top_logprobs")
        if not isinstance(tokens, list) or not isinstance(tops, list) or len(tokens) != len(tops) or not tokens:
            raise ServerError(f"{where}: the reply has no meta_info.output_token_logprobs and output_top_logprobs "
                              "of one length (an SGLang /generate reply to return_logprob and top_logprobs_num?)")
        ids = [i for _, i in _triples(tokens, where, "output_token_logprobs")]
        return ids, [_top_of(top, k, where, "output_top_logprobs") for top in tops]

    def read_verify(self, reply: dict, start: int, k: int, where: str, ids: list[int] | None = None) -> list[TopK]:
        """Distributions at positions start..len(ids) (the last: the generated token's). With `ids`, the
        entries must cover exactly ids[logprob_start_len:]: a server that ignored the field is named."""
        meta = _meta(reply, where)
        tops = meta.get("input_top_logprobs")
        first = start - self.logprob_start(start)
        if ids is not None:
            self._check_span(meta, ids, start, where)
        if not isinstance(tops, list) or len(tops) < first:
            raise ServerError(f"{where}: the reply has no meta_info.input_top_logprobs from logprob_start_len; this "
                              "server cannot verify drafts in one request (use --verify-with prefixes)")
        _, after = self.read_generation(reply, k, where)
        return [_top_of(top, k, where, "input_top_logprobs") for top in tops[first:]] + after[:1]

    def read_token_logprobs(self, reply: dict, ids: list[int], start: int, where: str) -> list[float]:
        """The log-prob of each prompt token ids[start:] under its prefix (meta_info.input_token_logprobs)."""
        meta = _meta(reply, where)
        pairs = self._check_span(meta, ids, start, where)
        out = pairs[start - self.logprob_start(start):]
        if any(not isinstance(lp, (int, float)) for lp, _ in out):
            raise ServerError(f"{where}: a prompt token's log-prob is null in meta_info.input_token_logprobs")
        return [float(lp) for lp, _ in out]

    def _check_span(self, meta: dict, ids: list[int], start: int, where: str) -> list[tuple]:
        s = self.logprob_start(start)
        pairs = _triples(meta.get("input_token_logprobs"), where, "input_token_logprobs")
        got = [i for _, i in pairs]
        if got != list(ids[s:]):
            raise ServerError(f"{where}: meta_info.input_token_logprobs covers {len(got)} prompt tokens where "
                              f"{len(ids) - s} (from logprob_start_len {s}) were sent; the server did not honour "
                              "logprob_start_len (use --verify-with prefixes)")
        return pairs


def _meta(reply: dict, where: str) -> dict:
    meta = reply.get("meta_info") if isinstance(reply, dict) else None
    if not isinstance(meta, dict):
        raise ServerError(f"{where}: the reply has no meta_info (not an SGLang /generate reply; check --*-protocol)")
    finish = meta.get("finish_reason")
    if isinstance(finish, dict) and finish.get("type") == "abort":
        raise ServerError(f"{where}: the server aborted the request: {finish.get('message') or finish}")
    return meta


def _triples(entries, where: str, field: str) -> list[tuple]:
    """SGLang's `[logprob, token_id, text]` entries as (logprob, id) pairs; a malformed one is a ServerError."""
    if not isinstance(entries, list):
        raise ServerError(f"{where}: the reply has no meta_info.{field} (an SGLang /generate reply to return_logprob?)")
    out = []
    for e in entries:
        if not isinstance(e, (list, tuple)) or len(e) < 2 or type(e[1]) is not int or e[1] < 0:
            raise ServerError(f"{where}: meta_info.{field} holds {str(e)[:80]!r}, not a [logprob, token_id, text] "
                              "entry with an integer id")
        out.append((e[0], e[1]))
    return out


def _top_of(entries, k: int, where: str, field: str) -> TopK:
    """One position's top list (null where the server computed none: fewer log-probs than asked)."""
    pairs = _triples(entries if entries is not None else [], where, field)
    return take_top({i: lp for lp, i in pairs}, k, where)


class CutCharacter(ServerError):
    """A llama-server reply whose last tokens end inside a UTF-8 character: their probabilities come only with
    the token that completes it. `ids`, `dists`: the positions that did come with probabilities."""

    def __init__(self, message: str, ids: list[int], dists: list[TopK]):
        super().__init__(message)
        self.ids, self.dists = ids, dists


class LlamaCppProtocol:
    """llama-server's native `/completion`."""

    name = "llama.cpp"
    path = "/completion"
    has_prompt_logprobs = False

    def __init__(self, served_name: str | None = None):
        self.served_name = served_name  # one model per llama-server: the name is informative only

    def generate(self, ids: list[int], n: int, k: int) -> dict:
        # temperature 0: greedy; n_probs: the raw softmax at temperature 1, before the sampler chain. ignore_eos:
        # a token llama-server samples as the end is not returned, nor its position's log-probs, so a position
        # whose greedy token is the end would come back empty; its bias acts in the sampler chain only, and the
        # returned log-probs keep the end token's own (checked on llama-server 0.3.36's build)
        return {"prompt": list(ids), "n_predict": n, "n_probs": k, "temperature": 0.0, "cache_prompt": True,
                "return_tokens": True, "post_sampling_probs": False, "ignore_eos": True}

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
        tokens = reply.get("tokens") if isinstance(reply, dict) else None
        if not isinstance(probs, list) or not (probs or tokens):
            raise ServerError(f"{where}: the reply has no completion_probabilities (a llama-server with n_probs?)")
        ids, dists = [], []
        for entry in probs:
            if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("top_logprobs"), list):
                raise ServerError(f"{where}: a completion_probabilities entry lacks id or top_logprobs")
            ids.append(int(entry["id"]))
            dists.append(take_top({int(t["id"]): t.get("logprob") for t in entry["top_logprobs"]
                                   if isinstance(t, dict) and "id" in t}, k, where))
        if isinstance(tokens, list) and len(probs) < len(tokens):
            # llama-server holds back the probabilities of tokens that end inside a UTF-8 character until a
            # later token completes it: ServedModel asks for a few more tokens
            raise CutCharacter(f"{where}: {len(tokens) - len(probs)} token(s) came without probabilities: they "
                               "end inside a UTF-8 character", ids, dists)
        return ids, dists


def make_protocol(name: str, served_name: str | None):
    if name == "openai":
        return OpenAIProtocol(served_name)
    if name == "sglang":
        return SGLangProtocol(served_name)
    if name == "llama.cpp":
        return LlamaCppProtocol(served_name)
    raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
