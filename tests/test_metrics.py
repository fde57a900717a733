"""pass@k and majority@k (evaluate/metrics.py) on hand-computed cases, and in eval's summary."""

from __future__ import annotations

import itertools

import pytest

from tracetailor.evaluate.metrics import majority_at_k, mean_over_questions, pass_at_k


def test_pass_at_k_hand_computed():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(16, 0, 16) == 0.0 and pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(3, 2, 2) == 1.0  # fewer wrong samples than k: always a correct one
    for n, c in ((7, 3), (16, 5)):
        assert pass_at_k(n, c, 1) == pytest.approx(c / n)  # pass@1 is the share correct


def test_pass_at_k_equals_enumeration_of_subsets():
    grades = [True, False, False, True, False, False]
    for k in range(1, 7):
        subsets = list(itertools.combinations(grades, k))
        assert pass_at_k(6, 2, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_pass_at_k_bad_arguments():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_majority_at_k():
    answers = ["5", "7", "7", None, "5", "5"]
    correct = [True, False, False, False, True, True]
    assert majority_at_k(answers, correct, 3) is False  # 7 wins 2-1
    assert majority_at_k(answers, correct, 6) is True  # 5 wins 3-2
    assert majority_at_k(answers, correct, 5) is True  # 5 and 7 tie 2-2: the first seen (5) wins
    assert majority_at_k(["7", "5", "5", "7"], [False, True, True, False], 4) is False  # tie: 7 seen first
    assert majority_at_k([None, None], [False, False], 2) is False  # no answer does not vote
    assert majority_at_k([None, "3"], [False, True], 2) is True
    with pytest.raises(ValueError):
        majority_at_k(["1"], [True], 2)


def test_eval_summary_reports_both():
    pytest.importorskip("math_verify")
    from tracetailor.evaluate.benchmarks import Item
    from tracetailor.evaluate.metrics import summarize

    items = [Item(q, q, q, "5", "math") for q in ("a", "b", "c")]
    answers = {"a": ["5", "7", "7"], "b": ["5.", "5", "9"], "c": [None, "1", "2"]}
    recs = [{"question_id": q, "sample": s, "extracted": a, "correct": a in ("5", "5."), "finish_reason": "stop"}
            for q, ans in answers.items() for s, a in enumerate(ans)]
    recs.append({"question_id": "c", "sample": 3, "extracted": "5", "correct": True, "finish_reason": "stop"})
    s = summarize(recs, items, samples=3, thinking=False)  # sample 3 is past k and not counted
    assert s["k"] == 3 and s["questions_with_k_samples"] == 3
    assert s["pass_at_k"] == pytest.approx(2 / 3)  # a and b have a correct sample, c none
    assert s["majority_at_k"] == pytest.approx(1 / 3)  # a: 7 wins; b: "5." and "5" vote together; c: 1 (first seen)
    assert mean_over_questions([]) is None
