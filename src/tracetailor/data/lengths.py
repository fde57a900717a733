"""Fitting prompt + completion token sequences into a length limit (shared by score and train)."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

E = TypeVar("E")  # a dataclass with prompt_ids and completion_ids (and maybe a `truncated` flag)


def fit_to_length(examples: list[E], max_length: int) -> tuple[list[E], int, int]:
    """Cut completions so that prompt + completion <= max_length (the end goes); drop examples whose
    prompt alone fills it. Returns the examples kept (cut ones are new objects, flagged `truncated`
    when they have that field) and the numbers cut and dropped."""
    kept, cut, dropped = [], 0, 0
    for ex in examples:
        room = max_length - len(ex.prompt_ids)
        if room < 1:
            dropped += 1
            continue
        if len(ex.completion_ids) > room:
            changes = {"completion_ids": ex.completion_ids[:room]}
            if hasattr(ex, "truncated"):
                changes["truncated"] = True
            ex = dataclasses.replace(ex, **changes)
            cut += 1
        kept.append(ex)
    return kept, cut, dropped
