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
    from ..models import load_tokenizer
    from ..sampling import make_bridge

    client = HttpClient(max_in_flight=cfg.max_in_flight, timeout=cfg.request_timeout,
                        api_key=os.environ.get(cfg.api_key_env) or None)
    k = cfg.top_k
    ends = {}
    roles = ("student",) if cfg.mode == "student" else ("student", "teacher")
    for role in roles:
        name = getattr(cfg, role)
        tok = load_tokenizer(name, gguf_file=getattr(cfg, f"{role}_gguf_file"),
                             trust_remote_code=cfg.trust_remote_code, role=role)
        vocab, context, eos = _config_facts(os.path.expanduser(name), tok)
        served = ServedModel(role, getattr(cfg, f"{role}_url").split(","), getattr(cfg, f"{role}_protocol"),
                             getattr(cfg, f"{role}_served_name"), client, vocab_size=vocab)
        probe_ids = tok.encode("Hello", add_special_tokens=False) or [0]
        info = run_sync(_probe(served, k, cfg.draft_tokens > 0 and cfg.mode != "student", probe_ids))
        contexts = [c for c in [context] + [s.get("context") for s in info["servers"]] if c]
        ends[role] = ServedEnd(name, served, tok, vocab, min(contexts) if contexts else None, sorted(eos))
        log(f"{role}: served at {', '.join(served.urls)} ({served.protocol_name})")
    student, teacher = ends["student"], ends.get("teacher")
    bridge = make_bridge(student, teacher, log) if teacher is not None else None
    return student, teacher, bridge


async def _probe(served: ServedModel, k: int, draft: bool, ids: list[int]) -> dict:
    try:
        return await served.probe(k, draft, ids)
    finally:
        await served.client.close()  # the run opens its own connections in its own event loop
