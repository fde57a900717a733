"""The Python API in memory: `rsd_generate`, `score_texts`, `select_records`.

The same steps as the `generate`, `score` and `select` commands (sampling.py, score.py,
select.py), without files: prompts in, `TraceRecord`s out; texts in, log-probs out;
records in, SFT rows and a funnel out. Models may be hub ids, local paths, `LoadedModel`s
or `(model, tokenizer)` pairs already in memory. Settings are the fields of the commands'
config classes (config.py), checked the same way. Nothing is written to disk. See
README.md ("Python API") and docs/architecture.md.
"""

from __future__ import annotations

import io
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Sequence

from .config import ConfigError, GenerateConfig, ScoreConfig, SelectConfig
from .data.traces import TraceRecord

_IN_MEMORY = "<in memory>"


def _loaded(model: Any, cfg, role: str, gguf_file: str | None = None, device_map=None):
    """A `LoadedModel` from an id or path (loaded with the config's device and dtype), a LoadedModel, or a
    (model, tokenizer) pair."""
    from .models import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, tuple) and len(model) == 2:
        net, tokenizer = model
        name = getattr(getattr(net, "config", None), "_name_or_path", None) or f"{role} (in memory)"
        return LoadedModel(name=str(name), model=net.eval(), tokenizer=tokenizer)
    if isinstance(model, (str, Path)):
        return load_model(str(model), gguf_file=gguf_file, device=cfg.device, dtype=cfg.dtype,
                          trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, role=role,
                          device_map=device_map)
    raise ConfigError(f"{role}: give a hub id, a local path, a LoadedModel or a (model, tokenizer) pair, "
                      f"not {type(model).__name__}")


def _config(cls, settings: dict[str, Any], **fixed):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(known))}")
    return cls(**{**settings, **fixed}).validate()


def _rows(prompts: Sequence[str | dict | list]) -> list[dict]:
    """Prompts as rows: a string (one user turn), a list of messages, or a dict with "prompt" (and "id")."""
    rows = []
    for i, p in enumerate(prompts):
        row = dict(p) if isinstance(p, dict) else {"prompt": p}
        row.setdefault("id", str(i))
        rows.append(row)
    return rows


def rsd_generate(teacher: Any, student: Any, prompts: Sequence[str | dict | list], *, log=lambda m: None,
                 **settings: Any) -> list[TraceRecord]:
    """Traces of `prompts` (strings, message lists, or dicts with "prompt", an optional "id" and fields to
    `carry`), generated as `tracetailor generate` does, in memory; in prompt order, then sample order.

    `settings` are GenerateConfig's fields (mode, threshold, trials, top_k, samples, max_new_tokens, seed,
    stop, prefill, system_prompt, carry, batch_size, device, dtype, ...). With mode="student" the teacher
    may be None. The same seed and settings give the same traces as the command."""
    from .data.prompts import build_prompts
    from .sampling import Sampling, context_window, make_bridge, make_engine, plan_requests, record_maker

    cfg = _config(GenerateConfig, settings, student=_IN_MEMORY, prompts=_IN_MEMORY,
                  teacher=_IN_MEMORY if teacher is not None else None)
    student_m = _loaded(student, cfg, "student", cfg.student_gguf_file)
    teacher_m = bridge = None
    if cfg.mode != "student":
        teacher_m = _loaded(teacher, cfg, "teacher", cfg.teacher_gguf_file, cfg.teacher_device_map)
        bridge = make_bridge(student_m, teacher_m, log)
    prompt_list = build_prompts(_rows(prompts), lambda i: f"prompt {i}", student_m.tokenizer, prompt_field="prompt",
                                id_field="id", carry=cfg.carry, system_prompt=cfg.system_prompt, prefill=cfg.prefill,
                                chat_template=cfg.chat_template)
    planned = plan_requests(((p, s) for p in prompt_list for s in range(cfg.samples)), bridge,
                            context_window(student_m, teacher_m), cfg)
    make = record_maker(cfg, student_m, teacher_m)
    order = {p.prompt_id: i for i, p in enumerate(prompt_list)}
    records = [TraceRecord.from_json(make(prompt, s, fin), f"prompt {prompt.prompt_id!r}, sample {s}")
               for prompt, s, fin in Sampling(make_engine(cfg, student_m, teacher_m, bridge), planned, log)]
    return sorted(records, key=lambda r: (order[r.prompt_id], r.sample))


def score_texts(model: Any, prompts: Sequence[str | list], completions: Sequence[str], **settings: Any
                ) -> list[dict[str, Any]]:
    """The student's log-probability of every completion token, as `tracetailor score` computes it for
    prompt/completion data: per example {"logprobs", "tokens", "nll", "share_below_<t>", "truncated"}.

    `settings` are ScoreConfig's fields (system_prompt, prefill, chat_template, max_length, batch_size,
    device, dtype, ...)."""
    from .data.lengths import fit_to_length
    from .score import _outside_examples, logprob_summary, score_examples

    if len(prompts) != len(completions):
        raise ConfigError(f"completions: {len(completions)} for {len(prompts)} prompt(s); give one per prompt")
    cfg = _config(ScoreConfig, settings, student=_IN_MEMORY, data=[_IN_MEMORY])
    student = _loaded(model, cfg, "model", cfg.gguf_file)
    rows = [{"id": str(i), "prompt": p, "completion": c} for i, (p, c) in enumerate(zip(prompts, completions))]
    examples = _outside_examples(rows, lambda i: f"example {i}", "completion", 0, cfg, student.tokenizer)
    limit = min(cfg.max_length, student.context_length or cfg.max_length)
    kept, _, _ = fit_to_length(examples, limit)
    logprobs = score_examples(student.model, kept, cfg.batch_size, cfg.max_batch_tokens)
    scored = {ex.id: (ex, lp) for ex, lp in zip(kept, logprobs)}  # the ids are the row numbers: unique
    out = []
    for ex in examples:
        if ex.id not in scored:  # the prompt alone fills max_length
            out.append({"logprobs": None, "tokens": 0, "nll": None, "truncated": True, "skipped": True})
            continue
        fitted, lp = scored[ex.id]
        out.append({"logprobs": [float(x) for x in lp], **logprob_summary(lp), "truncated": fitted.truncated})
    return out


def select_records(records: Iterable[TraceRecord | dict], **settings: Any) -> tuple[list[dict], dict]:
    """(SFT rows, funnel) of `records` as `tracetailor select` makes them, in memory. `settings` are
    SelectConfig's fields (answer_field, max_fallback_rate, correct_only, keep_unverifiable, pick, seed, ...)."""
    from .select import Picker, _stream, require_answer_checking

    cfg = _config(SelectConfig, settings, traces=[_IN_MEMORY], out=_IN_MEMORY)
    require_answer_checking(cfg)
    numbered = ((f"record {i}", r.to_json() if isinstance(r, TraceRecord) else r) for i, r in enumerate(records))
    sink = io.StringIO()
    funnel = _stream(cfg, numbered, [_IN_MEMORY], Picker(cfg.pick, cfg.seed, sink), lambda m: None)
    rows = [json.loads(line) for line in sink.getvalue().splitlines()]
    return rows, funnel


__all__ = ["rsd_generate", "score_texts", "select_records", "TraceRecord"]
