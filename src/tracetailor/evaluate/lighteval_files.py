"""eval's results also in the layout lighteval writes, for the dashboards and comparison scripts made for it.

Beside our per-sample JSONL and summary.json, `write_lighteval_files` puts under OUT:

- results/<model>/results_<date>.json with lighteval's top-level keys: "config_general" (model,
  times, generation settings), "results" ({task: {metric: value, metric_stderr: ...}} and "all",
  the mean over tasks), "versions", "config_tasks", "summary_tasks", "summary_general";
- details/<model>/<date>/details_<task>_<date>.parquet, one row per question with lighteval's
  columns: "doc" (query, choices, gold_index, task_name, specific), "model_response" (the text of
  every sample and the answer extracted from each) and "metric" (the question's scores).

<date> is the finish time as lighteval spells it (ISO 8601 with ":" as "-"), a task is named
"tracetailor|<benchmark>|0" (suite|task|few-shot count), <model> is a hub id as given or a local
model's directory name. Metrics: "acc" is our accuracy (mean over questions of the per-question
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

SUITE = "tracetailor"


def date_id(when: float) -> str:
    """A time as lighteval names its files: 2026-12-02T02-45-10.123456."""
    return datetime.fromtimestamp(when).isoformat().replace(":", "-")


def task_name(benchmark: str) -> str:
    return f"{SUITE}|{benchmark}|0"


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
            "lighteval_sha": None, "tracetailor_version": run["versions"].get("tracetailor"), "num_fewshot_seeds": 1,
            "max_samples": cfg.get("limit"), "job_id": "0", "start_time": started, "end_time": ended,
            "total_evaluation_time_secondes": str(ended - started), "model_name": summary["model"],
            "model_sha": "", "model_dtype": cfg.get("dtype"), "model_size": "",
            "generation_parameters": {k: cfg.get(k) for k in ("temperature", "top_p", "top_k", "max_new_tokens",
                                                               "seed")},
            "system_prompt": cfg.get("system_prompt"), "prefill": summary["prefill"], "samples": cfg.get("samples"),
        },
        "results": {**results, "all": _mean_of_tasks(results)},
        "versions": {**{t: 0 for t in results}, "all": 0},
        "config_tasks": {task_name(n): {"name": n, "suite": [SUITE], "hf_repo": b["source"],
                                        "evaluation_splits": ["test"], "metrics": list(task_results(b)),
                                        "num_samples": [b["samples_per_question"]],
                                        "original_num_docs": b["questions_asked"], "effective_num_docs": b["questions"],
                                        "version": 0} for n, b in benches.items()},
        "summary_tasks": counts,
        "summary_general": {key: sum(c[key] for c in counts.values())
                            for key in ("truncated", "non_truncated", "padded", "non_padded", "num_truncated_few_shots")},
        "versions_of_tools": run["versions"],
    }


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
                    "task_name": task_name(benchmark),
                    "specific": {"question_id": qid, "options": first.get("choices")}},
            "model_response": {"text": [r["completion"] for r in recs],
                               "text_post_processed": [r["extracted"] for r in recs],
                               "finish_reason": [r["finish_reason"] for r in recs],
                               "output_tokens_count": [r["completion_tokens"] for r in recs]},
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
