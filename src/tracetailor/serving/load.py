"""Served models as generate's loading step sees them: each model's tokenizer (from --student/--teacher, a
hub id or a directory, since the bridge and the records need it), its vocabulary size and end ids, and a
`ServedModel` over its URLs, probed before any real request. What the servers say goes in run.json
(endpoints and what they report; never a key)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .http import HttpClient, run_sync
from .model import ServedModel


@dataclass
class ServedEnd:
    """Stands where `models.LoadedModel` stands for an in-process model: name, tokenizer, `model`."""

    name: str
    model: ServedModel
    tokenizer: object
    vocab_size: int
    context_length: int | None
    _eos: list[int]

    def eos_ids(self) -> list[int]:
        return self._eos


def _config_facts(name: str, tokenizer) -> tuple[int, int | None, set[int]]:
    """(vocabulary size, context, end ids) from the model's config when its directory or hub repo has one,
    else from the tokenizer alone."""
    vocab, context, eos = len(tokenizer), None, set()
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    try:
        from transformers import AutoConfig, GenerationConfig

        cfg = AutoConfig.from_pretrained(name)
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        vocab = max(vocab, int(getattr(text, "vocab_size", 0) or 0))
        context = getattr(text, "max_position_embeddings", None)
        try:
            gen = GenerationConfig.from_pretrained(name)
            ids = gen.eos_token_id
            eos.update([ids] if isinstance(ids, int) else list(ids or []))
        except (OSError, ValueError):
            pass
    except (OSError, ValueError):
        pass
    return vocab, context, eos


def load_served_pair(cfg, log=print):
    """(student, teacher, bridge) for a config with --student-url (and --teacher-url): tokenizers loaded,
    servers probed (reachable, the model served, k log-probs, prompt log-probs when drafting needs them)."""
    from ..vocab import bridge_between

    client = make_client(cfg)
    roles = ("student",) if cfg.mode == "student" else ("student", "teacher")
    ends = {role: load_served(role, getattr(cfg, role), getattr(cfg, f"{role}_url"), getattr(cfg, f"{role}_protocol"),
                              getattr(cfg, f"{role}_served_name"), client, k=cfg.top_k,
                              draft=cfg.draft_tokens > 0 and cfg.mode != "student",
                              gguf_file=getattr(cfg, f"{role}_gguf_file"), trust_remote_code=cfg.trust_remote_code,
                              prompt_logprobs=cfg.verify_with == "prompt-logprobs", log=log)
            for role in roles}
    student, teacher = ends["student"], ends.get("teacher")
    bridge = bridge_between(student, teacher, log) if teacher is not None else None
    return student, teacher, bridge


def make_client(cfg) -> HttpClient:
    """The one HTTP client of a run, from its served options (the key read from the environment only)."""
    return HttpClient(max_in_flight=cfg.max_in_flight, timeout=cfg.request_timeout,
                      retries=getattr(cfg, "request_retries", 4), api_key=os.environ.get(cfg.api_key_env) or None)


def load_served(role: str, name: str, urls: str, protocol: str, served_name: str | None, client: HttpClient, *,
                k: int, draft: bool = False, gguf_file: str | None = None, trust_remote_code: bool = False,
                prompt_logprobs: bool = False, log=print) -> ServedEnd:
    """One served model: its tokenizer from `name`, its servers probed for k log-probs (and prompt log-probs
    when `draft`)."""
    from ..models import load_tokenizer

    tok = load_tokenizer(name, gguf_file=gguf_file, trust_remote_code=trust_remote_code, role=role)
    vocab, context, eos = _config_facts(os.path.expanduser(name), tok)
    served = ServedModel(role, urls.split(","), protocol, served_name, client, vocab_size=vocab,
                         prompt_logprobs=prompt_logprobs)
    probe_ids = tok.encode("Hello", add_special_tokens=False) or [0]
    info = run_sync(_probe(served, max(k, 1), draft, probe_ids))
    contexts = [c for c in [context] + [s.get("context") for s in info["servers"]] if c]
    log(f"{role}: served at {', '.join(served.urls)} ({served.protocol_name})")
    return ServedEnd(name, served, tok, vocab, min(contexts) if contexts else None, sorted(eos))


async def _probe(served: ServedModel, k: int, draft: bool, ids: list[int]) -> dict:
    try:
        return await served.probe(k, draft, ids)
    finally:
        await served.client.close()  # the run opens its own connections in its own event loop
