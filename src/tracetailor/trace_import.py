"""`tracetailor import`: an existing trace dataset -> an SFT set in `select`'s format, with its funnel.

This is the paper's other arm: fine-tuning on a dataset's own traces (s1K-1.1's DeepSeek-R1
traces) instead of RSD traces. Each row's assistant text is assembled from fields:

- with `thinking_field`: "<think>\\n" + thinking + "\\n</think>\\n" + answer_prefix + response
  (the layout of s1K-1.1_tokenized once its markers are turned into Qwen3's tags);
- without it: the `response_field` text as it is.

In both, the two `think_markers` (s1K's `<|im_start|>think` and `<|im_start|>answer` by default)
become `<think>` and `</think>` wherever they occur. The prompt is the question under the
student's chat template and system message (`data.prompts.build_prompts`, as generate builds it);
a `prefill` that starts the assistant text is moved to the end of the prompt, as generate writes
it. Prompt and completion are tokenised separately (add_special_tokens=False) and the student's
EOS id ends the completion, as a finished trace ends.

Filters, each counted in the funnel (`<out>.funnel.json`, written after the set: the mark of a
finished set): an empty assistant text; a think block without exactly one `</think>`; more than
`max_length` tokens; with `correct_only`, an answer that does not match `gold_field`
(`evaluate.answers.check_answer` in `answer_mode`). Rows are kept in source order, one per row.

It does not sample, grade with an LLM judge, or train; it reads the whole source into memory.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .config import ImportConfig, SelectError
from .data.traces import AtomicWriter
from .evaluate.answers import check_answer, gold_answers, require_math_verify
from .select import THINK_END, THINK_START, funnel_path, split_chat_prompt

STEPS = (  # funnel key, label (select's labels where the filter is select's)
    ("empty", "empty assistant text"),
    ("think_tags", "thinking without exactly one </think>"),
    ("too_long", "longer than {max_length} tokens"),
    ("incorrect", "wrong answer (or none found)"),
    ("unverifiable", "no gold answer (dropped)"),
)


def convert_markers(text: str, markers: list[str]) -> str:
    """`text` with the two markers (start, end of the reasoning) replaced by <think> and </think>."""
    if not markers:
        return text
    start, end = markers
    return text.replace(start, THINK_START).replace(end, THINK_END)


def _text(row: dict, name: str, where: str, flag: str) -> str:
    if name not in row:
        raise SelectError(f"{where}: no field {name!r} (fields: {', '.join(map(str, row))}); name it with {flag}")
    value = row[name]
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)  # s1K's thinking_trajectories: a list of strings
    if not isinstance(value, str):
        raise SelectError(f"{where}: field {name!r} should be text, got {type(value).__name__}")
    return value


def assistant_text(row: dict, where: str, cfg: ImportConfig) -> str:
    """The assistant's whole turn for one row, markers converted (see the module docstring)."""
    response = _text(row, cfg.response_field, where, "--response-field")
    if cfg.thinking_field is None:
        return convert_markers(response, cfg.think_markers)
    thinking = _text(row, cfg.thinking_field, where, "--thinking-field")
    response = response.strip()
    if cfg.answer_prefix and cfg.answer_prefix.strip() not in response:
        response = cfg.answer_prefix + response
    text = f"{THINK_START}\n{thinking.strip()}\n{THINK_END}\n{response}"
    return convert_markers(text, cfg.think_markers)


def _tokenizer(cfg: ImportConfig):
    from .models import load_tokenizer

    return load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code, role="student")


def run_import(cfg: ImportConfig, log: Callable[[str], None] = print) -> dict:
    """Read the source, assemble and filter its rows, write `cfg.out` and `<out>.funnel.json`; the funnel."""
    from .data.prompts import DataError, HubOptions, build_prompts, load_rows
    from .data.rundir import RunDir

    cfg.validate()
    out = Path(cfg.out)
    if out.is_dir():
        raise SelectError(f"out: {out} is a directory; name a new .jsonl file")
    if cfg.correct_only and cfg.answer_mode != "strict-boxed":
        require_math_verify()
    source = cfg.source[0]
    try:
        rows, where = load_rows(source, split=cfg.split, hub=HubOptions(cfg.subset, cfg.revision, False, None))
    except DataError as e:
        raise SelectError(str(e)) from None
    rows = rows[: cfg.limit] if cfg.limit else rows
    tokenizer = _tokenizer(cfg)
    texts = [assistant_text(row, where(i), cfg) for i, row in enumerate(rows)]
    prompts = build_prompts(rows, where, tokenizer, prompt_field=cfg.prompt_field, id_field=cfg.id_field,
                            system_prompt=cfg.system_prompt, prefill=cfg.prefill, chat_template=cfg.chat_template)
    rundir = RunDir(out, command="import", file=out.name, owned=[out.name, funnel_path(out).name],
                    overwrite=cfg.overwrite, resumable=False, marker=funnel_path(out).name, run_json=None,
                    what="an SFT set", owned_noun="an SFT set", partial=f".{out.name}.partial")
    with rundir:
        with AtomicWriter(out) as sink:
            funnel = _write_rows(cfg, rows, where, texts, prompts, tokenizer, sink)
            rundir.started()
            rundir.begin()
        funnel.update({"out": str(out), "inputs": [source], "settings": asdict(cfg)})
        rundir.finish(funnel)
    log(format_import_funnel(funnel))
    return funnel


def _write_rows(cfg: ImportConfig, rows, where, texts, prompts, tokenizer, sink) -> dict:
    removed = {key: 0 for key, _ in STEPS}
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    kept = 0
    for row, text, prompt in zip(rows, texts, prompts):
        if cfg.prefill and text.startswith(cfg.prefill):
            text = text[len(cfg.prefill):]
        reason, predicted, ids = screen_row(cfg, row, cfg.prefill + text, text, tokenizer, len(prompt.token_ids))
        if reason:
            removed[reason] += 1
            continue
        sink.write(json.dumps(sft_row(cfg, row, prompt, text, ids + eos, predicted), ensure_ascii=False) + "\n")
        kept += 1
    return {"traces_read": len(rows), "removed": {**removed, "not_picked": 0}, "kept": kept,
            "kept_unverifiable": 0, "incorrect_with_no_answer_found": 0, "prompts": len(rows),
            "prompts_with_a_trace": kept, "prompts_left_with_none": len(rows) - kept, "grading": _grading(cfg)}


def _grading(cfg: ImportConfig) -> str:
    return f"strict ({cfg.answer_mode}, offline)" if cfg.correct_only else "none (every row kept unchecked)"


def screen_row(cfg: ImportConfig, row: dict, whole: str, completion: str, tokenizer,
               prompt_tokens: int) -> tuple[str | None, str | None, list[int]]:
    """(the first filter the row fails or None, the answer extracted, the completion's token ids)."""
    if not completion.strip():
        return "empty", None, []
    thinking = THINK_START in whole or THINK_END in whole
    if thinking and whole.count(THINK_END) != 1:
        return "think_tags", None, []
    ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if cfg.max_length is not None and prompt_tokens + len(ids) + 1 > cfg.max_length:
        return "too_long", None, ids
    if not cfg.correct_only:
        return None, None, ids
    golds = gold_answers(row.get(cfg.gold_field))
    if not golds:
        return "unverifiable", None, ids
    verdict = check_answer(whole, golds, cfg.answer_mode, thinking=thinking)
    return (None if verdict.correct else "incorrect"), verdict.extracted, ids


def sft_row(cfg: ImportConfig, row: dict, prompt, completion: str, completion_ids: list[int],
            predicted: str | None) -> dict:
    """One row in select's format (select.sft_row's fields; `mode` "import")."""
    turns, prefill = split_chat_prompt(prompt.text)
    turns = turns if turns is not None else [{"role": "user", "content": prompt.text}]
    out = {
        "messages": [*turns, {"role": "assistant", "content": prefill + completion}],
        "prompt": prompt.text,
        "completion": completion,
        "prompt_token_ids": prompt.token_ids,
        "completion_token_ids": completion_ids,
        "id": f"{prompt.prompt_id}/0",
        "prompt_id": prompt.prompt_id,
        "sample": 0,
        "predicted_answer": predicted,
        "mode": "import",
    }
    if cfg.gold_field:
        out[cfg.gold_field] = row.get(cfg.gold_field)
    return out


def format_import_funnel(funnel: dict) -> str:
    s = funnel["settings"]
    rows = [("rows read", funnel["traces_read"])]
    rows += [(f"- {label.format(**s)}", funnel["removed"][key]) for key, label in STEPS]
    rows += [("kept", funnel["kept"])]
    width = max(len(name) for name, _ in rows)
    lines = ["import funnel:"] + [f"  {name:<{width}}  {value:>7}" for name, value in rows]
    lines.append(f"grading: {funnel['grading']}")
    lines.append(f"wrote {funnel['kept']} rows to {funnel['out']}")
    return "\n".join(lines)


__all__ = ["ImportConfig", "assistant_text", "convert_markers", "format_import_funnel", "run_import"]
