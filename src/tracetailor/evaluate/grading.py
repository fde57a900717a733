"""Gradings: which procedure decides that an answer is correct, and the judge prompt of the paper's.

Two gradings, the same names on `select` and `eval` (`--grading`):

- ``strict`` (the default, offline): answers.check_answer in the command's answer mode; the gold
  answer is first pulled out of the reference (answers.gold_answers); an LLM judge is asked only
  when one is configured and the offline checks say no.
- ``paper``: the authors' protocol (docs/paper.md, "Grading"). Nothing is pulled out of the
  reference: the judge is shown the reference field as it is. In `eval` it is also shown the whole
  completion, cut-off ones too (their eval.py); in `select` the last \\boxed{} after `</think>` is
  compared with the reference for an exact match first and, failing that, shown to the judge (their
  datagen.py). Needs a judge (`--judge-url`, `--judge-model`).

The prompt is ours (`PAPER_JUDGE_PROMPT`) unless `--judge-prompt FILE` gives one; a prompt holds
`{reference}` and `{completion}` (and may hold `{question}`), filled in by plain replacement, so
LaTeX braces elsewhere in it need no escaping. The reply is read by `parse_verdict`: the last
yes/no/true/false after any `</think>`; anything else is "incorrect".

It sends nothing itself: `paper_judge` hands the prompt and the verdict reader to the judge's client
(judge.py, `LLMJudge`), whose batching and cache stay as they are. It reads no records.

eval's grading of one completion lives here too: `grade_sample` (strict) and `grade_paper` (paper), each a
`Verdict`; the eval command (evaluation.py) samples, writes and summarizes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .answers import THINK_END, check_answer, extract_answer, is_correct, multiple_choice_letter
from .benchmarks import Item

GRADINGS = ("strict", "paper")

PAPER_JUDGE_PROMPT = """Grade a model's output against a reference.
{question}
Reference (a bare answer, or a worked solution whose final result is the answer):
{reference}

Model output (it may show its reasoning first, and it may stop before it is finished):
{completion}

Does the model's output reach a final answer equivalent to the reference's final answer? Equivalent forms of the \
same value, expression, set or choice count as equal. Reply with one word: YES or NO."""

_PLACES = ("{reference}", "{completion}")


class JudgePromptError(UserError, ValueError):
    """A --judge-prompt file that cannot be used; one line naming the file."""


def load_judge_prompt(path: str | None) -> str:
    """The prompt template: ours for None, else the file's text (which must hold {reference} and {completion})."""
    if path is None:
        return PAPER_JUDGE_PROMPT
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JudgePromptError(f"judge_prompt: cannot read {p} ({getattr(e, 'strerror', None) or e}); give a UTF-8 "
                               "text file") from None
    missing = [s for s in _PLACES if s not in text]
    if missing:
        raise JudgePromptError(f"judge_prompt: {p} has no {' or '.join(missing)}; the prompt must hold both "
                               "{reference} and {completion} (and may hold {question})")
    return text


def render_judge_prompt(template: str, reference: str, completion: str, question: str | None = None) -> str:
    """`template` with its places filled in; {question} becomes "Question: ..." or nothing."""
    asked = f"Question: {question}\n" if question else ""
    return (template.replace("{question}", asked).replace("{reference}", reference)
            .replace("{completion}", completion))


def parse_verdict(reply: str) -> bool:
    """YES/true -> True; NO/false or anything else -> False; the last such word after any `</think>` wins."""
    words = re.findall(r"\b(yes|no|true|false)\b", reply.rsplit("</think>", 1)[-1], re.IGNORECASE)
    return bool(words) and words[-1].lower() in ("yes", "true")


def paper_judge(judge, judge_prompt: str | None = None):
    """`judge` (evaluate.judge.LLMJudge) set up for the paper's grading: its questions written with our prompt
    or the file's (`load_judge_prompt`, read here, so a bad file fails before any work), its replies read by
    `parse_verdict`. Then `judge.equivalent(reference, completion, question)` asks as the paper's grading does,
    through the client's batching and cache (a different prompt is a different cache key)."""
    template = load_judge_prompt(judge_prompt)
    judge.make_prompt = lambda reference, completion, question=None: render_judge_prompt(
        template, reference, completion, question)
    judge.read_verdict = parse_verdict
    return judge


def reference_text(value) -> str:
    """A reference field as the judge sees it: a string as it is, a list joined by " or ", None as ""."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " or ".join(reference_text(v) for v in value)
    return str(value)


def grading_label(grading: str, answer_mode: str, judge, judge_prompt: str | None) -> str:
    """What made a number, for summaries and funnels."""
    if grading == "paper":
        prompt = judge_prompt or "ours"
        return f"paper (the authors' protocol; judge {getattr(judge, 'model', '?')}, prompt: {prompt})"
    return f"strict ({answer_mode}, offline" + (f", then judge {judge.model})" if judge is not None else ")")


__all__ = ["GRADINGS", "JudgePromptError", "PAPER_JUDGE_PROMPT", "grading_label", "load_judge_prompt", "paper_judge",
           "parse_verdict", "reference_text", "render_judge_prompt"]


@dataclass
class Verdict:
    extracted: str | None  # the answer found (math) or the letter (choice); None if none
    correct: bool
    think_closed: bool | None  # thinking runs: whether `</think>` came; None without thinking
    truncated_before_answer: bool  # thinking runs: cut by the token limit before `</think>`


def grade_sample(completion: str, gold: str, answer_type: str, thinking: bool, finish_reason: str,
                 answer_mode: str = "math-verify", judge=None, question: str | None = None) -> Verdict:
    """Grade one completion: the last `\\boxed{}` after `</think>` (math, by math-verify; another `answer_mode`
    or an LLM `judge` goes through `check_answer`, e.g. the paper's strict-math-verify) or the chosen letter."""
    if thinking and THINK_END not in completion:
        return Verdict(None, False, False, finish_reason == "length")
    closed = True if thinking else None
    if answer_type == "choice":
        letter = multiple_choice_letter(completion, thinking)
        return Verdict(letter, letter is not None and letter.upper() == gold.strip().upper(), closed, False)
    if answer_mode != "math-verify" or judge is not None:
        check = check_answer(completion, gold, answer_mode, judge=judge, question=question, thinking=thinking)
        return Verdict(check.extracted, check.correct, closed, False)
    answer = extract_answer(completion, thinking)
    return Verdict(answer, is_correct(answer, gold), closed, False)


def grade_paper(completion: str, item: Item, thinking: bool, judge) -> Verdict:
    """The authors' eval grading (their eval.py): the judge (set up by `grading.paper_judge`) sees the whole
    completion, cut-off ones too, and the benchmark's reference as it is (`Item.reference`); `extracted` is our
    extraction, kept for the votes only."""
    closed = (THINK_END in completion) if thinking else None
    extracted = (multiple_choice_letter(completion, thinking) if item.answer_type == "choice"
                 else extract_answer(completion, thinking))
    correct = judge.equivalent(item.reference or item.gold, completion, item.question)
    return Verdict(extracted, correct, closed, False)
