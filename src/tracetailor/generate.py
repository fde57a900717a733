"""`tracetailor generate`: prompts in, trace records out.

Glue between the parts: loads the models, the bridge and the prompts, checks the
output directory (resume or refuse), runs the engine with a progress bar, and
turns each finished sequence into a record. The decoding itself lives in
decoding/; the file format in data/traces.py.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .config import ConfigError, GenerateConfig, settings_changes
from .data.traces import (
    TraceWriter,
    finished_ids,
    read_records,
    record_id,
    summarize,
    trace_files,
    write_json_atomic,
)
from .decoding.engine import DecodeSettings, Engine, Request, run_halving_on_oom
from .decoding.rules import RSDParams, prompt_key


class OutputDirError(ValueError):
    pass


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"tracetailor": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def prepare_out_dir(cfg: GenerateConfig, prompt_texts: dict | None = None) -> set[str]:
    """Create or check OUT; return the ids already finished there (resume). `prompt_texts`, when given, is
    filled with the prompt texts those records were generated from (see `finished_ids`)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out}: exists and is not a directory")
    probe = out / ".write-test"
    try:
        out.mkdir(parents=True, exist_ok=True)  # fails under a file or on a read-only disk
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"--out {out}: cannot write there ({e.strerror}); choose another directory") from e
    run_json = out / "run.json"
    existing = trace_files(out)
    if cfg.overwrite:
        for p in existing + [run_json, out / "stats.json"]:
            p.unlink(missing_ok=True)
        return set()
    if run_json.exists():
        try:
            before = json.loads(run_json.read_text(encoding="utf-8")).get("config", {})
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OutputDirError(f"{run_json}: unreadable ({e}); pass --overwrite to start afresh") from e
        detail = settings_changes(before, cfg.trace_settings())
        if detail:
            raise OutputDirError(
                f"--out {out} holds a run with another configuration ({detail}). "
                "Use a new --out directory, or pass --overwrite to replace that run."
            )
    elif existing:
        raise OutputDirError(
            f"--out {out} holds trace files but no run.json; use a new --out directory or pass --overwrite"
        )
    return finished_ids(out, prompt_texts=prompt_texts)


def check_prompts_unchanged(prompt_texts: dict, prompts: list) -> None:
    """Refuse to resume when a finished trace's prompt text (`prompt_texts`, from `prepare_out_dir`) differs
    from the prompt of the same id now (the prompts file was edited in place, or another one has the same
    ids): the run would mix the two. Names the first such record in file order."""
    now = {p.prompt_id: p.text for p in prompts}
    changed = [(path, lineno, pid) for pid, texts in prompt_texts.items() if pid in now
               for text, (path, lineno) in texts.items() if text != now[pid]]
    if changed:
        path, lineno, pid = min(changed)
        raise OutputDirError(
            f"{path}:{lineno}: prompt {pid!r} was generated from another text than the prompt of that id "
            f"now; the prompts (or the system prompt, prefill or template) changed since. Use a new --out "
            "directory, or pass --overwrite to replace that run.")


def _stop_checker(tokenizer, stops: list[str]):
    if not stops:
        return None
    # a stop string of n characters spans at most n tokens (+1 for a token that straddles its start)
    window = max(len(s) for s in stops) + 1

    def hit(ids: list[int]) -> bool:
        text = tokenizer.decode(ids[-window:], skip_special_tokens=False)
        return any(s in text for s in stops)

    return hit


class _Progress:
    """A tqdm bar over sequences with live tokens/s and acceptance rate."""

    def __init__(self, total: int, enabled: bool, mode: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="seq", disable=not enabled, dynamic_ncols=True, desc=f"generate [{mode}]")
        self.start = time.perf_counter()
        self.tokens = self.teacher = 0
        self.mode = mode
        self._last = 0.0
        self.engine = None  # set once the engine exists: its draft counters show in the bar

    def step(self, tokens: int, teacher: int) -> None:
        self.tokens += tokens
        self.teacher += teacher
        now = time.perf_counter()
        if now - self._last > 0.5:
            self._last = now
            post = {"tok/s": f"{self.tokens / max(now - self.start, 1e-9):.0f}"}
            if self.mode == "rsd" and self.tokens:
                post["accept"] = f"{self.teacher / self.tokens:.1%}"
            if self.engine is not None and self.engine.draft_proposed:
                post["draft"] = f"{self.engine.draft_accepted / self.engine.draft_proposed:.0%}"
                post["passes/tok"] = f"{self.engine.teacher_passes / max(self.engine.tokens_emitted, 1):.2f}"
            self.bar.set_postfix(post, refresh=True)

    def close(self):
        self.bar.close()


# -- the steps of a run, shared by run_generate and the Ray workers (distributed.py) --------

def load_pair(cfg: GenerateConfig, log=print):
    """(student, teacher, bridge); teacher and bridge are None in mode student."""
    from .models import load_model
    from .vocab import build_bridge

    student = load_model(cfg.student, gguf_file=cfg.student_gguf_file, device=cfg.device, dtype=cfg.dtype,
                         trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, role="student")
    teacher = bridge = None
    if cfg.mode != "student":
        teacher = load_model(cfg.teacher, gguf_file=cfg.gguf_file, device=cfg.device, dtype=cfg.dtype,
                             trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, role="teacher",
                             device_map=cfg.teacher_device_map)
        bridge = build_bridge(student.tokenizer, teacher.tokenizer, student.vocab_size, teacher.vocab_size)
        if not bridge.identity:
            log(f"vocabulary bridge: {bridge.shared_fraction:.2%} of the student's tokens have a teacher counterpart")
    return student, teacher, bridge


def load_prompt_set(cfg: GenerateConfig, tokenizer) -> list:
    from .data.prompts import load_prompts

    prompts = load_prompts(
        cfg.prompts, tokenizer, split=cfg.split, prompt_field=cfg.prompt_field, id_field=cfg.id_field,
        carry=cfg.carry, system_prompt=cfg.system_prompt, prefill=cfg.prefill, chat_template=cfg.chat_template,
    )
    return prompts[: cfg.limit] if cfg.limit else prompts


def context_window(student, teacher) -> int | None:
    contexts = [c for c in (student.context_length, teacher.context_length if teacher else None) if c]
    return min(contexts) if contexts else None


def build_requests(pairs, bridge, context: int | None, max_new_tokens: int):
    """Engine requests for (prompt, sample) pairs: (requests, {handle: (prompt, sample)}, skipped prompt ids).
    A prompt that leaves no room to generate under `context` is skipped, and named once."""
    requests, handles, skipped = [], {}, []
    seen: dict[int, tuple] = {}  # id(prompt) -> (teacher ids, room), or None when skipped
    for p, s in pairs:
        if id(p) not in seen:
            teacher_ids = bridge.to_teacher(p.token_ids) if bridge is not None else None
            longest = max(len(p.token_ids), len(teacher_ids or []))
            if context is not None and longest >= context:
                seen[id(p)] = None
                skipped.append(p.prompt_id)
            else:
                seen[id(p)] = (teacher_ids, max_new_tokens if context is None else min(max_new_tokens, context - longest))
        if seen[id(p)] is None:
            continue
        teacher_ids, room = seen[id(p)]
        handle = len(handles)
        handles[handle] = (p, s)
        requests.append(Request(handle, prompt_key(p.prompt_id), s, p.token_ids, teacher_ids, room,
                                label=f"prompt {p.prompt_id!r}, sample {s}"))
    return requests, handles, skipped


def warn_skipped(skipped: list[str], context: int | None) -> None:
    if skipped:
        names = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        warnings.warn(f"skipped {len(skipped)} prompt(s) longer than the context ({context} tokens): {names}",
                      stacklevel=3)


def make_engine(cfg: GenerateConfig, student, teacher, bridge, on_step=None) -> Engine:
    settings = DecodeSettings(
        mode=cfg.mode,
        rsd=RSDParams(cfg.threshold, cfg.trials, cfg.top_k, cfg.teacher_temperature),
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed,
        draft_tokens=cfg.draft_tokens,
    )
    return Engine(
        student.model, teacher.model if teacher else None, bridge, settings, eos_ids=set(student.eos_ids()),
        batch_size=cfg.batch_size, stop_fn=_stop_checker(student.tokenizer, cfg.stop), on_step=on_step,
    )


def run_info(cfg: GenerateConfig, student_name: str, teacher_name: str | None, bridge) -> dict[str, Any]:
    """What run.json holds."""
    return {
        "config": {k: v for k, v in cfg.__dict__.items()},
        "models": {"student": student_name, "teacher": teacher_name},
        "bridge": None if bridge is None else {"identity": bridge.identity, "shared_fraction": bridge.shared_fraction},
        "versions": _versions(),
        "seed": cfg.seed,
        "command": " ".join(sys.argv),
    }


def build_record(prompt, sample: int, fin, tokenizer, eos: set[int], mode: str, with_teacher: bool) -> dict:
    """One finished sequence as a trace record (DESIGN.md, "Records")."""
    text_ids = fin.token_ids[:-1] if fin.token_ids and fin.token_ids[-1] in eos else fin.token_ids
    n = len(fin.token_ids)
    return {
        "id": record_id(prompt.prompt_id, sample),
        "prompt_id": prompt.prompt_id,
        "sample": sample,
        "prompt": prompt.text,
        "completion": tokenizer.decode(text_ids, skip_special_tokens=False),
        "prompt_token_ids": prompt.token_ids,
        "completion_token_ids": fin.token_ids,
        "origin": fin.origin,
        "student_logprobs": fin.student_logprobs,
        "teacher_logprobs": fin.teacher_logprobs if with_teacher else None,
        "finish_reason": fin.finish_reason,
        "fallback_rate": fin.origin.count("S") / n if n else 0.0,
        "mode": mode,
        **prompt.carry,
    }


def write_stats(out: Path, mode: str, *, prompts: int, skipped: list[str], sequences: int, tokens: int,
                seconds: float, log=print, extra: dict | None = None, draft: dict | None = None) -> dict[str, Any]:
    """Totals over every trace file in OUT plus this run's own counts, to OUT/stats.json; logs a summary.
    `draft` is `Engine.counters()`: its `teacher_passes_per_token` and `draft_tokens` (this run's) are always
    written, None where unknown (e.g. nothing generated)."""
    records = [r for path in trace_files(out) for r in read_records(path)]
    stats = summarize(records)
    stats.update({
        "prompts": prompts,
        "skipped_prompts": len(skipped),
        "skipped_prompt_ids": skipped,
        "teacher_passes_per_token": (draft or {}).get("teacher_passes_per_token"),
        "draft_tokens": (draft or {}).get("draft_tokens"),
        "this_run": {"sequences": sequences, "tokens": tokens, "seconds": round(seconds, 3),
                     "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None, **(extra or {})},
    })
    write_json_atomic(out / "stats.json", stats)
    acc = stats["acceptance_rate"]
    log(
        f"{stats['sequences']} sequences, {stats['tokens']} tokens in {out}"
        + (f"; teacher tokens accepted {acc:.1%}, student fallback {1 - acc:.1%}" if acc is not None and mode == "rsd" else "")
        + f"; this run {tokens} tokens in {seconds:.1f}s ({stats['this_run']['tokens_per_second']} tok/s)"
    )
    return stats


def run_generate(cfg: GenerateConfig, log=print) -> dict[str, Any]:
    """Run `generate` end to end; return the stats written to OUT/stats.json."""
    cfg.validate()
    if cfg.workers:  # the same steps, spread over Ray actors
        from .distributed import run_distributed

        return run_distributed(cfg, log=log)
    prompt_texts: dict = {}
    done = prepare_out_dir(cfg, prompt_texts)
    out = Path(cfg.out)

    student, teacher, bridge = load_pair(cfg, log)
    prompts = load_prompt_set(cfg, student.tokenizer)
    check_prompts_unchanged(prompt_texts, prompts)

    # prompts that leave no room to generate are skipped, counted and named
    context = context_window(student, teacher)
    pending = ((p, s) for p in prompts for s in range(cfg.samples) if record_id(p.prompt_id, s) not in done)
    requests, handles, skipped = build_requests(pending, bridge, context, cfg.max_new_tokens)
    warn_skipped(skipped, context)

    write_json_atomic(out / "run.json", run_info(cfg, student.name, teacher.name if teacher else None, bridge))
    (out / "stats.json").unlink(missing_ok=True)  # it marks a finished run: a run stopped from here on has none
    if done:
        log(f"resuming: {len(done)} sequence(s) already in {out}, {len(requests)} to go")

    progress = _Progress(len(requests), cfg.progress, cfg.mode)
    eos = set(student.eos_ids())
    engine = make_engine(cfg, student, teacher, bridge, on_step=progress.step)
    progress.engine = engine
    tok = student.tokenizer
    started = time.perf_counter()
    new_tokens = 0
    try:
        with TraceWriter(out / "traces.jsonl") as writer:
            for fin in run_halving_on_oom(engine, requests, log):  # out of memory: half the batch, go on
                prompt, sample = handles[fin.handle]
                new_tokens += len(fin.token_ids)
                writer.write(build_record(prompt, sample, fin, tok, eos, cfg.mode, teacher is not None))
                progress.bar.update(1)
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    return write_stats(out, cfg.mode, prompts=len(prompts), skipped=skipped, sequences=len(requests),
                       tokens=new_tokens, seconds=elapsed, log=log, draft=engine.counters())


__all__ = ["run_generate", "prepare_out_dir", "OutputDirError", "ConfigError"]
