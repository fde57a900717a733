"""Final answers: pull one out of a completion, and grade it against a gold answer.

Shared by `select` (keep only correct traces) and `eval` (score a benchmark).
Extraction is plain text work: the last `\\boxed{}` after `</think>`, then a few
phrasings ("#### 42", "the final answer is 42", "Answer: 42"). Grading first tries
a cheap exact/numeric match, then math-verify (`pip install math-verify`), which
parses both sides into sympy and compares them (`\\frac12` == `0.5` == `1/2`).
`check_answer` names the whole procedure as a mode (ANSWER_MODES): today's
lenient extraction + math-verify, or the paper's strict `\boxed{}` extraction with
exact matching (and optionally math-verify), each optionally followed by an LLM
judge (judge.py) when the offline checks say no.
It knows nothing of files, records or models.

math-verify bounds its parsing with `signal.alarm`, which only works in the main
thread of a Unix process; elsewhere (a worker thread, Windows) we turn its
timeouts off rather than let it raise, so an expression that sympy chokes on can
then take long. That is math-verify's documented advice for threaded use.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import threading
from fractions import Fraction
from typing import Any, Iterable, NamedTuple

from ..errors import UserError

THINK_END = "</think>"
MATH_VERIFY_TIMEOUT_S = 5  # per parse / per comparison, main thread only


class MathVerifyMissing(UserError, ImportError, ValueError):
    """math-verify is not installed (a ValueError too, so the CLI prints it as a user error)."""


# ---------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_FALLBACKS = (  # by priority; within one, the last match wins
    re.compile(r"####\s*(.+)"),  # GSM8K
    re.compile(r"final answer\s*(?:is|:|=)\s*(.+)", re.IGNORECASE),
    re.compile(r"\bthe answer is\s*:?\s*(.+)", re.IGNORECASE),
    re.compile(r"\banswer\s*:\s*(.+)", re.IGNORECASE),
)
_MATH_SPAN = re.compile(r"^(?:\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\])")
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_NUMBER_THEN_WORDS = re.compile(r"^(-?\d[\d,]*(?:\.\d+)?)\s+[A-Za-z]")


def answer_region(completion: str, thinking: bool = True) -> str:
    """The part of a completion that holds the final answer: after the last `</think>` if thinking and present."""
    if thinking and THINK_END in completion:
        return completion.rsplit(THINK_END, 1)[1]
    return completion


def braced(text: str, start: int) -> str | None:
    """The content of the `{...}` group opening at `text[start]`, nested braces balanced; None if unclosed."""
    if start >= len(text) or text[start] != "{":
        return None
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\":  # `\{` and `\}` are literal braces, not grouping
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`) in `text`; None if none or unclosed."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    end = matches[-1].end()
    rest = text[end:].lstrip(" ")
    if rest.startswith("{"):
        return braced(rest, 0)
    if end < len(text) and text[end] == " ":  # `\boxed 5`
        token = re.match(r"[^\s$]+", rest)
        return token.group(0) if token else None
    return None


def _clean(answer: str) -> str | None:
    """A fallback phrase's answer: the leading math span if any, else up to the end of the sentence."""
    s = answer.replace("**", "").strip()
    span = _MATH_SPAN.match(s)
    if span:
        s = next(g for g in span.groups() if g is not None)
    else:
        s = _SENTENCE_END.split(s, 1)[0]
        s = re.sub(r"^\$(?=\d)", "", s)  # currency: "$18 a day"
        number_then_words = _NUMBER_THEN_WORDS.match(s)  # "42 apples", "9 so far"
        if number_then_words:
            s = number_then_words.group(1)
    s = s.strip().rstrip(".").strip()
    return s or None


def extract_answer(completion: str, thinking: bool = True) -> str | None:
    """The final answer in `completion`, or None.

    Looks only after the last `</think>` when `thinking` and one is present,
    else at the whole text (so a thinking completion cut off before `</think>`
    is searched whole: select drops those as malformed anyway). There: the last
    `\\boxed{}` (nested braces balanced, `\\fbox{}` too), else the last "#### X",
    "final answer is X", "the answer is X", "answer: X", in that order.
    """
    region = answer_region(completion, thinking)
    boxed = last_boxed(region)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    for pattern in _FALLBACKS:
        matches = pattern.findall(region)
        if matches:
            answer = _clean(matches[-1])
            if answer:
                return answer
    return None


_LETTER = r"\(?([A-J])\)?(?![A-Za-z0-9])"
_LETTER_PATTERNS = (
    re.compile(r"(?i:answer is)\s*:?\s*(?:\*\*)?\s*(?:\$)?" + _LETTER),
    re.compile(r"(?i:answer)\s*:\s*(?:\*\*)?\s*" + _LETTER),
)


def multiple_choice_letter(completion: str, thinking: bool = True) -> str | None:
    """The chosen option letter (A-J) of a multiple-choice answer: the last "answer is (X)", "Answer: X" or boxed letter."""
    region = answer_region(completion, thinking)
    found: list[tuple[int, str]] = []
    for pattern in _LETTER_PATTERNS:
        found += [(m.start(), m.group(1)) for m in pattern.finditer(region)]
    boxes = list(_BOXED.finditer(region))
    if boxes:
        content = last_boxed(region)
        letter = _strip_latex_text(content or "").strip().strip("()").strip()
        if re.fullmatch(r"[A-J]", letter):
            found.append((boxes[-1].start(), letter))
    return max(found)[1] if found else None


# ---------------------------------------------------------------- grading


def gold_answers(value: Any) -> list[str]:
    """The acceptable answers in a gold field: a string, a number, or a list of them; [] when there is none.

    A GSM8K-style solution ("... #### 42") gives what follows `####`; a MATH-style
    solution gives its last `\\boxed{}`.
    """
    if value is None or isinstance(value, bool):
        return []
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in gold_answers(v)]
    if isinstance(value, (int, float)):
        return [repr(value) if isinstance(value, float) else str(value)]
    if not isinstance(value, str):
        return []
    text = value.strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    elif _BOXED.search(text):
        text = (last_boxed(text) or text).strip()
    return [text] if text else []


_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def _strip_latex_text(s: str) -> str:
    return _TEXT_CMD.sub(r"\1", s)


def normalize(answer: str) -> str:
    """A cheap canonical form: no `$`, spaces, `\\text{}`, trailing `.`, thousands commas; `\\dfrac` -> `\\frac`."""
    s = _strip_latex_text(answer.strip())
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\[,;:! ]", "", s)  # LaTeX spacing
    s = re.sub(r"\s+", "", s).strip("$").rstrip(".")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    return s if "\\" in s else s.lower()


def _number(s: str) -> Fraction | None:
    try:
        return Fraction(s)  # "3", "-0.5", "1/2", "1e3"
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify():
    try:
        import math_verify
    except ImportError as e:
        raise MathVerifyMissing(
            "answer checking needs math-verify: pip install math-verify  (or pip install 'tracetailor[eval]')"
        ) from e
    return math_verify


def require_math_verify() -> None:
    """Fail early, with a clear message, when math-verify is missing."""
    _math_verify()


def _timeout_s() -> int | None:
    """math-verify's signal.alarm timeouts work only in a Unix main thread; None turns them off elsewhere."""
    if os.name == "posix" and threading.current_thread() is threading.main_thread():
        return MATH_VERIFY_TIMEOUT_S
    return None


@functools.lru_cache(maxsize=None)
def _accepts(func_name: str, param: str) -> bool:
    """Whether the installed math-verify's `func_name` takes `param` (older releases lack the timeout options)."""
    func = getattr(_math_verify(), func_name)
    return param in inspect.signature(func).parameters


@functools.lru_cache(maxsize=65536)
def _parse(text: str, timeout_s: int | None) -> tuple:
    mv = _math_verify()
    kwargs = {"parsing_timeout": timeout_s} if _accepts("parse", "parsing_timeout") else {}
    try:
        parsed = mv.parse(f"${text}$", **kwargs)
        if not parsed:  # plain expressions such as `1/2` with stray `$` inside
            parsed = mv.parse(text, **kwargs)
    except Exception:  # a timeout, or sympy failing on odd input: unparseable is not equal
        return ()
    return tuple(parsed)


def _verify(gold: str, predicted: str) -> bool:
    mv = _math_verify()
    timeout_s = _timeout_s()
    g, p = _parse(gold, timeout_s), _parse(predicted, timeout_s)
    if not g or not p:
        return False
    kwargs = {"timeout_seconds": timeout_s} if _accepts("verify", "timeout_seconds") else {}
    try:
        return bool(mv.verify(list(g), list(p), **kwargs))
    except Exception:
        return False


def is_correct(predicted: str | None, gold: Any) -> bool:
    """Whether `predicted` equals (any of) `gold`: exact after `normalize`, equal as numbers, or equal by math-verify.

    `gold` is a string, a number or a list (see `gold_answers`); no gold or no
    prediction is never correct. Needs math-verify unless the cheap match succeeds.
    """
    if predicted is None or not predicted.strip():
        return False
    pred = predicted.strip().strip("$").strip()
    return any(_equal(pred, g.strip("$").strip()) for g in gold_answers(gold))


def _equal(predicted: str, gold: str) -> bool:
    a, b = normalize(predicted), normalize(gold)
    if a == b:
        return True
    x, y = _number(a), _number(b)
    if x is not None and y is not None and (x == y or (x.denominator == 1 and y.denominator == 1)):
        return x == y  # two different integers: no need for sympy; other numbers may still match within rounding
    return _verify(gold, predicted)


def grade(completion: str, gold: Any, thinking: bool = True) -> tuple[str | None, bool]:
    """`extract_answer` then `is_correct`: (the answer found, whether it is right)."""
    predicted = extract_answer(completion, thinking)
    return predicted, is_correct(predicted, gold)


# ---------------------------------------------------------------- named checking modes

ANSWER_MODES = {  # name -> (extraction, equivalence after the exact match)
    "math-verify": ("lenient", "math-verify"),  # extract_answer + is_correct: the default, as before
    "strict-boxed": ("strict", None),  # the paper's: last \boxed{} after </think>, exact string match
    "strict-math-verify": ("strict", "math-verify"),  # the paper's extraction, then math-verify (offline)
}


class AnswerCheck(NamedTuple):
    """One answer's verdict: `how` names what decided it: exact | math-verify | judge | no-answer | no-gold."""

    correct: bool
    extracted: str | None
    how: str


def strict_boxed_answer(completion: str, thinking: bool = True) -> str | None:
    """The paper's extraction: the last `\\boxed{}` after the last `</think>`; no `</think>` (when
    thinking) or no box there means no answer. No fallback phrasings."""
    if thinking and THINK_END not in completion:
        return None
    boxed = last_boxed(answer_region(completion, thinking))
    return boxed.strip() if boxed is not None and boxed.strip() else None


def check_answer(completion: str, gold: Any, mode: str = "math-verify", judge=None,
                 question: str | None = None, thinking: bool = True) -> AnswerCheck:
    """Extract the answer of `completion` and grade it against `gold` in `mode` (see ANSWER_MODES).

    Order: an exact string match with any gold answer; then, in the math-verify modes, `is_correct`;
    then, when those fail and `judge` (an `evaluate.judge.LLMJudge`) is given, the judge, once per
    gold answer until one says equivalent. No answer or no gold is never correct (the judge is not asked).
    """
    if mode not in ANSWER_MODES:
        raise ValueError(f"answer mode {mode!r} is not one of {', '.join(ANSWER_MODES)}")
    extraction, equivalence = ANSWER_MODES[mode]
    extracted = (strict_boxed_answer if extraction == "strict" else extract_answer)(completion, thinking)
    golds = gold_answers(gold)
    if not golds:
        return AnswerCheck(False, extracted, "no-gold")
    if extracted is None:
        return AnswerCheck(False, None, "no-answer")
    if any(extracted == g.strip() for g in golds):
        return AnswerCheck(True, extracted, "exact")
    if equivalence == "math-verify" and is_correct(extracted, golds):
        return AnswerCheck(True, extracted, "math-verify")
    if judge is not None:
        return AnswerCheck(any(judge.equivalent(g, extracted, question) for g in golds), extracted, "judge")
    return AnswerCheck(False, extracted, equivalence or "exact")


__all__: Iterable[str] = (
    "ANSWER_MODES", "AnswerCheck", "MathVerifyMissing", "check_answer", "strict_boxed_answer", "answer_region", "braced", "extract_answer", "gold_answers", "grade", "is_correct",
    "last_boxed", "multiple_choice_letter", "normalize", "require_math_verify",
)
