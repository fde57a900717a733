"""The one sampling path: prompts -> engine requests -> the engine (halving its batch when the device runs
out of memory) -> finished sequences -> records.

`generate` (in this process and on each Ray worker), the Python API (`api.rsd_generate`) and `eval` all
sample through `Sampling`, the loop written once: they load the models (`load_pair`), turn (prompt, sample)
pairs into requests that fit the context (`plan_requests`), build the engine from a config (`make_engine`:
in-process or served, both counting the run's statistics in `counters()`), run it (`Sampling`) and turn each
finished sequence into text (`completion_text`) or a trace record (`record_maker`, `write_traces`). Not its
job: the decoding (decoding/), the files (data/), the commands' run directories. See docs/architecture.md
("The sampling path").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from collections import Counter
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from .config import GenerateConfig, parse_draft_tokens
from .data.rundir import RunDir, tokens_per_second
from .data.traces import TRACE_GLOBS, TraceRecord, finished_ids, read_records, summarize, trace_files, write_json_atomic
from .decoding.engine import DecodeSettings, Engine, Finished, Request, run_halving_on_oom
from .decoding.rules import RSDParams, prompt_key
from .errors import OutputDirError, UserError, stop_if_signalled, warn


def stop_checker(tokenizer, stops: list[str]):
    """A callable over token ids that says whether the decoded tail holds one of `stops` (None for none)."""
    if not stops:
        return None
    # a stop string of n characters spans at most n tokens (+1 for a token that straddles its start)
    window = max(len(s) for s in stops) + 1

    def hit(ids: list[int]) -> bool:
        text = tokenizer.decode(ids[-window:], skip_special_tokens=False)
        return any(s in text for s in stops)

    return hit


class Progress:
    """A tqdm bar over sequences with live tokens/s and acceptance rate."""

    def __init__(self, total: int, enabled: bool, mode: str, desc: str | None = None):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="seq", disable=not enabled, dynamic_ncols=True,
                        desc=desc or f"generate [{mode}]")
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
            if self.engine is not None and "auto" in (self.engine.settings.draft_tokens, self.engine.kv_setting):
                post["in use"] = self.engine.k_in_use()  # e.g. "K=3 paged"
            self.bar.set_postfix(post, refresh=True)

    def close(self):
        self.bar.close()


# -- the steps of a run, shared by run_generate and the Ray workers (distributed.py) --------

def load_pair(cfg: GenerateConfig, log=print):
    """(student, teacher, bridge); teacher and bridge are None in mode student. Served models (--student-url):
    their tokenizers, with the servers probed (serving/load.py)."""
    if getattr(cfg, "served", False):
        from .serving.load import load_served_pair

        return load_served_pair(cfg, log)
    from .models import load_model

    student = load_model(cfg.student, gguf_file=cfg.student_gguf_file, device=cfg.device, dtype=cfg.dtype,
                         trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, role="student")
    teacher = bridge = None
    if cfg.mode != "student":
        teacher = load_model(cfg.teacher, gguf_file=cfg.teacher_gguf_file, device=cfg.device,
                             dtype=cfg.teacher_dtype or cfg.dtype,
                             trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, role="teacher",
                             device_map=cfg.teacher_device_map)
        bridge = make_bridge(student, teacher, log)
    return student, teacher, bridge


def make_bridge(student, teacher, log=print):
    """The vocabulary bridge from the student's tokens to the teacher's (identity for one tokenizer)."""
    from .vocab import bridge_between

    return bridge_between(student, teacher, log)


def load_prompt_set(cfg: GenerateConfig, tokenizer, context: int | None = None) -> list:
    """The prompts of `cfg`; with the `context` (tokens), those that cannot fit are marked `over_cap` by
    their length in characters, before tokenising (`data.prompts.char_cap`), and later skipped."""
    from .data.prompts import HubOptions, char_cap, load_prompts

    hub = HubOptions(subset=cfg.subset, revision=cfg.revision, streaming=cfg.streaming, limit=cfg.limit)
    prompts = load_prompts(
        cfg.prompts, tokenizer, split=cfg.split, hub=hub, prompt_field=cfg.prompt_field, id_field=cfg.id_field,
        carry=cfg.carry, system_prompt=cfg.system_prompt, prefill=cfg.prefill, chat_template=cfg.chat_template,
        max_chars=char_cap(tokenizer, context),
    )
    return prompts[: cfg.limit] if cfg.limit else prompts


def context_window(student, teacher) -> int | None:
    contexts = [c for c in (student.context_length, teacher.context_length if teacher else None) if c]
    return min(contexts) if contexts else None


def token_budget(context: int | None, max_length: int | None) -> int | None:
    """The most tokens a sequence may hold in all: the models' context, or `max_length` when smaller."""
    limits = [n for n in (context, max_length) if n]
    return min(limits) if limits else None


class Planned(NamedTuple):
    """Engine requests for (prompt, sample) pairs, each request's pair by its handle, and the prompts skipped."""
    requests: list[Request]
    handles: dict[int, tuple]  # handle -> (prompt, sample)
    skipped: list[str]  # prompt ids


def plan_requests(pairs, bridge, context: int | None, cfg) -> Planned:
    """`build_requests` under a command's limits: the models' `context`, `cfg.max_length`, `cfg.max_new_tokens`."""
    return build_requests(pairs, bridge, token_budget(context, cfg.max_length), cfg.max_new_tokens)


def build_requests(pairs, bridge, context: int | None, max_new_tokens: int) -> Planned:
    """Engine requests for (prompt, sample) pairs (`Planned`). A prompt that leaves no room to generate
    under `context` is skipped, and named once."""
    requests, handles, skipped = [], {}, []
    seen: dict[int, tuple] = {}  # id(prompt) -> (teacher ids, room), or None when skipped
    for p, s in pairs:
        if id(p) not in seen:
            teacher_ids = bridge.to_teacher(p.token_ids) if bridge is not None else None
            longest = max(len(p.token_ids), len(teacher_ids or []))
            if getattr(p, "invalid", None) or (context is not None and (getattr(p, "over_cap", False)
                                                                      or longest >= context)):
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
    return Planned(requests, handles, skipped)


class NothingFits(UserError, ValueError):
    """Every prompt was skipped: nothing can be generated."""


def limit_name(context: int | None, max_length: int | None) -> str:
    """The limit a sequence must fit, as messages name it: `max_length (5 tokens)` when it is the smaller one,
    else `the context (512 tokens)`."""
    if max_length and (context is None or max_length < context):
        return f"max_length ({max_length} tokens, prompt and completion together)"
    return f"the context ({context} tokens)"


def skipped_lines(skipped: list[str], prompts: Iterable, context: int | None, max_length: int | None,
                  noun: str = "prompt") -> list[str]:
    """One line per reason prompts were skipped (`build_requests`): longer than the limit, or no Unicode text."""
    invalid = {p.prompt_id: p.invalid for p in prompts if getattr(p, "invalid", None)}
    from .data.prompts import shown_id

    def names(ids: list[str], why: bool = False) -> str:
        return ", ".join(shown_id(i) + (f" ({invalid[i]})" if why else "") for i in ids[:5]) + (
            " ..." if len(ids) > 5 else "")

    long = [i for i in skipped if i not in invalid]
    bad = [i for i in skipped if i in invalid]
    lines = [f"skipped {len(long)} {noun}(s) longer than {limit_name(context, max_length)}: {names(long)}"] if long else []
    if bad:
        lines.append(f"skipped {len(bad)} {noun}(s) holding text that no tokenizer can read (JSON can escape half "
                     f"of a UTF-16 pair; it is not Unicode text): {names(bad, why=True)}; fix those rows")
    return lines


def warn_skipped(skipped: list[str], prompts: list, context: int | None, max_length: int | None = None) -> None:
    """Say which prompts were skipped and why, one warning line per reason; refuse a run in which no prompt at
    all can be generated (`NothingFits`)."""
    lines = skipped_lines(skipped, prompts, context, max_length)
    if prompts and len(set(skipped)) >= len(prompts):
        fix = ("raise --max-length" if max_length and (context is None or max_length < context)
               else "shorten the prompts, or use models with a longer context")
        raise NothingFits(f"no prompt can be generated: {'; '.join(lines)}"
                          + (f"; {fix}" if "longer than" in lines[0] else ""))
    for line in lines:
        warn(line)


def end_ids(student, end_tokens: list[str] | None = None) -> set[int]:
    """The ids that end a completion: every EOS id of the student (its generation config's and its tokenizer's),
    or only those of `end_tokens` (e.g. ["<|im_end|>"]) when given; an unknown token is a ConfigError."""
    if not end_tokens:
        return set(student.eos_ids())
    from .config import ConfigError

    vocab = student.tokenizer.get_vocab()
    missing = [t for t in end_tokens if t not in vocab]
    if missing:
        raise ConfigError(f"end_tokens: the student's tokenizer has no token {', '.join(map(repr, missing))}; name "
                          "tokens it has (e.g. <|im_end|>), or drop --end-tokens to stop on its EOS ids")
    return {vocab[t] for t in end_tokens}


def make_engine(cfg: GenerateConfig, student, teacher, bridge) -> Engine:
    """The engine of a config: in-process (decoding/engine.py) or over served models (serving/engine.py); its
    progress hook is `Sampling`'s to set."""
    settings = DecodeSettings(
        mode=cfg.mode,
        rsd=RSDParams(cfg.threshold, cfg.trials, cfg.top_k, cfg.teacher_temperature),
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed,
        draft_tokens=parse_draft_tokens("draft_tokens", cfg.draft_tokens) if cfg.mode != "student" else 0,
        teacher_topk=cfg.save_teacher_topk if cfg.mode != "student" else 0,
    )
    if getattr(cfg, "served", False):
        from .serving.engine import ServedEngine

        if settings.draft_tokens == "auto":  # served models: no measured costs to choose from, so lockstep
            settings.draft_tokens = 0
        return ServedEngine(student.model, teacher.model if teacher else None, bridge, settings,
                            eos_ids=set(student.eos_ids()), stop_fn=stop_checker(student.tokenizer, cfg.stop),
                            rows_in_flight=cfg.max_in_flight)
    return Engine(
        student.model, teacher.model if teacher else None, bridge, settings, eos_ids=end_ids(student, cfg.end_tokens),
        batch_size=cfg.batch_size, stop_fn=stop_checker(student.tokenizer, cfg.stop),
        kv_cache=cfg.kv_cache,
    )


def run_info(student_name: str, teacher_name: str | None, bridge, served: dict | None = None) -> dict[str, Any]:
    """What generate's run.json holds beside the config, versions and seed (`RunDir.write_run_json`);
    `served`: per role, the endpoints and what each server said of itself (never a key)."""
    info = {
        "models": {"student": student_name, "teacher": teacher_name},
        "bridge": None if bridge is None else {"identity": bridge.identity, "shared_fraction": bridge.shared_fraction},
    }
    if served:
        info["served"] = served
    return info


def served_info(student, teacher) -> dict | None:
    """Per role, what the served models' probes found (None for in-process models)."""
    from .serving.load import ServedEnd

    if not isinstance(student, ServedEnd):
        return None
    return {role: end.model.info for role, end in (("student", student), ("teacher", teacher)) if end is not None}


def stopped_by(fin: Finished, tokenizer, eos: set[int], stops: list[str] | tuple = ()) -> str | None:
    """What ended a sequence that stopped: the text of its end-of-sequence token (e.g. `<|im_end|>`) or the stop
    string in its tail; None when it ran out of tokens."""
    if fin.finish_reason != "stop" or not fin.token_ids:
        return None
    if fin.token_ids[-1] in eos:
        return tokenizer.convert_ids_to_tokens(fin.token_ids[-1])
    tail = tokenizer.decode(fin.token_ids[-(max(map(len, stops), default=0) + 1):], skip_special_tokens=False)
    return next((s for s in stops if s in tail), None)


def build_record(prompt, sample: int, fin, tokenizer, eos: set[int], mode: str, with_teacher: bool,
                 stops: list[str] | tuple = ()) -> dict:
    """One finished sequence as a trace record's JSON object (docs/architecture.md, "The trace record");
    `stops`: the run's stop strings (which one ended it goes in `stopped_by`)."""
    n = len(fin.token_ids)
    return TraceRecord(
        prompt_id=prompt.prompt_id, sample=sample, prompt=prompt.text, completion=completion_text(fin, tokenizer, eos),
        prompt_token_ids=prompt.token_ids, completion_token_ids=fin.token_ids, origin=fin.origin,
        student_logprobs=fin.student_logprobs, teacher_logprobs=fin.teacher_logprobs if with_teacher else None,
        finish_reason=fin.finish_reason, fallback_rate=fin.origin.count("S") / n if n else 0.0, mode=mode,
        stopped_by=stopped_by(fin, tokenizer, eos, stops), extra=dict(prompt.carry),
    ).to_json()


def write_stats(out: Path, mode: str, *, prompts: int, skipped: list[str], sequences: int, tokens: int,
                seconds: float, log=print, extra: dict | None = None, draft: dict | None = None) -> dict[str, Any]:
    """Totals over every trace file in OUT plus this run's own counts, to OUT/stats.json; logs a summary.
    `draft` is `Engine.counters()` (or the workers' sum): its `teacher_passes_per_token`, `draft_tokens`,
    `kv_cache` and `draft_acceptance` (the student's guesses that became tokens) are this run's, always
    written, None where unknown (e.g. nothing generated)."""
    records = [r for path in trace_files(out) for r in read_records(path)]
    stats = summarize(records)
    stats.update({
        "prompts": prompts,
        "skipped_prompts": len(skipped),
        "skipped_prompt_ids": skipped,
        "teacher_passes_per_token": (draft or {}).get("teacher_passes_per_token"),
        "draft_tokens": (draft or {}).get("draft_tokens"),
        "kv_cache": (draft or {}).get("kv_cache"),
        "draft_acceptance": (draft or {}).get("draft_acceptance"),
        # auto: the layout's reason and how often each K and layout was chosen (Engine.counters)
        **{k: v for k, v in (draft or {}).items() if k.startswith(("kv_cache_", "passes_by_", "mean_draft",
                                                                     "match_rate"))},
        **({"served": draft["served"]} if (draft or {}).get("served") else {}),  # requests and round trips
        "this_run": {"sequences": sequences, "tokens": tokens, "seconds": round(seconds, 3),
                     "tokens_per_second": tokens_per_second(tokens, seconds), **(extra or {})},
    })
    write_json_atomic(out / "stats.json", stats)
    acc = stats["acceptance_rate"]
    log(
        f"{stats['sequences']} sequences, {stats['tokens']} tokens in {out}"
        + (f"; teacher tokens accepted {acc:.1%}, student fallback {1 - acc:.1%}" if acc is not None and mode == "rsd" else "")
        + f"; this run {tokens} tokens in {seconds:.1f}s ({stats['this_run']['tokens_per_second']} tok/s)"
    )
    return stats


def completion_text(fin: Finished, tokenizer, eos: set[int]) -> str:
    """The text of a finished sequence, without its final EOS token."""
    ids = fin.token_ids[:-1] if fin.token_ids and fin.token_ids[-1] in eos else fin.token_ids
    return tokenizer.decode(ids, skip_special_tokens=False)


class Sampling:
    """The sampling loop, written once: iterating it runs `planned`'s requests through `engine` and yields
    (prompt, sample, Finished) for each, in the order they finish. Out of memory halves the engine's batch and
    goes on (`run_halving_on_oom`): nothing is lost or doubled. `progress` (a `Progress`, optional) sees the
    engine's steps and one tick per sequence, and is closed at the end. Afterwards `sequences`, `tokens` and
    `seconds` tally what it ran; the engine's `counters()` hold the rest of the run's statistics."""

    def __init__(self, engine: Engine, planned: Planned, log: Callable[[str], None] = print,
                 progress: Progress | None = None):
        self.engine, self.planned, self.log, self.progress = engine, planned, log, progress
        self.sequences = self.tokens = 0
        self.seconds = 0.0

    def __iter__(self) -> Iterator[tuple[Any, int, Finished]]:
        if self.progress is not None:
            self.engine.on_step, self.progress.engine = self.progress.step, self.engine
        started = time.perf_counter()
        try:
            for fin in run_halving_on_oom(self.engine, self.planned.requests, self.log):
                stop_if_signalled()  # SIGTERM/SIGHUP whose exception a library swallowed: stop here
                self.sequences += 1
                self.tokens += len(fin.token_ids)
                yield (*self.planned.handles[fin.handle], fin)
                if self.progress is not None:
                    self.progress.bar.update(1)
            stop_if_signalled()  # not a finished run: no stats.json
        finally:
            self.seconds += time.perf_counter() - started
            if self.progress is not None:
                self.progress.close()


def record_maker(cfg: GenerateConfig, student, teacher) -> Callable[[Any, int, Finished], dict]:
    """`build_record` under a config: (prompt, sample, Finished) -> a trace record's JSON object, ended by the
    config's end tokens (`end_ids`) and stop strings."""
    eos = end_ids(student, cfg.end_tokens)
    return lambda prompt, s, fin: build_record(prompt, s, fin, student.tokenizer, eos, cfg.mode, teacher is not None,
                                               cfg.stop)


def write_traces(path: Path, cfg: GenerateConfig, student, teacher, sampling: Sampling,
                 before_write: Callable[[dict], None] | None = None) -> None:
    """Append one trace record (and its top-K row) per finished sequence of `sampling` to `path`, flushed each;
    `before_write(record)` runs before each (the Ray worker's fault injection and driver check)."""
    make = record_maker(cfg, student, teacher)
    with trace_writer(path, cfg, student, teacher.name if teacher else None) as writer:
        for prompt, s, fin in sampling:
            record = make(prompt, s, fin)
            if before_write is not None:
                before_write(record)
            writer.write(record, fin.teacher_topk)


@dataclass
class Done:
    """What one of generate's executors ran (in this process or over Ray workers): its tallies, the engine's
    counters (`counters()`, or the workers' merged), what it adds to stats.json's this_run."""
    sequences: int
    tokens: int
    seconds: float
    skipped: list[str]
    counters: dict = field(default_factory=dict)
    extra: dict | None = None


# rate -> what it is per: how `merge_counters` weighs the parts' rates
_RATE_WEIGHTS: dict[str, Callable[[dict], float]] = {
    "teacher_passes_per_token": lambda part: part["per"]["tokens_emitted"],
    "draft_acceptance": lambda part: part["per"]["draft_proposed"],
    "mean_draft_tokens": lambda part: sum((part.get("passes_by_draft_tokens") or {}).values()),
}
_COUNTS = ("passes_by_draft_tokens", "kv_cache_runs")


def counted(engine) -> dict:
    """`engine.counters()` with what its rates are per (`per`: tokens emitted, draft guesses checked), so that
    `merge_counters` can weigh them; stats.json takes only the counters."""
    return {**engine.counters(), "per": {"tokens_emitted": engine.tokens_emitted,
                                         "draft_proposed": engine.draft_proposed}}


def merge_counters(parts: list[dict]) -> dict:
    """One run's counters over several engines (the Ray workers'), each `counted(engine)`: a rate is the parts'
    rates weighted by what they are per, counts of choices add up, and a value the parts disagree on (auto's
    layout in use, its reason) is None. No parts: {} (every statistic unknown)."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for part in parts for k in part if k != "per"):
        values = [part.get(key) for part in parts]
        if key in _RATE_WEIGHTS:
            pairs = [(v, _RATE_WEIGHTS[key](part)) for v, part in zip(values, parts) if v is not None]
            weight = sum(w for _, w in pairs)
            out[key] = round(sum(v * w for v, w in pairs) / weight, 4) if weight else None
        elif key in _COUNTS:
            total = sum((Counter(v or {}) for v in values), Counter())
            out[key] = {str(k): total[k] for k in sorted(total, key=lambda k: (len(str(k)), str(k)))}
        else:
            out[key] = values[0] if all(v == values[0] for v in values) else None
    return out


# -- generate's output directory (this process or the Ray driver) ------------------------------

def open_run_dir(cfg: GenerateConfig) -> RunDir:
    """generate's OUT: its trace files, run.json and stats.json; resumed when the trace settings match."""
    return RunDir(cfg.out, command="generate", owned=[*TRACE_GLOBS, "run.json", "stats.json"], overwrite=cfg.overwrite,
                  settings=cfg.trace_settings(), defaults=type(cfg)().trace_settings(), what="a run",
                  owned_noun="trace files",
                  inputs={"student": cfg.student, "teacher": cfg.teacher, "prompts": cfg.prompts},
                  models=("student", "teacher"))


def finished_in(rundir: RunDir, prompt_texts: dict) -> set[str]:
    """The record ids already in OUT (torn tails cut); `prompt_texts` filled as `finished_ids` does."""
    return finished_ids(rundir.root, prompt_texts=prompt_texts)


def sync_sidecar(out: Path, cfg: GenerateConfig) -> set[str]:
    """Once the run has started: with `--save-teacher-topk` the top-K sidecar is cut to the records of the
    trace files (`prune_sidecar`), and the ids of finished records whose row was lost (their trace lines removed:
    to be generated again) are returned; without it, a sidecar left by an earlier run (replaced by --overwrite)
    goes."""
    from .data.topk import part_files, prune_sidecar

    if cfg.save_teacher_topk:
        return prune_sidecar(out)
    for part in part_files(out):
        part.unlink()
    return set()


def trace_writer(path: Path, cfg: GenerateConfig, student=None, teacher_name: str | None = None):
    """The writer of one trace file: plain (`TraceWriter`), or with the teacher's top-K sidecar, whose schema
    metadata names K, the temperature (1: the engine keeps the teacher's plain log-probs) and `student`'s
    tokenizer, whose ids the rows hold."""
    from .data.traces import TraceWriter

    if cfg.save_teacher_topk:
        from .data.topk import TopkTraceWriter, topk_metadata

        meta = None if student is None else topk_metadata(cfg.save_teacher_topk, 1.0, student.tokenizer,
                                                          student.name, teacher_name)
        return TopkTraceWriter(path, meta)
    return TraceWriter(path)


def check_prompts_unchanged(prompt_texts: dict, prompts: list) -> None:
    """Refuse to resume when a finished trace's prompt text (from `finished_ids`) differs from the prompt of
    the same id now (the prompts file was edited in place, or another one has the same ids): the run would
    mix the two. Names the first such record in file order."""
    now = {p.prompt_id: p.text for p in prompts if not getattr(p, "over_cap", False) and not getattr(p, "invalid", None)}
    changed = [(path, lineno, pid) for pid, texts in prompt_texts.items() if pid in now
               for text, (path, lineno) in texts.items() if text != now[pid]]
    if changed:
        path, lineno, pid = min(changed)
        raise OutputDirError(
            f"{path}:{lineno}: prompt {pid!r} was generated from another text than the prompt of that id "
            f"now; the prompts (or the system prompt, prefill or template) changed since. Use a new --out "
            "directory, or pass --overwrite to replace that run.")
