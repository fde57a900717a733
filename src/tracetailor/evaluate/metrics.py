"""Benchmark scores beyond mean accuracy: pass@k and majority@k.

Pure functions of per-sample facts (the answer extracted, whether it was graded
correct); eval's summary calls them per question and averages over questions.
They do not grade, read files or know about benchmarks.

pass@k is the unbiased estimator of Chen et al. (2021, "Evaluating Large Language
Models Trained on Code"): with n samples of which c are correct, the chance that
k drawn without replacement hold at least one correct one, 1 - C(n-c, k) / C(n, k).
majority@k takes the first k samples, votes among their extracted answers (no
answer does not vote), and is right when the winning answer was graded correct;
equal votes go to the answer seen first, so the result does not depend on dict order.
"""

from __future__ import annotations

from collections import Counter
from math import comb
from typing import Sequence


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
