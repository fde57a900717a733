"""`tracetailor eval`: sample a model on reasoning benchmarks and grade every sample.

Glue between the parts: resolves the benchmarks (benchmarks.py), loads the model,
builds the prompts (chat template + the benchmark's instruction + an optional
thinking prefill, data/prompts.py), samples `samples` completions per question
with the engine's plain student sampling (decoding/engine.py), grades each one
(answers.py), and writes per-sample JSONL, `summary.json` and `summary.md`.

Scores. Per benchmark, `accuracy` is the mean over questions of each question's
accuracy over its samples (with the same number of samples per question, this
is also the mean over all samples: "avg@n", the paper's figure), and `stderr` is
its standard error across questions: the sample standard deviation of the
per-question accuracies over the square root of the number of questions. That
is the standard error the reasoning-eval papers report for mean@n (it treats
questions, not samples, as the independent draws; with one sample per question
it equals the binomial standard error up to the n-1).

With thinking (a `<think>` prefill), only the text after `</think>` is graded;
a completion without `</think>` is wrong, and one cut off by the token limit
before it is counted separately as `truncated_before_answer`.

Resume: a run restarted on the same OUT with the same settings skips the samples
already in `OUT/<benchmark>.jsonl` (a torn last line is cut); `samples`, `limit`,
`benchmark`, `batch_size`, `device` may change between runs. The summary
counts only the current questions and samples.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..config import ConfigError
from .answers import THINK_END, extract_answer, is_correct, multiple_choice_letter, normalize, require_math_verify
from .metrics import majority_at_k, mean_over_questions, pass_at_k
from .benchmarks import BenchmarkError, BenchmarkSpec, Item, load_benchmark, resolve_benchmark, split_benchmarks

THINK_PREFILL = "<think>\n"


@dataclass
class EvalConfig:
    """Everything `tracetailor eval` needs. Defaults are the paper's evaluation settings."""

    model: str = ""  # hub id, local dir or .gguf file
    gguf_file: str | None = None  # GGUF file name inside the model's dir or hub repo
    benchmark: str = "aime24,aime25,math500,gpqa-diamond"  # comma list of names or local files
    samples: int = 16  # completions per question
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0  # 0 = no top-k truncation
    max_new_tokens: int = 8192
    prefill: str | None = None  # None = auto: "<think>\n" when the tokenizer has a <think> token, else ""
    system_prompt: str | None = None
    chat_template: bool = True
    batch_size: int = 32
    seed: int = 0
    limit: int | None = None  # only the first N questions of each benchmark
    out: str = "results"
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True
    question_field: str | None = None  # local files: default "question"; named benchmarks: the spec's own
    answer_field: str | None = None  # local files: default "answer"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load pickle .bin weights (they can run code)
    overwrite: bool = False

    # Fields that do not change any sample's text: a run may resume with other values.
    RESUMABLE = ("out", "batch_size", "device", "progress", "limit", "samples", "benchmark", "overwrite",
                 "allow_pickle")

    def validate(self) -> "EvalConfig":
        def bad(name, why):
            raise ConfigError(f"{name}: {why}")

        if not self.model:
            bad("model", "required (a hub id such as Qwen/Qwen3-0.6B, a local dir or a .gguf file)")
        if not split_benchmarks(self.benchmark or ""):
            bad("benchmark", "required (e.g. aime24,math500, or a JSONL/Parquet file)")
        for name in ("samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("top_k", "seed"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if not self.temperature > 0:
            bad("temperature", "must be > 0")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if self.limit is not None and self.limit < 1:
            bad("limit", "must be >= 1")
        return self

    def settings(self) -> dict[str, Any]:
        """The fields that decide the samples; a resumed run must match them."""
        return {k: v for k, v in asdict(self).items() if k not in self.RESUMABLE}


# ---------------------------------------------------------------- grading


@dataclass
class Verdict:
    extracted: str | None  # the answer found (math) or the letter (choice); None if none
    correct: bool
    think_closed: bool | None  # thinking runs: whether `</think>` came; None without thinking
    truncated_before_answer: bool  # thinking runs: cut by the token limit before `</think>`


def grade_sample(completion: str, gold: str, answer_type: str, thinking: bool, finish_reason: str) -> Verdict:
    """Grade one completion: the last `\\boxed{}` after `</think>` (math, by math-verify) or the chosen letter."""
    if thinking and THINK_END not in completion:
        return Verdict(None, False, False, finish_reason == "length")
    closed = True if thinking else None
    if answer_type == "choice":
        letter = multiple_choice_letter(completion, thinking)
        return Verdict(letter, letter is not None and letter.upper() == gold.strip().upper(), closed, False)
    answer = extract_answer(completion, thinking)
    return Verdict(answer, is_correct(answer, gold), closed, False)


def resolve_prefill(prefill: str | None, tokenizer) -> str:
    """None (auto) -> "<think>\\n" when the tokenizer knows a `<think>` token, else no prefill."""
    if prefill is not None:
        return prefill
    return THINK_PREFILL if "<think>" in tokenizer.get_vocab() else ""


def uses_thinking(prefill: str) -> bool:
    """A prefill that opens a think block without closing it (Qwen3's no-think prefill closes it)."""
    return "<think>" in prefill and THINK_END not in prefill


# ---------------------------------------------------------------- scores


def per_question_accuracy(records: Iterable[dict], samples: int) -> dict[str, float]:
    """Question id -> the share of its first `samples` samples graded correct."""
    hits: dict[str, list[bool]] = {}
    for r in records:
        if r["sample"] < samples:
            hits.setdefault(r["question_id"], []).append(bool(r["correct"]))
    return {q: sum(v) / len(v) for q, v in hits.items()}


def mean_stderr(values: Sequence[float]) -> tuple[float | None, float | None]:
    """The mean and its standard error (None for no values; the error None below two)."""
    n = len(values)
    mean = statistics.fmean(values) if n else None
    return mean, (statistics.stdev(values) / math.sqrt(n) if n > 1 else None)


def summarize(records: list[dict], items: list[Item], samples: int, thinking: bool) -> dict[str, Any]:
    """Scores of one benchmark over the current questions' first `samples` samples (see the module docstring)."""
    ids = {it.id for it in items}
    recs = [r for r in records if r["question_id"] in ids and r["sample"] < samples]
    per_question = list(per_question_accuracy(recs, samples).values())
    q = len(per_question)
    accuracy, stderr = mean_stderr(per_question)
    tokens = sum(r.get("completion_tokens", 0) for r in recs)
    out = {
        "questions": q,
        "questions_asked": len(items),
        "samples_per_question": samples,
        "completions": len(recs),
        "correct": sum(bool(r["correct"]) for r in recs),
        "accuracy": accuracy,
        "stderr": stderr,
        "no_answer": sum(r["extracted"] is None for r in recs),
        "truncated": sum(r["finish_reason"] == "length" for r in recs),
        "mean_completion_tokens": tokens / len(recs) if recs else None,
    }
    out.update(vote_scores(recs, samples))
    if thinking:
        out["unclosed_think"] = sum(r.get("think_closed") is False for r in recs)
        out["truncated_before_answer"] = sum(bool(r.get("truncated_before_answer")) for r in recs)
    return out


def vote_scores(recs: list[dict], k: int) -> dict[str, Any]:
    """pass@k and majority@k (metrics.py) over the questions that have all k samples; answers vote normalized."""
    by_question: dict[str, list[dict]] = {}
    for r in sorted(recs, key=lambda r: r["sample"]):
        by_question.setdefault(r["question_id"], []).append(r)
    full = [g[:k] for g in by_question.values() if len(g) >= k]
    votes = [[None if r["extracted"] is None else normalize(r["extracted"]) for r in g] for g in full]
    grades = [[bool(r["correct"]) for r in g] for g in full]
    return {"k": k, "questions_with_k_samples": len(full),
            "pass_at_k": mean_over_questions([pass_at_k(k, sum(g), k) for g in grades]),
            "majority_at_k": mean_over_questions([majority_at_k(v, g, k) for v, g in zip(votes, grades)])}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["benchmark", "questions", "samples", "accuracy %", "± SE", "pass@k %", "maj@k %", "truncated",
              "cut before </think>", "no answer", "tok/s"]
    rows = []
    for name, b in summary["benchmarks"].items():
        tps = b.get("this_run", {}).get("tokens_per_second")
        rows.append([name, str(b["questions"]), str(b["samples_per_question"]), _pct(b["accuracy"]),
                     _pct(b["stderr"]), _pct(b.get("pass_at_k")), _pct(b.get("majority_at_k")), str(b["truncated"]),
                     str(b.get("truncated_before_answer", "-")), str(b["no_answer"]), "-" if tps is None else f"{tps:.0f}"])
    return header, rows


def text_table(summary: dict[str, Any]) -> str:
    header, rows = table_rows(summary)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def markdown(summary: dict[str, Any]) -> str:
    header, rows = table_rows(summary)
    s = summary["settings"]
    lines = [
        f"# Evaluation of {summary['model']}",
        "",
        f"temperature {s['temperature']}, top-p {s['top_p']}, top-k {s['top_k'] or 'none'}, "
        f"max new tokens {s['max_new_tokens']}, prefill {summary['prefill']!r}, seed {s['seed']}.",
        "Accuracy: mean over questions of the per-question accuracy over samples; "
        "± SE: its standard error across questions. pass@k (unbiased estimator) and maj@k (majority vote of "
        "the extracted answers) use k = the samples per question.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- output directory


def samples_file_name(name: str) -> str:
    """The per-sample JSONL file of a benchmark in OUT."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".jsonl"


def _prepare_out(cfg: EvalConfig, names: list[str]) -> Path:
    from ..config import settings_changes
    from ..generate import OutputDirError

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    run_json = out / "run.json"
    before = None
    if run_json.exists():
        try:
            before = json.loads(run_json.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if not cfg.overwrite:
                raise OutputDirError(f"{run_json}: unreadable ({e}); pass --overwrite to start afresh") from e
    if cfg.overwrite:
        old = [samples_file_name(n) for n in (before or {}).get("benchmarks", {})]
        for name in set(old) | {samples_file_name(n) for n in names}:
            (out / name).unlink(missing_ok=True)
        for name in ("run.json", "summary.json", "summary.md"):
            (out / name).unlink(missing_ok=True)
        return out
    if before is not None:
        detail = settings_changes(before.get("config", {}), cfg.settings())
        if detail:
            raise OutputDirError(
                f"--out {out} holds an evaluation with other settings ({detail}). "
                "Use a new --out directory, or pass --overwrite to replace it."
            )
    elif any((out / samples_file_name(n)).exists() for n in names):
        raise OutputDirError(f"--out {out} holds sample files but no run.json; use a new --out or pass --overwrite")
    return out


# ---------------------------------------------------------------- the run


def run_eval(cfg: EvalConfig, log=print) -> dict[str, Any]:
    """Run `eval` end to end; return the summary written to OUT/summary.json."""
    from ..data.prompts import build_prompts
    from ..data.traces import AtomicWriter, TraceWriter, read_repaired, record_id, write_json_atomic
    from ..decoding.engine import DecodeSettings, Engine, Request
    from ..decoding.rules import prompt_key
    from ..generate import _Progress, _versions
    from ..models import load_model

    cfg.validate()
    # benchmarks first: a typo or a missing field fails before the model loads
    specs: dict[str, BenchmarkSpec] = {}
    for name in split_benchmarks(cfg.benchmark):
        spec = resolve_benchmark(name, cfg.question_field, cfg.answer_field)
        if spec.name in specs:
            raise BenchmarkError(f"two benchmarks are both named {spec.name!r}; rename one of the files")
        specs[spec.name] = spec
    benchmarks = {name: load_benchmark(spec, limit=cfg.limit) for name, spec in specs.items()}
    if any(spec.answer_type == "math" for spec in specs.values()):
        require_math_verify()
    out = _prepare_out(cfg, list(specs))

    model = load_model(cfg.model, gguf_file=cfg.gguf_file, device=cfg.device, dtype=cfg.dtype,
                       trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, role="model")
    tok = model.tokenizer
    prefill = resolve_prefill(cfg.prefill, tok)
    thinking = uses_thinking(prefill)
    write_json_atomic(out / "run.json", {
        "config": asdict(cfg),
        "model": model.name,
        "prefill": prefill,
        "thinking": thinking,
        "benchmarks": {n: {"source": s.source, "question_field": s.question_field, "answer_field": s.answer_field,
                           "answer_type": s.answer_type, "questions": len(benchmarks[n])} for n, s in specs.items()},
        "versions": _versions(),
        "command": " ".join(sys.argv),
    })
    log(f"model {model.name}; prefill {prefill!r}" + (" (thinking: graded after </think>)" if thinking else ""))

    settings = DecodeSettings(mode="student", temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                              seed=cfg.seed)
    eos = set(model.eos_ids())
    engine = Engine(model.model, settings=settings, eos_ids=eos, batch_size=cfg.batch_size)
    context = model.context_length
    results: dict[str, Any] = {}
    total_tokens, total_seconds = 0, 0.0
    for name, items in benchmarks.items():
        spec = specs[name]
        prompts = build_prompts([{"id": it.id, "prompt": it.prompt} for it in items], None, tok,
                                prompt_field="prompt", id_field="id", system_prompt=cfg.system_prompt,
                                prefill=prefill, chat_template=cfg.chat_template)
        path = out / samples_file_name(name)
        records = read_repaired(path)
        done = {(r["question_id"], r["sample"]) for r in records}
        by_handle, requests, skipped = {}, [], []
        for item, p in zip(items, prompts):
            if context is not None and len(p.token_ids) >= context:
                skipped.append(item.id)
                continue
            room = cfg.max_new_tokens if context is None else min(cfg.max_new_tokens, context - len(p.token_ids))
            for s in range(cfg.samples):
                if (item.id, s) not in done:
                    handle = len(requests)
                    by_handle[handle] = (item, s)
                    requests.append(Request(handle, prompt_key(item.id), s, p.token_ids, None, room))
        if skipped:
            warnings.warn(f"{name}: skipped {len(skipped)} question(s) longer than the context ({context} tokens)",
                          stacklevel=2)
        if done and requests:
            log(f"{name}: resuming, {len(done)} sample(s) already in {path}, {len(requests)} to go")

        progress = _Progress(len(requests), cfg.progress, "student")
        progress.bar.set_description(f"eval [{name}]")
        engine.on_step = progress.step
        tokens, started = 0, time.perf_counter()
        try:
            with TraceWriter(path) as writer:
                for fin in engine.run(requests):
                    item, sample = by_handle[fin.handle]
                    ids = fin.token_ids[:-1] if fin.token_ids and fin.token_ids[-1] in eos else fin.token_ids
                    completion = tok.decode(ids, skip_special_tokens=False)
                    verdict = grade_sample(completion, item.gold, item.answer_type, thinking, fin.finish_reason)
                    tokens += len(fin.token_ids)
                    record = {
                        "id": record_id(item.id, sample), "benchmark": name, "question_id": item.id,
                        "sample": sample, "question": item.question, "gold": item.gold,
                        "extracted": verdict.extracted, "correct": verdict.correct, "completion": completion,
                        "finish_reason": fin.finish_reason, "completion_tokens": len(fin.token_ids),
                        "think_closed": verdict.think_closed, "truncated_before_answer": verdict.truncated_before_answer,
                    }
                    if item.choices is not None:
                        record["choices"] = item.choices
                    writer.write(record)
                    records.append(record)
                    progress.bar.update(1)
        finally:
            progress.close()
        seconds = time.perf_counter() - started
        total_tokens += tokens
        total_seconds += seconds
        results[name] = summarize(records, [it for it in items if it.id not in skipped], cfg.samples, thinking)
        results[name].update({
            "source": spec.source, "answer_type": spec.answer_type, "skipped_questions": skipped,
            "file": path.name,
            "this_run": {"completions": len(requests), "tokens": tokens, "seconds": round(seconds, 3),
                         "tokens_per_second": round(tokens / seconds, 2) if requests and seconds > 0 else None},
        })

    summary = {
        "model": model.name,
        "prefill": prefill,
        "thinking": thinking,
        "settings": {k: getattr(cfg, k) for k in ("samples", "temperature", "top_p", "top_k", "max_new_tokens",
                                                   "seed", "system_prompt", "chat_template", "limit")},
        "scores": "accuracy: mean over questions of per-question accuracy over samples; "
                  "stderr: standard error of that mean across questions",
        "benchmarks": results,
        "this_run": {"tokens": total_tokens, "seconds": round(total_seconds, 3),
                     "tokens_per_second": round(total_tokens / total_seconds, 2) if total_tokens else None},
    }
    write_json_atomic(out / "summary.json", summary)
    with AtomicWriter(out / "summary.md") as f:  # a temporary file, renamed: never half a table
        f.write(markdown(summary))
    log(text_table(summary))
    log(f"per-sample results and summary.json / summary.md in {out}")
    return summary


__all__ = ["EvalConfig", "Verdict", "grade_sample", "resolve_prefill", "run_eval", "summarize", "uses_thinking"]
