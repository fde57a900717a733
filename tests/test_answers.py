"""Answer extraction and grading (evaluate/answers.py): the forms select and eval rely on."""

from __future__ import annotations

import threading

import pytest

from tracetailor.evaluate.answers import (
    extract_answer,
    gold_answers,
    is_correct,
    last_boxed,
    multiple_choice_letter,
    normalize,
)

pytest.importorskip("math_verify")


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>\nlet me see\n</think>\n\nSo \\boxed{5}.", "5"),
        ("<think>maybe \\boxed{3}</think>\nThe answer is \\boxed{4}.", "4"),  # after </think> wins
        ("<think>so it is \\boxed{3}</think>\nI am not sure.", None),  # boxed only inside thinking
        ("</think>\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),  # nested braces
        ("</think>\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the group
        ("</think>\\fbox{x^{2}+1}", "x^{2}+1"),
        ("</think> first \\boxed{1}, then \\boxed{2}", "2"),  # the last one
        ("</think>\\boxed 7", "7"),
        ("<think>adding</think>\nJanet has 16 - 3 - 4 = 9 eggs.\n#### 42", "42"),  # GSM8K style
        ("</think>The final answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("</think>**Final Answer:** 12", "12"),
        ("</think>So the answer is 3.5. Done.", "3.5"),
        ("</think>Answer: 17", "17"),
        ("</think>nothing to see", None),
        ("", None),
        # truncated before </think>: the whole text is searched (select drops these as malformed anyway)
        ("<think>\nFirst, 2+2 = 4, so maybe \\boxed{4", None),
        ("<think>\nhmm, the answer is 9 so far", "9"),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_extract_answer_without_thinking_uses_the_whole_text():
    text = "work \\boxed{3} </think> words"
    assert extract_answer(text, thinking=True) is None
    assert extract_answer(text, thinking=False) == "3"


def test_last_boxed_unclosed_is_none():
    assert last_boxed("\\boxed{\\frac{1}{2}") is None
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    "predicted, gold",
    [
        ("\\frac12", "0.5"),
        ("\\frac{1}{2}", "1/2"),
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac{3}{4}", "0.75"),
        ("10\\%", "10"),
        ("1,000", "1000"),
        ("$42$", "42"),
        ("42.", "42"),
        ("\\text{Tuesday}", "Tuesday"),
        ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
        ("x = 3", "3"),
        ("\\{2, 1\\}", "\\{1,2\\}"),
    ],
)
def test_equivalent_forms_are_correct(predicted, gold):
    assert is_correct(predicted, gold)


@pytest.mark.parametrize("predicted, gold", [("3", "4"), ("\\frac{1}{3}", "0.5"), ("x", "y"), (None, "1"), ("", "1"), ("1", None)])
def test_different_answers_are_not(predicted, gold):
    assert not is_correct(predicted, gold)


def test_boxed_answer_from_a_completion_grades_against_a_decimal():
    assert is_correct(extract_answer("</think>\\boxed{\\dfrac{3}{4}}"), "0.75")
    assert is_correct(extract_answer("</think>\\boxed{\\frac{\\sqrt{2}}{2}}"), "\\frac{\\sqrt 2}{2}")


def test_gold_answers_forms():
    assert gold_answers("Natalia sold 48/2 = 24 clips.\n#### 72") == ["72"]
    assert gold_answers("so $x = \\boxed{\\frac{1}{2}}$.") == ["\\frac{1}{2}"]
    assert gold_answers(5) == ["5"]
    assert gold_answers(["1", 2]) == ["1", "2"]
    assert gold_answers(None) == [] and gold_answers("  ") == []
    assert is_correct("72", "Natalia sold 48/2 = 24 clips.\n#### 72")
    assert is_correct("2", ["1", "2"])


def test_normalize():
    assert normalize(" $1,234.$ ") == "1234"
    assert normalize("\\text{ B }") == "b"
    assert normalize("\\left( 1, 2 \\right)") == "(1,2)"


def test_grading_works_outside_the_main_thread():
    """math-verify's signal-based timeouts fail in threads; we switch them off there."""
    results = []
    worker = threading.Thread(target=lambda: results.append(is_correct("\\frac{2}{4}", "\\sqrt{1/4}")))
    worker.start()
    worker.join(30)
    assert results == [True]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("</think>The answer is (C).", "C"),
        ("</think>the answer is (A), no wait, the answer is (D)", "D"),
        ("</think>\\boxed{B}", "B"),
        ("</think>\\boxed{\\text{(B)}}", "B"),
        ("</think>Answer: **A**", "A"),
        ("<think>the answer is (A)</think> I cannot tell.", None),
        ("</think>The answer is Apple", None),
    ],
)
def test_multiple_choice_letter(completion, expected):
    assert multiple_choice_letter(completion) == expected
