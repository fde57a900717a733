"""`tracetailor eval`: sample a model on reasoning benchmarks and grade every sample.

The command, beside generate.py and score.py; the library parts live in evaluate/. It resolves
the benchmarks (evaluate/benchmarks.py), loads the model (or its served endpoints), builds the
prompts (chat template + the benchmark's instruction + an optional thinking prefill,
data/prompts.py), samples `samples` completions per question through the one sampling loop
(sampling.Sampling, plain student sampling), grades each one (evaluate/grading.py
`grade_sample` / `grade_paper`), scores them (evaluate/metrics.py `summarize`), and writes
per-sample JSONL, `summary.json` and `summary.md`, and the same results in lighteval's layout
(results/ and details/, evaluate/lighteval_files.py).

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
before it is counted separately as `truncated_before_answer`. That is the default
grading, `strict`; `--grading paper` (evaluate/grading.py) instead shows an LLM judge
the whole completion, cut-off ones too, and the benchmark's reference as it is, as the
authors' eval.py does. The summary names the grading of every figure.

Resume: a run restarted on the same OUT with the same settings skips the samples
already in `OUT/<benchmark>.jsonl` (a torn last line is cut); `samples`, `limit`,
`benchmark`, `batch_size`, `device` may change between runs. The summary
counts only the current questions and samples.
The design as a whole: docs/architecture.md.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import EvalConfig
from .data.traces import AtomicWriter
from .evaluate.answers import THINK_END, require_math_verify
from .evaluate.benchmarks import BenchmarkError, BenchmarkSpec, Item, load_benchmark, resolve_benchmark, split_benchmarks
from .evaluate.grading import grade_paper, grade_sample, grading_label, paper_judge
from .evaluate.judge import judge_from, judged
from .evaluate.lighteval_files import write_lighteval_files
from .evaluate.metrics import summarize

THINK_PREFILL = "<think>\n"


# ---------------------------------------------------------------- the prompt


def resolve_prefill(prefill: str | None, tokenizer) -> str:
    """None (auto) -> "<think>\\n" when the tokenizer knows a `<think>` token, else no prefill."""
    if prefill is not None:
        return prefill
    return THINK_PREFILL if "<think>" in tokenizer.get_vocab() else ""


def uses_thinking(prefill: str) -> bool:
    """A prefill that opens a think block without closing it (Qwen3's no-think prefill closes it)."""
    return "<think>" in prefill and THINK_END not in prefill


# ---------------------------------------------------------------- the summary tables


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
        f"Grading: {summary.get('grading', 'strict')}.",
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


def open_run_dir(cfg: EvalConfig, names: list[str]) -> "RunDir":
    """eval's OUT: a samples file per benchmark (those of the run it replaces too), run.json, the summaries."""
    from .data.rundir import RunDir

    owned = {samples_file_name(n) for n in names} | {samples_file_name(n) for n in _benchmarks_before(cfg.out)}
    return RunDir(cfg.out, command="eval", owned=sorted(owned) + ["run.json", "summary.json", "summary.md"],
                  overwrite=cfg.overwrite, settings=cfg.settings(), defaults=type(cfg)().settings(),
                  marker="summary.json", results=["summary.md"],
                  what="an evaluation", owned_noun="sample files", inputs={"model": cfg.model}, models=("model",))


def _benchmarks_before(out: str) -> list[str]:
    """The benchmarks named in OUT/run.json (what --overwrite replaces), [] if none can be read."""
    try:
        return list(json.loads((Path(out) / "run.json").read_text(encoding="utf-8")).get("benchmarks", {}))
    except (OSError, ValueError, AttributeError):
        return []


# ---------------------------------------------------------------- the run


def load_specs(cfg: EvalConfig) -> tuple[dict[str, BenchmarkSpec], dict[str, list[Item]]]:
    """The benchmarks and their questions, before any model loads: a typo or a missing field fails first."""
    specs: dict[str, BenchmarkSpec] = {}
    for name in split_benchmarks(cfg.benchmark):
        spec = resolve_benchmark(name, cfg.question_field, cfg.answer_field, copies=cfg.benchmark_copies)
        if spec.name in specs:
            raise BenchmarkError(f"two benchmarks are both named {spec.name!r}; rename one of the files")
        specs[spec.name] = spec
    benchmarks = {name: load_benchmark(spec, limit=cfg.limit, choice_layout=cfg.choice_layout)
                  for name, spec in specs.items()}
    if any(spec.answer_type == "math" for spec in specs.values()):
        require_math_verify()
    return specs, benchmarks


def run_eval(cfg: EvalConfig, log=print) -> dict[str, Any]:
    """Run `eval` end to end; return the summary written to OUT/summary.json."""
    cfg.validate()
    started = time.time()
    specs, benchmarks = load_specs(cfg)
    with open_run_dir(cfg, list(specs)) as rundir:
        model = _load(cfg, log)
        prefill = resolve_prefill(cfg.prefill, model.tokenizer)
        thinking = uses_thinking(prefill)
        rundir.started()
        run = rundir.write_run_json(asdict(cfg), seed=cfg.seed, model=model.name, prefill=prefill, thinking=thinking,
                                    benchmarks={n: {"source": s.source, "question_field": s.question_field,
                                                    "answer_field": s.answer_field, "answer_type": s.answer_type,
                                                    "questions": len(benchmarks[n])} for n, s in specs.items()})
        log(f"model {model.name}; prefill {prefill!r}" + (" (thinking: graded after </think>)" if thinking else ""))
        engine = _engine(cfg, model)
        judge = judge_from(cfg, rundir.path("judge-cache.jsonl"), log)
        if cfg.grading == "paper":
            paper_judge(judge, cfg.judge_prompt)
        results = {name: eval_benchmark(name, specs[name], items, cfg, model, engine, prefill, thinking,
                                        rundir.root, log, judge=judge) for name, items in benchmarks.items()}
        summary = _summary(cfg, model.name, prefill, thinking, results, judge)
        with AtomicWriter(rundir.path("summary.md")) as f:  # a temporary file, renamed: never half a table
            f.write(markdown(summary))
        questions = {n: {it.id for it in items} for n, items in benchmarks.items()}
        write_lighteval_files(rundir.root, summary, run, started, questions, log)  # lighteval's layout too
        rundir.finish(summary)  # summary.json last: it marks a finished evaluation
    log(text_table(summary))
    log(f"per-sample results, summary.json / summary.md and lighteval's results/ and details/ in {rundir.root}")
    return summary


def _load(cfg: EvalConfig, log):
    """The model in this process, or (--model-url) its tokenizer with its servers probed."""
    if cfg.model_url:
        from .serving.load import load_served, make_client

        return load_served("model", cfg.model, cfg.model_url, cfg.protocol, cfg.served_name, make_client(cfg),
                           k=1, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code, log=log)
    from .models import load_model

    return load_model(cfg.model, gguf_file=cfg.gguf_file, device=cfg.device, dtype=cfg.dtype,
                      trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, role="model")


def _engine(cfg: EvalConfig, model):
    from .decoding.engine import DecodeSettings, Engine

    settings = DecodeSettings(mode="student", temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                              seed=cfg.seed)
    if cfg.model_url:
        from .serving.engine import ServedEngine

        return ServedEngine(model.model, settings=settings, eos_ids=set(model.eos_ids()),
                            rows_in_flight=cfg.max_in_flight, server_sampling=True)
    return Engine(model.model, settings=settings, eos_ids=set(model.eos_ids()), batch_size=cfg.batch_size,
                  kv_cache=cfg.kv_cache)


def eval_benchmark(name: str, spec: BenchmarkSpec, items: list[Item], cfg: EvalConfig, model, engine, prefill: str,
                   thinking: bool, out: Path, log, judge=None) -> dict[str, Any]:
    """Sample, grade and append the samples of one benchmark not yet in OUT; its scores over all of them.
    `judge` (an LLMJudge or None) grades the math answers the offline checks reject."""
    from .data.prompts import build_prompts
    from .data.traces import TraceWriter, read_repaired
    from .errors import warn
    from .sampling import Progress, Sampling, plan_requests, skipped_lines

    tok = model.tokenizer
    prompts = build_prompts([{"id": it.id, "prompt": it.prompt if cfg.instruction else it.bare} for it in items], None,
                            tok, prompt_field="prompt",
                            id_field="id", system_prompt=cfg.system_prompt, prefill=prefill,
                            chat_template=cfg.chat_template)
    path = out / samples_file_name(name)
    records = read_repaired(path)
    done = {(r["question_id"], r["sample"]) for r in records}
    by_id = {it.id: it for it in items}
    pending = ((p, s) for p in prompts for s in range(cfg.samples) if (p.prompt_id, s) not in done)
    planned = plan_requests(pending, None, model.context_length, cfg)
    for line in skipped_lines(planned.skipped, prompts, model.context_length, cfg.max_length, noun="question"):
        warn(f"{name}: {line}")
    if done and planned.requests:
        log(f"{name}: resuming, {len(done)} sample(s) already in {path}, {len(planned.requests)} to go")
    sampling = Sampling(engine, planned, log, Progress(len(planned.requests), cfg.progress, "student",
                                                       desc=f"eval [{name}]"))
    eos = set(model.eos_ids())

    def grade(finished, with_judge):
        prompt, s, fin = finished
        return sample_record(name, by_id[prompt.prompt_id], s, fin, tok, eos, thinking, cfg.answer_mode,
                             with_judge, paper=cfg.grading == "paper")

    with TraceWriter(path) as writer:
        # with a judge, up to a batch of finished samples wait while their questions are asked at once
        # (evaluate/judge.py `judged`)
        for _, record in judged(sampling, grade, judge, chunk=cfg.batch_size):
            writer.write(record)
            records.append(record)
    skipped, tokens, seconds = planned.skipped, sampling.tokens, sampling.seconds
    result = summarize(records, [it for it in items if it.id not in skipped], cfg.samples, thinking)
    result.update({
        "source": spec.source, "answer_type": spec.answer_type, "skipped_questions": skipped, "file": path.name,
        "grading": grading_label(cfg.grading, cfg.answer_mode, judge, cfg.judge_prompt),
        "this_run": {"completions": sampling.sequences, "tokens": tokens, "seconds": round(seconds, 3),
                     "tokens_per_second": round(tokens / seconds, 2) if sampling.sequences and seconds > 0 else None},
    })
    return result


def sample_record(benchmark: str, item: Item, sample_index: int, fin, tokenizer, eos: set[int],
                  thinking: bool, answer_mode: str = "math-verify", judge=None,
                  paper: bool = False) -> dict[str, Any]:
    """One graded sample, as a line of OUT/<benchmark>.jsonl; `paper`: the paper's grading (evaluate/grading.py)."""
    from .data.traces import record_id
    from .sampling import completion_text

    completion = completion_text(fin, tokenizer, eos)
    if paper:
        verdict = grade_paper(completion, item, thinking, judge)
    else:
        verdict = grade_sample(completion, item.gold, item.answer_type, thinking, fin.finish_reason, answer_mode,
                               judge, item.question)
    record = {
        "id": record_id(item.id, sample_index), "benchmark": benchmark, "question_id": item.id,
        "sample": sample_index, "question": item.question, "gold": item.gold,
        "extracted": verdict.extracted, "correct": verdict.correct, "completion": completion,
        "finish_reason": fin.finish_reason, "completion_tokens": len(fin.token_ids),
        "think_closed": verdict.think_closed, "truncated_before_answer": verdict.truncated_before_answer,
    }
    if item.choices is not None:
        record["choices"] = item.choices
    return record


def _summary(cfg: EvalConfig, model_name: str, prefill: str, thinking: bool, results: dict,
             judge=None) -> dict[str, Any]:
    tokens = sum(r["this_run"]["tokens"] for r in results.values())
    seconds = sum(r["this_run"]["seconds"] for r in results.values())
    return {
        "model": model_name,
        "prefill": prefill,
        "thinking": thinking,
        "settings": {k: getattr(cfg, k) for k in ("samples", "temperature", "top_p", "top_k", "max_new_tokens",
                                                   "max_length", "seed", "system_prompt", "instruction",
                                                   "chat_template", "answer_mode", "limit")},
        "judge": None if judge is None else {"model": judge.model, "endpoint": judge.endpoint,
                                             "requests_this_run": judge.requests},
        "grading": grading_label(cfg.grading, cfg.answer_mode, judge, cfg.judge_prompt),
        "scores": "accuracy: mean over questions of per-question accuracy over samples; "
                  "stderr: standard error of that mean across questions",
        "benchmarks": results,
        "this_run": {"tokens": tokens, "seconds": round(seconds, 3),
                     "tokens_per_second": round(tokens / seconds, 2) if tokens else None},
    }


__all__ = ["EvalConfig", "resolve_prefill", "run_eval", "uses_thinking"]
