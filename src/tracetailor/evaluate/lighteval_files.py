"""eval's results also in the layout lighteval writes, for the dashboards and comparison scripts made for it.

Beside our per-sample JSONL and summary.json, `write_lighteval_files` puts under OUT:

- results/<model>/results_<date>.json with lighteval's top-level keys: "config_general" (times,
  "model_name" and "model_config": the model's name, dtype, generation_parameters and system prompt,
  as lighteval dumps its ModelConfig), "results" ({task: {metric: value, metric_stderr: ...}} and
  "all", the mean over tasks), "versions", "config_tasks", "summary_tasks", "summary_general";
- details/<model>/<date>/details_<task>_<date>.parquet, one row per question with lighteval's
  columns: "doc" (its Doc's fields: query, choices, gold_index, task_name, specific, ...),
  "model_response" (its ModelResponse's: the text of every sample, the answer extracted from each
  as text_post_processed, ...) and "metric" (the question's scores).

This is the layout of lighteval's current writer (0.12 and later: EvaluationTracker.save); 0.11
and before named tasks "suite|task|fewshot" and put model_sha / model_dtype / generation_parameters
directly in config_general. <date> is the finish time as lighteval spells it (ISO 8601 with ":" as
"-"), a task is named "<benchmark>|0" (task|few-shot count), <model> is a hub id as given or a
local model's directory name. Metrics: "acc" is our accuracy (mean over questions of the per-question
accuracy over the samples, avg@n) with "acc_stderr" across questions; "pass@k" and "maj@k" are
summary.json's pass_at_k and majority_at_k at k = the samples per question. The files are derived
from the samples files: each finished run replaces the previous run's. Our own code, after
lighteval's documented output layout; lighteval is not needed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ..data.traces import AtomicWriter, read_records
from .metrics import majority_at_k, pass_at_k
from .answers import normalize



def date_id(when: float) -> str:
    """A time as lighteval names its files: 2026-12-02T02-45-10.123456."""
    return datetime.fromtimestamp(when).isoformat().replace(":", "-")


def task_name(benchmark: str) -> str:
    """lighteval's task key: name|few-shot count (no suite since lighteval 0.12)."""
    return f"{benchmark}|0"


def model_dir_name(model: str) -> str:
    """A hub id as given (org/name: two levels, as lighteval nests them); a local model by its directory name."""
    from ..hub import hub_id_or_none

    return hub_id_or_none(model) or Path(model.rstrip("/")).name or "model"


def task_results(bench: dict[str, Any]) -> dict[str, float | None]:
    k = bench["k"]
    return {"acc": bench["accuracy"], "acc_stderr": bench["stderr"], f"pass@{k}": bench["pass_at_k"],
            f"maj@{k}": bench["majority_at_k"]}


def _mean_of_tasks(results: dict[str, dict]) -> dict[str, float]:
    """lighteval's "all": each metric averaged over the tasks that have it."""
    keys = dict.fromkeys(k for r in results.values() for k in r)
    means = {}
    for key in keys:
        values = [r[key] for r in results.values() if r.get(key) is not None]
        if values:
            means[key] = sum(values) / len(values)
    return means


def results_json(summary: dict[str, Any], run: dict[str, Any], started: float, ended: float) -> dict[str, Any]:
    """The content of results_<date>.json (see the module docstring)."""
    cfg, benches = run["config"], summary["benchmarks"]
    results = {task_name(n): task_results(b) for n, b in benches.items()}
    counts = {task_name(n): {"truncated": b["truncated"], "non_truncated": b["completions"] - b["truncated"],
                             "padded": 0, "non_padded": b["completions"], "effective_few_shots": 0.0,
                             "num_truncated_few_shots": 0} for n, b in benches.items()}
    return {
        "config_general": {
            "lighteval_sha": None, "num_fewshot_seeds": 1, "max_samples": cfg.get("limit"), "job_id": 0,
            "start_time": started, "end_time": ended, "total_evaluation_time_secondes": str(ended - started),
            "model_config": model_config(summary, cfg), "model_name": summary["model"],
        },
        "results": {**results, "all": _mean_of_tasks(results)},
        "versions": {**{t: 0 for t in results}, "all": 0},
        "config_tasks": {task_name(n): {"name": n, "hf_repo": b["source"], "hf_subset": None,
                                        "evaluation_splits": ["test"], "metrics": list(task_results(b)),
                                        "num_samples": [b["samples_per_question"]],
                                        "original_num_docs": b["questions_asked"], "effective_num_docs": b["questions"],
                                        "num_fewshots": 0, "version": 0} for n, b in benches.items()},
        "summary_tasks": counts,
        "summary_general": {key: sum(c[key] for c in counts.values())
                            for key in ("truncated", "non_truncated", "padded", "non_padded", "num_truncated_few_shots")},
        "versions_of_tools": run["versions"],
    }


def model_config(summary: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """config_general's "model_config" as lighteval dumps its ModelConfig (model_name, generation_parameters,
    system_prompt and the transformers backend's dtype), plus what tracetailor adds (prefill, samples)."""
    gen = {"temperature": cfg.get("temperature"), "top_p": cfg.get("top_p"), "top_k": cfg.get("top_k") or None,
           "max_new_tokens": cfg.get("max_new_tokens"), "seed": cfg.get("seed")}
    return {"model_name": summary["model"], "generation_parameters": gen, "system_prompt": cfg.get("system_prompt"),
            "dtype": cfg.get("dtype"), "prefill": summary["prefill"], "samples": cfg.get("samples")}


def detail_rows(records: list[dict], benchmark: str, samples: int, questions: set[str] | None = None
                ) -> list[dict[str, Any]]:
    """One row per question (of `questions`, default all): lighteval's doc / model_response / metric columns."""
    by_question: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: r["sample"]):
        if r["sample"] < samples and (questions is None or r["question_id"] in questions):
            by_question.setdefault(r["question_id"], []).append(r)
    rows = []
    for qid, recs in by_question.items():
        grades = [bool(r["correct"]) for r in recs]
        votes = [None if r["extracted"] is None else normalize(r["extracted"]) for r in recs]
        full = len(recs) == samples
        metric = {"acc": sum(grades) / len(grades),
                  f"pass@{samples}": pass_at_k(samples, sum(grades), samples) if full else None,
                  f"maj@{samples}": float(majority_at_k(votes, grades, samples)) if full else None}
        first = recs[0]
        rows.append({
            "doc": {"query": first["question"], "choices": [str(first["gold"])], "gold_index": 0,
                    "instruction": None, "id": qid, "task_name": task_name(benchmark), "num_samples": samples,
                    "specific": {"question_id": qid, "options": first.get("choices"),  # ours: not Doc's fields
                                 "finish_reason": [r["finish_reason"] for r in recs],
                                 "output_tokens_count": [r["completion_tokens"] for r in recs]}},
            "model_response": {"input": first.get("prompt"), "text": [r["completion"] for r in recs],
                               "text_post_processed": [r["extracted"] for r in recs],
                               "reasonings": [None] * len(recs),
                               "truncated_tokens_count": 0, "padded_tokens_count": 0},
            "metric": metric,
        })
    return rows


def write_lighteval_files(out: Path, summary: dict[str, Any], run: dict[str, Any], started: float,
                          questions: dict[str, set[str]] | None = None, log=print) -> dict[str, Any]:
    """results/<model>/results_<date>.json and details/<model>/<date>/details_<task>_<date>.parquet under `out`
    (the previous run's go first); `questions`: each benchmark's current question ids, as its summary counts
    them. {"results": path, "details": [paths]}."""
    ended = time.time()
    date, model = date_id(ended), model_dir_name(summary["model"])
    for folder in ("results", "details"):
        shutil.rmtree(out / folder, ignore_errors=True)
    results_path = out / "results" / model / f"results_{date}.json"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicWriter(results_path) as f:
        f.write(json.dumps(results_json(summary, run, started, ended), indent=2, ensure_ascii=False))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        log("note: pyarrow is not installed: skipped lighteval's details Parquet (pip install 'tracetailor[eval]')")
        return {"results": results_path, "details": []}
    details = []
    for name, bench in summary["benchmarks"].items():
        rows = detail_rows(list(read_records(out / bench["file"])), name, bench["samples_per_question"],
                           (questions or {}).get(name))
        path = out / "details" / model / date / f"details_{task_name(name)}_{date}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, path)
        details.append(path)
    return {"results": results_path, "details": details}
