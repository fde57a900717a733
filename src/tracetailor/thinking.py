"""`</think>` and the chat-end token counted by token id, not by text.

In Qwen3 `</think>` is one added token. RSD can also write it as ordinary tokens
(the teacher proposes `</`, `think`, `>` and the student accepts them): the text
then reads `</think>` but the model never closed its thought. The paper keeps a
trace only when its ids hold the `</think>` id exactly once and hold `<|im_end|>`.
`count_think_marks` gives those facts for one completion; `ThinkIds.of` finds the
ids in a tokenizer. Select's filters use them (select.py).

It reads token ids and a tokenizer only: no files, records or models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

from .errors import UserError

THINK_END = "</think>"
CHAT_END = "<|im_end|>"


class ThinkIdsError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class ThinkIds:
    """The special `</think>` id and the chat-end id (`<|im_end|>`, else the tokenizer's EOS)."""

    think_end: int | None
    chat_end: int | None

    @classmethod
    def of(cls, tokenizer) -> "ThinkIds":
        vocab = tokenizer.get_vocab()  # added tokens included: a hit is a single token
        chat_end = vocab.get(CHAT_END, tokenizer.eos_token_id)
        return cls(vocab.get(THINK_END), chat_end)


class ThinkMarks(NamedTuple):
    """What one completion's ids say about its end of thinking and its end of turn."""

    special: int  # `</think>` as its one special id
    spelled: int  # the text `</think>` made of ordinary tokens
    chat_end: bool  # the chat-end id (`<|im_end|>`) is among the ids
    last_id: int | None  # the last id: for a stopped sequence, the token that stopped it


def count_think_marks(ids: Sequence[int], tokenizer, think_ids: ThinkIds | None = None) -> ThinkMarks:
    """Count `</think>` in `ids` by id and, separately, spelled out in ordinary tokens.

    The spelled-out count decodes the runs of ids between special `</think>` ids one by one, so
    a special id never joins its neighbours' text into a false match."""
    think_ids = think_ids or ThinkIds.of(tokenizer)
    ids = list(ids)
    runs: list[list[int]] = [[]]
    for token in ids:
        if token == think_ids.think_end:
            runs.append([])
        else:
            runs[-1].append(token)
    spelled = sum(tokenizer.decode(run, skip_special_tokens=False).count(THINK_END) for run in runs if run)
    return ThinkMarks(special=len(runs) - 1, spelled=spelled,
                      chat_end=think_ids.chat_end is not None and think_ids.chat_end in ids,
                      last_id=ids[-1] if ids else None)


def text_after_think_end(ids: Sequence[int], tokenizer, think_ids: ThinkIds) -> str | None:
    """The decoded text after the last special `</think>` id (the answer region), None if there is none.
    A spelled-out `</think>` there is ordinary answer text."""
    ids = list(ids)
    if think_ids.think_end not in ids:
        return None
    cut = len(ids) - ids[::-1].index(think_ids.think_end)
    return tokenizer.decode(ids[cut:], skip_special_tokens=True)


def student_of_traces(trace_path: Path) -> str:
    """The student model that wrote a trace file, from the `run.json` beside it (generate's output dir)."""
    run_json = trace_path.parent / "run.json"
    try:
        student = json.loads(run_json.read_text(encoding="utf-8"))["models"]["student"]
    except (OSError, ValueError, KeyError, TypeError):
        student = None
    if not isinstance(student, str) or not student:
        raise ThinkIdsError(f"tokenizer auto: no student named in {run_json}; "
                            "give the student's tokenizer with --tokenizer (a hub id or a directory)")
    return student


__all__ = ["ThinkIds", "ThinkIdsError", "ThinkMarks", "count_think_marks", "student_of_traces", "text_after_think_end"]
