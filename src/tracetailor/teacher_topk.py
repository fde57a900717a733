"""The teacher's top-K for data that already exists (`score --save-teacher-topk K --teacher T`).

A teacher-forced pass of the teacher over each example's tokens (prompt + completion, in student ids)
gives, at every completion token, the teacher's K likeliest tokens with a student counterpart and their
log-probs (temperature 1): the same rows `generate --save-teacher-topk` stores while it decodes, so
`train --loss kd` takes either. When the teacher's tokenizer differs, the example is fed to it through the
vocabulary bridge (vocab.py): each student token as its expansion in teacher ids, and the teacher's
prediction of student token j is read at the last teacher position of the tokens before it, as the engine
reads it while generating; teacher tokens with no student counterpart are left out before the top-K cut.

It does not generate, and it writes nothing: score writes the rows (data/topk.py's layout and schema
metadata) to OUT/teacher_topk/<name>.topk.parquet.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .data.prompts import DataError


class TeacherTopkError(DataError):  # a UserError
    """An example cannot be fed to the teacher (too long for its context); the message names it."""


def teacher_view(student_ids: Sequence[int], prompt_len: int, bridge) -> tuple[list[int], list[int]]:
    """(the teacher's input ids, per completion token the teacher position whose logits predict it)."""
    if bridge is None or bridge.identity:
        return list(student_ids), list(range(prompt_len - 1, len(student_ids) - 1))
    ids: list[int] = []
    ends: list[int] = []  # teacher length after each student token
    for sid in student_ids:
        ids.extend(bridge.to_teacher([sid]))
        ends.append(len(ids))
    return ids, [ends[j - 1] - 1 for j in range(prompt_len, len(student_ids))]


def teacher_topk_rows(teacher, bridge, examples: Sequence, k: int, batch_tokens: int = 16384,
                      on_example: Callable[[], None] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per example (objects with prompt_ids, completion_ids, at): ([n, k] int32 student ids, [n, k] float16
    log-probs) of the teacher (a models.LoadedModel) at its n completion tokens."""
    import torch

    device = next(teacher.model.parameters()).device
    unmapped = t2s = None
    if bridge is not None and not bridge.identity:
        t2s = bridge.teacher_to_student.to(device)
        unmapped = t2s < 0
    context = teacher.context_length
    views = [teacher_view(ex.prompt_ids + ex.completion_ids, len(ex.prompt_ids), bridge) for ex in examples]
    for ex, (ids, _) in zip(examples, views):
        if context and len(ids) > context:
            raise TeacherTopkError(f"{ex.at}: {len(ids)} teacher tokens, more than the teacher's context ({context}); "
                                   "lower --max-length")
    order = sorted(range(len(examples)), key=lambda i: len(views[i][0]))
    out: list = [None] * len(examples)
    start = 0
    while start < len(order):
        width, stop = 0, start
        while stop < len(order) and (stop == start or max(width, len(views[order[stop]][0])) * (stop - start + 1)
                                     <= batch_tokens):
            width = max(width, len(views[order[stop]][0]))
            stop += 1
        batch = order[start:stop]
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(batch):
            ids[r, : len(views[i][0])] = torch.tensor(views[i][0])
            mask[r, : len(views[i][0])] = 1
        with torch.inference_mode():
            logits = teacher.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            for r, i in enumerate(batch):
                logp = logits[r, views[i][1]].float().log_softmax(-1)
                if unmapped is not None:
                    logp = logp.masked_fill(unmapped[: logp.shape[-1]], float("-inf"))
                lp, top = logp.topk(min(k, logp.shape[-1]), dim=-1)
                if t2s is not None:
                    top = t2s[top]
                out[i] = (top.to(torch.int32).cpu().numpy(), lp.to(torch.float16).cpu().numpy())
                if on_example:
                    on_example()
        start = stop
    return out
