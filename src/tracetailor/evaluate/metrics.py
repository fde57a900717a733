"""A benchmark's scores from its graded samples: accuracy over questions and its error, pass@k, majority@k.

Pure functions of per-sample facts (the answer extracted, whether it was graded
correct); eval's summary calls them per question and averages over questions.
They do not grade or read files. `summarize` turns one benchmark's graded sample
records into its scores (accuracy over questions and its standard error, see
evaluation.py's docstring; pass@k, majority@k and the counts).

pass@k is the unbiased estimator of Chen et al. (2021, "Evaluating Large Language
Models Trained on Code"): with n samples of which c are correct, the chance that
k drawn without replacement hold at least one correct one, 1 - C(n-c, k) / C(n, k).
majority@k takes the first k samples, votes among their extracted answers (no
answer does not vote), and is right when the winning answer was graded correct;
equal votes go to the answer seen first, so the result does not depend on dict order.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from math import comb
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .answers import normalize

if TYPE_CHECKING:
    from .benchmarks import Item


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of the n samples, drawn without replacement, hold a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> bool:
    """Whether the most common answer among the first k samples is a correct one (False when none answered)."""
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} grades")
    if not 1 <= k <= len(answers):
        raise ValueError(f"majority@k needs 1 <= k <= {len(answers)} samples, got k={k}")
    votes = Counter(a for a in answers[:k] if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers[:k] if a is not None and votes[a] == top)  # ties: first seen
    return bool(correct[answers.index(winner)])


def mean_over_questions(per_question: Sequence[float | bool]) -> float | None:
    return sum(per_question) / len(per_question) if per_question else None


__all__ = ["majority_at_k", "mean_over_questions", "pass_at_k"]


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
